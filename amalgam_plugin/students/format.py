"""The folder format of a student (the Hugging Face Hub layout, also used for bundled students), read and written.

* ``config.json``: the config's fields with ``student_type`` (a key of the student registry) and ``format_version``
  (an integer, at most :data:`FORMAT_VERSION` to be loadable);
* ``model.safetensors``: the weights, keyed like ``student.state_dict()`` (safetensors only; pickle files such as
  ``pytorch_model.bin`` are refused, never loaded);
* ``README.md``: the model card (``amalgam_plugin.cards``);
* ``heldout_loss.png``: held-out loss against steps, when an evaluation was given.

This module knows no student type by name: the caller says which class a folder's ``student_type`` builds (the
registry for ``hub.load_student``, the class itself for ``from_pretrained``), so students and the hub both import
it and it imports neither.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..cards import Card, render_card
from ..files import write_atomically, write_text_atomically

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
PLOT_NAME = "heldout_loss.png"
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.pkl", "pytorch_model.pt")
MAX_CONFIG_BYTES = 1024**2
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors' names; weights of any other dtype are refused

# the class a config.json's student_type builds, or a ValueError saying why that type is not accepted here
ClassFor = Callable[[Any, str], type[nn.Module]]


def config_dict(student: nn.Module) -> dict[str, Any]:
    """What ``config.json`` holds: the config's fields, its ``student_type`` and the format version."""
    config = getattr(student, "config", None)
    if config is None:
        raise ValueError(f"{type(student).__name__} has no .config: not an amalgam-plugin student")
    return {**asdict(config), "student_type": config.student_type, "format_version": FORMAT_VERSION}


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a student folder, checked: a JSON object of bounded size, a supported format version."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        pickles = [n for n in PICKLE_NAMES if (folder / n).exists()]
        extra = f" (it holds {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
        raise FileNotFoundError(f"student folder {str(folder)!r} has no {CONFIG_NAME}{extra}")
    size = config_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{str(config_path)!r} is {size:,} bytes; a student config is at most {MAX_CONFIG_BYTES:,}")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{str(config_path)!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} must hold a JSON object, got {type(config).__name__}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(
            f"{str(config_path)!r} has no integer format_version (got {version!r}); "
            "it is not an amalgam-plugin student config"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{str(config_path)!r} has format_version {version}, newer than this amalgam-plugin supports "
            f"({FORMAT_VERSION}); upgrade amalgam-plugin"
        )
    return config


def build(cls: type[nn.Module], config: dict[str, Any], where: str) -> nn.Module:
    """A fresh ``cls`` from a read config (its ``config_class`` checks every field); unknown keys are ignored with a
    warning, so a config written by a newer version with extra fields still loads."""
    config_cls = cls.config_class
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(config) - known - {"student_type"})
    if unknown:
        logger.warning("%s: ignoring unknown config keys %s", where, ", ".join(unknown))
    try:
        return cls(config_cls(**{k: v for k, v in config.items() if k in known}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: invalid {config_cls.student_type} config: {err}") from err


def check_header(weights: Path, expected: Mapping[str, torch.Tensor], student_type: str) -> None:
    """Names, dtypes and shapes from the safetensors header, checked before any tensor data is read."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{str(weights)!r} is not a readable safetensors file (corrupt or truncated?): {err}") from err
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{str(weights)!r} does not match a {student_type} student with this config: "
            f"missing keys {missing or 'none'}, unexpected keys {unexpected or 'none'}"
        )
    dtypes = [f"{k}: {dtype}" for k, (dtype, _) in header.items() if dtype not in FLOAT_DTYPES]
    if dtypes:
        raise ValueError(f"{str(weights)!r}: weights must be floating point; got " + ", ".join(dtypes))
    shapes = [f"{k}: expected {tuple(expected[k].shape)}, got {shape}" for k, (_, shape) in header.items()
              if shape != tuple(expected[k].shape)]
    if shapes:
        raise ValueError(f"{str(weights)!r}: shape mismatch with the config in {CONFIG_NAME}: " + "; ".join(shapes))


def check_links(folder: Path) -> None:
    """A student's files may be links within its folder or, in a Hub cache snapshot (``REPO/snapshots/REV``), into
    the repository's blobs; a link anywhere else is refused (it could read any file of the machine), and so is a
    snapshot folder that is itself a link out of its repository."""
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":
        repo = folder.parent.parent.resolve()
        if not roots[0].is_relative_to(repo):
            raise ValueError(f"Hub cache snapshot {str(folder)!r} links outside its repository (to {str(roots[0])!r}); "
                             "refused")
        roots.append(repo)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        target = (folder / name).resolve()
        if not any(target.is_relative_to(root) for root in roots):
            raise ValueError(f"{str(folder / name)!r} links outside the student folder (to {str(target)!r}); refused")


def _weights_path(folder: Path) -> Path:
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [n for n in PICKLE_NAMES if (folder / n).exists()]
        if pickles:
            raise ValueError(
                f"student folder {str(folder)!r} holds only pickle weights ({', '.join(pickles)}) and no "
                f"{WEIGHTS_NAME}: pickle is never loaded (it can run arbitrary code); convert the weights to "
                "safetensors"
            )
        raise FileNotFoundError(f"student folder {str(folder)!r} has no {WEIGHTS_NAME}")
    return weights


def read_folder(folder: str | os.PathLike, class_for: ClassFor) -> nn.Module:
    """Build and load the student in ``folder`` (safetensors only, strict keys and shapes), frozen, in eval mode.
    ``class_for(student_type, config_path)`` is the class its config builds."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no student folder {str(folder)!r}")
    check_links(folder)
    weights = _weights_path(folder)
    config = read_config(folder)
    student = build(class_for(config.get("student_type"), str(folder / CONFIG_NAME)), config, str(folder))
    check_header(weights, student.state_dict(), student.config.student_type)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{str(weights)!r} is not a readable safetensors file (corrupt or truncated?): {err}") from err
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{str(weights)!r}: non-finite values in {', '.join(bad)}")
    student.load_state_dict(tensors, strict=True)
    return student.eval().requires_grad_(False)


def write_folder(
    student: nn.Module,
    folder: str | os.PathLike,
    card: Card | Mapping[str, Any] | None = None,
    evaluation: Any = None,
    reference: str | None = None,
) -> Path:
    """Write ``student`` to ``folder`` in the Hub format: ``config.json``, ``model.safetensors``, the README.md model
    card (``card``: a :class:`~amalgam_plugin.cards.Card` or a dict of its fields) and, when ``evaluation`` (an
    ``amalgam_plugin.evaluate.Evaluation``) is given, its table in the card and ``heldout_loss.png``.
    ``reference``: the optimizer the card's paired differences are taken against (default: the evaluation's).
    Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config_dict(student)
    fields_shown, lr_note = type(student.config).card_fields, type(student.config).lr_note
    # check the card's keys before writing anything
    render_card(config, card, card_fields=fields_shown, lr_note=lr_note)
    # Interrupted at any point, the folder holds no student that loads: config.json goes first and comes back
    # last, and every file is written beside and renamed into place.
    (folder / CONFIG_NAME).unlink(missing_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in student.state_dict().items()}
    # one metadata key only: safetensors writes its metadata map in no fixed order, and a bundled file
    # should be byte-identical when rebuilt
    write_atomically(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    plot_name = None
    if evaluation is not None and evaluation.runs:
        title = f"{folder.name}: held-out loss on {evaluation.problem}"
        write_atomically(folder / PLOT_NAME, lambda tmp: evaluation.plot(tmp, title, reference or evaluation.reference))
        plot_name = PLOT_NAME
    write_text_atomically(folder / CARD_NAME, render_card(config, card, evaluation, plot_name, reference, fields_shown,
                                                             lr_note))
    write_text_atomically(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info("saved %s student to %s", config["student_type"], folder)
    return folder
