"""Where a student's folder is found, first match wins:

1. an existing local folder (a path; a path-like string that does not exist is an error, never a Hub id);
2. a bundled student: a folder name under ``hub_models/`` (package ``amalgam_plugin.hub_models``, installed with
   the package, works offline); :func:`list_bundled` lists them;
3. a Hub repo id ``owner/name``: downloaded with ``huggingface_hub.snapshot_download`` (``revision=`` pins a
   branch, tag or commit; cached in ``cache_dir`` or the default Hub cache; ``HF_HUB_OFFLINE=1`` or
   ``local_files_only=True`` read the cache only).
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from torch import nn

from .format import CONFIG_NAME, WEIGHTS_NAME, ClassFor, read_folder

logger = logging.getLogger(__name__)

DEFAULT_STUDENT = "paper-choice-large"
"""The bundled student used when none is named: the paper's optimal-choice (large pool) RNNProp."""
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ORIGIN_ATTR = "_amalgam_identity"  # where a loaded student came from: {"source", "name", "revision", "folder"}


def bundled_root() -> Path:
    """The folder of the bundled students (package ``amalgam_plugin.hub_models``; in a source checkout that is
    not installed, the checkout's ``hub_models/``)."""
    try:
        return Path(str(importlib.resources.files("amalgam_plugin.hub_models")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "hub_models"


def _bundled_names() -> list[str]:
    root = bundled_root()
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file())


def list_bundled() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every bundled student; the description is the config's
    ``provenance["description"]``."""
    out = []
    for name in _bundled_names():
        try:
            config = json.loads((bundled_root() / name / CONFIG_NAME).read_text())
            provenance = config.get("provenance") or {}
            description = provenance.get("description") or f"{config.get('student_type', '?')} student"
        except (OSError, ValueError) as err:
            description = f"(unreadable config.json: {err})"
        out.append((name, " ".join(str(description).split())))
    return out


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~"))
        or os.sep in text.replace("/", "")
        or text.count("/") > 1
        or (os.altsep is not None and os.altsep in text)
    )


def _package_version() -> str | None:
    try:
        return version("amalgam-plugin")
    except PackageNotFoundError:  # a source checkout that is not installed
        return None


def resolve(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The folder holding a student and where it came from (``{"source", "name", "revision"}``), in the order
    of the module docstring: local folder, bundled name, Hub repo id."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path, {"source": "local", "name": str(path.resolve()), "revision": revision}
    if path.exists():
        raise ValueError(
            f"{text!r} is a file, not a student folder (expected a folder with {CONFIG_NAME} "
            f"and {WEIGHTS_NAME})"
        )
    bundled = _bundled_names()
    if text in bundled:
        return bundled_root() / text, {"source": "bundled", "name": text, "revision": _package_version()}
    if (isinstance(name_or_path, os.PathLike) or _looks_like_path(text) or not _REPO_ID.match(text)
            or ".." in text.split("/")):
        raise FileNotFoundError(
            f"no student folder {text!r}, and it is neither a bundled student "
            f"({', '.join(bundled) or 'none'}) "
            "nor a Hub repo id of the form owner/name"
        )
    return _download(text, revision, cache_dir, local_files_only)


def _download(
    repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None, local_files_only: bool | None
) -> tuple[Path, dict[str, Any]]:
    where = f"{repo_id!r} is no local folder or bundled student, and Hub repo {repo_id!r}" + (
        f" at revision {revision!r}" if revision else ""
    )
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
            library_name="amalgam-plugin",
        )
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{where} is not in the local Hub cache ({cache_dir or 'default cache'}) and cannot be "
            "downloaded "
            f"(offline, or the network failed): {err}"
        ) from err
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"{where}: no such revision: {err}") from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"{where}: no such repository (or no access): {err}") from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(f"{where}: {err}") from err
    folder = Path(folder)
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision
    return folder, {"source": "hub", "name": repo_id, "revision": commit}


def load(
    name_or_path: str | os.PathLike,
    class_for: ClassFor,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> nn.Module:
    """The frozen student (eval mode) at a local folder, bundled name or Hub repo id, built by
    ``class_for(student_type, config_path)``; it remembers where it came from (``ORIGIN_ATTR``)."""
    folder, origin = resolve(name_or_path, revision, cache_dir, local_files_only)
    student = read_folder(folder, class_for)
    setattr(student, ORIGIN_ATTR, {**origin, "folder": str(folder)})
    logger.info("loaded %s student %r (%s, revision %s)", student.config.student_type, origin["name"],
                origin["source"], origin["revision"])
    return student
