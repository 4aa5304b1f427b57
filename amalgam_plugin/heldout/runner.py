"""The held-out suite's runner (docs/heldout.md#runs): every task x optimizer x seed in a fresh process, its
result cached under the run's full specification, then one table per task against AdamW tuned over a grid of
learning rates and AdamW at its default.

Each run is forked into its own process of one torch thread, so its ``ru_maxrss`` is its own peak: the suite
reports that peak beside the optimizer's state bytes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from ..evaluate import paired_difference
from ..files import write_text_atomically
from ..threads import torch_threads
from .task import HeldoutTask
from .train import hidden_matrices, optimizer_label, train_run

DEFAULT_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
ADAMW_DEFAULT = {"kind": "adamw", "lr": 1e-3}  # the untuned user: torch's default
LION = {"kind": "lion", "lr": 1e-4}  # timm's default (the Lion paper: 3-10x below AdamW's)
MUON = {"kind": "muon", "lr": 0.02}  # the Muon authors' setting; AdamW at its default for the rest
CACHE_VERSION = 1
WIDENINGS = 2  # learning rates a task's grid may grow by, one at a time, while its best sits at an edge


def canonical_json(value) -> str:  # noqa: ANN001 (any JSON value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Job:
    task: HeldoutTask
    optimizer: dict
    seed: int

    def key(self) -> str:
        """The cache key: the whole run specification as canonical JSON."""
        return canonical_json({"version": CACHE_VERSION, "task": self.task.specification(),
                               "optimizer": self.optimizer, "seed": self.seed, "threads": 1})


def muon_applies(task: HeldoutTask) -> bool:
    import torch

    with torch.random.fork_rng(devices=[]):
        return bool(hidden_matrices(task, task.model()))


def student_specs(students: Sequence[str]) -> list[dict]:
    """The students' run specifications: the name and the content hash (config and weights), so that a folder
    changed in place is run again, not read from the cache."""
    from ..hub import content_hash, load_student

    return [{"kind": "student", "name": s, "sha256": content_hash(load_student(s))} for s in students]


def task_optimizers(task: HeldoutTask, students: Sequence[dict], lrs: Sequence[float]) -> list[dict]:
    """The grid of AdamW learning rates (with the default's), Lion, Muon where the task has hidden matrices, and
    the students (``student_specs``), untuned."""
    grid = [{"kind": "adamw", "lr": lr} for lr in sorted({*lrs, ADAMW_DEFAULT["lr"]})]
    return grid + [LION] + ([MUON] if muon_applies(task) else []) + list(students)


def plan(tasks: Sequence[HeldoutTask], students: Sequence[dict], seeds: Sequence[int], lrs: Sequence[float]
         ) -> list[Job]:
    return [Job(task, spec, seed) for task in tasks for spec in task_optimizers(task, students, lrs) for seed in seeds]


# --- running ---------------------------------------------------------------------------------------------------


def _child(connection, job: Job) -> None:  # noqa: ANN001 (a Pipe end)
    try:
        with torch_threads(1):
            connection.send(("ok", train_run(job.task, job.optimizer, job.seed)))
    except Exception as err:  # reported by the parent in one line
        connection.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        connection.close()


def _start(job: Job):
    context = multiprocessing.get_context("fork")  # the child inherits the tasks, the user's own included
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, job), daemon=True)
    process.start()
    send.close()
    return receive, process


def load_cache(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _prepare(jobs: Sequence[Job]) -> None:
    """Load every task's data and the libraries its runs import once, here, so forked runs share them."""
    from .. import optim  # noqa: F401 (the students' optimizer)

    for task in {id(job.task): job.task for job in jobs}.values():
        task.data()
        if task.trainer:
            import transformers.trainer  # noqa: F401


def run_jobs(jobs: Sequence[Job], cache_path: Path, workers: int = 1, max_minutes: float | None = None,
             progress: Callable[[str], None] = print) -> tuple[dict, bool]:
    """Run every job not in the cache, ``workers`` at a time, saving the cache after each; with ``max_minutes``,
    no run starts after that time. Returns ``(cache, complete)``; a failed run stops all with a ValueError."""
    cache = load_cache(cache_path)
    pending = [job for job in jobs if job.key() not in cache]
    _prepare(pending)
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    running: dict = {}
    done = len(jobs) - len(pending)
    try:
        while pending or running:
            while pending and len(running) < workers and (deadline is None or time.monotonic() < deadline):
                job = pending.pop(0)
                connection, process = _start(job)
                running[connection] = (process, job)
            if not running:
                break
            for connection in wait(list(running)):
                process, job = running.pop(connection)
                try:
                    status, value = connection.recv()
                except EOFError:
                    status, value = "error", "its process died"
                process.join()
                what = f"{job.task.name} / {optimizer_label(job.optimizer)} / seed {job.seed}"
                if status == "error":
                    raise ValueError(f"run {what} failed: {value}")
                cache[job.key()] = value
                write_text_atomically(cache_path, json.dumps(cache))
                done += 1
                progress(f"[{done}/{len(jobs)}] {what}: best log held-out {best_of(value):.3f}, "
                         f"{1000 * value['seconds_per_step']:.1f} ms/step")
    finally:
        for process, _ in running.values():
            process.terminate()
            process.join()
    return cache, not pending


# --- summary ---------------------------------------------------------------------------------------------------


def _number(x: float) -> float | None:
    """Strict JSON: a non-finite float becomes null."""
    return float(x) if x is not None and math.isfinite(x) else None


def best_of(run: dict) -> float:
    """A run's best log held-out loss, NaN where it had none (stored as null)."""
    return math.nan if run["best_log_heldout"] is None else run["best_log_heldout"]


def _difference(a: list[float], b: list[float]) -> dict:
    d = paired_difference(a, b)
    return {"mean": _number(d.mean), "low": _number(d.low), "high": _number(d.high), "n": d.n}


def summarize_task(task: HeldoutTask, students: Sequence[dict], seeds: Sequence[int], lrs: Sequence[float],
                   cache: dict) -> dict:
    """Per optimizer: its runs' best log held-out losses, their paired differences against tuned AdamW and AdamW
    at 1e-3 (optimizer minus AdamW: negative is better), time per step, state bytes and peak memory."""
    specs = task_optimizers(task, students, lrs)
    runs = {canonical_json(s): [cache[Job(task, s, seed).key()] for seed in seeds] for s in specs}
    best = {k: [best_of(r) for r in rs] for k, rs in runs.items()}
    means = grid_means(task, seeds, lrs, cache)
    tuned_lr = tuned_rate(means)
    tuned = {"kind": "adamw", "lr": tuned_lr}
    tuned_best, default_best = best[canonical_json(tuned)], best[canonical_json(ADAMW_DEFAULT)]
    adamw_seconds = float(np.mean([r["seconds_per_step"] for r in runs[canonical_json(ADAMW_DEFAULT)]]))
    rows = []
    shown = [s for s in specs if s["kind"] in ("student", "lion", "muon")] + [tuned, ADAMW_DEFAULT]
    for spec in shown:
        key, values = canonical_json(spec), best[canonical_json(spec)]
        seconds = float(np.mean([r["seconds_per_step"] for r in runs[key]]))
        label = optimizer_label(spec) + (" (tuned)" if spec is tuned else " (default)" if spec is ADAMW_DEFAULT
                                         else "")
        rows.append({
            "optimizer": label, "spec": spec,
            "best_log_heldout": [_number(v) for v in values],
            "mean": _number(float(np.nanmean(values))) if np.isfinite(values).any() else None,
            "sd": _number(float(np.nanstd(values, ddof=1))) if np.isfinite(values).sum() > 1 else None,
            "vs_tuned_adamw": _difference(values, tuned_best),
            "vs_adamw_default": _difference(values, default_best),
            "seconds_per_step": seconds, "time_ratio": seconds / adamw_seconds,
            "state_bytes": max(r["state_bytes"] for r in runs[key]),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs[key]),
            "diverged": sum(r["diverged"] for r in runs[key]),
        })
    return {
        "task": task.specification(), "family": task.family, "description": task.description,
        "in_mixture": task.in_mixture, "parameters": runs[canonical_json(ADAMW_DEFAULT)][0]["parameters"],
        "adamw_grid": {f"{lr:g}": _number(m) for lr, m in means.items()}, "tuned_lr": tuned_lr,
        "tuned_lr_at_edge": tuned_lr in (min(lrs), max(lrs)), "rows": rows,
        "runs": runs,
    }


def grid_means(task: HeldoutTask, seeds: Sequence[int], lrs: Sequence[float], cache: dict) -> dict[float, float]:
    """AdamW's mean best log held-out loss at each learning rate of the grid."""
    return {lr: float(np.nanmean([best_of(cache[Job(task, {"kind": "adamw", "lr": lr}, seed).key()])
                                  for seed in seeds]))
            for lr in sorted(lrs)}


def tuned_rate(means: dict[float, float]) -> float:
    return min(means, key=lambda lr: means[lr] if math.isfinite(means[lr]) else math.inf)


def beyond_edge(lrs: Sequence[float], tuned: float) -> float | None:
    """The next learning rate past the grid's edge where the tuned one sits, at the edge's own spacing."""
    lrs = sorted(lrs)
    if tuned == lrs[0]:
        return float(f"{lrs[0] ** 2 / lrs[1]:.3g}")
    if tuned == lrs[-1]:
        return float(f"{lrs[-1] ** 2 / lrs[-2]:.3g}")
    return None


def _interval(d: dict) -> str:
    if d["mean"] is None:
        return "n/a"
    if d["low"] is None:
        return f"{d['mean']:+.3f}"
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def markdown(summaries: dict, seeds: int) -> str:
    lines = [f"## Held-out suite ({seeds} paired seeds)", "",
             "Δ = optimizer - AdamW in best log held-out loss (negative: the optimizer is better), mean over paired "
             "seeds with its 95% t interval. Time per step against AdamW at 1e-3; state: the optimizer's state "
             "bytes; peak memory: the peak resident set (ru_maxrss) of the run's own process, forked from the runner "
             "with the data and libraries loaded (the same base for every optimizer of a task).", ""]
    for name, s in summaries.items():
        edge = " **(still at the grid's edge after widening it: widen --lrs)**" if s["tuned_lr_at_edge"] else ""
        grid = ", ".join(f"{lr}: {'n/a' if m is None else f'{m:.3f}'}" for lr, m in s["adamw_grid"].items())
        lines += [f"### {name}: {s['description']}", "",
                  f"{s['parameters']:,} parameters; {s['task']['steps']} steps, batch {s['task']['batch_size']}, "
                  f"schedule {s['task']['schedule']}; family: {s['family']}; in a meta-training mixture: "
                  f"{'yes' if s['in_mixture'] else 'no'}.", "",
                  f"AdamW grid (lr: mean best log held-out): {grid}; tuned lr {s['tuned_lr']:g}{edge}.", "",
                  "| optimizer | best log held-out | Δ vs tuned AdamW | Δ vs AdamW 1e-3 | ms/step (x AdamW) "
                  "| state KiB | peak memory MiB | diverged |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            mean = "n/a" if r["mean"] is None else f"{r['mean']:.3f}" + ("" if r["sd"] is None else f" ± {r['sd']:.3f}")
            lines.append(f"| {r['optimizer']} | {mean} | {_interval(r['vs_tuned_adamw'])} | "
                         f"{_interval(r['vs_adamw_default'])} | {1000 * r['seconds_per_step']:.1f} "
                         f"({r['time_ratio']:.1f}x) | {r['state_bytes'] / 1024:.0f} | "
                         f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['diverged']} |")
        lines.append("")
    return "\n".join(lines)


def run_suite(tasks: Sequence[HeldoutTask], students: Sequence[str], seeds: Sequence[int], out: Path,
              lrs: Sequence[float] = DEFAULT_LRS, workers: int = 1, max_minutes: float | None = None,
              progress: Callable[[str], None] = print, widenings: int = WIDENINGS) -> dict | None:
    """Run (or resume) the suite into ``out``: ``cache.json`` as it goes, then ``results.md`` and
    ``results.json``. Where AdamW's best learning rate sits at an edge of the grid, the task's grid grows past
    that edge, up to ``widenings`` rates. None when ``max_minutes`` stopped it first (rerun the same command to
    continue)."""
    if len(lrs) < 2 or min(lrs) <= 0:
        raise ValueError("the AdamW grid needs at least 2 positive learning rates")
    specs = student_specs(students)  # each loaded and validated before anything is written
    out.mkdir(parents=True, exist_ok=True)
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    grids = {task.name: sorted(lrs) for task in tasks}
    for widening in range(widenings + 1):
        jobs = [job for task in tasks for job in plan([task], specs, seeds, grids[task.name])]
        minutes = None if deadline is None else max(0.0, deadline - time.monotonic()) / 60
        cache, complete = run_jobs(jobs, out / "cache.json", workers, minutes, progress)
        if not complete:
            return None
        grown = False
        for task in tasks:
            grid = grids[task.name]
            extra = beyond_edge(grid, tuned_rate(grid_means(task, seeds, grid, cache)))
            if extra is not None and widening < widenings:
                grids[task.name], grown = sorted([*grid, extra]), True
        if not grown:
            break
    summaries = {t.name: summarize_task(t, specs, seeds, grids[t.name], cache) for t in tasks}
    result = {"seeds": list(seeds), "lrs": list(lrs), "students": list(students), "tasks": summaries}
    write_text_atomically(out / "results.json", json.dumps(result, indent=1, allow_nan=False) + "\n")
    write_text_atomically(out / "results.md", markdown(summaries, len(seeds)))
    return result
