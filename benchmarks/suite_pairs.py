"""Two students of one held-out suite run against each other: the paired difference of their best log held-out
loss per task (``a − b`` over the suite's seeds, 95% t interval; negative: ``a`` is better). The suite's own table
compares each student with AdamW only.

    python benchmarks/suite_pairs.py runs/suite-broad/results.json runs/broad-stage1 normalized-choice-modern-mixaug
"""

from __future__ import annotations

import argparse
import json

from amalgam_plugin.evaluate.statistics import paired_difference


def student_runs(task: dict, name: str) -> list[float]:
    for spec, runs in task["runs"].items():
        if {"kind": "student", "name": name}.items() <= json.loads(spec).items():
            return [run["best_log_heldout"] for run in runs]
    raise SystemExit(f"no runs of {name!r} in this suite")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="the suite's results.json")
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args()
    with open(args.results) as f:
        tasks = json.load(f)["tasks"]
    for name, task in tasks.items():
        difference = paired_difference(student_runs(task, args.a), student_runs(task, args.b))
        print(f"{name}: {args.a} − {args.b}: {difference}")


if __name__ == "__main__":
    main()
