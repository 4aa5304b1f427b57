"""Issue 25: a normalized student's default ``lr``, chosen on meta-training validation, never on the held-out suite.

A normalized student moves every tensor by exactly ``lr`` RMS per step, so its speed is its ``lr``, which
meta-training cannot learn. This picks the default the way the card's torch Adam is tuned (``tune_adam``): its
grid ``ADAM_TUNING_LRS`` widened by one rate each side (``GRID``, so that both bests sit inside), the mean best
log loss over seeds 0-2 and 1000 steps on ``selection_problem`` (1,000 validation digits carved from the training
digits), here summed over two of the mixture's families: the Train CNN and the sigmoid MLP. Torch Adam is tuned
the same way beside it.

    python benchmarks/normalized_lr_selection.py benchmarks/results/normalized-modern-mixaug/run \
        --cache runs/normalized-lr-selection.json
"""

from __future__ import annotations

import argparse

from amalgam_plugin import hub
from amalgam_plugin.evaluate import evaluate
from amalgam_plugin.evaluate.baselines import ADAM_TUNING_LRS, student_factory, torch_adam
from amalgam_plugin.problems import make_problem, selection_problem

PROBLEMS = ("train", "mlp")
SEEDS = (0, 1, 2)
GRID = (5e-4, *ADAM_TUNING_LRS, 2e-2)


def scores(student: str, cache: str | None, with_adam: bool = True) -> dict[str, dict[float, float]]:
    """Per optimizer (the student, torch Adam unless not ``with_adam``) and lr: the sum over PROBLEMS of the mean
    best log loss."""
    totals: dict[str, dict[float, float]] = {"student": {}, **({"torch adam": {}} if with_adam else {})}
    for name in PROBLEMS:
        candidates = {**{f"student lr={lr:g}": student_factory(student, lr=lr) for lr in GRID},
                      **({f"torch adam lr={lr:g}": torch_adam(lr) for lr in GRID} if with_adam else {})}
        evaluation = evaluate(selection_problem(make_problem(name)), candidates, SEEDS, 1000, cache=cache, workers=1)
        for kind in totals:
            for lr in GRID:
                mean = evaluation.mean(f"{kind} lr={lr:g}")
                print(f"{name}: {kind} lr={lr:g}: {mean:.3f}", flush=True)
                totals[kind][lr] = totals[kind].get(lr, 0.0) + mean
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("student", help="a normalized student (folder or bundled name)")
    parser.add_argument("--cache", help="the evaluation cache (a rerun runs nothing again)")
    parser.add_argument("--student-only", action="store_true",
                        help="leave torch Adam out (its scores do not depend on the student: lr-selection.txt of "
                             "benchmarks/results/normalized-modern-mixaug has them)")
    args = parser.parse_args()
    student = hub.load_student(args.student)
    if student.config.student_type != "normalized":
        parser.error(f"{args.student!r} is a {student.config.student_type} student; its lr is no step size")
    totals = scores(args.student, args.cache, with_adam=not args.student_only)
    for kind, by_lr in totals.items():
        best = min(by_lr, key=by_lr.get)
        edge = " (at the grid's edge)" if best in (min(by_lr), max(by_lr)) else ""
        print(f"{kind}: " + ", ".join(f"{lr:g}: {v:.3f}" for lr, v in by_lr.items()) + f"; best lr {best:g}{edge}")


if __name__ == "__main__":
    main()
