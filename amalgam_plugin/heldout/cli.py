"""``amalgam evaluate --suite heldout``: the options it adds to ``amalgam evaluate`` and what it runs."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from .runner import DEFAULT_LRS, run_suite
from .task import HeldoutTask
from .tasks import HELDOUT_TASKS


def load_task(spec: str) -> HeldoutTask:
    """A built-in task by name, or the user's: ``package.module:function`` or ``path/to/file.py:function``, a
    function of no arguments returning a :class:`HeldoutTask` (e.g. from ``task_from_module``)."""
    if ":" not in spec:
        return HELDOUT_TASKS.lookup(spec)
    where, _, function = spec.rpartition(":")
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise ValueError(f"task {spec!r}: no such file {where!r}")
        module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(f"task {spec!r}: cannot import {where!r} ({err})") from None
    if not callable(getattr(module, function, None)):
        raise ValueError(f"task {spec!r}: {where!r} has no function {function!r}")
    try:
        task = getattr(module, function)()
    except Exception as err:  # the user's code: its error, in one line
        raise ValueError(f"task {spec!r}: {function}() failed: {type(err).__name__}: {err}") from None
    if not isinstance(task, HeldoutTask):
        raise ValueError(f"task {spec!r}: {function}() returned {type(task).__name__}, not a HeldoutTask")
    return task


def _task_option(spec: str) -> HeldoutTask:
    try:
        return load_task(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _learning_rates(text: str) -> tuple[float, ...]:
    try:
        lrs = tuple(sorted({float(x) for x in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of learning rates: {text!r}") from None
    if len(lrs) < 2 or lrs[0] <= 0:
        raise argparse.ArgumentTypeError(f"the AdamW grid needs at least 2 positive learning rates, got {text!r}")
    return lrs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=("problems", "heldout"), default="problems",
                        help="problems (default): the --problems below; heldout: the held-out suite of real models "
                             "(docs/heldout.md), each STUDENT untuned against AdamW tuned over --lrs, AdamW at 1e-3, "
                             "Lion and Muon; --problems, --steps, --eval-every, --pool and --forms do not apply")
    parser.add_argument("--task", action="append", type=_task_option, dest="tasks", metavar="TASK",
                        help=f"with --suite heldout, a task (repeatable; default all): {', '.join(HELDOUT_TASKS)}; "
                             "or your own, package.module:function or file.py:function returning a HeldoutTask")
    parser.add_argument("--lrs", type=_learning_rates, default=DEFAULT_LRS, metavar="LR,LR,...",
                        help="with --suite heldout, AdamW's tuning grid (default "
                             f"{','.join(f'{lr:g}' for lr in DEFAULT_LRS)}; 1e-3 always runs)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="with --suite heldout, start no run after this many minutes (rerun to resume)")


def refuse_its_options(args: argparse.Namespace) -> None:
    """Without ``--suite heldout``, its options would do nothing: refuse them rather than ignore them."""
    if args.tasks or args.lrs != DEFAULT_LRS or args.max_minutes is not None:
        raise ValueError("--task, --lrs and --max-minutes apply to --suite heldout only")


def evaluate(args: argparse.Namespace) -> int:
    """Run the held-out suite for ``amalgam evaluate --suite heldout``."""
    from ..hub import load_student
    from ..optim import DEFAULT_STUDENT

    students = args.optimizers or [DEFAULT_STUDENT]
    for student in students:
        load_student(student)  # a bad name fails here, in one line, before any run
    if not 1 <= args.seeds <= 1000 or args.workers < 1:
        raise ValueError("--seeds must be in [1, 1000] and --workers positive")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "cache.json").exists() and not args.overwrite:
        raise ValueError(f"output folder {str(out)!r} is not empty and holds no amalgam evaluate run; choose a new "
                         "folder, or pass --overwrite")
    tasks = args.tasks or list(HELDOUT_TASKS.values())
    result = run_suite(tasks, students, list(range(args.seeds)), out, args.lrs, args.workers, args.max_minutes,
                       progress=lambda line: print(line, file=sys.stderr))
    if result is None:
        print(f"stopped after --max-minutes {args.max_minutes:g}; finished runs are in {out / 'cache.json'}: rerun "
              "the same command to continue", file=sys.stderr)
        return 3
    print((out / "results.md").read_text())
    print(f"written: {out / 'results.md'}, {out / 'results.json'}")
    return 0
