"""``amalgam evaluate``: the metrics on hand-made curves and synthetic data with known answers, and the command
end to end on a tiny budget (resume, stale runs, valid PNG files, one-line errors)."""

import json
import math
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from amalgam_plugin import evaluate as ev
from amalgam_plugin.cli import main
from amalgam_plugin.evaluate import runs
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


def test_a_changed_student_is_re_run(tmp_path, caplog):
    reps = replicate_folders(tmp_path)
    out = tmp_path / "eval"
    args = ["evaluate", str(reps / "r0"), *TINY, "--no-baselines", "--out", str(out)]
    assert main(args) == 0
    shutil.rmtree(reps / "r0")
    shutil.copytree(reps / "r1", reps / "r0")
    assert main(args) == 0
    assert "changed since their runs were cached" in caplog.text


@pytest.mark.parametrize("args, message", [
    ([], "nothing to evaluate"),
    (["sgd-but-not-a-student"], "sgd-but-not-a-student"),
    (["torch.optim.NoSuchThing"], "cannot import optimizer class 'torch.optim.NoSuchThing'"),
    (["torch.optim.SGD:lr=-1"], "bad arguments for torch.optim.SGD"),
    (["torch.optim.SGD:lr=0.1", "--problems", "cifar"], "unknown problem 'cifar'; valid problems: train"),
    (["torch.optim.SGD:lr=0.1", "--problems", "mix"], "problem 'mix' is a distribution to meta-train on"),
    (["torch.optim.SGD:lr=0.1", "--seeds", "0"], "--seeds must be in [1, 100]"),
    (["--replicates", "no/such/folders*"], "matches 0 student folder(s)"),
])
def test_amalgam_evaluate_errors_are_one_line(args, message, capsys, tmp_path):
    assert main(["evaluate", *args, "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_amalgam_evaluate_never_writes_into_a_users_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["evaluate", "torch.optim.SGD:lr=0.1", "--out", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err


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
