"""The gradient estimator of meta-training: trajectories -> meta loss -> meta-gradient.

It owns the math of one meta-step (the truncated unroll of ``unroll.py`` and the weighted sum of the meta loss
and the imitation loss, docs/method.md#imitation-weight) and leaves the student's ``.grad`` holding the
meta-gradient; what is done with it (averaging across trajectories and processes, clipping, the meta-optimizer)
is the learner's business (``learner.py``). Its settings are an :class:`EstimatorConfig`. Perturbations of the
student's weights (``perturbations.py``) act here: the truncation runs with perturbed weights and the
meta-gradient reaches the unperturbed ones.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..problems import Problem
from ..teachers import Teacher
from .perturbations import Perturbation, adversarial_offset, noisy_policy, offset_policy
from .unroll import Trajectory, new_trajectory, unroll

NOISE_SALT = 0x9E3779B97F4A7C15  # the noise generator's seed: the trajectory's, salted (no draw from it)


@dataclass(frozen=True)
class EstimatorConfig:
    """How one meta-step's meta-gradient is estimated."""

    unroll_length: int = 100  # inner steps per truncation
    trajectories_per_step: int = 1  # trajectories whose meta-gradients are averaged into one meta-update
    warmup_lr: float = 0.05  # the SGD warm-up's learning rate (docs/method.md#warmup)
    mechanism: str = "minmax"  # how the imitation distances are reduced (docs/method.md#mechanisms)
    second_order: bool = True
    random_scale: bool = True
    # docs/method.md#perturbations: a kind of PERTURBATIONS, its magnitude (None: the kind's default), ascent steps
    perturbation: str = "none"
    perturbation_magnitude: float | None = None
    perturbation_steps: int = 1
    # docs/method.md#pes: "truncated" back-propagation, or "pes" with ε of std pes_sigma and pes_pairs pairs per
    # trajectory (σ 1e-3: at 1e-2 RNNProp's meta loss is far from linear, benchmarks/results/estimators/)
    gradient_estimator: str = "truncated"
    pes_sigma: float = 1e-3
    pes_pairs: int = 1

    def __post_init__(self):
        from .pes import ESTIMATORS, check_settings  # pes.py builds on this module

        if self.gradient_estimator not in ESTIMATORS:
            raise ValueError(f"unknown gradient_estimator {self.gradient_estimator!r}; valid: {', '.join(ESTIMATORS)}")
        check_settings(self.pes_sigma, self.pes_pairs)
        if self.gradient_estimator == "pes" and self.perturbation != "none":
            raise ValueError("the pes estimator perturbs the student's weights itself; it takes no perturbation, got "
                             f"{self.perturbation!r}")

    def perturbation_spec(self) -> Perturbation:
        return Perturbation(self.perturbation, self.perturbation_magnitude, self.perturbation_steps)


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

    def __init__(self, student: nn.Module, problem: Problem, teachers: list[Teacher], config: EstimatorConfig):
        self.student, self.problem, self.teachers = student, problem, teachers
        self.unroll_length, self.mechanism, self.second_order = (config.unroll_length, config.mechanism,
                                                                 config.second_order)
        self.warmup_lr, self.random_scale = config.warmup_lr, config.random_scale
        self.perturbation = config.perturbation_spec()

    def trajectory(self, generator: torch.Generator, warmup_steps: int, with_teachers: bool) -> Trajectory:
        teachers = self.teachers if with_teachers else []
        traj = new_trajectory(self.problem, self.student, teachers, generator, warmup_steps, self.warmup_lr,
                              self.random_scale)
        if self.perturbation.random:
            traj.noise = torch.Generator().manual_seed((generator.initial_seed() + NOISE_SALT) % 2**63)
        return traj

    def estimate(self, traj: Trajectory, alpha: float) -> Estimate:
        """One truncation of ``traj``; its meta-gradient lands in the student's ``.grad`` (zeroed first)."""
        loss, result = self._loss(self._policy(traj, alpha), traj, alpha)
        for p in self.student.parameters():
            p.grad = None
        # no graph when the very first objective of the truncation was not finite: nothing to learn from
        finite = loss.requires_grad and bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.student.parameters())
        return Estimate(loss.item(), result.meta_loss.item(), result.imitation.item(), result.steps,
                        result.skipped, finite)

    def _loss(self, policy: Callable, traj: Trajectory, alpha: float):
        result = unroll(policy, traj, traj.problem, self.unroll_length, self.mechanism, self.second_order,
                        track_teachers=alpha > 0 and bool(traj.teachers))
        return result.meta_loss + alpha * result.imitation, result

    def _policy(self, traj: Trajectory, alpha: float) -> Callable:
        """What the truncation runs: the student, or the student with perturbed weights."""
        p = self.perturbation
        if p.random:
            return noisy_policy(self.student, p, traj.noise)
        if not p.adversarial:
            return self.student
        # the attack sees the truncation's own batches, states and scale: draw the batches once, replay them
        batches = list(itertools.islice(traj.batches, self.unroll_length))
        traj.batches = itertools.chain(batches, traj.batches)

        def loss_at(policy: Callable) -> torch.Tensor:
            trial = dataclasses.replace(traj, batches=iter(batches), teacher_params=list(traj.teacher_params),
                                        teacher_states=copy.deepcopy(traj.teacher_states))
            return self._loss(policy, trial, alpha)[0]

        return offset_policy(self.student, adversarial_offset(self.student, p, loss_at))

    @torch.no_grad()
    def evaluate(self, traj: Trajectory, truncations: int) -> float:
        """Mean meta loss (α = 0) over ``truncations`` of ``traj``; inf when the objective blows up."""
        total = 0.0
        for _ in range(truncations):
            result = unroll(self.student, traj, traj.problem, self.unroll_length, track_teachers=False)
            if not math.isfinite(float(result.meta_loss)) or result.steps < self.unroll_length:
                return math.inf
            total += float(result.meta_loss)
        return total / max(truncations, 1)
