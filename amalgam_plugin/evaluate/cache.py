"""The cache of finished runs: a JSON object ``{key: run}`` from which an interrupted evaluation resumes.

A run's key is the canonical JSON of everything that decides its numbers: the optimizer's full specification
(:class:`Specified`: a teacher's name, every hyper-parameter and form; a torch optimizer's class and every
hyper-parameter; a student's content hash and options), the problem, the seed, ``steps``, ``eval_every`` and
:func:`versions`. The key is written by :func:`run_key` and read by :func:`key_fields`, nowhere else; it is never
built by joining free text, so no label can make two runs share a key. An optimizer given as a plain factory has
only its label to go by (``{"label": name}``): use a fresh cache when such a factory changes under the same name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..files import write_text_atomically
from .runs import OptimizerFactory, RunResult

EVALUATION_VERSION = 1
"""Bumped when a run's numbers change for the same specification (the run loop, the problems' data or
initialisation, the seeding): runs cached under another version are not reused."""


def versions() -> dict[str, Any]:
    """The versions that change a run's numbers: the evaluation's own and torch's release (its CPU kernels; the
    local build tag, e.g. ``+cu130``, does not change CPU runs)."""
    return {"evaluation": EVALUATION_VERSION, "torch": torch.__version__.split("+")[0]}


@dataclass(frozen=True)
class Specified:
    """An optimizer factory with its specification: ``describe()`` returns a JSON-able dict of everything that
    decides the optimizer's updates (computed when an evaluation starts, so a student trained further in between is
    described as it is then)."""

    factory: OptimizerFactory
    describe: Callable[[], Mapping[str, Any]]

    def __call__(self, params: list) -> torch.optim.Optimizer:
        return self.factory(params)


def specification(name: str, factory: OptimizerFactory) -> dict[str, Any]:
    """What the runs of ``factory`` (listed as ``name``) are keyed by: its full specification when it has one,
    else its label."""
    return dict(factory.describe()) if isinstance(factory, Specified) else {"label": name}


def _named(value: Any) -> str:
    """A JSON stand-in for what JSON cannot hold: a function or class by its qualified name, else its text."""
    qualname = getattr(value, "__qualname__", None)
    return f"{getattr(value, '__module__', '')}.{qualname}" if qualname else str(value)


def canonical(value: Any) -> str:
    """The canonical JSON of ``value``: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_named)


_KEY_FIELDS = ("optimizer", "problem", "seed", "steps", "eval_every", "versions")


def run_key(spec: Mapping[str, Any], problem: str, seed: int, steps: int, eval_every: int) -> str:
    """The cache key of one run: the canonical JSON of its full specification (the module docstring)."""
    return canonical({"optimizer": spec, "problem": problem, "seed": seed, "steps": steps, "eval_every": eval_every,
                      "versions": versions()})


def key_fields(key: str) -> dict[str, Any] | None:
    """The fields of a key written by :func:`run_key`; None for a key of another format (an older cache's)."""
    try:
        fields = json.loads(key)
    except ValueError:
        return None
    return fields if isinstance(fields, dict) and set(fields) == set(_KEY_FIELDS) else None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{str(path)!r} is not a valid {what} (not JSON: {err})") from None


def load_runs(path: str | os.PathLike | None) -> dict[str, dict]:
    """The runs cached in ``path`` (none when it is None or absent); a ValueError names the file and what is wrong
    with it."""
    if path is None or not Path(path).exists():
        return {}
    path = Path(path)
    runs = _read_json(path, "cache of runs")
    if not isinstance(runs, dict):
        raise ValueError(f"{str(path)!r} is not a cache of runs: a JSON object of runs, not {type(runs).__name__}")
    for key, run in runs.items():
        try:
            RunResult.from_dict(run)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{str(path)!r} is not a cache of runs: entry {key[:200]!r}: {err}") from None
    return runs


def save_runs(path: str | os.PathLike, runs: Mapping[str, dict]) -> None:
    write_text_atomically(path, json.dumps(runs))


def runs_on(runs: Mapping[str, dict], problems: Iterable[str]) -> dict[str, dict]:
    """The runs on one of ``problems`` that this installation can reuse (keys of the current format and
    :func:`versions`)."""
    problems, current = set(problems), versions()
    return {key: run for key, run in runs.items()
            if (fields := key_fields(key)) is not None and fields["problem"] in problems
            and fields["versions"] == current}
