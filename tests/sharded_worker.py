"""One process of the sharded-training test (tests/test_sharded.py), started by torchrun: trains a small model
with AmalgamOptimizer under DDP or FSDP2 (gloo, CPU) and rank 0 writes the full parameters to OUT."""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from amalgam_plugin.optim import AmalgamOptimizer

STEPS = 6


def model_and_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 12, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(STEPS)]
    return model, batches


def train(model, optimizer, batches) -> None:
    for x, y in batches:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


def main(mode: str, student: str, out: str) -> None:
    dist.init_process_group("gloo")
    model, batches = model_and_batches()  # every rank sees the same batch: the mean gradient is the batch's
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        wrapped = fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    optimizer = AmalgamOptimizer(wrapped.parameters(), student=student, warmup_steps=2)
    train(wrapped, optimizer, batches)
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}
    if dist.get_rank() == 0:
        save_file(full, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
