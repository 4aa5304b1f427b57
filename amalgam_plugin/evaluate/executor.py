"""Independent runs in worker processes: each worker is a ``fork`` of the caller running one torch thread, so a
run's numbers in a worker equal the in-process ones when the caller also runs one thread.

Factories are often closures and problems hold tensors, so nothing of a job is pickled: the workers inherit the
job tables below and receive only (token, index). Workers never outlive the caller: Ctrl+C in the caller stops
them, and a caller killed outright (SIGKILL runs no cleanup) takes them along (:func:`_die_with_parent`).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..problems import Problem
from . import runs
from .runs import OptimizerFactory

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_S = 0.5


@dataclass(eq=False)
class Job:
    """One independent run (one optimizer on one seed) and its cache key."""

    problem: Problem
    factory: OptimizerFactory
    seed: int
    steps: int
    eval_every: int
    name: str
    key: str

    def run(self) -> runs.RunResult:
        return runs.run(self.problem, self.factory, self.seed, self.steps, self.eval_every, name=self.name)


# Job tables of the parallel evaluations in progress, by token (inherited by the forked workers).
_JOB_TABLES: dict[int, list[Job]] = {}
_TABLE_TOKENS = itertools.count()


def _fork_context() -> multiprocessing.context.BaseContext | None:
    if "fork" not in multiprocessing.get_all_start_methods():
        return None
    return multiprocessing.get_context("fork")


def parallel(workers: int | None) -> bool:
    """Whether ``workers`` asks for worker processes (``None`` or 1: the in-process loop)."""
    if workers is None:
        return False
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be None or a positive integer, not {workers!r}")
    if workers == 1:
        return False
    if _fork_context() is None:
        logger.warning("workers=%d needs the 'fork' start method, unavailable here: running in-process", workers)
        return False
    return True


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # the parent is gone: nobody will read this worker's results


def _die_with_parent(parent: int) -> None:
    """A worker dies with the process that forked it: on Linux the kernel sends it SIGKILL when the parent dies
    (prctl PR_SET_PDEATHSIG); everywhere, a watchdog thread exits once the parent is gone (its parent id
    changes), should the signal be unavailable."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watchdog", daemon=True).start()


def _worker_init(parent: int) -> None:
    # the child only: one thread per run (the parent's thread count is untouched), and Ctrl+C is the parent's
    # business (it stops the workers), so a worker never dies half-way through the queue's protocol
    _die_with_parent(parent)
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_run(token: int, index: int) -> dict:
    return _JOB_TABLES[token][index].run().to_dict()


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's worker processes now (running runs are abandoned); the pool's shutdown then reaps
    them."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()


@contextmanager
def _ctrl_c_at_safe_points() -> Iterator[Callable[[], None]]:
    """While inside, the Python SIGINT handler (the default one, raising KeyboardInterrupt, or the caller's own) runs
    only where the yielded function is called, and on the way out should a Ctrl+C still be unanswered.

    Run as the signal comes, the handler's exception lands between any two bytecodes of the main thread, also inside
    concurrent.futures' lock handling (``wait`` acquires every future's lock in a loop): a lock left held there makes
    the pool's shutdown wait forever."""
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(handler):
        yield lambda: None  # SIGINT ignored, or not Python's to handle
        return
    asked: list[tuple] = []  # the latest unanswered Ctrl+C

    def defer(signum, frame) -> None:
        asked[:] = [(signum, frame)]

    def answer() -> None:
        if asked:
            handler(*asked.pop())

    signal.signal(signal.SIGINT, defer)
    try:
        yield answer
    finally:
        signal.signal(signal.SIGINT, handler)
    answer()


def run_parallel(jobs: list[Job], workers: int, stored: dict, save: Callable[[], None] | None, desc: str,
                 progress: bool) -> None:
    """Run the ``jobs`` whose key is not in ``stored`` (once per key) in up to ``workers`` forked worker processes
    (one thread each), writing each result into ``stored`` as it arrives and calling ``save`` then; the progress
    bar counts every key, the cached ones as done. A run's exception is raised here with its own type and message;
    on any exception, Ctrl+C included, the workers are terminated and the remaining runs dropped."""
    first: dict[str, int] = {}
    for i, job in enumerate(jobs):
        first.setdefault(job.key, i)
    missing = [i for key, i in first.items() if key not in stored]
    token = next(_TABLE_TOKENS)
    _JOB_TABLES[token] = jobs
    bar = tqdm(total=len(first), initial=len(first) - len(missing), desc=desc, disable=not progress)
    try:
        with _ctrl_c_at_safe_points() as answer_ctrl_c, ProcessPoolExecutor(
                max_workers=min(workers, len(missing)), mp_context=_fork_context(), initializer=_worker_init,
                initargs=(os.getpid(),)) as pool:
            pending = {}
            try:
                for i in missing:
                    pending[pool.submit(_worker_run, token, i)] = i
                while pending:
                    answer_ctrl_c()
                    # a timeout, so that Ctrl+C is acted on within half a second
                    done, _ = wait_futures(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        job = jobs[pending.pop(future)]
                        stored[job.key] = future.result()  # a run's exception surfaces here
                        if save is not None:
                            save()
                        bar.set_postfix_str(f"{job.name} seed {job.seed}")
                        bar.update(1)
            except BaseException:
                # no future.cancel() first: the pool, broken by the terminated workers, then fails every pending
                # future, and a cancelled one would raise InvalidStateError in its thread (a traceback on Ctrl+C)
                _stop_workers(pool)
                raise
    finally:
        bar.close()
        del _JOB_TABLES[token]
