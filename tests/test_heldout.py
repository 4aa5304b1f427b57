"""The held-out suite: its task registry, one run, the runner's paired differences, its cache and its CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from amalgam_plugin.cli import main
from amalgam_plugin.heldout import HELDOUT_TASKS, run_suite, task_from_module
from amalgam_plugin.heldout.cli import load_task
from amalgam_plugin.heldout.runner import Job, canonical_json
from amalgam_plugin.heldout.train import MuonAdamW, hidden_matrices

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "heldout_own_task.py"


@pytest.mark.parametrize("name", list(HELDOUT_TASKS))
def test_every_task_builds_trains_and_holds_out_its_own_examples(name):
    task = HELDOUT_TASKS[name]
    data = task.data()
    assert not torch.isin(data.heldout_source, data.train_source).any()  # no source example (row, byte) in both
    torch.manual_seed(0)
    model = task.model()
    x, y = data.train
    loss = task.loss(model, (x[: task.batch_size], y[: task.batch_size]))
    loss.backward()
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_families_held_out_of_every_mixture():
    assert {n for n, t in HELDOUT_TASKS.items() if not t.in_mixture} == {"bert-mlm", "convnext", "vit"}


def test_schedule_is_the_trainers_warmup_cosine():
    from transformers import get_cosine_schedule_with_warmup

    task = HELDOUT_TASKS["bert-mlm"]
    param = torch.zeros(1, requires_grad=True)
    reference = get_cosine_schedule_with_warmup(torch.optim.SGD([param], lr=1.0), task.warmup_steps, task.steps)
    for step in range(task.steps):
        assert task.lr_factor(step) == pytest.approx(reference.get_last_lr()[0], abs=1e-12)
        reference.optimizer.step()
        reference.step()


def test_muon_takes_hidden_matrices_only_and_steps_as_torch_does():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    task = task_from_module("t", lambda: model, (torch.zeros(4, 1), torch.zeros(4)), (torch.zeros(2, 1),
                            torch.zeros(2)), F.mse_loss, batch_size=2)
    assert hidden_matrices(task, model) == ["1.weight"]  # not the embedding, not the output layer
    torch.manual_seed(0)
    params = [p for p in model.parameters()]
    hidden, rest = [params[1]], [params[0], params[2], params[3], params[4]]
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    ours = MuonAdamW(hidden, rest, lr=0.02)
    muon = torch.optim.Muon([copies[1]], lr=0.02, weight_decay=0.01)
    adamw = torch.optim.AdamW([copies[0], *copies[2:]], lr=1e-3)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, c, g in zip(params, copies, grads, strict=True):
            p.grad, c.grad = g.clone(), g.clone()
        ours.step()
        muon.step()
        adamw.step()
    for p, c in zip(params, copies, strict=True):
        torch.testing.assert_close(p, c)


def _tiny_task(steps: int = 20):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=generator)
    y = x @ torch.randn(5, 1, generator=generator) + 0.1 * torch.randn(96, 1, generator=generator)
    return task_from_module("tiny-linear", lambda: nn.Linear(5, 1), (x[:64], y[:64]), (x[64:], y[64:]), F.mse_loss,
                            steps=steps, batch_size=16, eval_every=5)


def _by_hand(task, lr: float, seed: int) -> float:
    """The best log held-out loss of AdamW at ``lr``, trained here without the runner."""
    from amalgam_plugin.problems import shuffled_batches

    torch.manual_seed(seed)
    model = task.model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    x, y = task.data().train
    hx, hy = task.data().heldout
    batches = shuffled_batches(x, y, task.batch_size, torch.Generator().manual_seed(seed))
    held = []
    for step in range(1, task.steps + 1):
        bx, by = next(batches)
        optimizer.zero_grad()
        F.mse_loss(model(bx), by).backward()
        optimizer.step()
        if step % task.eval_every == 0:
            with torch.no_grad():
                held.append(float(F.mse_loss(model(hx), hy)))
    return min(math.log(v) for v in held)


def test_runner_pairs_seeds_and_matches_runs_by_hand(tmp_path):
    task = _tiny_task()
    result = run_suite([task], [], [0, 1], tmp_path, lrs=(1e-3, 1e-1), progress=lambda line: None, widenings=0)
    summary = result["tasks"]["tiny-linear"]
    by_hand = {lr: [_by_hand(task, lr, seed) for seed in (0, 1)] for lr in (1e-3, 1e-1)}
    for lr, values in by_hand.items():
        runs = summary["runs"][canonical_json({"kind": "adamw", "lr": lr})]
        np.testing.assert_allclose([r["best_log_heldout"] for r in runs], values, rtol=1e-5)
    tuned_lr = min(by_hand, key=lambda lr: np.mean(by_hand[lr]))
    assert summary["tuned_lr"] == tuned_lr
    lion = next(r for r in summary["rows"] if r["spec"]["kind"] == "lion")
    d = np.array(lion["best_log_heldout"]) - np.array(by_hand[tuned_lr])
    half = stats.t.ppf(0.975, 1) * d.std(ddof=1) / math.sqrt(2)
    diff = lion["vs_tuned_adamw"]
    assert (diff["mean"], diff["low"], diff["high"]) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half))
    assert "Muon" not in (tmp_path / "results.md").read_text()  # a lone Linear has no hidden matrix
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0, 1]


def test_cache_resumes_without_rerunning(tmp_path):
    task = _tiny_task(steps=10)
    lines: list[str] = []
    run_suite([task], [], [0, 1], tmp_path, lrs=(1e-3, 1e-2), progress=lines.append, widenings=0)
    assert len(lines) == 6  # AdamW at 2 learning rates and Lion, 2 seeds each
    cache = json.loads((tmp_path / "cache.json").read_text())
    key = Job(task, {"kind": "lion", "lr": 1e-4}, 1).key()
    assert json.loads(key)["optimizer"] == {"kind": "lion", "lr": 1e-4} and key in cache
    del cache[key]
    (tmp_path / "cache.json").write_text(json.dumps(cache))
    lines.clear()
    run_suite([task], [], [0, 1], tmp_path, lrs=(1e-3, 1e-2), progress=lines.append, widenings=0)
    assert len(lines) == 1 and "Lion" in lines[0] and "seed 1" in lines[0]


def test_a_student_folder_changed_in_place_is_run_again(tmp_path):
    """The cache knows a student by its content hash, not its path: retrained into the same folder, it runs again
    (by name alone, the suite would report the old student's runs as the new one's)."""
    from amalgam_plugin import hub
    from amalgam_plugin.students.normalized import Normalized, NormalizedConfig

    task, folder = _tiny_task(steps=10), tmp_path / "student"
    hub.save_student(Normalized(NormalizedConfig(lr=1e-3)), folder)
    lines: list[str] = []
    first = run_suite([task], [str(folder)], [0], tmp_path / "out", lrs=(1e-3, 1e-2), progress=lines.append,
                      widenings=0)
    assert len(lines) == 4  # AdamW at 2 rates, Lion, the student
    for path in folder.iterdir():
        path.unlink()
    hub.save_student(Normalized(NormalizedConfig(lr=1e-1)), folder)
    lines.clear()
    again = run_suite([task], [str(folder)], [0], tmp_path / "out", lrs=(1e-3, 1e-2), progress=lines.append,
                      widenings=0)
    assert len(lines) == 1 and str(folder) in lines[0]

    def student(result):
        return next(r for r in result["tasks"]["tiny-linear"]["rows"] if r["spec"]["kind"] == "student")

    assert student(first)["spec"]["sha256"] != student(again)["spec"]["sha256"]
    assert student(first)["best_log_heldout"] != student(again)["best_log_heldout"]


def test_grid_grows_past_the_edge_where_the_best_rate_sits(tmp_path):
    task = _tiny_task(steps=10)  # 10 steps of a linear regression: the larger the rate the better, up to ~0.1
    result = run_suite([task], [], [0, 1], tmp_path, lrs=(1e-4, 3e-4), progress=lambda line: None, widenings=2)
    summary = result["tasks"]["tiny-linear"]
    assert list(summary["adamw_grid"]) == ["0.0001", "0.0003", "0.0009", "0.0027"]
    assert summary["tuned_lr"] == 0.0027 and summary["tuned_lr_at_edge"]
    means = {lr: np.mean([_by_hand(task, lr, seed) for seed in (0, 1)]) for lr in (9e-4, 2.7e-3)}
    assert [summary["adamw_grid"][k] for k in ("0.0009", "0.0027")] == pytest.approx(list(means.values()))
    assert "still at the grid's edge" in (tmp_path / "results.md").read_text()


def test_max_minutes_stops_before_any_run_and_writes_no_results(tmp_path):
    assert run_suite([_tiny_task()], [], [0], tmp_path, lrs=(1e-3, 1e-2), max_minutes=0) is None
    assert not (tmp_path / "results.md").exists() and not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("spec, message", [
    ("no-such-task", "unknown held-out task 'no-such-task'"),
    ("missing_file.py:make_task", "no such file"),
    (f"{EXAMPLE}:no_function", "has no function 'no_function'"),
    ("json:dumps", "dumps\\(\\) failed: TypeError"),
    ("json:JSONDecoder", "returned JSONDecoder, not a HeldoutTask"),
])
def test_bad_task_is_one_line_and_exit_2(tmp_path, capsys, spec, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--suite", "heldout", "--task", spec, "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("amalgam evaluate: error: argument --task:") and re.search(message, err)
    assert not out.exists()


def test_heldout_options_without_the_suite_are_refused(tmp_path, capsys):
    code = main(["evaluate", "torch.optim.AdamW", "--task", "vit", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err == "amalgam evaluate: --task, --lrs and --max-minutes apply to --suite heldout only\n"
    assert not (tmp_path / "out").exists()


def test_users_own_task_from_a_file(tmp_path, capsys):
    task = load_task(f"{EXAMPLE}:make_task")
    assert task.name == "breast-cancer-mlp" and len(task.data().heldout[0]) == 119
    own = tmp_path / "own.py"
    own.write_text("import torch, torch.nn.functional as F\nfrom amalgam_plugin.heldout import task_from_module\n"
                   "def make():\n    x = torch.linspace(-1, 1, 80)[:, None]\n"
                   "    return task_from_module('own', lambda: torch.nn.Linear(1, 1), (x[::2], 3 * x[::2]), "
                   "(x[1::2], 3 * x[1::2]), F.mse_loss, steps=10, batch_size=8, eval_every=5)\n")
    out = tmp_path / "out"
    code = main(["evaluate", "--suite", "heldout", "lean-choice-large-mix", "--task", f"{own}:make", "--seeds", "2",
                 "--lrs", "1e-3,1e-2", "--workers", "1", "--out", str(out)])
    assert code == 0
    table = (out / "results.md").read_text()
    assert "### own:" in table and "| lean-choice-large-mix |" in table and "AdamW lr=0.001 (default)" in table
