"""The output folder of an ``amalgamate`` run: a user's files are never overwritten unasked, and one run at a time.

A folder is recognised as one of our runs by the files a run writes first into ``OUT/training/``: the lock file
(written before anything else) or the run's config. A run holds an exclusive lock (``fcntl.flock``) on the lock
file from before its first write to its end, so a second run on the same folder is refused, naming the first.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not protected against a second run on the same folder
    fcntl = None

WORKDIR = "training"  # checkpoints, logs, the run's config and summary
RUN_CONFIG = "run_config.json"
LOCK = "amalgamate.lock"


def is_run_folder(out: Path) -> bool:
    """Whether ``out`` holds (the beginning of) an ``amalgamate`` run."""
    return any((out / WORKDIR / name).is_file() for name in (RUN_CONFIG, LOCK))


def check_out(out: Path, overwrite: bool) -> None:
    """``out`` must be new, empty or a folder of an earlier run (``--resume`` included); any other folder only with
    ``overwrite``."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"output {str(out)!r} exists and is not a folder")
    if any(out.iterdir()) and not is_run_folder(out) and not overwrite:
        raise ValueError(f"output folder {str(out.resolve())!r} is not empty and holds no amalgamate run; choose a "
                         "new folder, or pass --overwrite (overwrite=True) to write the student into it anyway")


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/training``'s lock for the duration (creating the folder); a ValueError naming the holder when
    another run holds it. The lock dies with its process, so a killed run never leaves the folder locked."""
    workdir = out / WORKDIR
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK
    try:  # never through a link planted under the lock's name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as err:
        raise ValueError(f"cannot open the run's lock file {str(path)!r} ({err.strerror})") from err
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise ValueError(f"output folder {str(out)!r} is in use by another amalgamate run (pid {holder}); "
                                 "wait for it to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
