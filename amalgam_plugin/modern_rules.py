"""The modern teachers' per-tensor formulas (docs/method.md#modern-pool), as torch.optim computes them, in pure
out-of-place torch ops so that a gradient flows through them: Adafactor's factored second moment and Muon's
Newton-Schulz orthogonalization. Each takes one tensor in its own shape; ``teachers.py`` makes them teachers."""

from __future__ import annotations

import math

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's quintic (Keller Jordan's)
NS_EPS = 1e-7  # torch.optim.Muon's default


def split(flat: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """The flat vector as its tensors, each in its own shape."""
    sizes = [math.prod(s) for s in shapes]
    if sum(sizes) != flat.numel():
        raise ValueError(f"tensor shapes {shapes} do not cover the {flat.numel()} coordinates given")
    return [t.reshape(s) for t, s in zip(torch.split(flat, sizes), shapes, strict=True)]


def join(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def sqrt0(x: Tensor) -> Tensor:
    """√x (x >= 0) whose slope at 0 is 0 rather than inf, so no NaN reaches a meta-gradient; the value is exact."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1.0)), 0.0)


def check(teacher: str, positive: dict, nonnegative: dict, fractions: dict | None = None) -> None:
    """One line for the first hyper-parameter out of its range: > 0, >= 0, or in [0, 1)."""
    for values, holds, bound in ((positive, lambda v: v > 0, "> 0"), (nonnegative, lambda v: v >= 0, ">= 0"),
                                 (fractions or {}, lambda v: 0 <= v < 1, "in [0, 1)")):
        for key, value in values.items():
            if not holds(value):
                raise ValueError(f"teacher {teacher!r}: {key}={value!r} must be {bound}")


def decay(params: Tensor, lr: float, weight_decay: float) -> Tensor | float:
    """The decoupled weight decay's share of Δ, ``lr · wd · θ`` (θ ← θ(1 − lr·wd), as torch.optim.AdamW)."""
    return lr * weight_decay * params if weight_decay else 0.0


# --- Adafactor (torch.optim.Adafactor, its single-tensor path) ------------------------------------------------


def adafactor_moments(shape: tuple[int, ...], like: Tensor) -> list[Tensor]:
    """A fresh second moment: row and column factors for a tensor of rank >= 2 (over its last two dimensions),
    else a full one."""
    if len(shape) >= 2:
        return [like.new_zeros((*shape[:-1], 1)), like.new_zeros((*shape[:-2], 1, shape[-1]))]
    return [like.new_zeros(shape)]


def adafactor_direction(g: Tensor, moments: list[Tensor], beta2_weight: float, eps1: float) -> tuple[Tensor, list]:
    """``g / √v̂`` with v̂ the factored (rank >= 2) or full second moment, updated with weight ``t^beta2_decay``,
    clipped to RMS ``<= d`` by the caller; the new moments."""
    if g.dim() >= 2:
        row = torch.lerp(moments[0], torch.linalg.vector_norm(g, dim=-1, keepdim=True).square() / g.size(-1),
                         beta2_weight)
        col = torch.lerp(moments[1], torch.linalg.vector_norm(g, dim=-2, keepdim=True).square() / g.size(-2),
                         beta2_weight)
        variance = (row @ col) / row.mean(dim=-2, keepdim=True).clamp(min=eps1)
        new = [row, col]
    else:
        variance = torch.lerp(moments[0], g * g, beta2_weight)
        new = [variance]
    return variance.clamp(min=eps1 * eps1).rsqrt() * g, new


def rms(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t) / math.sqrt(t.numel())


def adafactor_step(g: Tensor, p: Tensor, moments: list[Tensor], t: int, lr: float, beta2_decay: float,
                   eps1: float | None, eps2: float, d: float, weight_decay: float) -> tuple[Tensor, list[Tensor]]:
    """One tensor's Δ at step ``t`` >= 1: ``lr·wd·θ + max(ε2, RMS(θ)) · min(lr, 1/√t) · u / max(1, RMS(u)/d)``
    with ``u = g/√v̂`` (``adafactor_direction``, moments weighted by ``t^beta2_decay``); the new moments."""
    tiny = torch.finfo(g.dtype).eps if eps1 is None else eps1
    u, moments = adafactor_direction(g, moments, t**beta2_decay, tiny)
    alpha = rms(p).clamp(min=eps2) * min(lr, 1 / math.sqrt(t))
    return alpha * u / (rms(u) / d).clamp(min=1.0) + decay(p, lr, weight_decay), moments


# --- Muon (torch.optim.Muon) --------------------------------------------------------------------------------


def orthogonalized(update: Tensor, steps: int) -> Tensor:
    """torch.optim.Muon's Newton-Schulz iteration on a matrix, in bfloat16 as torch runs it (singular values
    pushed towards 1, directions kept); bfloat16 out."""
    a, b, c = NS_COEFFICIENTS
    x = update.bfloat16()
    tall = update.size(0) > update.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=NS_EPS)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def check_matrix(shapes: list[tuple[int, ...]]) -> None:
    """The muon teacher's refusal of tensors among which none has rank >= 2 (nothing for Muon to act on)."""
    if not any(len(shape) >= 2 for shape in shapes):
        raise ValueError(f"the muon teacher needs a tensor of rank >= 2, but all {len(shapes)} tensors given "
                         "have rank <= 1; use adamw for them")


def muon_step(g: Tensor, p: Tensor, buffer: Tensor, lr: float, momentum: float, weight_decay: float,
              ns_steps: int) -> tuple[Tensor, Tensor]:
    """One tensor's Δ, as the matrix ``[shape[0], rest]``: ``lr·wd·θ + lr·√max(1, rows/cols) · NS(g + μ(b − g))``
    after ``b ← b + (1 − μ)(g − b)`` (torch.optim.Muon's Nesterov momentum); the new buffer."""
    buffer = torch.lerp(buffer, g, 1 - momentum)
    matrix = torch.lerp(g, buffer, momentum).reshape(g.shape[0], -1)
    rows, cols = matrix.shape
    direction = orthogonalized(matrix, ns_steps).to(g.dtype).reshape(g.shape)
    return lr * math.sqrt(max(1.0, rows / cols)) * direction + decay(p, lr, weight_decay), buffer
