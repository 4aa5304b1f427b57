"""Evaluation of optimizers on a problem (docs/method.md#evaluation).

One *run* trains a problem's model from a seeded initialisation for ``steps`` steps with one optimizer and
records the held-out loss (all held-out examples) at step 0 and every ``eval_every`` steps.  A seed fixes the
initialisation and the minibatch order through two explicit ``torch.Generator`` objects
(:func:`seed_generators`), so every optimizer compared under one seed sees the same start and the same batches
(paired seeds).  Metrics per run:

* ``best_log_heldout``: log of the lowest finite held-out loss of the run (the paper's primary metric);
* ``final_log_heldout``: log of the held-out loss at the last step (NaN when the run diverged);
* ``train_last100``: mean training minibatch loss over the last 100 steps (NaN when the run diverged).

A run diverges when a training loss or a held-out loss is not finite; it stops there, keeps its best finite
value and is flagged (``diverged``, ``diverged_at``).

:func:`evaluate` runs several optimizers on the same seeds and returns an :class:`Evaluation` (means, paired
differences against a reference with 95% t-intervals, markdown or plain tables, mean curves and a PNG plot).
Baseline builders: :func:`pool_baselines` (each pool member in the paper's form and in torch's textbook form),
:func:`tune_adam` (torch Adam tuned over a learning-rate grid, chosen on the *training* digits through
``selection_problem`` by default) and :meth:`Evaluation.add_oracle` (the best pool member, chosen on the
held-out metric like the paper's oracle).  Students run through ``amalgam_plugin.optim.AmalgamOptimizer``
(:func:`student_factory`), with their configured warm-up.

Independent runs can execute in worker processes (``workers=`` of :func:`evaluate`, :func:`tune_adam` and
:func:`evaluate_with_baselines`): each worker is a ``fork`` of the caller running one thread, and a run's
numbers in a worker equal the in-process ones when the caller also runs one thread.

Library code here never changes the calling process's torch thread count; scripts decide that.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .files import write_text_atomically
from .problems import Problem, selection_problem
from .teachers import Teacher, TeacherOptimizer, make_pool
from .threads import torch_threads

logger = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]
METRICS = ("best_log_heldout", "final_log_heldout", "train_last100")
ADAM_TUNING_LRS = (1e-3, 2e-3, 5e-3, 1e-2)


def seed_generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """(initialisation generator, batch-order generator) of a paired seed (``2*seed``, ``2*seed+1``)."""
    return torch.Generator().manual_seed(2 * seed), torch.Generator().manual_seed(2 * seed + 1)


def _log(x: float) -> float:
    return math.log(x) if math.isfinite(x) and x > 0 else float("nan")


@dataclass
class RunResult:
    """One training run: held-out curve, training losses and the docs/method.md#evaluation metrics."""

    name: str
    seed: int
    steps: int
    eval_steps: list[int]
    heldout: list[float]
    train_losses: list[float]
    diverged: bool = False
    diverged_at: int | None = None
    wall_s: float = 0.0
    train_seconds: list[float] = field(default_factory=list)  # training time (no held-out passes) at eval_steps

    @property
    def best_log_heldout(self) -> float:
        finite = [h for h in self.heldout if math.isfinite(h)]
        return _log(min(finite)) if finite else float("nan")

    @property
    def final_log_heldout(self) -> float:
        if self.diverged or not self.heldout:
            return float("nan")
        return _log(self.heldout[-1])

    @property
    def train_last100(self) -> float:
        if self.diverged or not self.train_losses:
            return float("nan")
        return float(np.mean(self.train_losses[-100:]))

    def metric(self, name: str) -> float:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}")
        return float(getattr(self, name))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunResult:
        return cls(**dict(data))


def _flagged_divergence(result: RunResult, step: int, what: str) -> RunResult:
    result.diverged, result.diverged_at = True, step
    logger.warning("run %r seed %d diverged at step %d (%s not finite)", result.name, result.seed, step, what)
    return result


def run(
    problem: Problem,
    make_optimizer: OptimizerFactory,
    seed: int,
    steps: int = 1000,
    eval_every: int = 25,
    name: str = "optimizer",
) -> RunResult:
    """Train ``problem``'s model for ``steps`` steps with ``make_optimizer(params)`` from the seed's
    initialisation and batch order; the held-out loss is measured at step 0 and every ``eval_every`` steps
    (and at the last step).  Parameters are leaf tensors with ``requires_grad=True``."""
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps ({steps}) and eval_every ({eval_every}) must be positive")
    init_gen, batch_gen = seed_generators(seed)
    params = [p.detach().clone().requires_grad_(True) for p in problem.init_params(init_gen)]
    optimizer = make_optimizer(params)
    batches = problem.train_batches(batch_gen)
    start = time.perf_counter()
    result = RunResult(name, seed, steps, [0], [problem.heldout_loss(params)], [], train_seconds=[0.0])
    if not math.isfinite(result.heldout[0]):
        return _flagged_divergence(result, 0, "initial held-out loss")
    training = 0.0
    for step in range(1, steps + 1):
        step_started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = problem.loss(params, next(batches))
        value = float(loss.detach())
        result.train_losses.append(value)
        if not math.isfinite(value):
            return _flagged_divergence(result, step, "training loss")
        loss.backward()
        optimizer.step()
        training += time.perf_counter() - step_started
        if step % eval_every == 0 or step == steps:
            heldout = problem.heldout_loss(params)
            result.eval_steps.append(step)
            result.train_seconds.append(training)
            result.heldout.append(heldout)
            if not math.isfinite(heldout):
                return _flagged_divergence(result, step, "held-out loss")
    result.wall_s = time.perf_counter() - start
    return result


# --- statistics ---------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes' ``betacf``)."""
    tiny, eps = 1e-300, 3e-16  # eps just above the float spacing at 1, which d * c can settle on
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betai(a: float, b: float, x: float, y: float) -> float:
    """Regularized incomplete beta function I_x(a, b), given ``x`` and ``y = 1 - x`` (both computed without
    cancellation by the caller)."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, y) / b


def _t_probability_beyond(t: float, df: float, central: bool) -> float:
    """For Student's t with ``df`` degrees of freedom and ``t >= 0``: P(T > t), or P(0 < T < t) when
    ``central`` (each the better-conditioned side for its range of quantiles)."""
    x, y = df / (df + t * t), t * t / (df + t * t)
    return 0.5 * (_betai(0.5, df / 2.0, y, x) if central else _betai(df / 2.0, 0.5, x, y))


def t_quantile(p: float, df: float) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom (what ``scipy.stats.t.ppf`` returns),
    by bisection on the regularized incomplete beta function down to adjacent floats: within 1e-10 of the
    exact value for ``df`` up to 1e5 and ``p`` in [1e-6, 1 - 1e-6]. ``p`` of 0 or 1 gives -inf or inf; ``p``
    outside [0, 1] or ``df <= 0`` gives NaN."""
    if not (0.0 <= p <= 1.0) or not df > 0:
        return float("nan")
    if p == 0.5:
        return 0.0
    if p in (0.0, 1.0):
        return math.copysign(math.inf, p - 0.5)
    tail = 1.0 - p if p > 0.5 else p  # P(T > |quantile|)
    central = tail > 0.25  # then solve P(0 < T < t) = 0.5 - tail instead (exact subtraction there)
    target = abs(p - 0.5) if central else tail

    def below(t: float) -> bool:  # is t below the quantile's magnitude?
        value = _t_probability_beyond(t, df, central)
        return value < target if central else value > target

    lo, hi = 0.0, 1.0
    while below(hi):
        lo, hi = hi, 2.0 * hi
        if math.isinf(hi):
            return math.copysign(math.inf, p - 0.5)
    while lo < (mid := 0.5 * (lo + hi)) < hi:
        lo, hi = (mid, hi) if below(mid) else (lo, mid)
    t = 0.5 * (lo + hi)
    return t if p > 0.5 else -t


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over paired seeds with its two-sided t confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    sd: float
    confidence: float = 0.95

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """t-interval of the mean paired difference ``a - b`` (seeds paired by position); pairs with a NaN on
    either side are dropped. With fewer than 2 pairs the interval is NaN."""
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired samples differ in length: {a_arr.shape} vs {b_arr.shape}")
    d = (a_arr - b_arr)[np.isfinite(a_arr - b_arr)]
    n = len(d)
    if n == 0:
        return PairedDifference(float("nan"), float("nan"), float("nan"), 0, float("nan"), confidence)
    mean = float(d.mean())
    if n < 2:
        return PairedDifference(mean, float("nan"), float("nan"), n, float("nan"), confidence)
    sd = float(d.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n, sd, confidence)


# --- the evaluation object ----------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Runs of several optimizers on the same paired seeds.

    ``runs[name]`` lists one :class:`RunResult` per seed, in the order of ``seeds``. ``notes[name]`` says
    how a baseline was chosen (shown under the table); ``reference`` names the optimizer the paired
    differences are taken against (``None``: the first one).
    """

    problem: str
    seeds: list[int]
    steps: int
    eval_every: int
    runs: dict[str, list[RunResult]] = field(default_factory=dict)
    reference: str | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.runs)

    def values(self, name: str, metric: str = "best_log_heldout") -> np.ndarray:
        if name not in self.runs:
            raise ValueError(f"unknown optimizer {name!r}; evaluated: {', '.join(self.runs)}")
        return np.array([r.metric(metric) for r in self.runs[name]], dtype=float)

    def mean(self, name: str, metric: str = "best_log_heldout") -> float:
        v = self.values(name, metric)
        v = v[np.isfinite(v)]
        return float(v.mean()) if len(v) else float("nan")

    def paired(
        self, reference: str | None = None, metric: str = "best_log_heldout", confidence: float = 0.95
    ) -> dict[str, PairedDifference]:
        """``name -> paired difference (name - reference)`` for every other optimizer."""
        ref = reference or self.reference or self.names[0]
        ref_values = self.values(ref, metric)
        return {n: paired_difference(self.values(n, metric), ref_values, confidence) for n in self.names if n != ref}

    def add_oracle(self, members: Iterable[str], label: str = "oracle", metric: str = "best_log_heldout") -> str:
        """Add the member with the lowest mean ``metric`` (held-out, as the paper's oracle: a choice that
        favours the baseline) under ``label``; returns the chosen member's name."""
        members = list(members)
        if not members:
            raise ValueError("the oracle needs at least one pool member")
        best = min(members, key=lambda n: (math.isnan(self.mean(n, metric)), self.mean(n, metric)))
        self.runs[label] = self.runs[best]
        self.notes[label] = (
            f"= {best}: the pool member with the lowest mean {metric} on these held-out runs "
            f"(chosen among {', '.join(members)}; favours the baseline)"
        )
        return best

    def rows(self, reference: str | None = None) -> list[dict[str, Any]]:
        ref = reference or self.reference or self.names[0]
        diffs = self.paired(ref)
        rows = []
        for n in self.names:
            runs = self.runs[n]
            rows.append(
                {
                    "name": n,
                    "best_log_heldout": self.mean(n, "best_log_heldout"),
                    "final_log_heldout": self.mean(n, "final_log_heldout"),
                    "train_last100": self.mean(n, "train_last100"),
                    "diff": None if n == ref else diffs[n],
                    "diverged": sum(r.diverged for r in runs),
                    "n": len(runs),
                }
            )
        return rows

    def table(self, fmt: str = "markdown", reference: str | None = None) -> str:
        """The evaluation table (docs/method.md#evaluation): means over seeds and the paired difference of best
        log held-out loss against the reference (negative = better than the reference) with its 95% t-interval."""
        if fmt not in ("markdown", "plain"):
            raise ValueError(f"unknown table format {fmt!r}; valid: markdown, plain")
        ref = reference or self.reference or self.names[0]
        header = [
            "optimizer",
            "best log held-out",
            "final log held-out",
            "train loss (last 100)",
            f"Δ best vs {ref} [95% CI]",
            "diverged",
        ]
        body = []
        for row in self.rows(ref):
            body.append(
                [
                    row["name"],
                    f"{row['best_log_heldout']:.3f}",
                    f"{row['final_log_heldout']:.3f}",
                    f"{row['train_last100']:.3f}",
                    "reference" if row["diff"] is None else str(row["diff"]),
                    f"{row['diverged']}/{row['n']}",
                ]
            )
        if fmt == "markdown":
            lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
            lines += ["| " + " | ".join(cells) + " |" for cells in body]
        else:
            widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
            lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body]]
        return "\n".join(lines)

    def protocol(self) -> str:
        """One sentence stating what the table measures."""
        return (
            f"Problem `{self.problem}`, {len(self.seeds)} paired seed{'s' if len(self.seeds) != 1 else ''} "
            f"({', '.join(map(str, self.seeds))}), "
            f"{self.steps} steps, held-out loss on all held-out examples every {self.eval_every} steps; "
            "log = natural log; intervals: 95% t-intervals of the mean paired difference."
        )

    def notes_text(self) -> str:
        return "\n".join(f"- {n}: {text}" for n, text in self.notes.items())

    def mean_curves(self) -> dict[str, tuple[list[int], list[float]]]:
        """``name -> (eval steps, mean held-out loss over the seeds)``; a diverged run's missing points are
        skipped (nan-mean)."""
        curves = {}
        for n, runs in self.runs.items():
            steps = max((r.eval_steps for r in runs), key=len)
            grid = np.full((len(runs), len(steps)), np.nan)
            for i, r in enumerate(runs):
                values = np.asarray(r.heldout[: len(steps)], dtype=float)
                grid[i, : len(values)] = np.where(np.isfinite(values), values, np.nan)
            with np.errstate(all="ignore"):
                counts = np.isfinite(grid).sum(0)
                mean = np.where(counts > 0, np.nansum(grid, 0) / np.maximum(counts, 1), np.nan)
            curves[n] = (list(steps), mean.tolist())
        return curves

    def plot(self, path: str | os.PathLike, title: str | None = None, highlight: str | None = None) -> Path:
        """PNG of the mean held-out loss against steps (log scale), one line per optimizer. Uses matplotlib's
        object API (no pyplot, no global backend change)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.2), dpi=90)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for n, (steps, mean) in self.mean_curves().items():
            bold = n == highlight
            ax.plot(steps, mean, label=n, linewidth=2.6 if bold else 1.2, zorder=3 if bold else 2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"held-out loss (mean of {len(self.seeds)} seeds)")
        ax.set_title(title or f"{self.problem}: held-out loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, format="png")
        return path

    def to_dict(self) -> dict:
        return {
            "problem": self.problem,
            "seeds": list(self.seeds),
            "steps": self.steps,
            "eval_every": self.eval_every,
            "reference": self.reference,
            "notes": dict(self.notes),
            "runs": {n: [r.to_dict() for r in runs] for n, runs in self.runs.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        runs = {n: [RunResult.from_dict(r) for r in rs] for n, rs in data["runs"].items()}
        return cls(
            data["problem"],
            list(data["seeds"]),
            data["steps"],
            data["eval_every"],
            runs,
            data.get("reference"),
            dict(data.get("notes", {})),
        )


def _load_cache(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    return json.loads(path.read_text())


def _save_cache(path: Path, data: dict) -> None:
    write_text_atomically(path, json.dumps(data))


def _cache_key(name: str, seed: int, steps: int, eval_every: int, problem: str) -> str:
    return f"{name}|seed={seed}|steps={steps}|every={eval_every}|problem={problem}"


# --- runs in worker processes -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    """One independent run (one optimizer on one seed) of a parallel evaluation."""

    problem: Problem
    factory: OptimizerFactory
    seed: int
    steps: int
    eval_every: int
    name: str

    @property
    def key(self) -> str:
        return _cache_key(self.name, self.seed, self.steps, self.eval_every, self.problem.name)


def _jobs(
    problem: Problem, optimizers: Mapping[str, OptimizerFactory], seeds: Sequence[int], steps: int, eval_every: int
) -> list[_Job]:
    # seed-major, as the in-process loop: an interrupted evaluation leaves mostly whole seeds
    return [_Job(problem, optimizers[n], s, steps, eval_every, n) for s in seeds for n in optimizers]


# Job tables of the parallel evaluations in progress, by token. Factories are often closures and problems hold
# tensors, so nothing of a job is pickled: the workers are forks of the caller that inherit these tables, and
# receive only (token, index).
_JOB_TABLES: dict[int, list[_Job]] = {}
_TABLE_TOKENS = itertools.count()


def _fork_context() -> multiprocessing.context.BaseContext | None:
    if "fork" not in multiprocessing.get_all_start_methods():
        return None
    return multiprocessing.get_context("fork")


def _parallel(workers: int | None) -> bool:
    """Whether ``workers`` asks for worker processes (``None`` or 1: the in-process loop)."""
    if workers is None:
        return False
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be None or a positive integer, not {workers!r}")
    if workers == 1:
        return False
    if _fork_context() is None:
        logger.warning("workers=%d needs the 'fork' start method, unavailable here: running in-process", workers)
        return False
    return True


def _worker_init() -> None:
    # the child only: one thread per run (the parent's thread count is untouched), and Ctrl+C is the parent's
    # business (it stops the workers), so a worker never dies half-way through the queue's protocol
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_run(token: int, index: int) -> dict:
    job = _JOB_TABLES[token][index]
    return run(job.problem, job.factory, job.seed, job.steps, job.eval_every, name=job.name).to_dict()


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's worker processes now (running runs are abandoned); the pool's shutdown then reaps
    them."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()


def _run_parallel(jobs: list[_Job], workers: int, stored: dict, cache_path: Path | None, desc: str,
                  progress: bool) -> None:
    """Run the ``jobs`` whose cache key is not in ``stored`` in up to ``workers`` forked worker processes (one
    thread each), writing each result into ``stored`` (and the JSON cache) as it arrives; the progress bar counts
    every job, the cached ones as done. A run's exception is raised here with its own type and message; on any
    exception, Ctrl+C included, the remaining runs are cancelled and the workers terminated."""
    missing = [i for i, job in enumerate(jobs) if job.key not in stored]
    token = next(_TABLE_TOKENS)
    _JOB_TABLES[token] = jobs
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(missing), desc=desc, disable=not progress)
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(missing)), mp_context=_fork_context(),
                                 initializer=_worker_init) as pool:
            pending = {}
            try:
                for i in missing:
                    pending[pool.submit(_worker_run, token, i)] = i
                while pending:
                    # a timeout, so that a Ctrl+C delivered to another thread is noticed here too
                    done, _ = wait_futures(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        job = jobs[pending.pop(future)]
                        stored[job.key] = future.result()  # a run's exception surfaces here
                        if cache_path is not None:
                            _save_cache(cache_path, stored)
                        bar.set_postfix_str(f"{job.name} seed {job.seed}")
                        bar.update(1)
            except BaseException:
                for future in pending:
                    future.cancel()
                _stop_workers(pool)
                raise
    finally:
        bar.close()
        del _JOB_TABLES[token]


def _collect(
    problem_name: str,
    names: Iterable[str],
    seeds: Sequence[int],
    steps: int,
    eval_every: int,
    stored: Mapping[str, Any],
    reference: str | None = None,
    notes: Mapping[str, str] | None = None,
) -> Evaluation:
    """The :class:`Evaluation` of finished runs (all in ``stored``), in the in-process loop's order."""
    evaluation = Evaluation(problem_name, list(seeds), steps, eval_every, reference=reference, notes=dict(notes or {}))
    evaluation.runs = {
        n: [RunResult.from_dict(stored[_cache_key(n, s, steps, eval_every, problem_name)]) for s in seeds]
        for n in names
    }
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

    ``cache``: a JSON file of finished runs keyed by optimizer name, seed, steps and ``eval_every``, so an
    interrupted evaluation resumes where it stopped (the key does not cover the optimizer's settings: use a
    fresh file when a factory changes under the same name).

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
    stored = _load_cache(cache_path)
    if _parallel(workers):
        jobs = _jobs(problem, optimizers, seeds, steps, eval_every)
        if any(job.key not in stored for job in jobs):
            _run_parallel(jobs, workers, stored, cache_path, f"evaluate on {problem.name}", progress)
        return _collect(problem.name, optimizers, seeds, steps, eval_every, stored, reference, notes)
    evaluation = Evaluation(problem.name, list(seeds), steps, eval_every, reference=reference, notes=dict(notes or {}))
    evaluation.runs = {n: [] for n in optimizers}
    jobs = [(n, s) for s in seeds for n in optimizers]  # seed-major: an interrupted run leaves whole seeds
    bar = tqdm(jobs, desc=f"evaluate on {problem.name}", disable=not progress)
    with torch_threads(1 if workers is not None else None):
        for name, seed in bar:
            key = _cache_key(name, seed, steps, eval_every, problem.name)
            bar.set_postfix_str(f"{name} seed {seed}")
            if key in stored:
                result = RunResult.from_dict(stored[key])
            else:
                result = run(problem, optimizers[name], seed, steps, eval_every, name=name)
                if cache_path is not None:
                    stored[key] = result.to_dict()
                    _save_cache(cache_path, stored)
            evaluation.runs[name].append(result)
    return evaluation


# --- baselines ----------------------------------------------------------------------------------------------


def _label(teacher: Teacher, form: str) -> str:
    return f"{teacher.name} {teacher.hparams.get('lr', '')} ({form})".replace("  ", " ")


def textbook_factory(teacher: Teacher) -> OptimizerFactory | None:
    """torch's textbook counterpart of a paper-form teacher at the same learning rate
    (docs/method.md#textbook-forms: the Keras baselines): Adam(lr), RMSprop(lr, alpha=rho), SGD(lr), and for
    Momentum SGD(lr, momentum=0.9) (the Keras "momentum" baseline, an effective step 10x that of the EMA form).
    AddSign/PowerSign have none: ``None``."""
    hp, lr = teacher.hparams, teacher.hparams.get("lr")
    name = teacher.name
    if name == "adam":
        return lambda params: torch.optim.Adam(params, lr=lr, betas=(hp["beta1"], hp["beta2"]))
    if name == "rmsprop":
        return lambda params: torch.optim.RMSprop(params, lr=lr, alpha=hp["rho"])
    if name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)
    return None


def teacher_factory(teacher: Teacher) -> OptimizerFactory:
    """A paper-form teacher as a torch optimizer (``TeacherOptimizer``)."""
    return lambda params: TeacherOptimizer(params, teacher)


def pool_baselines(
    pool: str | Sequence[str | Teacher], forms: Sequence[str] = ("paper", "torch")
) -> dict[str, OptimizerFactory]:
    """The pool baselines (docs/method.md#baselines): each member in the paper's form (``"adam 0.005 (paper)"``)
    and, where one exists, torch's textbook form (``"adam 0.005 (torch)"``)."""
    for form in forms:
        if form not in ("paper", "torch"):
            raise ValueError(f"unknown baseline form {form!r}; valid: paper, torch")
    baselines: dict[str, OptimizerFactory] = {}
    for teacher in make_pool(pool):
        if "paper" in forms:
            baselines[_label(teacher, "paper")] = teacher_factory(teacher)
        textbook = textbook_factory(teacher) if "torch" in forms else None
        if textbook is not None:
            baselines[_label(teacher, "torch")] = textbook
    return baselines


def torch_adam(lr: float) -> OptimizerFactory:
    return lambda params: torch.optim.Adam(params, lr=lr)


@dataclass(frozen=True)
class TunedChoice:
    """Result of :func:`tune_adam`: the chosen learning rate, each candidate's score, how it was chosen."""

    name: str
    lr: float
    scores: dict[float, float]
    how: str

    @property
    def factory(self) -> OptimizerFactory:
        return torch_adam(self.lr)


def tune_adam(
    problem: Problem,
    seeds: Sequence[int],
    steps: int = 1000,
    eval_every: int = 25,
    lrs: Sequence[float] = ADAM_TUNING_LRS,
    select_on: str = "selection",
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> TunedChoice:
    """torch Adam tuned over ``lrs`` by the mean best log loss over ``seeds``.

    ``select_on="selection"`` (default): the choice is made on ``selection_problem(problem)``, whose
    validation set is 1,000 *training* digits, so the held-out digits stay unseen. ``select_on="heldout"``:
    the choice is made on the held-out loss itself (oracle tuning, which favours the baseline;
    docs/method.md#baselines).
    ``workers``: as in :func:`evaluate`.
    """
    if select_on not in ("selection", "heldout"):
        raise ValueError(f"unknown select_on {select_on!r}; valid: selection, heldout")
    target = selection_problem(problem) if select_on == "selection" else problem
    candidates = {f"torch adam lr={lr:g}": torch_adam(lr) for lr in lrs}
    tuning = evaluate(target, candidates, seeds, steps, eval_every, cache=cache, progress=progress, workers=workers)
    scores = {lr: tuning.mean(f"torch adam lr={lr:g}") for lr in lrs}
    best = min(lrs, key=lambda lr: (math.isnan(scores[lr]), scores[lr]))
    where = (
        "1,000 validation digits carved from the training digits (selection_problem)"
        if select_on == "selection"
        else "the held-out digits (oracle tuning, favours the baseline)"
    )
    how = (
        f"lr chosen from {{{', '.join(f'{lr:g}' for lr in lrs)}}} by mean best log loss on {where}, "
        f"seeds {list(seeds)}, {steps} steps; scores: "
        + ", ".join(f"{lr:g}: {scores[lr]:.3f}" for lr in lrs)
        + f"; chosen lr={best:g}"
    )
    logger.info("tuned torch Adam: %s", how)
    return TunedChoice(f"torch adam tuned (lr={best:g})", best, scores, how)


def student_factory(student: Any, **kwargs: Any) -> OptimizerFactory:
    """Evaluate a student (module, bundled name, folder or repo id) through ``AmalgamOptimizer`` with its
    configured warm-up (``kwargs`` go to the optimizer, e.g. ``warmup_steps=0``)."""
    from .optim import AmalgamOptimizer

    return lambda params: AmalgamOptimizer(params, student=student, **kwargs)


def _baseline_notes(tuned: TunedChoice, baselines: Iterable[str]) -> dict[str, str]:
    notes = {tuned.name: "torch.optim.Adam; " + tuned.how}
    for name in baselines:
        notes[name] = (
            "paper form (docs/method.md#teachers), TeacherOptimizer"
            if name.endswith("(paper)")
            else ("torch textbook form (docs/method.md#textbook-forms; Momentum = SGD(lr, momentum=0.9))")
        )
    return notes


def evaluate_with_baselines(
    problem: Problem,
    candidates: Mapping[str, OptimizerFactory],
    pool: str | Sequence[str | Teacher],
    seeds: Sequence[int],
    steps: int = 1000,
    eval_every: int = 25,
    forms: Sequence[str] = ("paper", "torch"),
    tune_seeds: Sequence[int] | None = None,
    tune_on: str = "selection",
    reference: str | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> Evaluation:
    """The evaluation protocol in one call: ``candidates`` (e.g. ``{"student": student_factory(module)}``) against
    every pool member in the paper's and torch's forms (:func:`pool_baselines`), the oracle (the best member on
    the held-out metric, :meth:`Evaluation.add_oracle`) and torch Adam tuned by :func:`tune_adam` (on the
    training digits by default, with ``tune_seeds`` or else ``seeds``). ``reference`` defaults to the first
    candidate. Every choice is written into ``Evaluation.notes``, which the model card prints under the table.
    ``workers``: as in :func:`evaluate` (the tuning runs first, then the evaluation runs)."""
    baselines = pool_baselines(pool, forms)
    clash = sorted(set(candidates) & set(baselines))
    if clash:
        raise ValueError(f"candidate names clash with baseline names: {', '.join(clash)}")
    tuned = tune_adam(problem, list(tune_seeds or seeds), steps, eval_every, select_on=tune_on, cache=cache,
                      progress=progress, workers=workers)
    optimizers = {**candidates, **baselines, tuned.name: tuned.factory}
    evaluation = evaluate(problem, optimizers, seeds, steps, eval_every, reference or next(iter(candidates), None),
                          _baseline_notes(tuned, baselines), cache, progress, workers)
    evaluation.add_oracle(list(baselines))
    return evaluation
