"""AmalgamOptimizer where large models are trained: DDP and FSDP2 (``fully_shard``, DTensor parameters with
per-shard state) in 2 CPU processes on gloo give the parameters of one process within float tolerance."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amalgam_plugin.hub import save_student
from amalgam_plugin.optim import AmalgamOptimizer
from amalgam_plugin.students import Lean

sys.path.insert(0, str(Path(__file__).parent))
from sharded_worker import model_and_batches, train  # noqa: E402

WORKER = Path(__file__).with_name("sharded_worker.py")


@pytest.fixture(scope="module")
def lean_folder(tmp_path_factory):
    student = Lean()
    student.reset_parameters(torch.Generator().manual_seed(0))
    return str(save_student(student, tmp_path_factory.mktemp("lean") / "lean"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("student", ["paper-choice-large", "lean"])
def test_two_processes_give_the_parameters_of_one(mode, student, lean_folder, tmp_path):
    spec = lean_folder if student == "lean" else student
    out = tmp_path / "params.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKER),
               mode, spec, str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    if done.returncode != 0 and "address already in use" in done.stderr.lower():  # the rendezvous port was taken
        done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "Error" in line)[-3000:]
    model, batches = model_and_batches()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, AmalgamOptimizer(model.parameters(), student=spec, warmup_steps=2), batches)
    sharded = load_file(str(out))
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name])
        torch.testing.assert_close(sharded[name], p.detach(), rtol=1e-5, atol=1e-6)
