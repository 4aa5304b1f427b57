"""The examples in a smoke setting, ``amalgam run SCRIPT.py``, ``register()``, and the light import (subprocesses)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def run(args: list[str], cwd: Path, timeout: int = 150) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def train_losses(stdout: str) -> list[float]:
    return [float(line.split("train loss")[1].split()[0]) for line in stdout.splitlines() if "train loss" in line]


@pytest.mark.parametrize(
    "script, student_flag",
    [
        ("train_with_trainer.py", ["--optim-args", "student={}"]),
        # the timm CNN with a student also runs in test_timm_example_runs_the_student_at_the_lr_multiplier_asked
        pytest.param("train_timm.py", ["--student", "{}"], marks=pytest.mark.slow),
        ("train_timm.py", ["--model", "vit", "--student", "{}"]),
        ("train_accelerate.py", ["--student", "{}"]),
    ],
)
def test_example_smoke(script, student_flag, paper_student_name, tmp_path):
    flags = [flag.format(paper_student_name) for flag in student_flag]
    done = run([sys.executable, str(EXAMPLES / script), "--smoke", *flags], cwd=tmp_path)
    losses = train_losses(done.stdout)
    assert len(losses) >= 2 and losses[-1] < losses[0], done.stdout
    assert "held-out loss" in done.stdout


@pytest.mark.parametrize("script, flags", [
    ("train_with_trainer.py", ["--optim", "adamw_torch", "--learning-rate", "3e-3"]),
    pytest.param("train_timm.py", ["--opt", "adamw", "--lr", "3e-3"], marks=pytest.mark.slow),  # the ViT's covers it
    ("train_timm.py", ["--model", "vit", "--opt", "adamw", "--lr", "3e-3"]),
])
def test_examples_run_the_adamw_baseline_of_benchmarks_example_tasks(script, flags, tmp_path):
    done = run([sys.executable, str(EXAMPLES / script), "--smoke", *flags], cwd=tmp_path)
    losses = train_losses(done.stdout)
    assert len(losses) >= 2 and losses[-1] < losses[0], done.stdout
    lrs = [float(line.split("  lr ")[1]) for line in done.stdout.splitlines() if "  lr " in line]
    assert max(lrs) <= 3e-3  # the schedule decays AdamW's lr (timm's floor is a tenth of it, not 0.1)


def test_timm_example_runs_the_student_at_the_lr_multiplier_asked(paper_student_name, tmp_path):
    flags = ["--smoke", "--student", paper_student_name, "--lr-multiplier", "0.5"]
    done = run([sys.executable, str(EXAMPLES / "train_timm.py"), *flags], cwd=tmp_path)
    assert "group lrs [0.5, 0.5]" in done.stdout


def test_timm_example_runs_the_normalized_student_at_its_own_lr(tmp_path):
    """A normalized student's lr is AdamW's: without --lr the example must not hand it a rate tuned for another."""
    flags = ["--smoke", "--opt", "amalgam-normalized"]
    done = run([sys.executable, str(EXAMPLES / "train_timm.py"), *flags], cwd=tmp_path)
    assert "group lrs [0.02, 0.02]" in done.stdout, done.stdout


SCRIPT = """\
import sys

import timm.optim
import torch
from transformers import HfArgumentParser, TrainingArguments

(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
student = args.optim_args.split("=", 1)[1]  # "student=NAME"
optimizer = timm.optim.create_optimizer_v2(torch.nn.Linear(2, 2), opt="amalgam", lr=5e-4, student=student)
print("RESULT", __name__, args.optim.value, type(optimizer).__name__, optimizer.param_groups[0]["lr"])
sys.exit(3)
"""


def test_run_script_registers_before_an_unmodified_script(paper_student_name, tmp_path):
    """The script knows nothing of amalgam_plugin; ``--optim amalgam`` and ``opt="amalgam"`` work anyway through
    ``amalgam run`` (the console script calls ``run_script``; without it, ``run_script`` is called directly)."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    args = [str(script), "--output_dir", str(tmp_path / "out"), "--optim", "amalgam",
            "--optim_args", f"student={paper_student_name}", "--report_to", "none"]  # fmt: skip
    plain = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=120)
    assert plain.returncode != 0 and "invalid choice: 'amalgam'" in plain.stderr  # without registration

    code = "import sys; from amalgam_plugin.integrations import run_script; run_script(sys.argv[1], sys.argv[2:])"
    launcher = ["amalgam", "run"] if shutil.which("amalgam") else [sys.executable, "-c", code]
    done = subprocess.run([*launcher, *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-3000:]  # the script's own exit status
    assert "RESULT __main__ amalgam AmalgamOptimizer 1.0" in done.stdout


def test_register_and_run_script_errors(tmp_path):
    from amalgam_plugin.integrations import register, run_script

    assert register() == ["transformers", "timm"]
    with pytest.raises(ValueError, match="valid choices"):
        register(["keras"])
    with pytest.raises(FileNotFoundError):
        run_script(tmp_path / "missing.py")


def test_import_amalgam_plugin_is_light():
    code = textwrap.dedent(
        """
        import sys
        import amalgam_plugin
        import amalgam_plugin.integrations
        heavy = sorted(m for m in ("transformers", "timm") if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    done = run([sys.executable, "-c", code], cwd=ROOT, timeout=60)
    assert "HEAVY []" in done.stdout
