"""``amalgam evaluate``: the metrics on hand-made curves and synthetic data with known answers, and the command
end to end on a tiny budget (resume, stale runs, valid PNG files, one-line errors)."""

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from processes import amalgam, wait_until

from amalgam_plugin import evaluate as ev
from amalgam_plugin.cli import main
from amalgam_plugin.evaluate import runs
from amalgam_plugin.evaluate.cache import key_fields
from amalgam_plugin.evaluate.metrics import gaussian_smooth, optimization_stability
from amalgam_plugin.evaluate.statistics import variance_components
from amalgam_plugin.hub import bundled_root


def brute_force_smooth(x, sigma):
    """scipy's gaussian_filter1d(mode="nearest", truncate=4) written out as a double loop."""
    radius = int(4 * sigma + 0.5)
    kernel = [math.exp(-0.5 * (j / sigma) ** 2) for j in range(-radius, radius + 1)]
    total = sum(kernel)
    out = []
    for i in range(len(x)):
        acc = 0.0
        for j, w in zip(range(-radius, radius + 1), kernel, strict=True):
            acc += w * x[min(max(i + j, 0), len(x) - 1)]
        out.append(acc / total)
    return np.array(out)


def test_gaussian_smooth_matches_its_definition_and_scipy():
    x = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0])
    np.testing.assert_allclose(gaussian_smooth(x, 2.0), brute_force_smooth(x, 2.0), rtol=1e-13)
    ndimage = pytest.importorskip("scipy.ndimage")
    np.testing.assert_allclose(gaussian_smooth(x, 2.0), ndimage.gaussian_filter1d(x, 2.0, mode="nearest"),
                               rtol=1e-12)


def test_optimization_stability_on_hand_made_curves():
    assert optimization_stability([0.5] * 40) == 0.0  # a flat curve does not jitter
    smooth = np.exp(-np.linspace(0, 1, 40))  # log-linear: its smoothed log differs only near the edges
    jagged = smooth * np.where(np.arange(40) % 2 == 0, 1.3, 1 / 1.3)
    assert optimization_stability(jagged) > 10 * optimization_stability(smooth)
    # the definition by hand: std of log(G2 * v) - log(v)
    v = np.array([1.0, 0.5, 0.8, 0.3, 0.4, 0.2])
    expected = np.std(np.log(brute_force_smooth(v, 2.0)) - np.log(v))
    assert optimization_stability(v) == pytest.approx(expected, rel=1e-12)
    # a diverged run's tail is dropped; too short a curve has no stability
    assert optimization_stability([*v, float("nan"), float("inf")]) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(optimization_stability([1.0]))


def test_variance_components_by_hand():
    # replicate means 1.5, 3.5; seed means 2, 3; no residual: MS_rep = 2·(1 + 1)/1 = 4, σ²_meta = 4/2 = 2
    vc = variance_components(np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert vc.meta_std == pytest.approx(math.sqrt(2.0))
    assert vc.eval_std == pytest.approx(0.0, abs=1e-12)
    assert vc.mean == 2.5
    half = ev.t_quantile(0.975, 1) * np.std([1.5, 3.5], ddof=1) / math.sqrt(2)
    assert (vc.low, vc.high) == pytest.approx((2.5 - half, 2.5 + half))


def test_variance_components_recover_known_components():
    rng = np.random.default_rng(0)
    r, k, meta, seed, noise = 400, 10, 0.3, 0.5, 0.1
    y = 2.0 + rng.normal(0, meta, (r, 1)) + rng.normal(0, seed, (1, k)) + rng.normal(0, noise, (r, k))
    vc = variance_components(y)
    assert vc.meta_std == pytest.approx(meta, rel=0.1)
    assert vc.eval_std == pytest.approx(noise, rel=0.05)  # the shared seed effect is not counted as noise
    identical = variance_components(np.tile(rng.normal(0, 1, (1, k)), (5, 1)) + rng.normal(0, 0.01, (5, k)))
    assert identical.meta_std < 0.01  # replicates that differ only by noise are meta-stable


def test_variance_components_drop_seeds_with_a_diverged_run():
    y = np.array([[1.0, 2.0, np.nan], [3.0, 4.0, 5.0]])
    vc = variance_components(y)
    assert vc.seeds == 2 and vc.meta_std == pytest.approx(math.sqrt(2.0))


def png_ok(path) -> bool:
    """A PNG file whose chunks all carry a valid CRC, IHDR first with a positive size, IEND last."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            return False
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
            if width <= 0 or height <= 0:
                return False
        kinds.append(kind)
        pos += 12 + length
    return kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds


CPUS = os.cpu_count() or 1
QUICK = ["--no-baselines", "--problems", "mlp", "--steps", "1", "--seeds", "1"]
TINY = ["--problems", "mlp", "--seeds", "2", "--steps", "30", "--eval-every", "10", "--pool", "small",
        "--forms", "paper", "--workers", "1"]


def replicate_folders(tmp_path):
    reps = tmp_path / "reps"
    for i, name in enumerate(["amalgam-choice-large-quick", "paper-choice-large"]):
        shutil.copytree(bundled_root() / name, reps / f"r{i}")
    return reps


def test_amalgam_evaluate_end_to_end(tmp_path, capsys, monkeypatch):
    reps = replicate_folders(tmp_path)
    out = tmp_path / "eval"
    assert main(["evaluate", "torch.optim.SGD:lr=0.1", "--replicates", str(reps / "r*"), *TINY,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| torch.optim.SGD:lr=0.1 | " in printed and "Replicate groups" in printed
    results = json.loads((out / "results.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    mlp = results["problems"]["mlp"]
    names = [row["name"] for row in mlp["optimizers"]]
    assert names[:3] == ["torch.optim.SGD:lr=0.1", f"{reps / 'r*'} [r0]", f"{reps / 'r*'} [r1]"]
    assert {"adam 0.005 (paper)", "rmsprop 0.005 (paper)", "oracle"} <= set(names)
    assert any(n.startswith("torch adam tuned") for n in names)
    group = mlp["replicate_groups"][0]
    assert group["replicates"] == 2 and group["best_log_heldout"]["meta_std"] >= 0
    best = [row["best_log_heldout"] for row in mlp["optimizers"][1:3]]
    assert group["best_log_heldout"]["mean"] == pytest.approx(np.mean(best))
    for row in mlp["optimizers"]:
        assert row["optimization_stability"] >= 0 and row["runs"] == 2
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["mlp-bars.png", "mlp-curves.png", "mlp-time.png"]
    assert all(png_ok(out / "plots" / p) for p in plots)
    assert "![held-out loss against steps](plots/mlp-curves.png)" in (out / "results.md").read_text()

    # resumed: every run comes from the cache
    monkeypatch.setattr(runs, "run", lambda *a, **k: pytest.fail("a cached run was run again"))
    assert main(["evaluate", "torch.optim.SGD:lr=0.1", "--replicates", str(reps / "r*"), *TINY,
                 "--out", str(out)]) == 0


def test_the_evaluation_goes_into_a_students_card_and_is_replaced_on_a_rerun(tmp_path, capsys):
    reps = replicate_folders(tmp_path)
    card = reps / "r0" / "README.md"
    before = card.read_text()
    args = ["evaluate", str(reps / "r0"), "torch.optim.SGD:lr=0.1", *TINY, "--no-baselines",
            "--out", str(tmp_path / "eval"), "--card", str(reps / "r0")]
    assert main(args) == 0 and main(args) == 0
    text = card.read_text()
    assert text.startswith(before.rstrip("\n"))  # the card's own content is kept
    assert text.count("<!-- amalgam evaluate: begin -->") == 1  # replaced, not appended twice
    assert "## Evaluation across problems (`amalgam evaluate`)" in text and "### mlp" in text
    assert "![held-out loss against steps](evaluate-mlp-curves.png)" in text
    assert png_ok(reps / "r0" / "evaluate-mlp-curves.png")
    capsys.readouterr()
    assert main(["evaluate", "torch.optim.SGD:lr=0.1", "--card", str(tmp_path), "--out", str(tmp_path / "e2")]) == 2
    assert "holds no model card" in capsys.readouterr().err


def best_of(out: Path, name: str, problem: str = "mlp") -> float:
    rows = json.loads((out / "results.json").read_text())["problems"][problem]["optimizers"]
    return next(row["best_log_heldout"] for row in rows if row["name"] == name)


def cached_specs(out: Path) -> list:
    """The optimizer specification of every run in OUT/cache.json."""
    return [key_fields(key)["optimizer"] for key in json.loads((out / "cache.json").read_text())]


def test_a_changed_student_is_re_run_and_its_old_runs_dropped(tmp_path, caplog):
    reps = replicate_folders(tmp_path)
    student = tmp_path / "st|x"  # a label with a pipe: neither the check nor the table may break on it
    shutil.copytree(reps / "r0", student)
    old_spec = ev.student_factory(str(student)).describe()
    out = tmp_path / "eval"
    args = ["evaluate", str(student), *TINY, "--no-baselines", "--out", str(out)]
    assert main(args) == 0
    stale = best_of(out, str(student))
    assert cached_specs(out) == [old_spec] * 2
    shutil.rmtree(student)
    shutil.copytree(reps / "r1", student)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "warmup_steps": 5}))  # its own steps within 30
    assert main(args) == 0
    assert "changed since their runs were cached" in caplog.text
    assert old_spec not in cached_specs(out) and len(cached_specs(out)) == 2  # the old student's runs are gone
    fresh = tmp_path / "fresh"
    assert main(["evaluate", str(student), *TINY, "--no-baselines", "--out", str(fresh)]) == 0
    assert best_of(out, str(student)) == best_of(fresh, str(student)) != stale  # the new student's number
    row = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith(f"| {tmp_path}"))
    assert row.replace("\\|", "").count("|") == 8 and "st\\|x" in row  # 7 cells: the pipe is escaped


def test_a_teachers_runs_are_keyed_by_every_hyper_parameter(tmp_path):
    """Issue 23.5: change a teacher's beta1/beta2 and rerun into the same OUT: the new teacher's number, as a fresh
    folder gives it, not the old one's; two teachers that share a name and lr are two rows."""
    budget = ["--problems", "mlp", "--seeds", "1", "--steps", "30", "--eval-every", "10", "--forms", "paper",
              "--workers", "1"]
    out = tmp_path / "eval"
    assert main(["evaluate", "torch.optim.SGD:lr=0.1", *budget, "--pool", "adam:lr=0.005", "--out", str(out)]) == 0
    before = best_of(out, "adam 0.005 (paper)")
    changed = ["evaluate", "torch.optim.SGD:lr=0.1", *budget, "--pool", "adam:lr=0.005,beta1=0.5,beta2=0.9"]
    assert main([*changed, "--out", str(out)]) == 0
    assert main([*changed, "--out", str(tmp_path / "fresh")]) == 0
    after = best_of(out, "adam 0.005 (paper)")
    assert after == best_of(tmp_path / "fresh", "adam 0.005 (paper)") and after != before
    both = ev.pool_baselines("adam:lr=0.005+adam:lr=0.005,beta1=0.5,beta2=0.9", forms=["paper"])
    assert list(both) == ["adam 0.005 beta1=0.9,beta2=0.999 (paper)", "adam 0.005 beta1=0.5,beta2=0.9 (paper)"]
    keys = {ev.run_key(ev.specification(name, factory), "mlp", 0, 30, 10) for name, factory in both.items()}
    assert len(keys) == 2


def test_an_optimizer_name_with_markdown_or_mathtext_in_it_keeps_the_table_and_plots_whole(tmp_path):
    runs = [ev.RunResult(name, 0, 50, [0, 25, 50], [2.3, 0.5, 0.4], [1.0] * 50, train_seconds=[0.0, 0.1, 0.2])
            for name in ("a|b", "my $\\frac$ one")]
    evaluation = ev.Evaluation("mlp", [0], 50, 25, {r.name: [r] for r in runs}, reference="a|b")
    table = evaluation.table().splitlines()
    assert all(line.replace("\\|", "").count("|") == 7 for line in table)  # 6 cells a row
    assert table[2].startswith("| a\\|b |") and "Δ best vs a\\|b" in table[0]
    from amalgam_plugin.plots import problem_plots

    plots = problem_plots(evaluation, tmp_path / "plots", highlight="a|b")
    assert all(png_ok(path) for path in plots.values())
    assert png_ok(evaluation.plot(tmp_path / "curves.png"))


@pytest.mark.parametrize("args, message", [
    ([], "nothing to evaluate"),
    (["sgd-but-not-a-student"], "sgd-but-not-a-student"),
    (["torch.optim.NoSuchThing"], "cannot import optimizer class 'torch.optim.NoSuchThing'"),
    (["torch.optim.SGD:lr=-1"], "bad arguments for torch.optim.SGD"),
    (["torch.optim.SGD:lr=0.1", "--problems", "cifar"], "unknown problem 'cifar'; valid problems: train"),
    (["torch.optim.SGD:lr=0.1", "--problems", "mix"], "problem 'mix' is a distribution to meta-train on"),
    (["torch.optim.SGD:lr=0.1", "--seeds", "0"], "--seeds must be in [1, 100]"),
    (["--replicates", "no/such/folders*"], "matches 0 student folder(s)"),
    (["torch.optim.SGD:lr=0.1", *QUICK, "--seeds", "101"], "--seeds must be in [1, 100]"),
    (["torch.optim.SGD:lr=0.1", *QUICK, "--workers", str(CPUS + 1)],
     f"--workers must be between 1 and this machine's {CPUS} CPUs, got {CPUS + 1}"),
])
def test_amalgam_evaluate_errors_are_one_line(args, message, capsys, tmp_path):
    assert main(["evaluate", *args, "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_amalgam_evaluate_never_writes_into_a_users_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["evaluate", "torch.optim.SGD:lr=0.1", "--out", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_a_folder_with_someone_elses_cache_json_is_not_taken_for_an_evaluation(tmp_path, capsys):
    """Issue 23.3: our folders are recognised by the marker we write, not by a cache.json any folder may have."""
    theirs = {"cache.json": '{"my": "data"}', "results.md": "my results"}
    for name, text in theirs.items():
        (tmp_path / name).write_text(text)
    args = ["evaluate", "torch.optim.SGD:lr=0.1", *QUICK, "--workers", "1", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty and holds no amalgam evaluate run" in err
    assert {name: (tmp_path / name).read_text() for name in theirs} == theirs
    assert main([*args, "--overwrite"]) == 0  # asked for: our files replace theirs, whose cache is not read as runs
    assert cached_specs(tmp_path) == [runs_spec("torch.optim.SGD:lr=0.1")]
    assert main(args) == 0  # now ours: resumed


def runs_spec(spec: str) -> dict:
    from amalgam_plugin.suite import candidate

    return candidate(spec).spec


@pytest.fixture(scope="module")
def evaluation_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation") / "e"
    assert main(["evaluate", "torch.optim.SGD:lr=0.1", *QUICK, "--workers", "1", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("name, text, message", [
    ("cache.json", "[]", "is not a cache of runs: a JSON object of runs, not list"),
    ("cache.json", json.dumps({"k": {"name": "x", "nonsense": 1}}), "entry 'k': a run has unknown field(s) 'nonsense'"),
    ("cache.json", "{", "is not a valid cache of runs (not JSON: "),
    ("candidates.json", "not json", "is not a valid list of candidates (not JSON: "),
    ("candidates.json", "[]", "is not a list of candidates"),
])
def test_a_damaged_evaluation_folder_is_reported_in_one_line_naming_the_file(name, text, message, evaluation_folder,
                                                                             tmp_path, capsys):
    """Issue 23.10: no TypeError traceback, no JSON error without the file's name."""
    out = tmp_path / "e"
    shutil.copytree(evaluation_folder, out)
    (out / name).write_text(text)
    assert main(["evaluate", "torch.optim.SGD:lr=0.1", *QUICK, "--workers", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and repr(str(out / name)) in err
    assert (out / name).read_text() == text  # left as it was


def test_a_learning_rate_of_five_thousand_nines_is_one_short_line(tmp_path, capsys):
    assert main(["evaluate", "torch.optim.SGD:lr=" + "9" * 5000, *QUICK, "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err == "amalgam evaluate: torch.optim.SGD: lr=inf is not a finite number\n"


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or CPUS < 2, reason="reads /proc; two workers")
def test_the_workers_die_with_a_killed_evaluate(tmp_path):
    """Issue 23.7: SIGKILL of the parent (which runs no cleanup) must not leave its two workers running."""
    parent = amalgam("evaluate", "torch.optim.SGD:lr=0.01", "--no-baselines", "--problems", "mlp", "--seeds", "2",
                     "--steps", "1000000", "--workers", "2", "--out", str(tmp_path / "e"),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        assert wait_until(lambda: len(children(parent.pid)) >= 2 or parent.poll() is not None, 120)
        workers = children(parent.pid)
        assert len(workers) == 2 and all(map(alive, workers))
        parent.kill()
        parent.wait()
        assert wait_until(lambda: not any(map(alive, workers)), 10), "workers outlived their parent"
    finally:
        parent.kill()
        parent.wait()
        for pid in filter(alive, workers):  # a failed check must not leave them running
            os.kill(pid, signal.SIGKILL)


def test_ctrl_c_during_evaluate_is_one_line_and_the_same_command_resumes(tmp_path):
    """Issue 23.11: SIGINT gives one line and exit 130, no traceback; the rerun keeps the runs finished before."""
    out = tmp_path / "e"
    args = ["torch.optim.SGD:lr=0.1", "torch.optim.Adam:lr=0.001", "--no-baselines", "--problems", "mlp", "--seeds",
            "8", "--steps", "400", "--eval-every", "200", "--workers", str(min(CPUS, 2)), "--out", str(out)]
    first = amalgam("evaluate", *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cache = out / "cache.json"
    assert wait_until(lambda: first.poll() is not None or (cache.exists() and len(json.loads(cache.read_text()))), 120)
    assert first.poll() is None, "the evaluation ended before it could be interrupted"
    first.send_signal(signal.SIGINT)
    err = first.communicate(timeout=60)[1]
    assert first.returncode == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == "amalgam evaluate: interrupted; rerun the same command to resume"
    done = json.loads(cache.read_text())
    assert 0 < len(done) < 16  # 16 runs of 400 steps: the signal lands mid-way on an idle or a loaded machine
    again = amalgam("evaluate", *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert again.wait(timeout=300) == 0
    resumed = json.loads(cache.read_text())
    assert len(resumed) == 16 and all(resumed[key] == run for key, run in done.items())  # not run again


@pytest.mark.slow  # a benchmark script end to end: over a minute on 2 cores
def test_reproduce_paper_runs_every_study_on_the_smoke_budget(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_paper.py"
    done = subprocess.run([sys.executable, str(script), "--budget", "smoke", "--out", str(tmp_path), "--workers", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (tmp_path / "results.md").read_text()
    for heading in ("## (a) Mechanisms and (b)", "## (c) Meta-stability", "## (d) The same students"):
        assert heading in report
    assert "| choice-large | " in report and "| alpha0 | " in report and "| oracle | " in report
    assert "| mlp-gaussian-adaptive-0.01 | 2 | " in report
    recipe = json.loads((tmp_path / "students/mlp-gaussian-adaptive-0.01/r1/training/run_config.json").read_text())
    assert recipe["student_recipe"]["perturbation"] == "gaussian-adaptive" and recipe["seed"] == 1
