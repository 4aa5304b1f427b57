"""Evaluation of optimizers on a problem (METHOD §15.2, metrics of §11.3).

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

Library code here never changes torch's thread count; scripts decide that.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from .problems import Problem, selection_problem
from .teachers import Teacher, TeacherOptimizer, make_pool

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
    """One training run: held-out curve, training losses and the §15.2 metrics."""

    name: str
    seed: int
    steps: int
    eval_steps: list[int]
    heldout: list[float]
    train_losses: list[float]
    diverged: bool = False
    diverged_at: int | None = None
    wall_s: float = 0.0

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
    result = RunResult(name, seed, steps, [0], [problem.heldout_loss(params)], [])
    if not math.isfinite(result.heldout[0]):
        return _flagged_divergence(result, 0, "initial held-out loss")
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = problem.loss(params, next(batches))
        value = float(loss.detach())
        result.train_losses.append(value)
        if not math.isfinite(value):
            return _flagged_divergence(result, step, "training loss")
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            heldout = problem.heldout_loss(params)
            result.eval_steps.append(step)
            result.heldout.append(heldout)
            if not math.isfinite(heldout):
                return _flagged_divergence(result, step, "held-out loss")
    result.wall_s = time.perf_counter() - start
    return result


# --- statistics ---------------------------------------------------------------------------------------------


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
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
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
        """The §15.2 table: means over seeds and the paired difference of best log held-out loss against the
        reference (negative = better than the reference) with its 95% t-interval."""
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
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


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
) -> Evaluation:
    """Run every optimizer on every seed (paired) and collect an :class:`Evaluation`.

    ``cache``: a JSON file of finished runs keyed by optimizer name, seed, steps and ``eval_every``, so an
    interrupted evaluation resumes where it stopped (the key does not cover the optimizer's settings: use a
    fresh file when a factory changes under the same name).
    """
    if not optimizers:
        raise ValueError("no optimizers to evaluate")
    if reference is not None and reference not in optimizers:
        raise ValueError(f"reference {reference!r} is not among the optimizers: {', '.join(optimizers)}")
    cache_path = Path(cache) if cache is not None else None
    stored = _load_cache(cache_path)
    evaluation = Evaluation(problem.name, list(seeds), steps, eval_every, reference=reference, notes=dict(notes or {}))
    evaluation.runs = {n: [] for n in optimizers}
    jobs = [(n, s) for s in seeds for n in optimizers]  # seed-major: an interrupted run leaves whole seeds
    bar = tqdm(jobs, desc=f"evaluate on {problem.name}", disable=not progress)
    for name, seed in bar:
        key = f"{name}|seed={seed}|steps={steps}|every={eval_every}|problem={problem.name}"
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
    """torch's textbook counterpart of a paper-form teacher at the same learning rate (METHOD §4.4's Keras
    baselines): Adam(lr), RMSprop(lr, alpha=rho), SGD(lr), and for Momentum SGD(lr, momentum=0.9) (the Keras
    "momentum" baseline, an effective step 10x that of the EMA form). AddSign/PowerSign have none:
    ``None``."""
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
    """§15.2's pool baselines: each member in the paper's form (``"adam 0.005 (paper)"``) and, where one
    exists, torch's textbook form (``"adam 0.005 (torch)"``)."""
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
) -> TunedChoice:
    """torch Adam tuned over ``lrs`` by the mean best log loss over ``seeds``.

    ``select_on="selection"`` (default): the choice is made on ``selection_problem(problem)``, whose
    validation set is 1,000 *training* digits, so the held-out digits stay unseen. ``select_on="heldout"``:
    the choice is made on the held-out loss itself (§15.2's oracle tuning, which favours the baseline).
    """
    if select_on not in ("selection", "heldout"):
        raise ValueError(f"unknown select_on {select_on!r}; valid: selection, heldout")
    target = selection_problem(problem) if select_on == "selection" else problem
    candidates = {f"torch adam lr={lr:g}": torch_adam(lr) for lr in lrs}
    tuning = evaluate(target, candidates, seeds, steps, eval_every, cache=cache, progress=progress)
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
) -> Evaluation:
    """§15.2 in one call: ``candidates`` (e.g. ``{"student": student_factory(module)}``) against every pool
    member in the paper's and torch's forms (:func:`pool_baselines`), the oracle (the best member on the
    held-out metric, :meth:`Evaluation.add_oracle`) and torch Adam tuned by :func:`tune_adam` (on the training
    digits by default, with ``tune_seeds`` or else ``seeds``). ``reference`` defaults to the first candidate.
    Every choice is written into ``Evaluation.notes``, which the model card prints under the table."""
    baselines = pool_baselines(pool, forms)
    clash = sorted(set(candidates) & set(baselines))
    if clash:
        raise ValueError(f"candidate names clash with baseline names: {', '.join(clash)}")
    tuned = tune_adam(
        problem, list(tune_seeds or seeds), steps, eval_every, select_on=tune_on, cache=cache, progress=progress
    )
    optimizers = {**candidates, **baselines, tuned.name: tuned.factory}
    notes = {tuned.name: "torch.optim.Adam; " + tuned.how}
    for name in baselines:
        notes[name] = (
            "paper form (METHOD §4.2), TeacherOptimizer"
            if name.endswith("(paper)")
            else ("torch textbook form (METHOD §4.4; Momentum = SGD(lr, momentum=0.9))")
        )
    evaluation = evaluate(
        problem, optimizers, seeds, steps, eval_every, reference or next(iter(candidates), None), notes, cache, progress
    )
    evaluation.add_oracle(list(baselines))
    return evaluation
