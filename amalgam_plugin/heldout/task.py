"""A held-out task: a real model, its data split once into a training and a held-out part, a loss, a run length,
a batch size, the user's learning-rate schedule and how often the held-out loss is read (docs/heldout.md).

Tasks are frozen dataclasses, as timm's ``OptimInfo`` describes an optimizer: the registry
(:mod:`amalgam_plugin.heldout.tasks`) holds the built-in ones and :func:`task_from_module` builds a user's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]
SCHEDULES = ("constant", "warmup-cosine")


@dataclass(frozen=True)
class TaskData:
    """Inputs and targets of both splits. ``*_source`` name the source examples each split was cut from (row
    indices, or byte positions for text), so a test can check the splits never share one."""

    train: Batch
    heldout: Batch
    train_source: Tensor | None = None
    heldout_source: Tensor | None = None


@dataclass(frozen=True)
class HeldoutTask:
    """One task of the held-out suite.

    ``model()`` builds a freshly initialised model from torch's global generator (the runner seeds it);
    ``data()`` returns the :class:`TaskData` (the same every call); ``loss(model, batch)`` is the scalar training
    and held-out loss; ``trainer`` runs the task through ``transformers.Trainer`` (whose batches are
    ``{"input_ids", "labels"}`` dicts). ``in_mixture`` says whether the task's family appears in a meta-training
    mixture (``amalgam_plugin/problems``), so the suite can tell recall from generalization. ``output_layers``
    are name prefixes of the output layer's parameters (Muon leaves them to AdamW; empty: the last 2-D one)."""

    name: str
    family: str
    description: str
    model: Callable[[], nn.Module]
    data: Callable[[], TaskData]
    loss: Callable[[nn.Module, Batch], Tensor]
    steps: int
    batch_size: int
    eval_every: int
    schedule: str = "constant"
    warmup_steps: int = 0
    in_mixture: bool = False
    trainer: bool = False
    output_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"task {self.name!r}: unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1 or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"task {self.name!r}: steps, batch_size and eval_every must be positive and "
                             "0 <= warmup_steps < steps")

    def specification(self) -> dict:
        """What identifies the task's runs in the cache (its code is identified by its name)."""
        return {"name": self.name, "steps": self.steps, "batch_size": self.batch_size, "eval_every": self.eval_every,
                "schedule": self.schedule, "warmup_steps": self.warmup_steps, "trainer": self.trainer}

    def lr_factor(self, step: int) -> float:
        """The schedule's multiplier of every group's lr at ``step`` (the Trainer's linear warm-up then cosine
        decay to 0, as ``transformers.get_cosine_schedule_with_warmup``)."""
        if self.schedule == "constant":
            return 1.0
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def supervised_loss(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[nn.Module, Batch], Tensor]:
    """``loss(model, (x, y)) = loss_fn(model(x), y)``."""

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return loss_fn(model(x), y)

    return loss


def task_from_module(
    name: str,
    model: Callable[[], nn.Module],
    train: Batch,
    heldout: Batch,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int = 300,
    batch_size: int = 64,
    eval_every: int = 25,
    schedule: str = "constant",
    warmup_steps: int = 0,
    family: str = "user",
    description: str = "the user's own task",
) -> HeldoutTask:
    """A task from the user's model factory (a class or function building a fresh ``nn.Module``), training and
    held-out tensors ``(x, y)`` and a loss ``loss_fn(model(x), y)``."""
    for split, (x, y) in (("train", train), ("heldout", heldout)):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"task {name!r}: the {split} inputs and targets must be non-empty and of equal length")
    if len(train[0]) < batch_size:
        raise ValueError(f"task {name!r}: batch size {batch_size} exceeds the {len(train[0])} training examples")
    data = TaskData(train, heldout)
    return HeldoutTask(name, family, description, model, lambda: data, supervised_loss(loss_fn), steps, batch_size,
                       eval_every, schedule, warmup_steps)


def heldout_loss(task: HeldoutTask, model: nn.Module, chunk: int = 256) -> float:
    """Mean loss over every held-out example (the model in eval mode, then back in training mode)."""
    x, y = task.data().heldout
    total = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            part = (x[start : start + chunk], y[start : start + chunk])
            total += float(task.loss(model, part)) * len(part[0])
    model.train()
    return total / len(x)
