"""Two optimizers of one held-out suite run against each other: the paired difference of their best log held-out
loss per task (``a − b`` over the suite's seeds, 95% t interval; negative: ``a`` is better). The suite's own table
compares each optimizer with AdamW only.

    python benchmarks/suite_pairs.py runs/suite-broad/results.json runs/broad-stage1 normalized-choice-modern-mixaug
    python benchmarks/suite_pairs.py runs/suite-fresh/results.json adamw:tuned adamw:0.001 --from-seed 5

Each side is a student by the name it ran under, or a baseline as ``adamw:LR``, ``lion:LR``, ``muon:LR``;
``adamw:tuned`` is the AdamW grid's rate with the best mean over the seeds before ``--from-seed`` (so the pairs
from that seed on are free of the choice's bias).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from amalgam_plugin.evaluate.statistics import paired_difference
from amalgam_plugin.heldout.runner import best_of, tuned_rate


def runs_of(task: dict, spec: dict) -> list[float]:
    for key, runs in task["runs"].items():
        if spec.items() <= json.loads(key).items():
            return [best_of(run) for run in runs]
    raise SystemExit(f"{task['task']['name']}: no runs of {spec} in this suite")


def adamw_grid(task: dict) -> dict[float, list[float]]:
    specs = {key: json.loads(key) for key in task["runs"]}
    return {s["lr"]: [best_of(run) for run in task["runs"][key]] for key, s in specs.items() if s["kind"] == "adamw"}


def tuned_lr(task: dict, before: int) -> float:
    """The AdamW grid's rate with the lowest mean over seeds ``[0, before)`` (all of them when ``before`` is 0)."""
    return tuned_rate({lr: float(np.nanmean(runs[:before or None])) for lr, runs in adamw_grid(task).items()})


def spec_of(side: str, task: dict, before: int) -> dict:
    kind, _, value = side.partition(":")
    if kind not in ("adamw", "lion", "muon") or not value:
        return {"kind": "student", "name": side}
    if kind == "adamw" and value == "tuned":
        return {"kind": "adamw", "lr": tuned_lr(task, before)}
    try:
        return {"kind": kind, "lr": float(value)}
    except ValueError:
        raise SystemExit(f"{side!r}: a baseline is KIND:LR with a number, or adamw:tuned") from None


def describe(spec: dict) -> str:
    return spec["name"] if spec["kind"] == "student" else f"{spec['kind']} {spec['lr']:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="the suite's results.json")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--from-seed", type=int, default=0, metavar="K",
                        help="pair the seeds from the K-th on (default 0: all)")
    args = parser.parse_args()
    with open(args.results) as f:
        suite = json.load(f)
    if not 0 <= args.from_seed < len(suite["seeds"]):
        raise SystemExit(f"--from-seed must be in [0, {len(suite['seeds'])}), got {args.from_seed}")
    seeds = suite["seeds"][args.from_seed:]
    for name, task in suite["tasks"].items():
        a, b = (spec_of(side, task, args.from_seed) for side in (args.a, args.b))
        difference = paired_difference(runs_of(task, a)[args.from_seed:], runs_of(task, b)[args.from_seed:])
        print(f"{name}: {describe(a)} − {describe(b)}, seeds {seeds[0]}-{seeds[-1]}: {difference}")


if __name__ == "__main__":
    main()
