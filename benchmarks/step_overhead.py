"""Step time and memory of AmalgamOptimizer against torch.optim.AdamW(foreach=True), side by side.

    python benchmarks/step_overhead.py            # 1M, 10M, 25M parameters (a few minutes on 2 cores)
    python benchmarks/step_overhead.py --quick    # small sizes, few repeats (< 1 minute)
    python benchmarks/step_overhead.py --student lean   # the lean student: compiled and eager steps vs AdamW
    python benchmarks/step_overhead.py --student normalized --threads 1   # the normalized student vs AdamW
    python benchmarks/step_overhead.py --student normalized --harness     # ... with its harness, beside Muon
    python benchmarks/step_overhead.py --device cuda --dtype bfloat16   # both students vs AdamW on a GPU

Only the optimizer step is timed (gradients are fixed random tensors; no forward/backward), after warm-up
steps and with ``warmup_steps=0`` so the learned (LSTM) branch runs.  Floors for the RNNProp student:

* arithmetic: its matmul FLOPs per coordinate over the throughput torch reaches on the student's own shapes
  ([chunk, 22] x [22, 80], [chunk, 40] x [40, 80], [chunk, 20] x [20, 1]): the time of those matmuls alone;
* memory traffic: bytes read and written per coordinate (its 82 float32 of state, the gradient and the
  parameter) over the measured copy bandwidth.

Peak temporary memory of a step is the rise of the process's peak RSS during one step once the state exists
(Linux: peak reset through /proc/self/clear_refs, and glibc told to mmap every allocation over 64 kB so freed
buffers leave the RSS and the next step's buffers show up again; elsewhere the lifetime peak).
Prints only; no assertions.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from amalgam_plugin.heldout.train import MuonAdamW
from amalgam_plugin.hub import load_student
from amalgam_plugin.optim import AmalgamOptimizer
from amalgam_plugin.students import Lean, RNNProp
from amalgam_plugin.students.normalized import Normalized, NormalizedConfig
from amalgam_plugin.students.rnnprop_kernel import CPU_CHUNK, RNNPropKernel

MB = 1024**2
SKETCH_RANK = 32  # the sketched column: normalized-choice-modern-sketch's ns_rank


def paper_student() -> RNNProp:
    """The bundled student with the paper's choice-large weights (the timing does not depend on the values)."""
    return load_student("paper-choice-large")


def mlp(width: int, depth: int) -> nn.Module:
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))


def tensors(sizes: list[int]) -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(n)) for n in sizes]


def set_grads(params: list[torch.Tensor], seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2


def _read_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _mmap_large_allocations() -> None:
    """glibc otherwise raises its mmap threshold after a free and reuses resident heap pages unseen by RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixes it, no dynamic raise)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def peak_temp_mb(fn) -> float:
    """Rise of peak RSS above the RSS before ``fn`` (MB)."""
    gc.collect()
    if _reset_peak() and _read_kb("VmRSS") is not None:
        before = _read_kb("VmRSS")
        fn()
        return (_read_kb("VmHWM") - before) / 1024
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def median_time(fn, repeats: int, warm: int = 0) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def floors(student: RNNProp, chunk: int, repeats: int) -> dict[str, float]:
    """Per-coordinate arithmetic and memory-traffic floors (seconds) and the numbers behind them."""
    sizes = student.config.hidden_sizes
    shapes, ins = [], 2
    for u in sizes:
        shapes.append((ins + u, 4 * u))
        ins = u
    shapes.append((sizes[-1], 1))
    flops = sum(2 * k * n for k, n in shapes)
    seconds = 0.0
    for k, n in shapes:
        a, b, bias, out = torch.randn(chunk, k), torch.randn(k, n), torch.randn(n), torch.empty(chunk, n)
        seconds += median_time(lambda a=a, b=b, c=bias, o=out: torch.addmm(c, a, b, out=o), repeats, 2)
    src = torch.randn(64 * MB // 4)
    dst = torch.empty_like(src)
    copy_s = median_time(lambda: dst.copy_(src), repeats, 2)
    bandwidth = 2 * src.numel() * 4 / copy_s  # bytes read + written per second
    state_floats = 2 + 2 * sum(sizes)
    traffic = 4 * (2 * state_floats + 1 + 2)  # state read+write, grad read, param read+write
    return {"flops": flops, "gflops": flops * chunk / seconds / 1e9, "arith": seconds / chunk,
            "traffic": traffic, "bandwidth": bandwidth, "memory": traffic / bandwidth}


def bench_pair(params: list[torch.Tensor], student: RNNProp, repeats: int) -> dict[str, float]:
    """Time and memory of one step of each optimizer on the same parameters and gradients."""
    set_grads(params)
    out = {"n": sum(p.numel() for p in params)}
    for name, make in (
        ("amalgam", lambda: AmalgamOptimizer(params, student=student, warmup_steps=0)),
        ("adamw", lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True)),
    ):
        opt = make()
        opt.step()  # allocates the state and warms up; warmup_steps=0 so every step runs the learned branch
        out[f"{name}_s"] = median_time(opt.step, repeats if out["n"] < 20e6 else min(repeats, 2))
        out[f"{name}_temp_mb"] = peak_temp_mb(opt.step)
        out[f"{name}_state_bpp"] = state_bytes(opt) / out["n"]
        del opt
        gc.collect()
    return out


def bench_lean(params: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """AdamW (foreach), the lean student compiled and the lean student eager, one after another on the same
    parameters and gradients (the step's time does not depend on the student's weight values)."""
    student = Lean()
    student.reset_parameters(torch.Generator().manual_seed(0))
    set_grads(params)
    out = {"n": sum(p.numel() for p in params)}
    for name, mode in (("adamw", None), ("compiled", "always"), ("eager", "never")):
        os.environ["AMALGAM_COMPILE"] = mode or "auto"
        opt = (torch.optim.AdamW(params, lr=1e-3, foreach=True) if mode is None
               else AmalgamOptimizer(params, student=student, warmup_steps=0))
        opt.step()  # state, and the compiled kernel (paid once)
        out[f"{name}_s"] = median_time(opt.step, repeats, warm=1)
        out[f"{name}_temp_mb"] = peak_temp_mb(opt.step)
        out[f"{name}_state_bpp"] = state_bytes(opt) / out["n"]
        del opt
        gc.collect()
    os.environ.pop("AMALGAM_COMPILE")
    return out


def table(title: str, header: str, models: list[tuple[int, int]], bench, row) -> None:
    """One row per MLP of ``models``: ``row(bench(its parameters))``."""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {title}")
    print(header)
    print("-" * len(header))
    for width, depth in models:
        model = mlp(width, depth)
        print(row(bench(list(model.parameters()))))
        del model
        gc.collect()


def main_lean(models: list[tuple[int, int]], repeats: int) -> None:
    header = (f"{'params':>10} {'adamw ms':>9} {'lean compiled ms':>16} {'ratio':>6} {'lean eager ms':>13} "
              f"{'ratio':>6} {'state B/p lean':>14} {'adamw':>6} {'temp MB lean':>12} {'adamw':>6}")

    def row(r: dict) -> str:
        return (f"{r['n']:>10,} {r['adamw_s'] * 1e3:>9.1f} {r['compiled_s'] * 1e3:>16.1f} "
                f"{r['compiled_s'] / r['adamw_s']:>6.2f} {r['eager_s'] * 1e3:>13.1f} "
                f"{r['eager_s'] / r['adamw_s']:>6.2f} {r['compiled_state_bpp']:>14.0f} {r['adamw_state_bpp']:>6.0f} "
                f"{r['compiled_temp_mb']:>12.1f} {r['adamw_temp_mb']:>6.1f}")

    table("lean student (4 floats of state per parameter); each row: medians of the same steps, side by side",
          header, models, lambda params: bench_lean(params, repeats), row)


def bench_normalized(params: list[torch.Tensor], repeats: int, harness: bool) -> dict[str, float]:
    """AdamW (foreach), the normalized student bare, sized (``adamw_size``, AdamW's step size: one more pass per
    tensor; with ``adamw_1d``: the harness without Newton-Schulz), sketched (sized with Newton-Schulz on each
    matrix's ``SKETCH_RANK`` strongest directions, ``ns_steps`` 2) and (``harness``) with its whole harness beside
    Muon (torch's, on the matrices, AdamW on the rest: the same Newton-Schulz iterations), on the same parameters
    and gradients; every time the median of ``repeats`` steps."""
    set_grads(params)
    out = {"n": sum(p.numel() for p in params), "harness_s": math.nan, "muon_s": math.nan}
    matrices = [p for p in params if p.ndim == 2]
    makers = {"adamw": lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True),
              "bare": lambda: AmalgamOptimizer(params, student=Normalized()),
              "sized": lambda: AmalgamOptimizer(params, student=Normalized(NormalizedConfig(adamw_size=True,
                                                                                             adamw_1d=True))),
              "sketched": lambda: AmalgamOptimizer(params, student=Normalized(NormalizedConfig(
                  orthogonalize=True, adamw_1d=True, adamw_size=True, ns_steps=2, ns_rank=SKETCH_RANK))),
              "harness": lambda: AmalgamOptimizer(params, student=Normalized(NormalizedConfig(
                  orthogonalize=True, adamw_1d=True, weight_decay=0.1))),
              "muon": lambda: MuonAdamW(matrices, [p for p in params if p.ndim != 2], lr=0.02)}
    if not harness:
        makers.pop("harness")
        makers.pop("muon")
    for name, make in makers.items():
        opt = make()
        opt.step()  # the state
        out[f"{name}_s"] = median_time(opt.step, repeats, warm=1)
        out[f"{name}_temp_mb"] = peak_temp_mb(opt.step)
        out[f"{name}_state_bpp"] = state_bytes(opt) / out["n"]
        del opt
        gc.collect()
    return out


def main_normalized(models: list[tuple[int, int]], repeats: int, harness: bool) -> None:
    header = (f"{'params':>10} {'adamw ms':>9} {'bare ms':>8} {'ratio':>6} {'sized ms':>8} {'ratio':>6} "
              f"{'sketch ms':>9} {'ratio':>6} {'harness ms':>10} {'ratio':>6} "
              f"{'muon ms':>9} {'ratio':>6} {'state B/p':>9} {'adamw':>6} {'ratio':>6} {'temp MB':>8} {'sized':>6} "
              f"{'adamw':>6}")

    def row(r: dict) -> str:
        ms = {k: r[f"{k}_s"] * 1e3 for k in ("adamw", "bare", "sized", "sketched", "harness", "muon")}
        cells = [f"{r['n']:>10,}", f"{ms['adamw']:>9.1f}"]
        for name, width in (("bare", 8), ("sized", 8), ("sketched", 9), ("harness", 10), ("muon", 9)):
            cells += [f"{ms[name]:>{width}.1f}", f"{ms[name] / ms['adamw']:>6.2f}"]
        state = (r["bare_state_bpp"], r["adamw_state_bpp"])
        cells += [f"{state[0]:>9.0f}", f"{state[1]:>6.0f}", f"{state[0] / state[1]:>6.2f}",
                  f"{r['bare_temp_mb']:>8.1f}", f"{r['sized_temp_mb']:>6.1f}", f"{r['adamw_temp_mb']:>6.1f}"]
        return " ".join(cells)

    table(f"normalized student (4 floats of state per parameter), bare, sized (adamw_size, adamw_1d), sketched "
          f"(sized, Newton-Schulz 2 on {SKETCH_RANK} directions), with its whole harness, and Muon; each time the "
          f"median of {repeats} steps, side by side", header, models,
          lambda params: bench_normalized(params, repeats, harness), row)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main_device(models: list[tuple[int, int]], repeats: int, device: torch.device, dtype: torch.dtype) -> None:
    """On a GPU: AdamW (foreach), the RNNProp student and the lean student, step time (synchronised), state and
    the peak rise of allocated memory during one step (0 on the CPU, where the tests run this table)."""
    cuda = device.type == "cuda"
    lean = Lean()
    lean.reset_parameters(torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if cuda else 'CPU'}, {dtype}; each "
          "row: medians of the same steps, side by side")
    header = (f"{'params':>10} {'adamw ms':>9} {'rnnprop ms':>10} {'ratio':>6} {'lean ms':>8} {'ratio':>6} "
              f"{'state B/p rnnprop':>17} {'lean':>5} {'adamw':>6} {'temp MB rnnprop':>15} {'lean':>6}")
    print(header)
    print("-" * len(header))

    def timed(step) -> float:
        def run():
            step()
            synchronize(device)
        return median_time(run, repeats, warm=2)

    makers = {"adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=True),
              "rnnprop": lambda params: AmalgamOptimizer(params, student=paper_student(), warmup_steps=0),
              "lean": lambda params: AmalgamOptimizer(params, student=lean, warmup_steps=0)}
    for width, depth in models:
        params = list(mlp(width, depth).to(device, dtype).parameters())
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        row = {}
        for name, make in makers.items():
            opt = make(params)
            opt.step()
            synchronize(device)
            row[name] = timed(opt.step)
            before = torch.cuda.memory_allocated(device) if cuda else 0
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            opt.step()
            row[f"{name}_temp"] = (torch.cuda.max_memory_allocated(device) - before) / MB if cuda else 0.0
            row[f"{name}_bpp"] = state_bytes(opt) / sum(p.numel() for p in params)
            del opt
            gc.collect()
        n = sum(p.numel() for p in params)
        print(f"{n:>10,} {row['adamw'] * 1e3:>9.2f} {row['rnnprop'] * 1e3:>10.2f} "
              f"{row['rnnprop'] / row['adamw']:>6.1f} {row['lean'] * 1e3:>8.2f} {row['lean'] / row['adamw']:>6.1f} "
              f"{row['rnnprop_bpp']:>17.0f} {row['lean_bpp']:>5.0f} {row['adamw_bpp']:>6.0f} "
              f"{row['rnnprop_temp']:>15.1f} {row['lean_temp']:>6.1f}")
        del params
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (< 1 minute)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--student", choices=("rnnprop", "lean", "normalized"), default="rnnprop")
    parser.add_argument("--harness", action="store_true",
                        help="--student normalized: also time its harness (Newton-Schulz: minutes per step at 25M)")
    parser.add_argument("--repeats", type=int, default=None, help="steps timed per median (default 3; 2 quick)")
    parser.add_argument("--device", default="cpu", help="cpu (the detailed tables) or cuda (both students vs AdamW)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameter dtype; other than float32, or on cuda, the short table of both students")
    args = parser.parse_args()
    if args.device != "cpu" or args.dtype != "float32":
        models = [(512, 4), (1024, 10), (1600, 10), (4096, 6)] if not args.quick else [(256, 2)]
        return main_device(models, 3 if args.quick else 10, torch.device(args.device), getattr(torch, args.dtype))
    _mmap_large_allocations()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    student = paper_student()
    repeats = args.repeats or (2 if args.quick else 3)
    models = [(256, 4), (512, 4)] if args.quick else [(512, 4), (1024, 10), (1600, 10)]
    if args.student == "lean":
        return main_lean(models, repeats)
    if args.student == "normalized":
        return main_normalized(models, repeats, args.harness)

    fl = floors(student, CPU_CHUNK, repeats=5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), chunk {CPU_CHUNK}")
    print(f"student: {fl['flops']} matmul FLOPs/coord at {fl['gflops']:.1f} GFLOP/s on its own shapes -> "
          f"arithmetic floor {fl['arith'] * 1e9:.0f} ns/coord; {fl['traffic']} B/coord at "
          f"{fl['bandwidth'] / 1e9:.1f} GB/s copy bandwidth -> memory floor "
          f"{fl['memory'] * 1e9:.1f} ns/coord")
    print()
    header = (f"{'params':>10} {'amalgam ms':>11} {'adamw ms':>9} {'ratio':>6} {'state B/p':>9} "
              f"{'arith ms':>9} {'mem ms':>7} {'step/arith':>10} {'step/mem':>8} {'temp MB am':>10} "
              f"{'temp MB aw':>10}")
    print(header)
    print("-" * len(header))
    for width, depth in models:
        model = mlp(width, depth)
        r = bench_pair(list(model.parameters()), student, repeats)
        n = r["n"]
        arith, mem = fl["arith"] * n, fl["memory"] * n
        print(f"{n:>10,} {r['amalgam_s'] * 1e3:>11.1f} {r['adamw_s'] * 1e3:>9.1f} "
              f"{r['amalgam_s'] / r['adamw_s']:>6.1f} {r['amalgam_state_bpp']:>9.0f} {arith * 1e3:>9.1f} "
              f"{mem * 1e3:>7.1f} {r['amalgam_s'] / arith:>10.2f} {r['amalgam_s'] / mem:>8.1f} "
              f"{r['amalgam_temp_mb']:>10.1f} {r['adamw_temp_mb']:>10.1f}")
        del model
        gc.collect()

    print()
    total = 200_000 if args.quick else 1_000_000
    small = tensors([total // 1000] * 1000)
    large = tensors([total // 10] * 10)
    rs = bench_pair(small, student, repeats)
    rl = bench_pair(large, student, repeats)
    per_small = rs["amalgam_s"] / rs["n"] * 1e9
    per_large = rl["amalgam_s"] / rl["n"] * 1e9
    adamw_small, adamw_large = rs["adamw_s"] / rs["n"] * 1e9, rl["adamw_s"] / rl["n"] * 1e9
    print(f"1,000 tensors of {total // 1000:,}: {per_small:.0f} ns/param (AdamW {adamw_small:.1f}) | "
          f"10 tensors of {total // 10:,}: {per_large:.0f} ns/param (AdamW {adamw_large:.1f}) | "
          f"small/large {per_small / per_large:.2f}x")
    print(f"temporary memory of a step (peak RSS rise): {rs['amalgam_temp_mb']:.1f} MB for 1,000 small "
          f"tensors, {rl['amalgam_temp_mb']:.1f} MB for 10 large; workspace bound = chunk {CPU_CHUNK} x "
          f"{sum(_columns(student))} floats = {CPU_CHUNK * sum(_columns(student)) * 4 / MB:.1f} MB")


def _columns(student: RNNProp) -> list[int]:
    return list(RNNPropKernel(student, torch.device("cpu")).fused.workspace_columns().values())


if __name__ == "__main__":
    main()
