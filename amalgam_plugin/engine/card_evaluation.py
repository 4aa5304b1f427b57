"""The model card's evaluation of a freshly meta-trained student (docs/method.md#evaluation) on the held-out
data: the student, the pool (paper form, and torch form in the full evaluation), the oracle, and torch Adam tuned
on the training data; and its summary against the best baseline."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from ..evaluate import runs_on
from ..files import write_text_atomically
from ..problems import Problem
from ..teachers import POOLS
from .presets import Preset

KNOWN_RUNS = Path(__file__).with_name("baseline_runs.json")
"""Finished evaluation runs of the preset pools' baselines on the Train problem (they do not depend on the
student), written by ``benchmarks/baseline_runs.py`` and reused by the card's reduced evaluation."""
FULL_EVAL_SEEDS = 10


def evaluation_seeds(recipe: Preset, full: bool) -> list[int]:
    return list(range(FULL_EVAL_SEEDS if full else recipe.eval_seeds))


def evaluate_student(student: nn.Module, pool, recipe: Preset, problem: Problem, workdir: Path, full: bool,
                     workers: int | None):
    """The card's evaluation: the preset's reduced one, reusing the known baseline runs of ``KNOWN_RUNS``, unless
    ``full`` (10 paired seeds, both forms of every teacher, everything re-run)."""
    from .. import evaluate as ev

    cache = workdir / ("eval_cache_full.json" if full else "eval_cache.json")
    seeds = evaluation_seeds(recipe, full)
    notes = {}
    recorded = None if full or not (isinstance(pool, str) and pool in POOLS) else _reuse_known_runs(cache, problem.name)
    if recorded:
        notes["reused baseline runs"] = (
            "the baselines' runs do not depend on the student: those of this problem and these seeds were reused "
            f"from amalgam-plugin's record (`{recorded['command']}`, torch {recorded['torch']}, one thread per "
            "run) instead of being re-run; `amalgam amalgamate --full-eval` re-runs everything")
    evaluation = ev.evaluate_with_baselines(
        problem, {"student": ev.student_factory(student)}, pool, seeds, recipe.eval_steps,
        forms=("paper", "torch") if (full or recipe.eval_textbook) else ("paper",), tune_seeds=seeds[:3],
        cache=cache, workers=workers or os.cpu_count() or 1,
    )
    evaluation.notes.update(notes)
    return evaluation


def _reuse_known_runs(cache: Path, problem: str) -> dict | None:
    """Copy the recorded baseline runs of ``problem`` into ``cache`` (keys absent there only); returns how they
    were recorded, or None when none apply."""
    if not KNOWN_RUNS.exists():
        return None
    record = json.loads(KNOWN_RUNS.read_text())
    known = runs_on(record["runs"], (problem, f"{problem}-selection"))
    if not known:
        return None
    stored = json.loads(cache.read_text()) if cache.exists() else {}
    write_text_atomically(cache, json.dumps({**known, **stored}))
    return record["recorded_with"]


def against_best_baseline(evaluation) -> dict:
    """The student's mean best log held-out loss against the best baseline's, with the paired interval."""
    baselines = [n for n in evaluation.names if n not in ("student", "oracle")]
    best = min(baselines, key=lambda n: evaluation.mean(n))
    diff = evaluation.paired("student")[best]
    return {"seeds": len(evaluation.seeds), "student_best_log_heldout": evaluation.mean("student"),
            "best_baseline": best, "best_baseline_log_heldout": evaluation.mean(best),
            # baseline − student: positive favours the student
            "difference": {"mean": diff.mean, "low": diff.low, "high": diff.high}}
