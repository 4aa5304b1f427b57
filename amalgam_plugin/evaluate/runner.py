"""The run loop: every optimizer on every seed (paired), from the cache where a run is there already, in this
process or in worker processes (:mod:`.executor`), collected into an :class:`Evaluation`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ..problems import Problem
from ..threads import torch_threads
from . import executor
from .cache import load_runs, run_key, save_runs, specification
from .report import Evaluation
from .runs import OptimizerFactory, RunResult


def _jobs(problem: Problem, optimizers: Mapping[str, OptimizerFactory], seeds: Sequence[int], steps: int,
          eval_every: int) -> list[executor.Job]:
    """Seed-major, so that an interrupted evaluation leaves mostly whole seeds; each with its cache key."""
    specs = {name: specification(name, factory) for name, factory in optimizers.items()}
    return [executor.Job(problem, optimizers[n], s, steps, eval_every, n, run_key(specs[n], problem.name, s, steps,
                                                                                  eval_every))
            for s in seeds for n in optimizers]


def _collect(evaluation: Evaluation, jobs: list[executor.Job], stored: Mapping[str, dict]) -> Evaluation:
    """``evaluation`` with the finished runs of ``jobs`` (all in ``stored``), each under the name it was asked for
    (runs are keyed by specification, so another name may have run it first)."""
    evaluation.runs = {job.name: [] for job in jobs}
    for job in jobs:
        evaluation.runs[job.name].append(RunResult.from_dict({**stored[job.key], "name": job.name}))
    return evaluation


def evaluate(
    problem: Problem,
    optimizers: Mapping[str, OptimizerFactory],
    seeds: Sequence[int],
    steps: int = 1000,
    eval_every: int = 25,
    reference: str | None = None,
    notes: Mapping[str, str] | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> Evaluation:
    """Run every optimizer on every seed (paired) and collect an :class:`Evaluation`.

    ``cache``: a JSON file of finished runs, so an interrupted evaluation resumes where it stopped. A run is keyed
    by its full specification (:mod:`.cache`); a plain factory (not :class:`Specified`) by its name only: use a
    fresh file when such a factory changes under the same name.

    ``workers``: ``None`` runs in this process at its thread count, one run after another. ``workers = N``
    runs every run with one torch thread: 1 in this process, N >= 2 in that many worker processes (forks of this
    one, so factories may be closures), so the numbers do not depend on N; this process's thread count is left as
    it is. A run at another thread count may differ in the last bits (matrix products sum in another order).
    Where ``fork`` is unavailable (Windows) it runs in-process.
    """
    if not optimizers:
        raise ValueError("no optimizers to evaluate")
    if reference is not None and reference not in optimizers:
        raise ValueError(f"reference {reference!r} is not among the optimizers: {', '.join(optimizers)}")
    cache_path = Path(cache) if cache is not None else None
    stored = load_runs(cache_path)
    save = (lambda: save_runs(cache_path, stored)) if cache_path is not None else None
    jobs = _jobs(problem, optimizers, seeds, steps, eval_every)
    evaluation = Evaluation(problem.name, list(seeds), steps, eval_every, reference=reference, notes=dict(notes or {}))
    desc = f"evaluate on {problem.name}"
    if executor.parallel(workers):
        if any(job.key not in stored for job in jobs):
            executor.run_parallel(jobs, workers, stored, save, desc, progress)
        return _collect(evaluation, jobs, stored)
    bar = tqdm(jobs, desc=desc, disable=not progress)
    with torch_threads(1 if workers is not None else None):
        for job in bar:
            bar.set_postfix_str(f"{job.name} seed {job.seed}")
            if job.key not in stored:
                stored[job.key] = job.run().to_dict()
                if save is not None:
                    save()
    return _collect(evaluation, jobs, stored)
