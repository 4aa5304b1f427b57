"""Persistent evolution strategies (PES; Vicol, Metz and Sohl-Dickstein, ICML 2021): a second gradient estimator
of meta-training beside truncated back-propagation (``estimator.py``), with the same interface, so the curriculum
runs either (docs/method.md#pes).

A trajectory here is ``pairs`` antithetic pairs of particles, each particle its own copy of the optimizee's
parameters and the student's state, all starting from the same warmed-up point and seeing the same minibatches. At
every truncation each pair draws a fresh ε ~ N(0, σ² I) over the student's weights φ, runs its + particle with
φ + ε and its − particle with φ − ε, forward only (no graph through the unroll), and adds ε to its accumulated
perturbation ξ. The estimate is the mean over pairs of ξ · (L+ − L−) / (2σ²), with L = meta loss + α · imitation
loss of the truncation, each particle with its own. Because ξ sums every ε the particles ran with since the
trajectory started, the estimate is unbiased for the gradient of the truncation's loss with respect to the weights
used along the whole trajectory (for the Gaussian-smoothed loss), not only within the truncation as truncated
back-propagation is. ξ lives as long as its trajectory: the curriculum starts fresh trajectories in every group of
every period and checkpoints between periods, so no ξ is ever part of a checkpoint, and its noise comes from a
generator seeded by the trajectory's seed, so ``--resume`` stays exact.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, replace
from itertools import islice

import torch
from torch import Tensor, nn

from ..problems import PROBLEMS, Problem
from ..problems.models import ARCHITECTURES
from ..teachers import Teacher
from .distributed import CPU
from .estimator import Estimate, EstimatorConfig, TruncatedEstimator
from .perturbations import offset_policy
from .unroll import Trajectory, UnrollResult, unroll

ESTIMATORS = ("truncated", "pes")
PES_SALT = 0x5851F42D4C957F2D  # the ε generator's seed: the trajectory's, salted (no draw from the trajectory's)


@dataclass
class Pairs:
    """One PES trajectory: the warmed-up start (its minibatches and teachers serve every particle), the ε
    generator and, from the first truncation on, the particles (+, − for each pair) and each pair's ξ."""

    start: Trajectory
    noise: torch.Generator
    particles: list[Trajectory] | None = None
    accumulated: Tensor | None = None  # ξ, [pairs, student weights]


class PESEstimator:
    """Meta-gradients of ``student`` by antithetic PES on ``problem`` against ``teachers``, as ``config`` says
    (``pes_sigma``: the standard deviation of ε per weight, ``pes_pairs``: the antithetic pairs per trajectory);
    ``trajectories``: how many trajectories this process holds at once (for the memory check)."""

    def __init__(self, student: nn.Module, problem: Problem, teachers: list[Teacher], config: EstimatorConfig,
                 trajectories: int = 1):
        self.student, self.problem, self.teachers = student, problem, teachers
        self.unroll_length, self.mechanism = config.unroll_length, config.mechanism
        self.sigma, self.pairs = config.pes_sigma, config.pes_pairs
        # the trajectories' start and the validation are truncated back-propagation's, unperturbed
        self.unperturbed = TruncatedEstimator(student, problem, teachers,
                                              replace(config, gradient_estimator="truncated", second_order=False))
        device = next(student.parameters()).device
        check_memory(optimizee_size(problem), state_floats(student), self.pairs, trajectories, device)

    def trajectory(self, generator: torch.Generator, warmup_steps: int, with_teachers: bool) -> Pairs:
        start = self.unperturbed.trajectory(generator, warmup_steps, with_teachers)
        return Pairs(start, torch.Generator().manual_seed((generator.initial_seed() + PES_SALT) % 2**63))

    def estimate(self, traj: Pairs, alpha: float) -> Estimate:
        """One truncation of every particle; the PES meta-gradient lands in the student's ``.grad``."""
        weights = list(self.student.parameters())
        for p in weights:
            p.grad = None
        if traj.particles is None:
            traj.particles = [copy.copy(traj.start) for _ in range(2 * self.pairs)]
            traj.accumulated = torch.zeros(self.pairs, sum(p.numel() for p in weights), dtype=weights[0].dtype,
                                           device=weights[0].device)
        epsilon = self.sigma * torch.randn(traj.accumulated.shape, generator=traj.noise,
                                           dtype=traj.accumulated.dtype).to(traj.accumulated.device)
        traj.accumulated += epsilon
        batches = list(islice(traj.start.batches, self.unroll_length))  # every particle sees these
        track = alpha > 0 and bool(traj.start.teachers)
        results = [self._run(particle, sign * epsilon[k], batches, traj.start, track)
                   for k in range(self.pairs)
                   for sign, particle in zip((1, -1), traj.particles[2 * k : 2 * k + 2], strict=True)]
        if track:  # every particle ran the teachers from the same state on the same batches: keep one's
            last = traj.particles[-1]
            traj.start.teacher_params, traj.start.teacher_states = last.teacher_params, last.teacher_states
            for particle in traj.particles[:-1]:
                particle.teacher_params, particle.teacher_states = [], []
        losses = torch.tensor([float(r.meta_loss) + alpha * float(r.imitation) for r in results],
                              dtype=torch.float64)
        finite = all(r.steps == self.unroll_length for r in results) and bool(torch.isfinite(losses).all())
        if finite:  # a pair whose particles stopped at different steps compares unequal truncations: skipped
            gradient = pes_gradient(traj.accumulated, losses[0::2], losses[1::2], self.sigma)
            for p, g in zip(weights, torch.split(gradient, [p.numel() for p in weights]), strict=True):
                p.grad = g.view_as(p).clone()
            finite = bool(torch.isfinite(gradient).all())
        meta = sum(float(r.meta_loss) for r in results) / len(results)
        imitation = sum(float(r.imitation) for r in results) / len(results)
        return Estimate(float(losses.mean()), meta, imitation, min(r.steps for r in results),
                        sum(r.skipped for r in results), finite)

    @torch.no_grad()
    def _run(self, particle: Trajectory, offset: Tensor, batches: list, start: Trajectory,
             track: bool) -> UnrollResult:
        """One truncation of ``particle`` with the student's weights moved by ``offset`` (flat), forward only;
        with ``track``, on its own copy of the teachers' positions and states at the truncation's start."""
        named = list(self.student.named_parameters())
        pieces = torch.split(offset, [p.numel() for _, p in named])
        psi = {n: v.view_as(p) for (n, p), v in zip(named, pieces, strict=True)}
        particle.batches = iter(batches)
        if track:
            particle.teacher_params = list(start.teacher_params)
            particle.teacher_states = copy.deepcopy(start.teacher_states)
        return unroll(offset_policy(self.student, psi), particle, particle.problem, self.unroll_length,
                      self.mechanism, second_order=False, track_teachers=track)

    def evaluate(self, traj: Pairs, truncations: int) -> float:
        """Mean meta loss (α = 0) of the unperturbed student from the trajectory's start, as truncated
        back-propagation's validation."""
        return self.unperturbed.evaluate(traj.start, truncations)


def pes_gradient(accumulated: Tensor, plus: Tensor, minus: Tensor, sigma: float) -> Tensor:
    """The antithetic PES estimate: the mean over pairs k of ξ_k · (L+_k − L−_k) / (2σ²)."""
    contributions = (plus - minus).to(accumulated.dtype).to(accumulated.device) / (2 * sigma**2)
    return (accumulated * contributions[:, None]).mean(0)


# --- settings and memory ------------------------------------------------------------------------------------


def check_settings(sigma: float, pairs: int) -> None:
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"pes_sigma must be a finite number > 0, got {sigma!r}")
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"pes_pairs must be an integer >= 1, got {pairs!r}")


def optimizee_size(problem: str | Problem) -> int:
    """Scalars of one optimizee of ``problem`` (of a mixture: its reference problem, Train)."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(problem, str):
        tensors = ARCHITECTURES[PROBLEMS.lookup(problem).architecture].init_params(generator)
    else:
        tensors = problem.reference().init_params(generator)
    return sum(t.numel() for t in tensors)


def state_floats(student: nn.Module) -> int:
    """Floats of the student's state per optimizee scalar."""

    def count(state) -> int:
        if isinstance(state, Tensor):
            return state.numel()
        if isinstance(state, dict):
            return sum(count(v) for v in state.values())
        if isinstance(state, (list, tuple)):
            return sum(count(v) for v in state)
        return 0

    return count(student.init_state(1, torch.zeros(1)))


def particles_bytes(coordinates: int, floats_per_coordinate: int, pairs: int, trajectories: int,
                    element_size: int = 4) -> int:
    """Memory of the particles a process holds: two per pair, each the optimizee's parameters and the student's
    state, for each of its trajectories."""
    return 2 * pairs * trajectories * coordinates * (1 + floats_per_coordinate) * element_size


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (the CPU: the kernel's MemAvailable); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(coordinates: int, floats_per_coordinate: int, pairs: int, trajectories: int,
                 device: torch.device = CPU) -> None:
    """A ValueError when the PES particles would need more memory than ``device`` has free."""
    needed = particles_bytes(coordinates, floats_per_coordinate, pairs, trajectories)
    free = available_memory(device)
    if free is not None and needed > free:
        raise ValueError(f"PES with {pairs} antithetic pairs x {trajectories} trajectories per process needs about "
                         f"{needed / 2**30:.1f} GiB for its particles ({2 * pairs * trajectories} copies of "
                         f"{coordinates:,} parameters with {floats_per_coordinate} floats of student state each), "
                         f"more than the {free / 2**30:.1f} GiB available on {device.type}; lower pes_pairs or "
                         "trajectories_per_step")
