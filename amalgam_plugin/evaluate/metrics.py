"""The metrics of one run, in one table (docs/method.md#evaluation): name -> function of a :class:`RunResult`.

A new metric is one function and one :data:`METRICS` entry; ``RunResult.metric(name)``,
``Evaluation.values(name, metric)`` and ``Evaluation.mean`` then know it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..registry import Registry

if TYPE_CHECKING:
    from .runs import RunResult

STABILITY_SIGMA = 2.0  # the Gaussian filter's σ, in evaluation points (the paper: 2 epochs)


def _log(x: float) -> float:
    return math.log(x) if math.isfinite(x) and x > 0 else float("nan")


def best_log_heldout(run: RunResult) -> float:
    """log of the lowest finite held-out loss of the run (the paper's primary metric)."""
    finite = [h for h in run.heldout if math.isfinite(h)]
    return _log(min(finite)) if finite else float("nan")


def final_log_heldout(run: RunResult) -> float:
    """log of the held-out loss at the last step (NaN when the run diverged)."""
    if run.diverged or not run.heldout:
        return float("nan")
    return _log(run.heldout[-1])


def train_last100(run: RunResult) -> float:
    """mean training minibatch loss over the last 100 steps (NaN when the run diverged)."""
    if run.diverged or not run.train_losses:
        return float("nan")
    return float(np.mean(run.train_losses[-100:]))


def final_log_train(run: RunResult) -> float:
    """log of the mean training loss over the last 100 steps (the paper: log training loss at the end)."""
    return _log(train_last100(run))


def gaussian_smooth(values: np.ndarray, sigma: float = STABILITY_SIGMA, truncate: float = 4.0) -> np.ndarray:
    """A 1-D Gaussian filter with edge ("nearest") padding and a kernel cut at ``truncate`` σ (what
    ``scipy.ndimage.gaussian_filter1d`` computes with ``mode="nearest"``)."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    return np.convolve(np.pad(np.asarray(values, dtype=float), radius, mode="edge"), weights, mode="valid")


def optimization_stability(heldout: Sequence[float], sigma: float = STABILITY_SIGMA) -> float:
    """std over the evaluation points of log(G_σ ∗ loss) − log(loss): how much a run's held-out curve jitters
    around its own smoothed trend (0 for a smooth curve). Non-finite points (a diverged run's tail) are dropped;
    NaN with fewer than 2 points."""
    values = np.asarray(heldout, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) < 2:
        return float("nan")
    return float(np.std(np.log(gaussian_smooth(values, sigma)) - np.log(values)))


@dataclass(frozen=True)
class Metric:
    """A number per run; ``of(run)`` computes it."""

    name: str
    of: Callable[[RunResult], float]


def _metric(of: Callable[[RunResult], float]) -> tuple[Metric, str]:
    return Metric(of.__name__, of), (of.__doc__ or "").split("\n")[0]


METRICS: Registry[Metric] = Registry("metric", {
    "best_log_heldout": _metric(best_log_heldout),
    "final_log_heldout": _metric(final_log_heldout),
    "train_last100": _metric(train_last100),
    "final_log_train": _metric(final_log_train),
    "optimization_stability": (Metric("optimization_stability", lambda run: optimization_stability(run.heldout)),
                               "std of log(G2 * held-out) - log(held-out) over the run's evaluation points"),
})
