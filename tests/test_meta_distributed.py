"""Meta-training on two processes (torchrun, gloo): the meta-gradient, the training losses and the student are
those of one process running the same trajectories, and a run killed half-way resumes exactly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from meta_distributed_worker import run  # noqa: E402

WORKER = Path(__file__).with_name("meta_distributed_worker.py")
FLAKY_LAUNCH = ("address already in use", "signal 6 (sigabrt)")  # the launch failed, never a wrong result


def two_processes(mode: str, workdir: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKER),
               mode, str(workdir), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and any(f in done.stderr.lower() for f in FLAKY_LAUNCH):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return done


def succeeded(done: subprocess.CompletedProcess) -> None:
    lines = [line for line in done.stderr.splitlines() if not line.startswith("W")]  # torch's own warnings
    assert done.returncode == 0, "\n".join(lines[-60:])


def result(path: Path) -> tuple[dict[str, torch.Tensor], list[float]]:
    with safe_open(str(path), framework="pt") as f:
        losses = json.loads(f.metadata()["losses"])
    return load_file(str(path)), losses


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    run("straight", folder / "run", folder / "out.safetensors")
    return result(folder / "out.safetensors")


def test_two_processes_give_the_meta_gradient_and_the_student_of_one(single, tmp_path):
    succeeded(two_processes("straight", tmp_path / "run", tmp_path / "out.safetensors"))
    tensors, losses = result(tmp_path / "out.safetensors")
    expected, expected_losses = single
    assert losses == expected_losses and len(losses) == 2 * 3 + 2 * 6  # two periods of each stage
    assert expected["first_gradient"].abs().sum() > 0
    for name, value in expected.items():
        assert torch.equal(tensors[name], value), name
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()


@pytest.mark.slow  # half a minute; one process's exact resume is in the default run (test_crash_safety.py)
def test_a_killed_two_process_run_resumes_exactly(single, tmp_path):
    killed = two_processes("killed", tmp_path / "run", tmp_path / "unused.safetensors")
    assert killed.returncode != 0 and not (tmp_path / "unused.safetensors").exists()
    succeeded(two_processes("resume", tmp_path / "run", tmp_path / "out.safetensors"))
    tensors, losses = result(tmp_path / "out.safetensors")
    expected, expected_losses = single
    assert losses == expected_losses
    # it resumed from the checkpoint: its first meta-update is a later one
    assert not torch.equal(tensors["first_gradient"], expected["first_gradient"])
    for name, value in expected.items():
        if name != "first_gradient":
            assert torch.equal(tensors[name], value), name


def test_more_processes_than_trajectories_per_step_is_one_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(WORKER), "straight", str(tmp_path / "run"), str(tmp_path / "out"), "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "2 processes need at least as many trajectories per meta-step, got 1" in done.stderr


@pytest.mark.slow  # half a minute; test_two_processes_give_the_meta_gradient_and_the_student_of_one runs torchrun
def test_amalgam_amalgamate_under_torchrun_writes_one_student(tmp_path):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "amalgam_plugin.cli", "amalgamate", "--preset", "smoke", "--no-eval", "--out",
                           str(tmp_path / "student")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    succeeded(done)
    assert done.stdout.count("student: ") == 1  # rank 0 reports
    config = json.loads((tmp_path / "student" / "training" / "run_config.json").read_text())
    assert config["processes"] == 2 and config["student_recipe"]["trajectories_per_step"] == 2
    assert "--trajectories-per-step 2" in (tmp_path / "student" / "README.md").read_text()
    from amalgam_plugin.optim import AmalgamOptimizer

    model = torch.nn.Linear(3, 2)
    AmalgamOptimizer(model.parameters(), student=str(tmp_path / "student"))
