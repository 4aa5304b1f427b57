"""Runtime kernels: how ``AmalgamOptimizer`` steps many parameter tensors of one device with a frozen student.

A kernel works on the optimizer's per-parameter state, a flat dict of tensors and numbers (torch's optimizer
state must be flat: ``{"pool": [{"m": t}], "t": 0}`` is stored as ``{"pool.0.m": t, "t": 0}``).
:class:`ModuleKernel` runs any student through its ``forward``; a student type may register a faster kernel
(``students/__init__.py``), which must give the same numbers within float tolerance.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .base import State


class RuntimeKernel(Protocol):
    def warmup(self, grads: list[Tensor], states: list[State]) -> None:
        """Advance each parameter's state by a warm-up step (in place); the optimizer moves the parameters."""

    def step(self, flats: list[Tensor], grads: list[Tensor], states: list[State], lr: float,
             ranks: list[int]) -> None:
        """The learned step: update the states in place and add ``-lr * Δ`` to each flat parameter view."""


def flatten_state(state: Any, prefix: str = "") -> dict[str, Any]:
    """A student's nested state as one flat dict with dotted keys."""
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(state))
    else:
        return {prefix: state}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten_state(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def unflatten_state(flat: dict[str, Any], template: Any, prefix: str = "") -> Any:
    """The inverse of :func:`flatten_state`, shaped like ``template`` (e.g. ``student.init_state(1, g)``)."""
    if isinstance(template, dict):
        return {k: unflatten_state(flat, v, f"{prefix}.{k}" if prefix else k) for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        return [unflatten_state(flat, v, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(template)]
    return flat[prefix]


def write_state(state: dict, new_nested: Any) -> None:
    """Store a student's new nested state into a flat state, in place where a tensor already exists."""
    for k, v in flatten_state(new_nested).items():
        if isinstance(state.get(k), Tensor) and isinstance(v, Tensor):
            state[k].copy_(v)
        else:
            state[k] = v


class ModuleKernel:
    """Any student: one ``forward`` per parameter tensor on its flat gradient and the tensor's rank."""

    def __init__(self, student: nn.Module, device: torch.device, chunk_size: int | None = None):
        self.student = copy.deepcopy(student).to(device=device, dtype=torch.float32)

    def _nested(self, state: State, grad: Tensor) -> Any:
        return unflatten_state(state, self.student.init_state(1, grad))

    def warmup(self, grads: list[Tensor], states: list[State]) -> None:
        for g, state in zip(grads, states, strict=True):
            write_state(state, self.student.warmup_step(g, self._nested(state, g)))

    def step(self, flats: list[Tensor], grads: list[Tensor], states: list[State], lr: float,
             ranks: list[int]) -> None:
        for flat, g, state, rank in zip(flats, grads, states, ranks, strict=True):
            delta, new = self.student(g, self._nested(state, g), rank=rank)
            write_state(state, new)
            if lr != 0.0:
                flat.add_(delta, alpha=-lr)
