"""Learned optimizers (the student protocol: ``students/base.py``) and their registry.

Adding a student type: one new file (the module with its ``config_class``, a config dataclass that states the
type's ``student_type`` and ``card_fields``, optionally a faster runtime kernel) and one :class:`StudentType`
below. The Hub loader, the model card, the runtime optimizer and ``amalgam amalgamate --student`` find it here;
the optimizer runs it through :class:`~.kernel.ModuleKernel` unless the entry names a kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..registry import Registry
from .base import Student, StudentConfig
from .choice import ChoiceConfig, ChoiceNet
from .kernel import ModuleKernel, RuntimeKernel
from .lean import Lean, LeanConfig, LeanKernel
from .rnnprop import RNNProp, RNNPropConfig
from .rnnprop_kernel import RNNPropKernel


@dataclass(frozen=True)
class StudentType:
    """A registered student type: its module (whose ``config_class`` names the type and its card fields), a
    one-line description, its runtime kernel and whether ``amalgamate`` can meta-train it against teachers."""

    module: type[nn.Module]
    description: str
    kernel: Callable[[nn.Module, torch.device, int | None], RuntimeKernel] = ModuleKernel
    trainable: bool = True

    def __post_init__(self) -> None:
        config = getattr(self.module, "config_class", None)
        if not (isinstance(config, type) and issubclass(config, StudentConfig)):
            raise ValueError(f"{self.module.__name__}.config_class must be a StudentConfig dataclass")
        if not config.__dict__.get("student_type"):  # its own, not one inherited from another type's config
            raise ValueError(f"{config.__name__} must state its own student_type")
        unknown = sorted(set(config.card_fields) - {f.name for f in fields(config)})
        if unknown:
            raise ValueError(f"{config.__name__}.card_fields names no config field: {', '.join(unknown)}")

    @property
    def name(self) -> str:
        """The key in :data:`STUDENTS` and the ``student_type`` of config.json: its config class's."""
        return self.config.student_type

    @property
    def config(self) -> type[StudentConfig]:
        return self.module.config_class

    @property
    def card_fields(self) -> tuple[str, ...]:
        """The config fields its model card shows as the architecture."""
        return self.config.card_fields


def student_types(*types: StudentType) -> Registry[StudentType]:
    """The registry of ``types``, each under its own name (so a key and its type cannot disagree)."""
    registry: Registry[StudentType] = Registry("student type")
    for entry in types:
        registry.register(entry.name, entry, entry.description)
    return registry


STUDENTS = student_types(
    StudentType(RNNProp, "RNNProp: 2-layer coordinate-wise LSTM, 82 floats of state per parameter", RNNPropKernel),
    StudentType(Lean, "lean: a 16-unit MLP over 3 momenta and a second moment, 4 floats of state per parameter",
                LeanKernel),
    StudentType(ChoiceNet, "the choice network: a learned soft choice among a pool's updates (choice amalgamation)",
                trainable=False),
)


__all__ = ["STUDENTS", "ChoiceConfig", "ChoiceNet", "Lean", "LeanConfig", "RNNProp", "RNNPropConfig", "Student",
           "StudentConfig", "StudentType", "student_types"]
