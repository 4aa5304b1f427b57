"""The students on the examples' own tasks against AdamW with its learning rate tuned, as a user meets them: the
tiny GPT-2 on the standard library's bytes under the stock Trainer (``examples/train_with_trainer.py``), and the
scaled-down timm resnet10t and ViT on MNIST digits (``examples/train_timm.py``), each run through the example's own
``main``, on paired seeds. The score is the final held-out loss (the examples' own held-out split).

AdamW's learning rate is picked from a grid by its mean final held-out loss over the same seeds: the most
favourable choice for the baseline, so the students' gap is not understated. Each run is one process of one torch
thread; finished runs are kept in ``--cache`` so an interrupted benchmark resumes.

    python benchmarks/example_tasks.py                          # 600 steps, 3 seeds, 2 workers
    python benchmarks/example_tasks.py --steps 1000 --seeds 5
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STUDENTS = ["lean-choice-large", "paper-choice-large"]
ADAMW_LRS = [1e-3, 3e-3, 1e-2]
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # Student's t, 97.5%


def student_and_multiplier(optimizer: str) -> tuple[str, str]:
    """``NAME@M``: the student NAME at group lr M (the integrations' ``lr_multiplier``); ``NAME``: at 1."""
    student, _, multiplier = optimizer.partition("@")
    return student, multiplier or "1"


def trainer_argv(optimizer: str, seed: int, steps: int) -> list[str]:
    common = ["--steps", str(steps), "--seed", str(seed), "--threads", "1"]
    if optimizer.startswith("adamw:"):
        return [*common, "--optim", "adamw_torch", "--learning-rate", optimizer.split(":")[1]]
    student, multiplier = student_and_multiplier(optimizer)
    return [*common, "--optim-args", f"student={student},lr_multiplier={multiplier}"]


def timm_argv(optimizer: str, seed: int, steps: int, model: str = "resnet10t") -> list[str]:
    common = ["--model", model, "--steps", str(steps), "--seed", str(seed), "--threads", "1"]
    if optimizer.startswith("adamw:"):
        return [*common, "--opt", "adamw", "--lr", optimizer.split(":")[1]]
    student, multiplier = student_and_multiplier(optimizer)
    return [*common, "--opt", "amalgam", "--student", student, "--lr-multiplier", multiplier]


# task -> (example module, argv builder, the key of main()'s result holding the final held-out loss)
TASKS = {
    "gpt2-stdlib (Trainer)": ("train_with_trainer", trainer_argv, "held_after"),
    "resnet10t-mnist (timm)": ("train_timm", timm_argv, "held_loss"),
    "vit-mnist (timm)": ("train_timm", functools.partial(timm_argv, model="vit"), "held_loss"),
}


def run(task: str, optimizer: str, seed: int, steps: int) -> float:
    module, argv, key = TASKS[task]
    sys.path.insert(0, str(EXAMPLES))
    with contextlib.redirect_stdout(io.StringIO()):
        result = importlib.import_module(module).main(argv(optimizer, seed, steps))
    return float(result[key])


def interval(diffs: list[float]) -> tuple[float, float]:
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, math.inf
    return mean, T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", default="example_tasks_cache.json")
    parser.add_argument("--students", nargs="+", default=STUDENTS,
                        help="bundled names, folders or Hub repo ids; NAME@M runs NAME at group lr M (default 1)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), metavar="TASK",
                        help=f"default: all of {list(TASKS)}")
    args = parser.parse_args()
    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    optimizers = [*args.students, *(f"adamw:{lr:g}" for lr in ADAMW_LRS)]
    jobs = [(t, o, s) for t in args.tasks for o in optimizers for s in range(args.seeds)
            if f"{t}|{o}|{s}|{args.steps}" not in cache]
    with ProcessPoolExecutor(args.workers) as pool:
        futures = {pool.submit(run, t, o, s, args.steps): (t, o, s) for t, o, s in jobs}
        for done, future in enumerate(futures, 1):
            t, o, s = futures[future]
            cache[f"{t}|{o}|{s}|{args.steps}"] = future.result()
            cache_path.write_text(json.dumps(cache, indent=1))
            print(f"[{done}/{len(jobs)}] {t} {o} seed {s}: {cache[f'{t}|{o}|{s}|{args.steps}']:.4f}", flush=True)

    print(f"\n{args.steps} steps, seeds 0..{args.seeds - 1}; final held-out loss and its log (lower is better); "
          "Δ log = log loss of the optimizer − of tuned AdamW, paired, 95% interval")
    for task in args.tasks:
        losses = {o: [cache[f"{task}|{o}|{s}|{args.steps}"] for s in range(args.seeds)] for o in optimizers}
        tuned = min((o for o in optimizers if o.startswith("adamw:")), key=lambda o: statistics.mean(losses[o]))
        print(f"\n{task}: AdamW tuned over lr {ADAMW_LRS} -> {tuned.split(':')[1]}")
        print(f"{'optimizer':24} {'held-out loss':>14} {'sd':>7} {'log loss':>9} {'Δ log vs tuned AdamW':>24}")
        for o in optimizers:
            mean, half = interval([math.log(a / b) for a, b in zip(losses[o], losses[tuned], strict=True)])
            sd = statistics.stdev(losses[o]) if args.seeds > 1 else 0.0
            delta = "reference" if o == tuned else f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"
            log_loss = statistics.mean(math.log(v) for v in losses[o])
            print(f"{o:24} {statistics.mean(losses[o]):>14.4f} {sd:>7.4f} {log_loss:>9.3f} {delta:>24}")


if __name__ == "__main__":
    main()
