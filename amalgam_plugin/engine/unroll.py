"""One optimizee trajectory and one truncated unroll (docs/method.md#inner-step, #warmup).

Everything is flat: the optimizee's tensors are concatenated into one vector of n scalars, so the student (a
coordinate-wise network) runs once per inner step over all n coordinates, and teachers (elementwise rules) act
on the same vector; a tensorwise teacher, or a student over such teachers, also gets the current parameters and
the tensors' shapes in its state at every step (``teachers.in_context``).  The student works in the randomly
scaled coordinates p = θ / s; teachers run with "oracle scaling" (unscaled gradients, θ-space updates mapped
back by 1/s).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..amalgamation import imitation_distance, log_improvement, reduce_imitation
from ..problems import Batch, Problem
from ..teachers import Teacher, check_tensors, in_context

SCALE_SPREAD = 3.0  # s = exp(u), u ~ U[−3, 3] per scalar (Lv et al. 2017)


@dataclass
class Layout:
    """How the flat vector splits back into the optimizee's tensors, and each coordinate's tensor rank."""

    shapes: list[torch.Size]

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        return [t.view(s) for t, s in zip(torch.split(flat, self.sizes), self.shapes, strict=True)]

    def ranks(self, device: torch.device | str = "cpu") -> Tensor:
        sizes = zip(self.sizes, self.shapes, strict=True)
        return torch.cat([torch.full((n,), len(s), device=device) for n, s in sizes])


def flat_loss(problem: Problem, layout: Layout, theta: Tensor, batch: Batch) -> Tensor:
    return problem.loss(layout.unflatten(theta), batch)


def flat_grad(problem: Problem, layout: Layout, theta: Tensor, batch: Batch) -> Tensor:
    """∇_θ f at a point that carries no graph (teachers, validation)."""
    theta = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(flat_loss(problem, layout, theta, batch), theta)[0]


def frozen_choice_teacher(net: nn.Module) -> Teacher:
    """A trained choice network as the single (frozen) teacher of choice distillation (docs/method.md#mechanisms);
    its state carries the coordinates' tensor ranks, which each trajectory's problem sets."""

    def update(g: Tensor, s: dict) -> tuple[Tensor, dict]:
        with torch.no_grad():
            return net(g, s, s["ranks"])

    return Teacher("choice", lambda p: net.init_state(p.numel(), p), update, {}, differentiable=True,
                   warmup=net.warmup_step, ranked=True, tensorwise=getattr(net, "tensorwise", False),
                   check_shapes=getattr(net, "check_shapes", None))


@dataclass
class Trajectory:
    """The student's and the teachers' positions and states along one optimizee trajectory."""

    layout: Layout
    ranks: Tensor
    scale: Tensor
    params: Tensor  # student, scaled coordinates p = θ / s
    state: dict
    batches: Iterator[Batch]
    teachers: list[Teacher] = field(default_factory=list)
    teacher_params: list[Tensor] = field(default_factory=list)
    teacher_states: list[dict] = field(default_factory=list)
    skipped_steps: int = 0
    noise: torch.Generator | None = None  # the random perturbations' draws along this trajectory
    problem: Problem | None = None  # the problem it runs on (a mixture's draw)
    per_tensor: bool = False  # the student takes the tensors' shapes, not the coordinates' ranks
    tensorwise: bool = False  # the student's state gets the parameters and shapes at every step (``in_context``)

    def structure(self) -> Tensor | list[torch.Size]:
        """The student's third argument: the coordinates' ranks, or the tensors' shapes for a student that
        works per tensor (``per_tensor``: it normalizes or orthogonalizes whole tensors)."""
        return self.layout.shapes if self.per_tensor else self.ranks


def new_trajectory(
    problem: Problem,
    student: nn.Module,
    teachers: list[Teacher],
    generator: torch.Generator,
    warmup_steps: int = 0,
    warmup_lr: float = 0.05,
    random_scale: bool = True,
) -> Trajectory:
    """Fresh initialisation and scale shared by student and teachers, then the SGD warm-up where the problem
    has one (docs/method.md#warmup): all move together in p-space, every policy's state advances on the same gradients,
    the LSTM state stays frozen. A :class:`~amalgam_plugin.problems.Mixture` first draws the problem."""
    problem = problem.pick(generator)
    tensors = problem.init_params(generator)
    layout = Layout([t.shape for t in tensors])
    check_tensors([student, *teachers], layout.shapes)  # e.g. Muon on a problem of vectors alone: before any step
    theta = torch.cat([t.flatten() for t in tensors])
    n = theta.numel()
    scaled = random_scale and problem.random_scale
    scale = torch.exp((torch.rand(n, generator=generator) * 2 - 1) * SCALE_SPREAD) if scaled else torch.ones(n)
    scale = scale.to(theta.device)
    params = theta / scale
    ranks = layout.ranks(theta.device)
    batches = problem.train_batches(generator)
    state = student.init_state(n, params)
    # torch optimizers cannot replay the warm-up on their own copy: they start fresh at the warmed-up point.
    replays = [t.differentiable for t in teachers]
    teacher_states = [_init(t, theta, ranks) if r else None for t, r in zip(teachers, replays, strict=True)]
    with torch.no_grad():
        for _ in range(warmup_steps if problem.warmup else 0):
            g_theta = flat_grad(problem, layout, scale * params, next(batches))
            g_p = g_theta * scale
            state = student.warmup_step(g_p, in_context(student, state, params, layout.shapes))
            teacher_states = [t.warmup_step(g_theta, in_context(t, s, scale * params, layout.shapes)) if r else s
                              for t, s, r in zip(teachers, teacher_states, replays, strict=True)]
            params = params - warmup_lr * g_p
    theta = scale * params
    teacher_states = [s if r else _init(t, theta, ranks)
                      for t, s, r in zip(teachers, teacher_states, replays, strict=True)]
    return Trajectory(
        layout, ranks, scale, params, state, batches, list(teachers),
        [params.clone() for _ in teachers], teacher_states, problem=problem,
        per_tensor=getattr(student, "per_tensor", False), tensorwise=getattr(student, "tensorwise", False),
    )


def _init(teacher: Teacher, theta: Tensor, ranks: Tensor):
    state = teacher.init(theta)
    return {**state, "ranks": ranks} if teacher.ranked else state


@dataclass
class UnrollResult:
    meta_loss: Tensor  # mean log improvement (differentiable when training)
    imitation: Tensor  # reduced imitation loss (0 without teachers)
    steps: int  # inner steps actually run (an unroll stops early once the objective is not finite)
    skipped: int  # inner steps whose update was not finite and was skipped


def _detach_state(state):
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, dict):
        return {k: _detach_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_detach_state(v) for v in state]
    return state


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def unroll(
    student: nn.Module | Callable,
    traj: Trajectory,
    problem: Problem,
    steps: int,
    mechanism: str = "minmax",
    second_order: bool = True,
    track_teachers: bool = True,
) -> UnrollResult:
    """Advance the student (and its teachers) by one truncation, building the graph for the meta-gradient.
    ``student`` is the module or a callable running it with perturbed weights (``perturbations.py``).

    NaN guard (docs/method.md#deviations): an inner step whose update is not finite is skipped (parameters and
    state kept, the step counted), instead of l2o's behaviour of zeroing the parameters.
    """
    p_start = traj.params.detach()
    theta_start = traj.scale * p_start  # the meta loss's reference point
    params, state = p_start.clone().requires_grad_(True), _detach_state(traj.state)
    log_terms, distances, skipped, ran = [], [], 0, 0
    differentiable = torch.is_grad_enabled()
    for _ in range(steps):
        batch = next(traj.batches)
        with torch.enable_grad():
            if not params.requires_grad:
                params = params.detach().requires_grad_(True)
            objective = flat_loss(problem, traj.layout, traj.scale * params, batch)
            if not _finite(objective):
                break
            grad = torch.autograd.grad(
                objective, params, create_graph=differentiable and second_order, retain_graph=differentiable
            )[0]
        if not (differentiable and second_order):
            grad = grad.detach()
        with torch.no_grad():
            reference = flat_loss(problem, traj.layout, theta_start, batch)
        log_terms.append(log_improvement(objective if differentiable else objective.detach(), reference))
        ran += 1
        context = in_context(traj, state, params, traj.layout.shapes)
        delta, new_state = student(grad, context, traj.structure())
        if _finite(delta):
            params, state = params - delta, new_state
        else:
            skipped += 1
        if track_teachers and traj.teachers:
            _teachers_step(traj, problem, batch)
            distances.append(torch.stack([imitation_distance(params, tp) for tp in traj.teacher_params]))
    traj.params, traj.state = params.detach(), _detach_state(state)
    traj.skipped_steps += skipped
    meta = torch.stack(log_terms).mean() if log_terms else torch.zeros(())
    imitation = reduce_imitation(torch.stack(distances), mechanism) if distances else torch.zeros(())
    return UnrollResult(meta, imitation, ran, skipped)


@torch.no_grad()
def _teachers_step(traj: Trajectory, problem: Problem, batch: Batch) -> None:
    """Each teacher on its own trajectory and the same minibatch, with oracle scaling."""
    for k, teacher in enumerate(traj.teachers):
        theta = traj.scale * traj.teacher_params[k]
        state = in_context(teacher, traj.teacher_states[k], theta, traj.layout.shapes)
        delta, new_state = teacher.update(flat_grad(problem, traj.layout, theta, batch), state)
        if _finite(delta):
            traj.teacher_params[k] = traj.teacher_params[k] - delta / traj.scale
            traj.teacher_states[k] = new_state
