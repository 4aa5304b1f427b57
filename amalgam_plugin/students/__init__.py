"""Learned optimizers (the student protocol: ``students/base.py``) and their registry.

Adding a student type: one new file (the module, its config dataclass and, optionally, a faster runtime
kernel) and one entry below. The Hub loader, the runtime optimizer and ``amalgam amalgamate --student`` find
it here; the optimizer runs it through :class:`~.kernel.ModuleKernel` unless the entry names a kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..registry import Registry
from .base import Student, StudentConfig
from .choice import ChoiceConfig, ChoiceNet
from .kernel import ModuleKernel, RuntimeKernel
from .lean import Lean, LeanConfig, LeanKernel
from .normalized import Normalized, NormalizedConfig, NormalizedKernel
from .rnnprop import RNNProp, RNNPropConfig
from .rnnprop_kernel import RNNPropKernel


@dataclass(frozen=True)
class StudentType:
    module: type[nn.Module]
    config: type[StudentConfig]
    kernel: Callable[[nn.Module, torch.device, int | None], RuntimeKernel] = ModuleKernel
    trainable: bool = True  # can be the student of ``amalgamate`` (meta-trained against teachers)


STUDENTS: Registry[StudentType] = Registry("student type", {
    "rnnprop": (StudentType(RNNProp, RNNPropConfig, RNNPropKernel),
                "RNNProp: 2-layer coordinate-wise LSTM, 82 floats of state per parameter"),
    "lean": (StudentType(Lean, LeanConfig, LeanKernel),
             "lean: a 16-unit MLP over 3 momenta and a second moment, 4 floats of state per parameter"),
    "choice": (StudentType(ChoiceNet, ChoiceConfig, trainable=False),
               "the choice network: a learned soft choice among a pool's updates (choice amalgamation)"),
    "normalized": (StudentType(Normalized, NormalizedConfig, NormalizedKernel),
                   "normalized: lean's MLP with its update RMS-normalized per tensor (lr is AdamW's), optional "
                   "Celo2-style harness, 4 floats of state per parameter"),
})


def build_student(config: StudentConfig) -> nn.Module:
    """A fresh student of ``config.student_type`` built from ``config``."""
    return STUDENTS.lookup(config.student_type).module(config)


__all__ = ["STUDENTS", "ChoiceConfig", "ChoiceNet", "Lean", "LeanConfig", "RNNProp", "RNNPropConfig", "Student",
           "StudentConfig", "StudentType", "build_student"]
