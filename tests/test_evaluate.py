"""The evaluation protocol: paired statistics on hand-made numbers, divergence handling, a tiny real evaluation (MLP,
2 seeds, 50 steps) with students through AmalgamOptimizer, tuned Adam chosen on the training digits only, runs
in worker processes (equal numbers, cache, errors, Ctrl+C)."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from amalgam_plugin import evaluate as ev
from amalgam_plugin.evaluate import executor, runs
from amalgam_plugin.problems import make_problem
from amalgam_plugin.problems.data import DigitSplit
from amalgam_plugin.students import RNNProp, RNNPropConfig


@pytest.fixture(scope="module")
def mlp():
    return make_problem("mlp")


def result(name: str, seed: int, heldout: list[float], train: list[float] | None = None, **kw) -> ev.RunResult:
    return ev.RunResult(name, seed, 50, [0, 25, 50][: len(heldout)], heldout, train or [1.0] * 50, **kw)


# --- statistics on hand-made numbers ------------------------------------------------------------------------


def test_paired_difference_by_hand():
    d = ev.paired_difference([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0])  # differences 1, 2, 2, 3
    sd = math.sqrt(2 / 3)
    half = 3.182446305284263 * sd / 2  # t_{0.975, 3}
    assert d.n == 4 and d.mean == pytest.approx(2.0) and d.sd == pytest.approx(sd)
    assert (d.low, d.high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert str(d) == f"+2.000 [{2 - half:+.3f}, {2 + half:+.3f}]"
    d90 = ev.paired_difference([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0], confidence=0.9)
    assert d90.high - d90.mean == pytest.approx(2.3533634348018264 * sd / 2)


@pytest.mark.parametrize(
    "df, expected",
    [(1, 12.706204736), (2, 4.302652730), (3, 3.182446305), (9, 2.262157163), (29, 2.045229642), (1000, 1.962339081)],
)
def test_t_quantile_against_table_values(df, expected):
    assert ev.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)
    assert ev.t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-6)  # symmetric


def test_t_quantile_edges():
    assert ev.t_quantile(0.95, 1) == pytest.approx(6.313751515, abs=1e-6)
    assert ev.t_quantile(0.995, 4) == pytest.approx(4.604094871, abs=1e-6)
    assert ev.t_quantile(0.5, 7) == 0.0 and ev.t_quantile(1.0, 3) == math.inf and ev.t_quantile(0.0, 3) == -math.inf
    assert math.isnan(ev.t_quantile(1.5, 3)) and math.isnan(ev.t_quantile(0.9, 0))
    assert ev.t_quantile(0.975, 10**6) == pytest.approx(1.959966357, abs=1e-6)  # tends to the normal quantile


def test_paired_difference_edge_cases():
    d = ev.paired_difference([1.0, float("nan"), 3.0], [0.0, 0.0, 1.0])  # the NaN pair is dropped
    assert d.n == 2 and d.mean == pytest.approx(1.5)
    one = ev.paired_difference([1.0], [0.5])
    assert one.mean == 0.5 and math.isnan(one.low) and math.isnan(one.high)
    assert ev.paired_difference([], []).n == 0
    with pytest.raises(ValueError, match="differ in length"):
        ev.paired_difference([1.0, 2.0], [1.0])


def test_run_metrics_and_divergence_flags():
    ok = result("a", 0, [2.0, 0.5, 0.7], train=[3.0] * 10 + [1.0] * 100)
    assert ok.best_log_heldout == pytest.approx(math.log(0.5))
    assert ok.final_log_heldout == pytest.approx(math.log(0.7))
    assert ok.train_last100 == pytest.approx(1.0)
    bad = result("b", 0, [2.0, 0.4, float("nan")], diverged=True, diverged_at=50)
    assert bad.best_log_heldout == pytest.approx(math.log(0.4))  # best finite value counts
    assert math.isnan(bad.final_log_heldout) and math.isnan(bad.train_last100)
    with pytest.raises(ValueError, match="unknown metric"):
        ok.metric("accuracy")


def hand_evaluation() -> ev.Evaluation:
    runs = {
        "student": [result("student", s, [2.3, h]) for s, h in zip([0, 1, 2], [0.30, 0.40, 0.35], strict=True)],
        "adam": [result("adam", s, [2.3, h]) for s, h in zip([0, 1, 2], [0.40, 0.50, 0.50], strict=True)],
        "sgd": [
            result("sgd", 0, [2.3, 0.9]),
            result("sgd", 1, [2.3, float("inf")], diverged=True, diverged_at=50),
            result("sgd", 2, [2.3, 1.0]),
        ],
    }
    return ev.Evaluation("mlp", [0, 1, 2], 50, 25, runs, reference="student", notes={"adam": "lr 0.005"})


def test_evaluation_table_and_paired_differences():
    e = hand_evaluation()
    assert e.mean("student") == pytest.approx(np.mean(np.log([0.30, 0.40, 0.35])))
    diffs = e.paired()
    expected = np.log([0.40, 0.50, 0.50]) - np.log([0.30, 0.40, 0.35])
    assert diffs["adam"].mean == pytest.approx(expected.mean()) and diffs["adam"].n == 3
    assert diffs["adam"].low > 0  # adam is worse than the student on every seed
    assert diffs["sgd"].n == 3  # the diverged run keeps its best finite value (2.3 at step 0)
    table = e.table()
    lines = table.splitlines()
    assert lines[0].startswith("| optimizer | best log held-out |") and len(lines) == 5
    assert "| student |" in table and "reference" in table and "| 1/3 |" in table
    plain = e.table("plain")
    assert "|" not in plain and plain.splitlines()[1].startswith("student")
    assert "3 paired seeds (0, 1, 2), 50 steps" in e.protocol()
    with pytest.raises(ValueError, match="unknown table format"):
        e.table("html")


def test_oracle_curves_and_serialisation(tmp_path):
    e = hand_evaluation()
    assert e.add_oracle(["adam", "sgd"]) == "adam"
    assert e.runs["oracle"] is e.runs["adam"] and "= adam" in e.notes["oracle"]
    steps, mean = e.mean_curves()["sgd"]
    assert steps == [0, 25] and mean == pytest.approx([2.3, 0.95])  # the inf point is skipped
    back = ev.Evaluation.from_dict(e.to_dict())
    assert back.table() == e.table() and back.notes == e.notes
    png = e.plot(tmp_path / "curves.png", highlight="student")
    assert png.read_bytes()[:4] == b"\x89PNG"


# --- real runs ----------------------------------------------------------------------------------------------


class _Poison(torch.optim.Optimizer):
    """SGD that writes NaN into the parameters at its 3rd step."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})
        self.count = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.count += 1
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])
                if self.count == 3:
                    p.fill_(float("nan"))


def test_run_is_paired_and_divergence_is_caught(mlp):
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    a, b = ev.run(mlp, sgd, seed=4, steps=10, eval_every=5), ev.run(mlp, sgd, seed=4, steps=10, eval_every=5)
    assert a.heldout == b.heldout and a.train_losses == b.train_losses and a.eval_steps == [0, 5, 10]
    assert ev.run(mlp, sgd, seed=5, steps=1).heldout[0] != a.heldout[0]
    bad = ev.run(mlp, _Poison, seed=4, steps=10, eval_every=1)
    assert bad.diverged and bad.diverged_at == 3 and math.isfinite(bad.best_log_heldout)


def test_tiny_evaluation_with_students_and_baselines(mlp, tmp_path):
    student = RNNProp(RNNPropConfig())
    student.reset_parameters(torch.Generator().manual_seed(0))
    optimizers = {
        "student": ev.student_factory(student, warmup_steps=20),
        **ev.pool_baselines("small"),
    }
    assert list(optimizers) == [
        "student",
        "adam 0.005 (paper)",
        "adam 0.005 (torch)",
        "rmsprop 0.005 (paper)",
        "rmsprop 0.005 (torch)",
    ]
    cache = tmp_path / "runs.json"
    e = ev.evaluate(mlp, optimizers, seeds=[0, 1], steps=50, reference="student", cache=cache, progress=False)
    assert {n: len(r) for n, r in e.runs.items()} == {n: 2 for n in optimizers}
    for s in range(2):  # paired: the same initialisation for everyone
        assert len({e.runs[n][s].heldout[0] for n in optimizers}) == 1
    assert all(r.heldout[-1] < r.heldout[0] for n, runs in e.runs.items() if n != "student" for r in runs)
    assert all(math.isfinite(r.best_log_heldout) for r in e.runs["student"])  # an untrained student
    table = e.table()
    assert table.count("\n") == 6 and "Δ best vs student" in table
    # resumed from the cache: no run is repeated
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, "run", lambda *a, **k: pytest.fail("run() called despite the cache"))
        again = ev.evaluate(mlp, optimizers, seeds=[0, 1], steps=50, reference="student", cache=cache, progress=False)
    assert again.table() == table


def test_pool_baselines_forms():
    large = ev.pool_baselines("large")
    assert "momentum 0.5 (torch)" in large and "addsign 0.1 (paper)" in large
    assert "addsign 0.1 (torch)" not in large and "powersign 0.1 (torch)" not in large
    params = [torch.nn.Parameter(torch.zeros(2))]
    momentum = large["momentum 0.5 (torch)"](params)
    assert isinstance(momentum, torch.optim.SGD) and momentum.defaults["momentum"] == 0.9
    rms = large["rmsprop 0.005 (torch)"](params)
    assert rms.defaults["alpha"] == 0.9 and rms.defaults["lr"] == 0.005
    assert list(ev.pool_baselines("small", forms=["paper"])) == [
        "adam 0.005 (paper)",
        "rmsprop 0.005 (paper)",
    ]
    with pytest.raises(ValueError, match="unknown baseline form"):
        ev.pool_baselines("small", forms=["keras"])


@pytest.mark.parametrize("workers", [None, 2])
def test_tune_adam_reads_only_training_digits(mlp, monkeypatch, workers):
    original = DigitSplit.heldout

    def guarded(self):
        if not self.name.endswith("-selection"):
            raise AssertionError("tuning read the held-out digits")
        return original(self)

    monkeypatch.setattr(DigitSplit, "heldout", guarded)
    choice = ev.tune_adam(mlp, seeds=[0], steps=10, eval_every=5, lrs=[1e-3, 1e-2], progress=False, workers=workers)
    assert choice.lr in (1e-3, 1e-2) and set(choice.scores) == {1e-3, 1e-2}
    assert choice.scores[choice.lr] == min(choice.scores.values())
    assert "selection_problem" in choice.how and f"chosen lr={choice.lr:g}" in choice.how
    assert isinstance(choice.factory([torch.nn.Parameter(torch.zeros(1))]), torch.optim.Adam)
    with pytest.raises(ValueError, match="unknown select_on"):
        ev.tune_adam(mlp, seeds=[0], select_on="test")


def test_evaluate_with_baselines_names_every_choice(mlp):
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    e = ev.evaluate_with_baselines(
        mlp, {"mine": sgd}, "small", seeds=[0, 1], steps=10, eval_every=5, forms=["paper"], progress=False
    )
    assert e.reference == "mine"
    assert e.names[:3] == ["mine", "adam 0.005 (paper)", "rmsprop 0.005 (paper)"]
    tuned = [n for n in e.names if n.startswith("torch adam tuned")]
    assert len(tuned) == 1 and "selection_problem" in e.notes[tuned[0]]
    assert e.names[-1] == "oracle" and e.notes["oracle"].startswith("= ")
    assert "oracle" in e.table() and "- oracle: = " in e.notes_text()
    with pytest.raises(ValueError, match="clash"):
        ev.evaluate_with_baselines(mlp, {"adam 0.005 (paper)": sgd}, "small", seeds=[0], steps=2, progress=False)


# --- runs in worker processes -------------------------------------------------------------------------------


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def _adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def _numbers(e: ev.Evaluation) -> dict:
    return {
        n: [(r.name, r.seed, r.eval_steps, r.heldout, r.train_losses, r.diverged) for r in runs]
        for n, runs in e.runs.items()
    }


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_workers_give_the_in_process_numbers(mlp, one_thread):
    optimizers = {"sgd": lambda params: torch.optim.SGD(params, lr=0.1), "adam": _adam}  # a lambda: not picklable
    kw = dict(seeds=[0, 1], steps=30, eval_every=10, reference="adam", notes={"sgd": "lr 0.1"}, progress=False)
    sequential = ev.evaluate(mlp, optimizers, **kw)
    parallel = ev.evaluate(mlp, optimizers, workers=2, **kw)
    assert _numbers(parallel) == _numbers(sequential)
    assert [r.seed for r in parallel.runs["sgd"]] == [0, 1] and parallel.runs["sgd"][0].eval_steps == [0, 10, 20, 30]
    assert (parallel.reference, parallel.notes, parallel.seeds) == ("adam", {"sgd": "lr 0.1"}, [0, 1])
    assert parallel.table() == sequential.table()
    assert torch.get_num_threads() == 1 and not multiprocessing.active_children()


def test_one_worker_runs_in_this_process_with_one_thread_like_each_worker(mlp):
    """``workers=1`` means one run at a time of one thread, as each of N workers runs, so the numbers do not depend
    on N; ``None`` keeps the caller's thread count. Either way the caller's count is restored."""
    threads_seen = []

    def recording_sgd(params):
        threads_seen.append(torch.get_num_threads())
        return torch.optim.SGD(params, lr=0.1)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for workers in (1, None):
            ev.evaluate(mlp, {"sgd": recording_sgd}, seeds=[0], steps=5, workers=workers, progress=False)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert threads_seen == [1, 2]


def _refuse(params):
    raise AssertionError("a cached run was run again")


def test_workers_write_the_cache_and_resume_from_it(mlp, tmp_path):
    threads = torch.get_num_threads()
    cache = tmp_path / "runs.json"
    first = ev.evaluate(
        mlp, {"sgd": _sgd, "adam": _adam}, seeds=[0, 1], steps=20, eval_every=10, cache=cache, workers=2, progress=False
    )
    assert torch.get_num_threads() == threads  # the caller's thread count is left alone
    assert sorted(json.loads(cache.read_text())) == sorted(
        ev.run_key({"label": n}, "mlp", s, 20, 10) for n in ("sgd", "adam") for s in (0, 1)
    )
    again = ev.evaluate(
        mlp, {"sgd": _refuse, "adam": _refuse}, seeds=[0, 1], steps=20, eval_every=10, cache=cache, workers=2
    )
    assert _numbers(again) == _numbers(first) and again.names == ["sgd", "adam"]
    # one more seed: only its two runs are new, the cached ones are reused
    more = ev.evaluate(
        mlp, {"sgd": _sgd, "adam": _adam}, seeds=[0, 1, 2], steps=20, eval_every=10, cache=cache, workers=2
    )
    assert _numbers(more)["sgd"][:2] == _numbers(first)["sgd"] and len(json.loads(cache.read_text())) == 6


def _broken(params):
    raise RuntimeError("factory broke on purpose (42)")


def test_a_worker_exception_surfaces_in_the_caller(mlp, tmp_path):
    optimizers = {"sgd": _sgd, "broken": _broken}
    with pytest.raises(RuntimeError, match=r"factory broke on purpose \(42\)"):
        ev.evaluate(mlp, optimizers, seeds=[0, 1, 2], steps=5, cache=tmp_path / "c.json", workers=2, progress=False)
    assert not multiprocessing.active_children()
    with pytest.raises(ValueError, match="workers must be"):
        ev.evaluate(mlp, optimizers, seeds=[0], steps=5, workers=0)


def _slow(params):
    time.sleep(60)
    return torch.optim.SGD(params, lr=0.1)


def test_ctrl_c_stops_the_workers(mlp):
    """Ctrl+C while workers run: KeyboardInterrupt in the caller at once, no worker left behind. Ctrl+C is sent
    every 0.5 s until evaluate gives up, because Python drops an interrupt that lands in a finalizer."""
    stop = threading.Event()

    def interrupt(signum, frame):
        if not stop.is_set():
            raise KeyboardInterrupt

    def press_ctrl_c(main: int) -> None:
        while not stop.wait(0.5):
            signal.pthread_kill(main, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, interrupt)
    sender = threading.Thread(target=press_ctrl_c, args=(threading.main_thread().ident,))
    start = time.perf_counter()
    sender.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            try:
                ev.evaluate(mlp, {"slow": _slow}, seeds=[0, 1, 2], steps=5, workers=2, progress=False)
            finally:
                stop.set()
    finally:
        stop.set()
        sender.join()
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - start < 20  # the running runs were not waited for
    assert not multiprocessing.active_children()


# Ctrl+C raised inside concurrent.futures' wait with every pending future's lock held (before the fix: a hang)
CTRL_C_INSIDE_WAIT = """
import concurrent.futures._base as futures_base, signal, sys, torch
from amalgam_plugin import evaluate as ev
from amalgam_plugin.problems import make_problem
signal.signal(signal.SIGINT, signal.default_int_handler)  # a test run in the background inherits SIGINT ignored
acquire_all = futures_base._AcquireFutures.__enter__
def acquire_all_then_ctrl_c(self):
    acquire_all(self)
    futures_base._AcquireFutures.__enter__ = acquire_all
    signal.raise_signal(signal.SIGINT)
futures_base._AcquireFutures.__enter__ = acquire_all_then_ctrl_c
try:
    ev.evaluate(make_problem("mlp"), {"sgd": lambda p: torch.optim.SGD(p, lr=0.1)}, seeds=[0, 1, 2, 3], steps=300,
                workers=2, progress=False)
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_inside_the_pools_lock_handling_still_stops_the_workers():
    """Python raises KeyboardInterrupt between any two bytecodes; raised with concurrent.futures' locks held, the
    pool's shutdown waited for them forever. Ctrl+C is now answered only between waits."""
    done = subprocess.run([sys.executable, "-c", CTRL_C_INSIDE_WAIT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr[-2000:]


def test_without_fork_runs_in_process(mlp, monkeypatch, caplog):
    monkeypatch.setattr(executor, "_fork_context", lambda: None)
    with caplog.at_level(logging.WARNING, logger=ev.__name__):
        e = ev.evaluate(mlp, {"sgd": _sgd}, seeds=[0], steps=5, workers=2, progress=False)
    assert len(e.runs["sgd"]) == 1 and sum("fork" in r.getMessage() for r in caplog.records) == 1


def test_evaluate_with_baselines_in_workers(mlp, one_thread, tmp_path):
    kw = dict(seeds=[0, 1], steps=10, eval_every=5, forms=["paper"], progress=False)
    sequential = ev.evaluate_with_baselines(mlp, {"mine": _sgd}, "small", **kw)
    cache = tmp_path / "runs.json"
    parallel = ev.evaluate_with_baselines(mlp, {"mine": _sgd}, "small", cache=cache, workers=2, **kw)
    assert parallel.names == sequential.names and parallel.notes == sequential.notes
    assert _numbers(parallel) == _numbers(sequential) and parallel.table() == sequential.table()
    # tuning (4 lrs x 2 seeds) + mine and 2 baselines + the tuned Adam (2 seeds each), and nothing else
    assert len(json.loads(cache.read_text())) == 8 + 8
    again = ev.evaluate_with_baselines(mlp, {"mine": _refuse}, "small", cache=cache, workers=2, **kw)
    assert again.table() == parallel.table()
