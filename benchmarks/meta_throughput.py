"""Meta-training throughput, side by side in one process: for choice distillation (its single frozen choice
teacher), min-max against the large pool and the choice phase (the choice network meta-trained alone), first- and
second-order, the inner steps per second of one truncation with its meta-gradient, and the ratio of one inner
step to one plain forward+backward of the optimizee at the same batch size (measured in between, so machine noise
hits both). Medians over repeats. ``--profile`` prints the top of torch.profiler's table for each setting;
``--floor`` prints, for the first-order settings, what one inner step cannot skip, part by part, in the same unit.

    python benchmarks/meta_throughput.py                  # Train CNN, 20-step truncations, 5 repeats
    python benchmarks/meta_throughput.py --profile --repeats 2
    python benchmarks/meta_throughput.py --floor
    python benchmarks/meta_throughput.py --device cuda      # on a GPU (benchmarks/gpu_smoke.sh)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from amalgam_plugin.engine.estimator import EstimatorConfig, TruncatedEstimator
from amalgam_plugin.engine.unroll import flat_grad, flat_loss, frozen_choice_teacher
from amalgam_plugin.problems import Problem, make_problem
from amalgam_plugin.students import ChoiceConfig, ChoiceNet, RNNProp
from amalgam_plugin.teachers import POOLS, make_pool


def settings(problem: Problem) -> dict[str, tuple[torch.nn.Module, list, str]]:
    """name -> (student, teachers, mechanism), each student and network freshly initialised (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    chooser = ChoiceNet(ChoiceConfig(pool=[[n, dict(kw)] for n, kw in POOLS["choice-large"].members]))
    chooser.reset_parameters(gen)
    chooser.requires_grad_(False).eval().to(problem.device)
    student = RNNProp()
    student.reset_parameters(gen)
    student.to(problem.device)
    phase = ChoiceNet(ChoiceConfig(pool=[[n, dict(kw)] for n, kw in POOLS["choice-large"].members]))
    phase.reset_parameters(gen)
    phase.to(problem.device)
    return {
        "choice distillation (1 teacher)": (student, [frozen_choice_teacher(chooser)], "choice"),
        "min-max, large pool (6 teachers)": (student, make_pool("large"), "minmax"),
        "choice phase (no teacher)": (phase, [], "minmax"),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device) -> float:
    """Wall time of one ``fn()`` on ``device`` (its queued GPU work included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def plain_pass(problem: Problem, params: list[torch.Tensor], batch) -> float:
    return seconds(lambda: problem.loss(params, batch).backward(), problem.device)


def truncation(estimator: TruncatedEstimator, seed: int, alpha: float) -> float:
    traj = estimator.trajectory(torch.Generator().manual_seed(seed), 0, with_teachers=alpha > 0)
    return seconds(lambda: estimator.estimate(traj, alpha), estimator.problem.device)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    return statistics.median(seconds(fn, device) for _ in range(repeats))


def floor_parts(estimator: TruncatedEstimator, repeats: int) -> dict[str, float]:
    """Seconds of each part of a first-order inner step that no rewrite of the loop can skip: the optimizee's
    pass at the student's point, the meta loss's reference loss (a forward pass), each teacher's pass at its own
    point, a frozen choice teacher's network, and the student's network over every coordinate, forward with its
    graph and backward into its weights."""
    problem, device = estimator.problem, estimator.problem.device
    traj = estimator.trajectory(torch.Generator().manual_seed(0), 0, with_teachers=bool(estimator.teachers))
    batch = next(traj.batches)
    theta = (traj.scale * traj.params).detach()
    grad = flat_grad(problem, traj.layout, theta, batch)

    def student_pass():
        delta, _ = estimator.student(grad, traj.state, traj.ranks)
        delta.sum().backward()

    parts = {
        "optimizee fwd+bwd": timed(lambda: flat_grad(problem, traj.layout, theta, batch), repeats, device),
        "reference loss (fwd)": timed(lambda: flat_loss(problem, traj.layout, theta, batch).item(), repeats, device),
        "student network fwd+bwd": timed(student_pass, repeats, device),
    }
    if traj.teachers:  # a teacher's pass at its own point costs what the student's does
        parts["teachers' fwd+bwd"] = len(traj.teachers) * parts["optimizee fwd+bwd"]
    if traj.teachers and estimator.mechanism == "choice":
        teacher, state = traj.teachers[0], traj.teacher_states[0]
        parts["choice network fwd (teacher)"] = timed(lambda: teacher.update(grad, state), repeats, device)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="train")
    parser.add_argument("--unroll", type=int, default=20, help="inner steps per truncation")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators per setting")
    parser.add_argument("--floor", action="store_true", help="print the parts a first-order inner step cannot skip")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    problem = make_problem(args.problem).on(args.device)
    params = [t.requires_grad_(True) for t in problem.init_params(torch.Generator().manual_seed(0))]
    batch = next(problem.train_batches(torch.Generator().manual_seed(0)))
    n = sum(p.numel() for p in params)
    where = torch.cuda.get_device_name(problem.device) if problem.device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}, {torch.get_num_threads()} thread(s); problem {problem.name} ({n:,} "
          f"parameters, batch {problem.batch_size}); {args.unroll}-step truncations; medians of {args.repeats}")
    print(f"{'setting':34} {'order':6} {'inner steps/s':>13} {'step / fwd+bwd':>15} {'fwd+bwd ms':>11}")
    for name, (student, teachers, mechanism) in settings(problem).items():
        for second_order in (False, True):
            estimator = TruncatedEstimator(student, problem, teachers, EstimatorConfig(
                unroll_length=args.unroll, mechanism=mechanism, second_order=second_order))
            alpha = 0.2 if teachers else 0.0
            truncation(estimator, 999, alpha)  # warm the allocator and caches
            steps, passes = [], []
            for r in range(args.repeats):
                passes.append(plain_pass(problem, params, batch))
                steps.append(truncation(estimator, r, alpha) / args.unroll)
                passes.append(plain_pass(problem, params, batch))
            step, fb = statistics.median(steps), statistics.median(passes)
            order = "second" if second_order else "first"
            print(f"{name:34} {order:6} {1 / step:13.1f} {step / fb:15.2f} {1000 * fb:11.2f}", flush=True)
            if args.floor and not second_order:
                parts = floor_parts(estimator, 4 * args.repeats)
                unit = parts["optimizee fwd+bwd"]
                print("    floor: " + " + ".join(f"{k} {v / unit:.2f}" for k, v in parts.items())
                      + f" = {sum(parts.values()) / unit:.2f} plain passes", flush=True)
            if args.profile:
                traj = estimator.trajectory(torch.Generator().manual_seed(0), 0, with_teachers=alpha > 0)
                activities = [torch.profiler.ProfilerActivity.CPU]
                if problem.device.type == "cuda":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                with torch.profiler.profile(activities=activities) as prof:
                    estimator.estimate(traj, alpha)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)


if __name__ == "__main__":
    main()
