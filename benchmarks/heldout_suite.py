"""Time each held-out task's one AdamW run (lr 1e-3, seed 0, one torch thread, its own process) and estimate what
the whole suite costs; the suite itself is ``amalgam evaluate --suite heldout`` (docs/heldout.md).

    python benchmarks/heldout_suite.py --out benchmarks/results/heldout/timings
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from amalgam_plugin.files import write_text_atomically
from amalgam_plugin.heldout import DEFAULT_LRS, HELDOUT_TASKS
from amalgam_plugin.heldout.runner import ADAMW_DEFAULT, Job, run_jobs, task_optimizers


def time_task(name: str, out: Path) -> dict:
    task = HELDOUT_TASKS[name]
    cache = out / f"{name}.cache.json"
    cache.unlink(missing_ok=True)  # a fresh run every time: this measures, it does not resume
    started = time.perf_counter()
    runs, _ = run_jobs([Job(task, ADAMW_DEFAULT, 0)], cache, progress=lambda line: None)
    seconds = time.perf_counter() - started
    cache.unlink()
    run = next(iter(runs.values()))
    return {"task": name, "parameters": run["parameters"], "steps": task.steps, "batch_size": task.batch_size,
            "run_seconds": round(seconds, 2), "ms_per_step": round(1000 * run["seconds_per_step"], 2),
            "best_log_heldout": run["best_log_heldout"],
            "runs_per_seed": len(task_optimizers(task, [{"kind": "student", "name": n} for n in "ab"], DEFAULT_LRS))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(HELDOUT_TASKS), choices=list(HELDOUT_TASKS))
    parser.add_argument("--out", type=Path, default=Path("heldout-timings"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.tasks:
        rows.append(time_task(name, args.out))
        print(json.dumps(rows[-1]), flush=True)
    lines = ["| task | parameters | steps x batch | one AdamW run (s, wall) | ms/step | best log held-out | "
             "runs per seed (default grid, 2 students) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['parameters']:,} | {r['steps']} x {r['batch_size']} | {r['run_seconds']} | "
              f"{r['ms_per_step']} | {r['best_log_heldout']:.3f} | {r['runs_per_seed']} |" for r in rows]
    total = sum(r["run_seconds"] * r["runs_per_seed"] for r in rows)
    lines += ["", f"At AdamW's cost per run, the whole suite takes one worker about {total / 60:.0f} minutes (wall) "
              "per seed on this machine as loaded then (students' steps cost more: see the suite's time ratios)."]
    write_text_atomically(args.out / "timings.json", json.dumps(rows, indent=1) + "\n")
    write_text_atomically(args.out / "timings.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
