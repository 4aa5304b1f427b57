"""Issue 24: is there a ``quick`` recipe whose student is good on every seed and float path?

Meta-trains candidate recipes (the ``quick`` preset with changed knobs, built here and handed to
``amalgamate(preset=...)``) without the card's evaluation, then scores each student with
``amalgam evaluate STUDENT --problems train --seeds 5 --no-baselines --workers 1``. One CSV row per scored student.

Weight averaging is measured without touching the engine: every run also records, over the student's last
curriculum stage, the uniform average of the student's weights after each meta-update (``avg``), their
exponential moving average (``ema``, decay ``EMA_DECAY``) and the last weights (``last``). They feed nothing back
into meta-training (the run's own student, ``best``, stays bit-identical to a plain run's), so one run gives
several students; each is written beside the run as a student folder and scored like it. (``quick`` repeats no
period; with repeats, this hook would also count a repeated period's rolled-back updates, which the engine's
``average_last_stage`` (docs/method.md#weight-averaging) leaves out. Its ``avg`` is otherwise what that switch keeps.)

Resumable: a run whose student exists is not meta-trained again, a scored student is not scored again.
``--isa avx2`` re-runs this script with ATen, oneDNN and MKL held to AVX2: another float path on this machine,
as a CPU without AVX-512 gives.

    .venv/bin/python benchmarks/quick_recipe_study.py --candidate quick --seeds 5 9 --threads 1 \
        --variants best avg ema --max-minutes 60
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from amalgam_plugin import hub
from amalgam_plugin.engine import amalgamate
from amalgam_plugin.engine.curriculum import Curriculum
from amalgam_plugin.engine.learner import Learner
from amalgam_plugin.engine.presets import PRESETS, Preset
from amalgam_plugin.engine.run import meta_training_seconds

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "quick-stability"
CSV_PATH = ROOT / "benchmarks" / "results" / "quick-stability" / "runs.csv"
EVAL_SEEDS = 5
EMA_DECAY = 0.95
# the best baseline on these 5 seeds (rmsprop 0.005, paper form), per seed, from the quick-selection study
BASELINE_RUNS = ROOT / "benchmarks" / "results" / "quick-selection" / "runs.csv"
BASELINE = "rmsprop 0.005 (paper)"
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


# the student's curriculum of quick up to commit 0528c99 (today's has two stages) with its final-model rule of
# 2026-12-03 (the last stage's weight average): what the candidates below change
AVERAGED = {"select": "best", "average_last_stage": True, "horizon_start": False, "depths": [1, 2, 5],
            "validation_depths": [2, 5, 10]}


def quick_with(**student) -> Preset:
    quick = PRESETS.lookup("quick")
    return replace(quick, student=quick.student.changed(**{**AVERAGED, **student}))


CANDIDATES = {
    "smoke": lambda: PRESETS.lookup("smoke"),  # a check of this script in seconds
    "quick": lambda: quick_with(average_last_stage=False),  # the recipe before this study
    "quick-averaged": lambda: quick_with(),  # quick of 2026-12-03 (RNNProp): the last stage's weight average
    "lr1e-3": lambda: quick_with(meta_lr=1e-3),
    "tps2": lambda: quick_with(trajectories_per_step=2),
    "tps4-lr6e-3": lambda: quick_with(trajectories_per_step=4, meta_lr=6e-3),
    "periods3": lambda: quick_with(min_periods=3, max_periods=3),
    "val4": lambda: quick_with(validation_trajectories=4),
    "warmup5": lambda: quick_with(warmup_unrolls=[5]),
    "horizon": lambda: quick_with(select="horizon"),
    "cpu": lambda: PRESETS.lookup("cpu"),  # the next budget up (about 1 hour), if no quick recipe meets the targets
    "quick-normalized": lambda: quick_with(),  # quick-averaged with the normalized student type
    # ... keeping, of its start, its first stages' checkpoints and its last stage's average, the one whose
    # 1000-step validation runs train best (quick of commits 1f0f456 to 0528c99)
    "quick-normalized-horizon": lambda: quick_with(select="horizon", horizon_start=True),
    # ... without its last stage, which that selection never kept: the candidates are the start and the two
    # stages' best checkpoints (today's quick)
    "quick-two-stages": lambda: PRESETS.lookup("quick"),
}
# a candidate's student type where it is not the paper's RNNProp
STUDENT_TYPES = {name: "normalized" for name in ("quick-normalized", "quick-normalized-horizon", "quick-two-stages")}
# Meta-trained in pieces (--max-minutes) and resumed: only the run's own student (the variants need one whole run).
RESUMABLE = {"cpu"}
VARIANTS = ("best", "avg", "ema", "last")
FIELDS = ["candidate", "variant", "seed", "threads", "isa", "started", "load_at_start", "meta_training_s",
          "student_meta_steps", "sha256", "eval_seeds", "best_log_heldout", "per_seed", "diff_vs_baseline",
          "diff_low", "diff_high", "eval_s", "load_at_eval"]


class LastStageAverages:
    """The student's weights over its last stage's meta-updates: uniform mean, EMA and the last ones."""

    def __init__(self):
        self.count, self.sum, self.ema, self.last = 0, None, None, None

    def add(self, weights: dict[str, torch.Tensor]) -> None:
        w = {k: v.detach().to(torch.float64, copy=True) for k, v in weights.items()}
        if self.count == 0:
            self.sum, self.ema = {k: v.clone() for k, v in w.items()}, {k: v.clone() for k, v in w.items()}
        else:
            for k, v in w.items():
                self.sum[k] += v
                self.ema[k].mul_(EMA_DECAY).add_(v, alpha=1 - EMA_DECAY)
        self.count += 1
        self.last = w

    def weights(self, variant: str) -> dict[str, torch.Tensor]:
        chosen = {"avg": {k: v / self.count for k, v in (self.sum or {}).items()}, "ema": self.ema,
                  "last": self.last}[variant]
        return {k: v.to(torch.float32) for k, v in chosen.items()}


class Recorder:
    """Hooks the learner: after each meta-update of the student phase's last stage, record the weights."""

    def __init__(self):
        self.current: Curriculum | None = None
        self.averages = LastStageAverages()
        train_period, apply = Curriculum.train_period, Learner.apply
        recorder = self

        def hooked_train_period(curriculum):
            recorder.current = curriculum
            return train_period(curriculum)

        def hooked_apply(learner, gradient):
            apply(learner, gradient)
            c = recorder.current
            if c is not None and c.learner is learner and c.phase == "student" and c.progress.stage == c.cfg.stages - 1:
                recorder.averages.add(learner.student.state_dict())

        Curriculum.train_period, Learner.apply = hooked_train_period, hooked_apply


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def meta_steps(run: Path) -> int:
    log = run / "training" / "student" / "log.jsonl"
    return sum(1 for line in log.read_text().splitlines() if '"meta_step"' in line)


def train(candidate: str, seed: int, threads: int, isa: str, variants: list[str],
          max_minutes: float | None = None) -> dict | None:
    """Meta-train one run (unless its student exists); the variants' folders; the run's record. None when
    ``max_minutes`` stopped a resumable run at a checkpoint."""
    run = RUNS / candidate / f"s{seed}-t{threads}{'-' + isa if isa != 'native' else ''}"
    record_path = run / "study_record.json"
    if record_path.exists() and (run / "model.safetensors").exists():
        return {**json.loads(record_path.read_text()), "run": run}
    if candidate in RESUMABLE:
        return train_resumable(candidate, seed, threads, run, max_minutes)
    shutil.rmtree(run, ignore_errors=True)  # an unfinished run is started over: the averages live in memory
    record = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "load_at_start": load_average()}
    recorder = Recorder()
    amalgamate(preset=CANDIDATES[candidate](), out=run, seed=seed, threads=threads, evaluate=False,
               student=STUDENT_TYPES.get(candidate, "rnnprop"))
    summary = json.loads((run / "training" / "summary.json").read_text())
    record.update(meta_training_s=summary["meta_training_seconds"], student_meta_steps=meta_steps(run),
                  sha256={"best": sha256(run / "model.safetensors")}, last_stage_updates=recorder.averages.count)
    student = hub.load_folder(run)
    for variant in ("avg", "ema", "last"):
        student.load_state_dict(recorder.averages.weights(variant))
        folder = run / "variants" / variant
        hub.save_student(student, folder)
        record["sha256"][variant] = sha256(folder / "model.safetensors")
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return {**record, "run": run}


def train_resumable(candidate: str, seed: int, threads: int, run: Path, max_minutes: float | None) -> dict | None:
    """A run meta-trained in pieces: ``--resume`` when its checkpoints exist. Its meta-training time is the
    engine's over all its pieces (``meta_training_seconds``: the periods' seconds its checkpoints record)."""
    resume = (run / "training").is_dir()
    record = {"started": "resumed" if resume else datetime.datetime.now().isoformat(timespec="seconds"),
              "load_at_start": load_average()}
    finished = (run / "model.safetensors").exists()  # by `amalgam amalgamate` with the same flags, say
    if not finished and amalgamate(preset=CANDIDATES[candidate](), out=run, seed=seed, threads=threads,
                                   evaluate=False, resume=resume, max_minutes=max_minutes,
                                   student=STUDENT_TYPES.get(candidate, "rnnprop")) is None:
        return None
    record.update(meta_training_s=round(meta_training_seconds(run / "training", 0.0), 1),
                  student_meta_steps=meta_steps(run), sha256={"best": sha256(run / "model.safetensors")})
    (run / "study_record.json").write_text(json.dumps(record, indent=2) + "\n")
    return {**record, "run": run}


def recorded_per_seed(optimizer: str) -> list[float]:
    """Per seed, in seed order, the best log held-out loss of ``optimizer`` on Train in the quick-selection study."""
    with BASELINE_RUNS.open() as f:
        rows = [r for r in csv.DictReader(f) if r["problem"] == "train" and r["optimizer"] == optimizer]
    return [float(r["best_log_heldout"]) for r in sorted(rows, key=lambda r: int(r["seed"]))][:EVAL_SEEDS]


def baseline_per_seed() -> list[float]:
    return recorded_per_seed(BASELINE)


def best_log_heldout(runs: list[dict]) -> list[float]:
    """Per seed, in seed order, of an evaluation's recorded runs (``RunResult.best_log_heldout``: the log of the
    lowest finite held-out loss)."""
    ordered = sorted(runs, key=lambda r: r["seed"])[:EVAL_SEEDS]
    return [math.log(min(h for h in r["heldout"] if h is not None and math.isfinite(h))) for r in ordered]


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval (the evaluation's: scipy's t quantile)."""
    from scipy import stats

    mean = statistics.fmean(values)
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def score(folder: Path) -> dict:
    """``amalgam evaluate`` of one student on the study's seeds; its per-seed best log held-out losses."""
    out = folder.parent / f"{folder.name}-eval" if folder.name in VARIANTS else folder / "eval"
    results = out / "results.json"
    started, load = time.time(), load_average()
    if not results.exists():
        subprocess.run([str(Path(sys.executable).parent / "amalgam"), "evaluate", str(folder), "--problems", "train",
                        "--seeds", str(EVAL_SEEDS), "--no-baselines", "--workers", "1", "--out", str(out)],
                       check=True, env={k: v for k, v in os.environ.items() if k not in ISA_ENV["avx2"]})
    runs = next(iter(json.loads(results.read_text())["problems"]["train"]["runs"].values()))
    per_seed = best_log_heldout(runs)
    diff = t_interval([b - s for b, s in zip(baseline_per_seed(), per_seed, strict=True)])
    return {"per_seed": per_seed, "best_log_heldout": statistics.fmean(per_seed), "diff": diff,
            "eval_s": round(time.time() - started, 1), "load_at_eval": load}


def scored() -> set[tuple]:
    if not CSV_PATH.exists():
        return set()
    with CSV_PATH.open() as f:
        return {(r["candidate"], r["variant"], r["seed"], r["threads"], r["isa"]) for r in csv.DictReader(f)}


def append_row(row: dict) -> None:
    CSV_PATH.parent.mkdir(parents=True, exist_ok=True)
    new = not CSV_PATH.exists()
    with CSV_PATH.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def released_per_seed(seed: int) -> list[float]:
    """The quick-selection study's released ``quick`` replicate of ``seed`` (this engine's, one thread)."""
    return recorded_per_seed(f"released/quick-s[0-9] [quick-s{seed}]")


def summary() -> str:
    """Markdown tables of runs.csv: every scored student, then each candidate and variant as a replicate group
    (σ_meta as ``amalgam evaluate --replicates`` computes it)."""
    import numpy as np

    from amalgam_plugin.suite import variance_components

    with CSV_PATH.open() as f:
        rows = list(csv.DictReader(f))
    lines = ["| candidate | variant | seed | threads | float path | meta-training (s) | load at start | "
             "best log held-out (5 seeds) | baseline - student [95% CI] | released quick, same seed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        released = statistics.fmean(released_per_seed(int(r["seed"])))
        lines.append(f"| {r['candidate']} | {r['variant']} | {r['seed']} | {r['threads']} | {r['isa']} | "
                     f"{r['meta_training_s']} | {r['load_at_start']} | {float(r['best_log_heldout']):.3f} | "
                     f"{float(r['diff_vs_baseline']):+.3f} [{float(r['diff_low']):+.3f}, {float(r['diff_high']):+.3f}] "
                     f"| {released:.3f} |")
    lines += ["", "| candidate | variant | float path | replicates | mean [95% CI] | σ_meta | σ_eval |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list] = {}
    for r in rows:  # each float path (threads, instruction set) on its own, then all paths together
        per_seed = [float(v) for v in r["per_seed"].split()]
        groups.setdefault((r["candidate"], r["variant"], f"{r['threads']} thread(s), {r['isa']}"), []).append(per_seed)
        groups.setdefault((r["candidate"], r["variant"], "all"), []).append(per_seed)
    for (candidate, variant, path), values in groups.items():
        if path == "all" and len(values) == len(groups.get((candidate, variant, "1 thread(s), native"), [])):
            continue  # one float path only: its row says it all
        v = variance_components(np.array(values))
        lines.append(f"| {candidate} | {variant} | {path} | {v.replicates} | {v.mean:.3f} [{v.low:.3f}, {v.high:.3f}] "
                     f"| {v.meta_std:.3f} | {v.eval_std:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", action="store_true", help="print the tables of runs.csv and stop")
    parser.add_argument("--candidate", choices=sorted(CANDIDATES))
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--isa", default="native", choices=["native", *ISA_ENV])
    parser.add_argument("--variants", nargs="+", default=["best"], choices=VARIANTS)
    parser.add_argument("--no-score", action="store_true", help="meta-train only")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new run after this long (a resumable candidate's run stops at a checkpoint)")
    args = parser.parse_args()
    if args.summary:
        print(summary(), end="")
        return
    if args.candidate is None or not args.seeds:
        parser.error("--candidate and --seeds are required (or --summary)")
    if args.isa != "native" and any(os.environ.get(k) != v for k, v in ISA_ENV[args.isa].items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ISA_ENV[args.isa]})
    begun = time.time()
    for seed in args.seeds:
        if args.max_minutes is not None and time.time() - begun > 60 * args.max_minutes:
            print(f"--max-minutes {args.max_minutes} passed: stopping before seed {seed}", flush=True)
            break
        left = None if args.max_minutes is None else args.max_minutes - (time.time() - begun) / 60
        record = train(args.candidate, seed, args.threads, args.isa, list(args.variants), left)
        if record is None:
            print(f"--max-minutes {args.max_minutes} passed: s{seed} stopped at a checkpoint; rerun to resume")
            break
        print(f"{args.candidate} s{seed} t{args.threads} {args.isa}: meta-training {record['meta_training_s']} s, "
              f"sha256 {record['sha256']['best']}", flush=True)
        if args.no_score:
            continue
        for variant in args.variants:
            key = (args.candidate, variant, str(seed), str(args.threads), args.isa)
            if key in scored():  # read again each time: another process may score this run's other variants
                continue
            folder = record["run"] if variant == "best" else record["run"] / "variants" / variant
            result = score(folder)
            append_row({"candidate": args.candidate, "variant": variant, "seed": seed, "threads": args.threads,
                        "isa": args.isa, "started": record["started"], "load_at_start": record["load_at_start"],
                        "meta_training_s": record["meta_training_s"],
                        "student_meta_steps": record["student_meta_steps"], "sha256": record["sha256"][variant],
                        "eval_seeds": EVAL_SEEDS, "best_log_heldout": round(result["best_log_heldout"], 4),
                        "per_seed": " ".join(f"{v:.4f}" for v in result["per_seed"]),
                        "diff_vs_baseline": round(result["diff"][0], 4), "diff_low": round(result["diff"][1], 4),
                        "diff_high": round(result["diff"][2], 4), "eval_s": result["eval_s"],
                        "load_at_eval": result["load_at_eval"]})
            print(f"  {variant}: {result['best_log_heldout']:.3f} (baseline - student {result['diff'][0]:+.3f} "
                  f"[{result['diff'][1]:+.3f}, {result['diff'][2]:+.3f}]), evaluation {result['eval_s']} s",
                  flush=True)


if __name__ == "__main__":
    main()
