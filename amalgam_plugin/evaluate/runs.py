"""One run (docs/method.md#evaluation): a problem's model trained from a seeded initialisation for ``steps`` steps
with one optimizer, the held-out loss (all held-out examples) recorded at step 0 and every ``eval_every`` steps.

A seed fixes the initialisation and the minibatch order through two explicit ``torch.Generator`` objects
(:func:`seed_generators`), so every optimizer compared under one seed sees the same start and the same batches
(paired seeds). A run diverges when a training loss or a held-out loss is not finite; it stops there, keeps its
best finite value and is flagged (``diverged``, ``diverged_at``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from ..problems import Problem
from . import metrics

logger = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


def seed_generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """(initialisation generator, batch-order generator) of a paired seed (``2*seed``, ``2*seed+1``)."""
    return torch.Generator().manual_seed(2 * seed), torch.Generator().manual_seed(2 * seed + 1)


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
        return metrics.best_log_heldout(self)

    @property
    def final_log_heldout(self) -> float:
        return metrics.final_log_heldout(self)

    @property
    def train_last100(self) -> float:
        return metrics.train_last100(self)

    def metric(self, name: str) -> float:
        """The metric called ``name`` (:data:`metrics.METRICS`) of this run."""
        return float(metrics.METRICS.lookup(name).of(self))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunResult:
        """A run from :meth:`to_dict`'s dict; a ValueError names what is missing or unknown."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a run is a JSON object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        unknown, missing = sorted(set(data) - known), sorted(required - set(data))
        if unknown or missing:
            raise ValueError("a run has " + "; ".join(
                [*([f"unknown field(s) {', '.join(map(repr, unknown))}"] if unknown else []),
                 *([f"no {', '.join(map(repr, missing))}"] if missing else [])]))
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
