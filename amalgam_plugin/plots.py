"""PNG plots of an evaluation (matplotlib's object API: no pyplot, no global backend change)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .evaluate import Evaluation, RunResult, t_quantile
from .files import write_atomically


def _figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _grid(runs: list[RunResult], values) -> tuple[list[int], np.ndarray]:
    """(longest eval-step list, seeds x points array of ``values(run)``, NaN where a run stopped early)."""
    steps = max((r.eval_steps for r in runs), key=len)
    grid = np.full((len(runs), len(steps)), np.nan)
    for i, r in enumerate(runs):
        v = np.asarray(values(r)[: len(steps)], dtype=float)
        grid[i, : len(v)] = np.where(np.isfinite(v), v, np.nan)
    return list(steps), grid


def _write_png(fig, path: Path) -> Path:
    """The figure as a PNG file at ``path``, written atomically (a link planted under the name is replaced, not
    written through)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))


def _save(fig, ax, path: Path, title: str, legend: bool = True) -> Path:
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if legend:
        ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    return _write_png(fig, path)


def _label(name: str) -> str:
    """An optimizer's name as literal legend or tick text: a ``$`` would start matplotlib's mathtext."""
    return name.replace("$", r"\$")


def mean_curves(evaluation: Evaluation, path: Path, title: str | None = None, highlight: str | None = None) -> Path:
    """Mean held-out loss against steps (log scale), one line per optimizer (:meth:`Evaluation.mean_curves`)."""
    fig, ax = _figure()
    for name, (steps, mean) in evaluation.mean_curves().items():
        bold = name == highlight
        ax.plot(steps, mean, label=_label(name), linewidth=2.6 if bold else 1.2, zorder=3 if bold else 2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out loss (mean of {len(evaluation.seeds)} seeds)")
    ax.set_title(title or f"{evaluation.problem}: held-out loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _write_png(fig, path)


def heldout_curves(evaluation: Evaluation, path: Path, highlight: str | None = None) -> Path:
    """Mean held-out loss against steps (log scale) with a band of ± one standard deviation over the seeds."""
    fig, ax = _figure()
    for name, runs in evaluation.runs.items():
        steps, grid = _grid(runs, lambda r: r.heldout)
        with np.errstate(all="ignore"):
            mean, std = np.nanmean(grid, 0), np.nanstd(grid, 0)
        bold = name == highlight
        (line,) = ax.plot(steps, mean, label=_label(name), linewidth=2.4 if bold else 1.1, zorder=3 if bold else 2)
        ax.fill_between(steps, np.maximum(mean - std, 1e-12), mean + std, color=line.get_color(), alpha=0.12)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out loss (mean ± sd, {len(evaluation.seeds)} seeds)")
    return _save(fig, ax, path, f"{evaluation.problem}: held-out loss")


def best_bars(evaluation: Evaluation, path: Path, highlight: str | None = None) -> Path:
    """Mean best log held-out loss per optimizer with its 95% t-interval over the seeds (lower is better)."""
    names = list(evaluation.runs)
    means, halves = [], []
    for name in names:
        v = evaluation.values(name)
        v = v[np.isfinite(v)]
        means.append(float(v.mean()) if len(v) else math.nan)
        halves.append(t_quantile(0.975, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else 0)
    fig, ax = _figure(7.0, 0.8 + 0.28 * len(names))
    colors = ["tab:red" if n == highlight else "tab:blue" for n in names]
    ax.barh(range(len(names)), means, xerr=halves, color=colors, alpha=0.75, capsize=2)
    ax.set_yticks(range(len(names)), [_label(n) for n in names], fontsize=7)
    ax.invert_yaxis()
    finite = [m for m in means if math.isfinite(m)]
    if finite:  # bars of log losses: start the axis near the values, not at 0
        ax.set_xlim(min(finite) - 0.3, max(finite) + 0.3)
    ax.set_xlabel("best log held-out loss (mean, 95% CI over seeds; lower is better)")
    return _save(fig, ax, path, f"{evaluation.problem}: best log held-out loss", legend=False)


def loss_against_time(evaluation: Evaluation, path: Path, highlight: str | None = None) -> Path:
    """Mean held-out loss against mean training time (held-out passes excluded), for runs that recorded it."""
    fig, ax = _figure()
    for name, runs in evaluation.runs.items():
        if not all(len(r.train_seconds) == len(r.eval_steps) for r in runs):
            continue  # runs recorded before training times were kept
        _, loss = _grid(runs, lambda r: r.heldout)
        _, seconds = _grid(runs, lambda r: r.train_seconds)
        with np.errstate(all="ignore"):
            bold = name == highlight
            ax.plot(np.nanmean(seconds, 0), np.nanmean(loss, 0), label=_label(name), linewidth=2.4 if bold else 1.1)
    ax.set_yscale("log")
    ax.set_xlabel("training time, s (one thread per run)")
    ax.set_ylabel("held-out loss (mean over seeds)")
    return _save(fig, ax, path, f"{evaluation.problem}: held-out loss against time")


def problem_plots(evaluation: Evaluation, folder: Path, highlight: str | None = None) -> dict[str, Path]:
    """The three plots of one problem, ``{caption: path}``."""
    stem = folder / evaluation.problem
    return {
        "held-out loss against steps": heldout_curves(evaluation, stem.with_name(f"{stem.name}-curves.png"),
                                                      highlight),
        "best log held-out loss per optimizer": best_bars(evaluation, stem.with_name(f"{stem.name}-bars.png"),
                                                          highlight),
        "held-out loss against training time": loss_against_time(evaluation, stem.with_name(f"{stem.name}-time.png"),
                                                                 highlight),
    }
