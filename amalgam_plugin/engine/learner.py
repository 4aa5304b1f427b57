"""The learner of meta-training: averages the estimator's meta-gradients over a meta-step's trajectories and, in
a multi-process run, over the processes, then applies the average (AdaptiveGC clipping, the meta-optimizer;
docs/method.md#meta-optimizer); it also snapshots the student and the meta-optimizer for checkpoints.

Averaging across processes (docs/method.md#distributed): each trajectory's meta-gradient fills its own row of a
table that is summed across processes (adding zeros is exact), and every process then averages the rows in the same
order, as a single process does with the whole table. Checkpoints are safetensors files (tensors) with the
bookkeeping as JSON in their metadata, written atomically; the meta-optimizer is saved and restored through its own
``state_dict``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from ..amalgamation import adaptive_clip_
from ..files import write_atomically
from .distributed import Group, current_group

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnerConfig:
    """How meta-gradients are applied (docs/method.md#meta-optimizer)."""

    meta_lr: float = 1e-3  # the meta-optimizer's (Adam's) learning rate
    clip: float = 0.1  # AdaptiveGC's ratio of a gradient's norm to its weight's


class Learner:
    def __init__(self, student: nn.Module, config: LearnerConfig, group: Group | None = None):
        self.student, self.clip, self.group = student, config.clip, group or current_group()
        self.opt = torch.optim.Adam(student.parameters(), lr=config.meta_lr, eps=1e-7)  # Keras Adam's ε

    def gradient_table(self, trajectories: int) -> Tensor:
        """Zeros, one row per trajectory of a meta-step, for :meth:`record`."""
        weights = list(self.student.parameters())
        return torch.zeros(trajectories, sum(p.numel() for p in weights), device=weights[0].device)

    def record(self, table: Tensor, row: int) -> None:
        """The student's ``.grad`` (the estimator's meta-gradient of one trajectory) into ``table[row]``, flat
        (zeros for a weight that got none)."""
        table[row] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                for p in self.student.parameters()])

    def step(self, table: Tensor, applied: list[int]) -> None:
        """One meta-update from the mean of the rows ``applied`` (the trajectories whose meta-gradient is finite,
        the same on every process) of ``table``, summed across the processes first (each filled its own rows);
        nothing is applied when no row is."""
        self.group.sum(table)
        if applied:
            self.apply(table[applied].sum(0) / len(applied))

    def apply(self, gradient: Tensor) -> None:
        """One meta-update from a finite flat meta-gradient (a row of :meth:`gradient_table`)."""
        weights = list(self.student.parameters())
        for p, g in zip(weights, torch.split(gradient, [p.numel() for p in weights]), strict=True):
            p.grad = g.view_as(p).clone()
        adaptive_clip_(self.student.parameters(), self.clip)
        self.opt.step()

    def snapshot(self, prefix: str) -> dict[str, Tensor]:
        """The student's weights and the meta-optimizer's state as named tensors (``prefix`` + name)."""
        out = {f"{prefix}weights.{k}": v.detach().to("cpu", copy=True) for k, v in self.student.state_dict().items()}
        for index, state in self.opt.state_dict()["state"].items():
            for key, value in state.items():
                out[f"{prefix}meta_opt.{index}.{key}"] = torch.as_tensor(value).detach().to("cpu", copy=True)
        return out

    def restore(self, tensors: dict[str, Tensor], prefix: str) -> None:
        self.student.load_state_dict(student_weights(tensors, prefix), strict=True)
        state: dict[int, dict[str, Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith(prefix + "meta_opt."):
                index, key = name[len(prefix) + 9 :].split(".", 1)
                state.setdefault(int(index), {})[key] = value.clone()
        self.opt.load_state_dict({"state": state, "param_groups": self.opt.state_dict()["param_groups"]})


def student_weights(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The student's weights saved by :meth:`Learner.snapshot` under ``prefix`` (``"stage1."``, ``"final."``), as
    its ``state_dict``."""
    start = prefix + "weights."
    return {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}


def previous(path: Path) -> Path:
    return path.with_suffix(".prev" + path.suffix)


def save_checkpoint(path: Path, progress: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Atomic: write beside, keep the last checkpoint as ``*.prev``, then rename the new one into place. A kill at
    any point leaves at least one complete checkpoint."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={"progress": json.dumps(progress)}),
                     keep_previous=previous(path))


def resume_from_latest(path: Path, restore: Callable[[dict[str, Any], dict[str, Tensor]], None]) -> bool:
    """``restore(progress, tensors)`` from the newest usable checkpoint of ``path`` and its ``*.prev``: one that is
    torn, corrupt or foreign (``restore`` raises) is passed over with a warning. False when there is none; a
    ValueError when every one there is unusable."""
    errors = []
    for candidate in (path, previous(path)):
        if not candidate.exists():
            continue
        try:
            restore(*load_checkpoint(candidate))
        except (ValueError, RuntimeError, KeyError, TypeError) as err:
            errors.append(f"checkpoint {str(candidate)!r} is unusable ({err})")
            continue
        if errors:
            logger.warning("%s; resumed from the previous checkpoint %s instead", errors[0], candidate)
        return True
    if errors:
        raise ValueError("; ".join(errors) + "; move them away to start the run over")
    return False
def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The bookkeeping and tensors of a checkpoint; a ValueError when it is unreadable or holds non-finite
    values (never a half-loaded run)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            progress = json.loads((f.metadata() or {})["progress"])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"checkpoint {str(path)!r} is unreadable (truncated or corrupt: {err}); move it away "
                         "to start the run over") from err
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise ValueError(f"checkpoint {str(path)!r} holds non-finite values ({', '.join(bad[:3])}); it is "
                         "corrupt: move it away to start the run over")
    return progress, tensors
