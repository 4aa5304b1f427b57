"""Loading and saving students of any registered type (the registry ``STUDENTS`` says which class a folder's
``student_type`` builds), and the paper's ``.npz`` weights as an RNNProp."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..students import STUDENTS, RNNProp, RNNPropConfig
from ..students.format import read_folder, write_folder
from ..students.sources import load


def registered_class(student_type: Any, where: str) -> type[nn.Module]:
    """The module class of a registered ``student_type`` (read from the config file ``where``)."""
    if not isinstance(student_type, str) or student_type not in STUDENTS:
        raise ValueError(f"{where!r}: unknown student_type {student_type!r}; valid student types: {STUDENTS.valid()}")
    return STUDENTS[student_type].module


def load_folder(folder: str | os.PathLike) -> nn.Module:
    """Build and load the student in ``folder`` (safetensors only, strict keys and shapes), frozen."""
    return read_folder(folder, registered_class)


def load_student(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> nn.Module:
    """A frozen student (eval mode) from a local folder, a bundled name or a Hub repo id (see
    ``amalgam_plugin.students.sources`` for the order). ``revision`` pins a Hub branch, tag or commit; ``cache_dir``
    and ``local_files_only`` go to huggingface_hub (``None``: its defaults, which honour ``HF_HUB_OFFLINE``)."""
    return load(name_or_path, registered_class, revision, cache_dir, local_files_only)


def save_student(student: nn.Module, folder: str | os.PathLike, **card_and_evaluation: Any) -> Path:
    """Write a student of a registered type to ``folder`` in the Hub format: config.json, model.safetensors, the
    model card and, with an evaluation, its plot. Keywords ``card``, ``evaluation``, ``reference``: those of
    :func:`~amalgam_plugin.students.format.write_folder`. Returns the folder."""
    STUDENTS.lookup(getattr(getattr(student, "config", None), "student_type", type(student).__name__))
    return write_folder(student, folder, **card_and_evaluation)


def student_from_npz(path: str | os.PathLike, config: RNNPropConfig | None = None) -> nn.Module:
    """An RNNProp from one of the paper's ``.npz`` files (Keras-layout keys equal to the state_dict names)."""
    arrays = np.load(path, allow_pickle=False)
    student = RNNProp(config or RNNPropConfig())
    try:
        student.load_state_dict(
            {k: torch.from_numpy(np.asarray(arrays[k], dtype=np.float32)) for k in arrays.files}, strict=True
        )
    except RuntimeError as err:
        raise ValueError(f"{os.fspath(path)!r} does not hold RNNProp weights: {err}") from err
    return student.eval().requires_grad_(False)
