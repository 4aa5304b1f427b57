"""Losses of optimizer amalgamation (docs/method.md#meta-loss to #imitation-weight), as pure functions of
trajectories."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .registry import Registry

LOG_EPS = 1e-10

# How a mechanism reduces the imitation distances of one inner step, [steps, teachers] -> [steps].
MECHANISMS: Registry[Callable[[Tensor], Tensor]] = Registry("mechanism", {
    "mean": (lambda d: d.mean(dim=1), "mean of the imitation losses over the teachers"),
    "minmax": (lambda d: d.max(dim=1).values, "max of the imitation losses over the teachers, per inner step"),
    "choice": (lambda d: d.max(dim=1).values,
               "a choice network trained on the pool, then distilled as the single teacher"),
})

# Imitation weight α per curriculum stage (docs/method.md#imitation-weight); stages past the end keep the last.
IMITATION_SCHEDULES: Registry[tuple[float, ...]] = Registry("imitation schedule", {
    "il_more": ((0.2, 0.1, 0.05, 0.02), "the authors' schedule for all three mechanisms"),
    "il_adjusted": ((0.2, 0.04, 0.02, 0.01), "a faster decay"),
    "il_staged": ((1.0, 0.0, 0.0, 0.0), "imitation in the first stage only"),
    "none": ((0.0,), "α = 0: the plain RNNProp learned-optimizer baseline"),
})


def log_improvement(objective: Tensor, reference: Tensor) -> Tensor:
    """One term of the meta loss: log f(θ_i; x_i) − log f(θ_start; x_i); the meta loss of a truncation is their
    mean (docs/method.md#meta-loss), taken by the unroll (``engine/unroll.py``)."""
    return torch.log(objective + LOG_EPS) - torch.log(reference + LOG_EPS)


def imitation_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """D = log(½ Σ (p_student − p_teacher)² + 1e-10) − log n, in the scaled coordinates
    (docs/method.md#imitation-distance)."""
    return torch.log(0.5 * (student - teacher).pow(2).sum() + LOG_EPS) - math.log(student.numel())


def reduce_imitation(distances: Tensor, mechanism: str) -> Tensor:
    """distances [steps, teachers] -> scalar: mean over teachers (mean) or max per step (minmax, choice with
    its single teacher), then mean over steps (docs/method.md#mechanisms)."""
    return MECHANISMS.lookup(mechanism)(distances).mean()


def imitation_weight(schedule: str, stage: int) -> float:
    values = IMITATION_SCHEDULES.lookup(schedule)
    return values[min(stage, len(values) - 1)]


def adaptive_clip_(parameters, clip: float = 0.1, eps: float = 1e-3) -> None:
    """AdaptiveGC (Brock et al. 2021), unit = whole tensor: cap ‖G‖ at clip · max(‖w‖, eps)
    (docs/method.md#meta-optimizer)."""
    for w in parameters:
        if w.grad is None:
            continue
        limit = clip * max(float(w.detach().norm()), eps)
        norm = float(w.grad.norm())
        if norm > limit:
            w.grad.mul_(limit / norm)
