"""Writing a user's files safely: every file is written beside its final name and renamed into place, so an
interrupted write never leaves a half file, and a symbolic link already sitting under the name is replaced, never
written through (a link planted in an output folder cannot redirect our write to a file elsewhere)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object], keep_previous: Path | None = None
                     ) -> Path:
    """``write(tmp)`` to a fresh temporary file beside ``path``, then rename it over ``path``; with
    ``keep_previous``, the file ``path`` held is first renamed there. Returns ``path``."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def copy_atomically(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy ``source``'s bytes to ``path`` (a link at ``path`` is replaced, not followed)."""
    data = Path(source).read_bytes()
    return write_atomically(path, lambda tmp: tmp.write_bytes(data))
