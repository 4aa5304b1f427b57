"""Record the baselines' evaluation runs that ``amalgam amalgamate`` reuses in its model card.

The runs of the pool's teachers and of tuned torch Adam do not depend on the student, so the card's reduced
evaluation (the ``quick`` preset: 3 paired seeds, the paper forms) takes them from
``amalgam_plugin/engine/baseline_runs.json`` instead of re-running them; ``amalgam amalgamate --full-eval``
re-runs everything. This script writes that file with the same library calls the card uses:

    python benchmarks/baseline_runs.py            # Train problem, large pool, seeds 0-2, 1,000 steps
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from amalgam_plugin.engine import KNOWN_RUNS
from amalgam_plugin.evaluate import evaluate_with_baselines, load_runs
from amalgam_plugin.files import write_text_atomically
from amalgam_plugin.problems import make_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="train")
    parser.add_argument("--pool", default="large")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=KNOWN_RUNS)
    args = parser.parse_args()

    seeds = list(range(args.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "runs.json"
        evaluation = evaluate_with_baselines(make_problem(args.problem), {}, args.pool, seeds, args.steps,
                                             forms=("paper",), tune_seeds=seeds[:3], cache=cache,
                                             workers=args.workers)
        runs = load_runs(cache)  # keyed by each run's full specification, as the card's evaluation looks them up
    recorded = {"command": "python benchmarks/baseline_runs.py " + " ".join(
                    f"--{k} {v}" for k, v in vars(args).items() if k not in ("out", "workers")),
                "torch": torch.__version__, "threads per run": 1, "python": platform.python_version(),
                "machine": platform.machine(), "date": datetime.date.today().isoformat()}
    write_text_atomically(args.out, json.dumps({"recorded_with": recorded, "runs": runs}, sort_keys=True) + "\n")
    print(evaluation.table("plain"))
    print(f"{len(runs)} runs written to {args.out}")


if __name__ == "__main__":
    main()
