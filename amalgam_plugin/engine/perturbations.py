"""Stability-aware perturbations of the student's weights during meta-training (docs/method.md#perturbations).

A perturbation changes which weights the student runs with inside a truncation, never the weights the
meta-optimizer updates: the meta-gradient is taken at φ̃ and applied to φ.

* Random kinds (``gaussian``, ``gaussian-adaptive``) draw fresh noise at every inner step.
* Adversarial kinds (``fgsm``, ``pgd``, ``pgd-adaptive``, ``pgd-adaptive-clipped``) compute one offset ψ before
  each meta-step by gradient ascent on the amalgamation loss over the same truncation (same batches, states and
  scale), then hold φ + ψ fixed for the real meta-step.

Everything here is a pure function of tensors so that each rule can be checked against its formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..registry import Registry

Weights = dict[str, Tensor]


@dataclass(frozen=True)
class Kind:
    adversarial: bool
    default_magnitude: float
    rule: str


PERTURBATIONS: Registry[Kind] = Registry("perturbation", {
    "none": (Kind(False, 0.0, "no perturbation"), "no perturbation (the paper's amalgamation alone)"),
    "gaussian": (Kind(False, 1e-3, "φ + N(0, ε²)"), "φ + N(0, ε²), fresh at every inner step (default ε 1e-3)"),
    "gaussian-adaptive": (Kind(False, 5e-4, "φ_w + N(0, ε² ‖φ_w‖²/|φ_w|)"),
                          "per tensor w: φ_w + N(0, ε²·mean(φ_w²)), fresh at every inner step (default ε 5e-4)"),
    "fgsm": (Kind(True, 1e-3, "ψ + ε sign(∇L)"), "one ascent step ψ = ε·sign(∇L) (default ε 1e-3)"),
    "pgd": (Kind(True, 1e-4, "clip(ψ + 0.1 ∇L, ±ε)"), "ψ = clip(ψ + 0.1·∇L, ±ε) (default ε 1e-4)"),
    "pgd-adaptive": (Kind(True, 1e-3, "ψ_w + ε‖φ_w‖ ∇L/‖∇L‖"),
                     "per tensor w: ψ_w += ε‖φ_w‖·∇L/‖∇L‖, a step of exactly ε‖φ_w‖ (the paper; default ε 1e-3)"),
    "pgd-adaptive-clipped": (Kind(True, 1e-3, "ψ_w + clip_norm(∇L, ε‖φ_w‖)"),
                             "per tensor w: ψ_w += ∇L clipped to norm ≤ ε‖φ_w‖ (the authors' code; default ε 1e-3)"),
})
PGD_LR = 0.1  # the step size of plain PGD before its projection (the authors' code)
MAX_MAGNITUDE = 1.0
"""The largest ε taken, a thousand times the defaults: at ε = 1 the adaptive kinds already move each weight tensor
by its whole norm and the absolute kinds by more than the student's typical weight, so the student under
training is noise; a larger ε is a slip (1e9 for 1e-9), not a study."""


@dataclass(frozen=True)
class Perturbation:
    """A kind of :data:`PERTURBATIONS`, its magnitude ε and, for adversarial kinds, the ascent steps."""

    kind: str = "none"
    magnitude: float | None = None  # None: the kind's default
    steps: int = 1

    def __post_init__(self) -> None:
        PERTURBATIONS.lookup(self.kind)
        if self.magnitude is not None and not (math.isfinite(self.magnitude) and 0 <= self.magnitude <= MAX_MAGNITUDE):
            raise ValueError(f"perturbation magnitude must be in [0, {MAX_MAGNITUDE:g}] (the kinds' defaults are 1e-4 "
                             f"to 1e-3; at 1 a perturbation is as large as the weights), got {self.magnitude}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 100:
            raise ValueError(f"perturbation steps must be an integer in [1, 100], got {self.steps!r}")

    @property
    def epsilon(self) -> float:
        return PERTURBATIONS[self.kind].default_magnitude if self.magnitude is None else self.magnitude

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.epsilon > 0

    @property
    def adversarial(self) -> bool:
        return self.active and PERTURBATIONS[self.kind].adversarial

    @property
    def random(self) -> bool:
        return self.active and not PERTURBATIONS[self.kind].adversarial

    def describe(self) -> dict:
        return {"kind": self.kind, "magnitude": self.epsilon, "rule": PERTURBATIONS[self.kind].rule,
                **({"steps": self.steps} if self.adversarial else {})}


# --- the rules ---------------------------------------------------------------------------------------------


def noise(weights: Weights, kind: str, epsilon: float, generator: torch.Generator) -> Weights:
    """One draw of the random kinds' noise, per weight tensor: std ε (``gaussian``) or ε·RMS(φ_w) with the
    authors' 1e-8 inside the mean (``gaussian-adaptive``)."""
    out = {}
    for name, w in weights.items():
        std = epsilon * torch.sqrt((w.detach() ** 2 + 1e-8).mean()) if kind == "gaussian-adaptive" else epsilon
        out[name] = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device) * std
    return out


def ascent_step(psi: Weights, grads: Weights, weights: Weights, kind: str, epsilon: float) -> Weights:
    """One adversarial update of the offset ψ from ∇_ψ L (``grads``); ``weights`` are φ, for the adaptive
    kinds' per-tensor radius ε‖φ_w‖."""
    out = {}
    for name, g in grads.items():
        if kind == "fgsm":
            step = epsilon * torch.sign(g)
        elif kind == "pgd":
            out[name] = torch.clamp(psi[name] + PGD_LR * g, -epsilon, epsilon)
            continue
        else:
            radius = epsilon * weights[name].detach().norm()
            norm = g.norm()
            if kind == "pgd-adaptive":
                step = g * (radius / norm) if norm > 0 else torch.zeros_like(g)
            else:  # pgd-adaptive-clipped: tf.clip_by_norm
                step = g * torch.clamp(radius / norm, max=1.0) if norm > 0 else torch.zeros_like(g)
        out[name] = psi[name] + step
    return out


# --- running the student with perturbed weights ------------------------------------------------------------


def with_weights(student: nn.Module, weights: Callable[[], Weights]) -> Callable:
    """The student as a callable ``(grad, state, ranks)`` that runs with ``weights()`` (drawn at every call)."""

    def policy(grad: Tensor, state, ranks):
        return torch.func.functional_call(student, weights(), (grad, state, ranks))

    return policy


def noisy_policy(student: nn.Module, perturbation: Perturbation, generator: torch.Generator) -> Callable:
    """φ + fresh noise at every call (every inner step); gradients reach φ through the sum."""
    params = dict(student.named_parameters())

    def weights() -> Weights:
        drawn = noise(params, perturbation.kind, perturbation.epsilon, generator)
        return {n: p + drawn[n] for n, p in params.items()}

    return with_weights(student, weights)


def offset_policy(student: nn.Module, psi: Weights) -> Callable:
    """φ + ψ with ψ held fixed; gradients reach φ."""
    params = dict(student.named_parameters())
    return with_weights(student, lambda: {n: p + psi[n] for n, p in params.items()})


def adversarial_offset(student: nn.Module, perturbation: Perturbation,
                       loss_at: Callable[[Callable], Tensor]) -> Weights:
    """ψ after ``perturbation.steps`` ascent steps on ``loss_at(policy)``, the amalgamation loss of one
    truncation run with ``policy``; ψ starts at 0 and carries no graph."""
    params = {n: p.detach() for n, p in student.named_parameters()}
    psi = {n: torch.zeros_like(p) for n, p in params.items()}
    for _ in range(perturbation.steps):
        leaves = {n: v.clone().requires_grad_(True) for n, v in psi.items()}
        policy = with_weights(student, lambda leaves=leaves: {n: params[n] + leaves[n] for n in params})
        loss = loss_at(policy)
        if not (loss.requires_grad and torch.isfinite(loss)):
            break  # nothing to ascend (the objective blew up): keep the offset so far
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True), strict=True))
        grads = {n: torch.zeros_like(params[n]) if g is None else torch.nan_to_num(g) for n, g in grads.items()}
        psi = ascent_step(psi, grads, params, perturbation.kind, perturbation.epsilon)
    return psi
