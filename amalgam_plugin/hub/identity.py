"""What identifies a student: the content hash of its config and weights, and where it was loaded from."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from ..students.format import config_dict
from ..students.sources import ORIGIN_ATTR


def content_hash(student: nn.Module) -> str:
    """sha256 of the student's config (canonical JSON, without ``provenance``, which records where a student
    came from, not how it behaves) and weights (name, dtype, shape, bytes, sorted by name)."""
    digest = hashlib.sha256()
    config = {k: v for k, v in config_dict(student).items() if k != "provenance"}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(student.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def student_identity(student: nn.Module) -> dict[str, Any]:
    """``{"name", "revision", "source", "sha256"}``: where the student was loaded from (``None`` for a module
    built in code) and the content hash of its config and weights, which identifies it in any case."""
    origin = getattr(student, ORIGIN_ATTR, None) or {}
    return {
        "name": origin.get("name"),
        "revision": origin.get("revision"),
        "source": origin.get("source", "module"),
        "sha256": content_hash(student),
    }
