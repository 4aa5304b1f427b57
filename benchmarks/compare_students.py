"""Compare students (folders, bundled names or Hub repo ids) side by side on one problem under the evaluation
protocol (docs/method.md#evaluation): paired seeds, 1,000 steps, best log held-out loss, paired differences
against the first student with 95% intervals. Runs in worker processes of one thread each.

    python benchmarks/compare_students.py ./amalgam-student amalgam-choice-large-quick --seeds 10
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from amalgam_plugin.evaluate import evaluate, student_factory
from amalgam_plugin.hub import load_student
from amalgam_plugin.problems import make_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("students", nargs="+", help="the first is the reference of the paired differences")
    parser.add_argument("--problem", default="train")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=None, help="JSON file of finished runs (resumes)")
    args = parser.parse_args()
    try:
        students = {name: load_student(name) for name in args.students}
    except (OSError, ValueError) as err:
        raise SystemExit(f"compare_students: {err}") from None
    evaluation = evaluate(make_problem(args.problem), {n: student_factory(s) for n, s in students.items()},
                          list(range(args.seeds)), args.steps, reference=args.students[0], cache=args.cache,
                          workers=args.workers)
    print(evaluation.protocol())
    print(evaluation.table("plain"))


if __name__ == "__main__":
    main()
