import os
import sys
from pathlib import Path

import pytest
import torch

from amalgam_plugin import hub
from amalgam_plugin.students import RNNProp

ROOT = Path(__file__).resolve().parents[1]

# --- the suite reads nothing beside the repository ----------------------------------------------------------
# An audit hook (installed once, at import of this conftest) records every open / listdir / scandir of a path
# inside ROOT's parent folder but outside ROOT (the parent itself, or what lay in it when the session started);
# pytest_sessionfinish prints them and fails the session.
# Only str, bytes and path-like arguments are looked at (file descriptors are ignored); paths elsewhere
# (site-packages, pytest's tmp_path under the temp folder, the Hub cache) are not recorded.

_PARENT = os.path.realpath(ROOT.parent)
_ROOT = os.path.realpath(ROOT)
_OUTSIDE_READS: list[tuple[str, str]] = []
_WATCHED = frozenset({"open", "os.listdir", "os.scandir"})


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _interpreter_dirs() -> tuple[str, ...]:
    """The interpreter's own folders (a virtual environment beside the repository) that lie inside ROOT's parent:
    reading them is not reading the project's neighbours."""
    import site

    dirs = [sys.prefix, sys.base_prefix, sys.exec_prefix, *getattr(site, "getsitepackages", list)()]
    dirs = {os.path.realpath(d) for d in dirs if d}
    return tuple(d for d in dirs if d != _PARENT and _inside(d, _PARENT) and not _inside(_ROOT, d))


def _tool_caches() -> tuple[str, ...]:
    """Folders of the temporary directory that pytest (its tmp_path) and torch.compile (its cache) use: they are
    no neighbours of the project even when the repository itself lies in the temporary directory."""
    import getpass
    import tempfile

    user = getpass.getuser()
    temp = tempfile.gettempdir()
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR", os.path.join(temp, f"torchinductor_{user}"))
    return tuple(os.path.realpath(d) for d in (os.path.join(temp, f"pytest-of-{user}"), inductor))


_ALLOWED = (_ROOT, *_interpreter_dirs(), *_tool_caches())
# the neighbours: what lay beside the repository when the session started (a folder the tests make later, such
# as a tempfile.mkdtemp() when the repository itself lies in the temporary directory, is no neighbour)
_NEIGHBOURS = frozenset(os.path.join(_PARENT, name) for name in os.listdir(_PARENT)) - {_ROOT}


def outside_repository(path) -> str | None:
    """The resolved path when ``path`` (str, bytes or path-like) lies inside ROOT's parent but outside ROOT (and
    outside the interpreter's folders); ``None`` otherwise, and for file descriptors."""
    if isinstance(path, int):
        return None
    try:
        path = os.fsdecode(os.fspath("." if path is None else path))  # os.listdir() audits None for "."
    except TypeError:
        return None
    resolved = os.path.realpath(path)
    if not _inside(resolved, _PARENT) or any(_inside(resolved, d) for d in _ALLOWED):
        return None
    if resolved != _PARENT and not any(_inside(resolved, n) for n in _NEIGHBOURS):
        return None
    return resolved


def _audit(event: str, args: tuple) -> None:
    if event in _WATCHED and args:
        try:
            outside = outside_repository(args[0])
        except (OSError, ValueError):  # e.g. an embedded NUL: open itself will refuse it
            return
        if outside is not None:
            _OUTSIDE_READS.append((event, outside))


if not getattr(sys, "_amalgam_outside_guard", False):  # audit hooks cannot be removed: install once
    sys._amalgam_outside_guard = True
    sys.addaudithook(_audit)


def pytest_sessionfinish(session, exitstatus):
    if not _OUTSIDE_READS:
        return
    seen = sorted(set(_OUTSIDE_READS))
    lines = "\n".join(f"  {event}: {path}" for event, path in seen)
    print(f"\nthe tests read {len(seen)} path(s) outside the repository {_ROOT}:\n{lines}", file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread: the tests' tensors are small, and with two threads on a busy 2-core machine torch's
    thread pool spends far more time waiting than computing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def paper_student_name() -> str:
    """The bundled student with the paper's choice-large weights, by name."""
    name = "paper-choice-large"
    assert name in dict(hub.list_bundled()), f"hub_models/{name} is missing"
    return name


@pytest.fixture(scope="module")
def paper_student(paper_student_name) -> RNNProp:
    """The paper's trained choice-large student (the bundled replicate, frozen), so the learned branch is a real
    optimizer."""
    return hub.load_student(paper_student_name)
