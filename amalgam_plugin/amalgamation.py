"""Losses of optimizer amalgamation (METHOD §3), as pure functions of trajectories."""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_EPS = 1e-10
MECHANISMS = ("mean", "minmax", "choice")

# Imitation weight α per curriculum stage (§3.6); stages past the end keep the last value.
IMITATION_SCHEDULES: dict[str, tuple[float, ...]] = {
    "il_more": (0.2, 0.1, 0.05, 0.02),
    "il_adjusted": (0.2, 0.04, 0.02, 0.01),
    "il_staged": (1.0, 0.0, 0.0, 0.0),
    "none": (0.0,),  # α = 0: the plain RNNProp learned-optimizer baseline
}


def log_improvement(objective: Tensor, reference: Tensor) -> Tensor:
    """One term of the meta loss: log f(θ_i; x_i) − log f(θ_start; x_i)."""
    return torch.log(objective + LOG_EPS) - torch.log(reference + LOG_EPS)


def meta_loss(objectives: Tensor, references: Tensor) -> Tensor:
    """Mean log improvement over a truncation (§3.1): objectives at the pre-update parameters of each step,
    references at the truncation's starting parameters on the same minibatch."""
    return log_improvement(objectives, references).mean()


def imitation_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """D = log(½ Σ (p_student − p_teacher)² + 1e-10) − log n, in the scaled coordinates (§3.2)."""
    return torch.log(0.5 * (student - teacher).pow(2).sum() + LOG_EPS) - math.log(student.numel())


def reduce_imitation(distances: Tensor, mechanism: str) -> Tensor:
    """distances [steps, teachers] -> scalar: mean over teachers (mean) or max per step (minmax, choice with
    its single teacher), then mean over steps (§3.3-3.5)."""
    if mechanism == "mean":
        per_step = distances.mean(dim=1)
    elif mechanism in ("minmax", "choice"):
        per_step = distances.max(dim=1).values
    else:
        raise ValueError(f"unknown mechanism {mechanism!r}; valid: {', '.join(MECHANISMS)}")
    return per_step.mean()


def imitation_weight(schedule: str, stage: int) -> float:
    if schedule not in IMITATION_SCHEDULES:
        raise ValueError(f"unknown imitation schedule {schedule!r}; valid: {', '.join(IMITATION_SCHEDULES)}")
    values = IMITATION_SCHEDULES[schedule]
    return values[min(stage, len(values) - 1)]


def adaptive_clip_(parameters, clip: float = 0.1, eps: float = 1e-3) -> None:
    """AdaptiveGC (Brock et al. 2021), unit = whole tensor: cap ‖G‖ at clip · max(‖w‖, eps) (§9.2)."""
    for w in parameters:
        if w.grad is None:
            continue
        limit = clip * max(float(w.detach().norm()), eps)
        norm = float(w.grad.norm())
        if norm > limit:
            w.grad.mul_(limit / norm)
