"""Two ways to spend 2 cores on meta-training, side by side: one process with 2 torch threads against 2 processes
(torchrun, gloo) of 1 thread each, the same recipe and the same trajectories per meta-step, so that both do the
same work. Each run is ``amalgam amalgamate --no-eval`` bounded by ``--max-minutes``; its rate is the truncations
(meta-steps of one trajectory) of its completed periods over their seconds, read from its checkpoint. Runs
alternate and the medians are compared.

    python benchmarks/meta_processes.py                          # quick preset, 2 minutes a run, 2 rounds
    python benchmarks/meta_processes.py --minutes 5 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from amalgam_plugin.engine.curriculum import read_progress


def rate(command: list[str], out: Path) -> float:
    """Truncations per second of a bounded run."""
    done = subprocess.run(command, capture_output=True, text=True)
    # 3: stopped at a checkpoint by --max-minutes (torchrun reports that as a failure of its own, exit status 1)
    if done.returncode != 0 and "stopped at a checkpoint" not in done.stderr:
        sys.exit(f"run failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    steps = seconds = 0.0
    for phase in ("choice", "student"):
        checkpoint = out / "training" / phase / "checkpoint.safetensors"
        if checkpoint.exists():
            progress = read_progress(checkpoint)
            steps, seconds = steps + progress.meta_steps, seconds + progress.seconds
    if not seconds:
        sys.exit("no period completed: raise --minutes")
    return steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--minutes", type=float, default=2.0, help="bound of each run")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    amalgamate = ["amalgamate", "--preset", args.preset, "--no-eval", "--max-minutes", str(args.minutes),
                  "--trajectories-per-step", "2"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m",
              "amalgam_plugin.cli"]
    setups = {"1 process x 2 threads": [sys.executable, "-m", "amalgam_plugin.cli", *amalgamate, "--threads", "2"],
              "2 processes x 1 thread": [*launch, *amalgamate, "--threads", "1"]}
    rates: dict[str, list[float]] = {name: [] for name in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, command in setups.items():
                out = Path(tmp) / f"{r}-{len(rates[name])}-{name[0]}"
                rates[name].append(rate([*command, "--out", str(out)], out))
                print(f"round {r}: {name}: {rates[name][-1]:.3f} truncations/s", flush=True)
    one, two = (statistics.median(v) for v in rates.values())
    print(f"\npreset {args.preset}, 2 trajectories per meta-step, medians of {args.rounds}")
    print(f"{'setup':24} {'truncations/s':>14}")
    for name, value in zip(setups, (one, two), strict=True):
        print(f"{name:24} {value:14.3f}")
    print(f"2 processes / 1 process: {two / one:.2f}x")


if __name__ == "__main__":
    main()
