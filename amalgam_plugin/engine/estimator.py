"""The gradient estimator of meta-training: trajectories -> meta loss -> meta-gradient.

It owns the math of one meta-step (the truncated unroll of ``unroll.py`` and the weighted sum of the meta loss
and the imitation loss, docs/method.md#imitation-weight) and leaves the student's ``.grad`` holding the
meta-gradient; what is done with it (clipping, the meta-optimizer, all-reducing across processes) is the
learner's business (``learner.py``). Perturbations of the student's weights plug in here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..problems import Problem
from ..teachers import Teacher
from .unroll import Trajectory, new_trajectory, unroll


@dataclass
class Estimate:
    loss: float  # meta loss + α · imitation loss
    meta_loss: float
    imitation: float
    steps: int  # inner steps run (fewer than a truncation when the objective blew up)
    skipped: int  # inner steps whose update was not finite
    finite: bool  # the loss and every meta-gradient are finite


class TruncatedEstimator:
    """Meta-gradients of ``student`` from truncated unrolls on ``problem`` against ``teachers``."""

    def __init__(self, student: nn.Module, problem: Problem, teachers: list[Teacher], unroll_length: int,
                 mechanism: str, second_order: bool, warmup_lr: float, random_scale: bool):
        self.student, self.problem, self.teachers = student, problem, teachers
        self.unroll_length, self.mechanism, self.second_order = unroll_length, mechanism, second_order
        self.warmup_lr, self.random_scale = warmup_lr, random_scale

    def trajectory(self, generator: torch.Generator, warmup_steps: int, with_teachers: bool) -> Trajectory:
        teachers = self.teachers if with_teachers else []
        return new_trajectory(self.problem, self.student, teachers, generator, warmup_steps, self.warmup_lr,
                              self.random_scale)

    def estimate(self, traj: Trajectory, alpha: float) -> Estimate:
        """One truncation of ``traj``; its meta-gradient lands in the student's ``.grad`` (zeroed first)."""
        result = unroll(self.student, traj, self.problem, self.unroll_length, self.mechanism, self.second_order,
                        track_teachers=alpha > 0 and bool(traj.teachers))
        loss = result.meta_loss + alpha * result.imitation
        for p in self.student.parameters():
            p.grad = None
        # no graph when the very first objective of the truncation was not finite: nothing to learn from
        finite = loss.requires_grad and bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.student.parameters())
        return Estimate(loss.item(), result.meta_loss.item(), result.imitation.item(), result.steps,
                        result.skipped, finite)

    @torch.no_grad()
    def evaluate(self, traj: Trajectory, truncations: int) -> float:
        """Mean meta loss (α = 0) over ``truncations`` of ``traj``; inf when the objective blows up."""
        total = 0.0
        for _ in range(truncations):
            result = unroll(self.student, traj, self.problem, self.unroll_length, track_teachers=False)
            if not math.isfinite(float(result.meta_loss)) or result.steps < self.unroll_length:
                return math.inf
            total += float(result.meta_loss)
        return total / max(truncations, 1)
