"""Plug :class:`amalgam_plugin.optim.AmalgamOptimizer` into the libraries people train with.

One thin module per library, each importing its library only when imported itself (``import amalgam_plugin``
stays light):

- :mod:`amalgam_plugin.integrations.transformers`: ``TrainingArguments(optim="amalgam")`` with the stock
  ``Trainer``, ``--optim amalgam`` on the command line (registration on import);
- :mod:`amalgam_plugin.integrations.timm`: ``timm.optim.create_optimizer_v2(model, opt="amalgam")`` and one
  hyphenated name per bundled student family (registration on import);
- Accelerate needs no registration: ``Accelerator.prepare`` wraps an ``AmalgamOptimizer`` like any optimizer.

:func:`register` registers with every installed library at once; :func:`run_script` runs an unmodified
training script after registering (what ``amalgam run SCRIPT.py ARGS...`` does).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import runpy
import sys
from collections.abc import Sequence

logger = logging.getLogger(__name__)

#: The libraries with an integration module here, by import name.
LIBRARIES = ("transformers", "timm")


class UnsupportedLibraryError(ImportError):
    """The installed version of a library lacks the internals an integration registers into."""


def register(libraries: Sequence[str] | None = None) -> list[str]:
    """Register AmalgamOptimizer with the installed libraries; idempotent.

    Args:
        libraries: import names out of :data:`LIBRARIES`; ``None`` means every one that is installed.
            A library named explicitly must be installed.

    Returns:
        The libraries registered with.

    Raises:
        ValueError: a name not in :data:`LIBRARIES`.
        ModuleNotFoundError: an explicitly named library is not installed.
        UnsupportedLibraryError: an installed library's internals differ from what the integration knows.
    """
    explicit = libraries is not None
    names = list(LIBRARIES if libraries is None else libraries)
    unknown = [name for name in names if name not in LIBRARIES]
    if unknown:
        raise ValueError(f"unknown libraries {unknown}; valid choices: {list(LIBRARIES)}")
    done = []
    for name in names:
        if importlib.util.find_spec(name) is None:
            if explicit:
                raise ModuleNotFoundError(f"cannot register with {name}: it is not installed", name=name)
            continue
        module = importlib.import_module(f"{__name__}.{name}")
        module.register()
        done.append(name)
    return done


def run_script(script_path: str | os.PathLike[str], argv: Sequence[str] = ()) -> None:
    """Run a training script as ``__main__`` after :func:`register`, as ``python SCRIPT ARGS...`` would.

    ``sys.argv`` becomes ``[script_path, *argv]`` and the script's folder goes first on ``sys.path``, so an
    unmodified script (a transformers or timm example) sees ``--optim amalgam`` / ``--opt amalgam`` as a known
    choice. ``SystemExit`` raised by the script propagates to the caller.

    Raises:
        FileNotFoundError: ``script_path`` is not a file.
    """
    path = os.fspath(script_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such script: {path!r}")
    registered = register()
    logger.info("registered AmalgamOptimizer with %s; running %s", registered or "no library", path)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


__all__ = ["LIBRARIES", "UnsupportedLibraryError", "register", "run_script"]
