"""One process of the sharded-training test (tests/test_sharded.py), started by torchrun: trains a small model
with AmalgamOptimizer under DDP or FSDP2 (gloo, CPU), or under FSDP2 with a torch.distributed.checkpoint resume
half-way (``fsdp2-resume``), and rank 0 writes the full parameters to OUT."""

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


def wrap(model, mode: str):
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))


def resumed_through_dcp(model, optimizer, student: str, batches, folder: str):
    """Half the steps, a distributed checkpoint of model and optimizer, a fresh model and optimizer loaded from
    it (the loading runs torch's lr = 0 initialisation step), the other half."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    half = len(batches) // 2
    train(model, optimizer, batches[:half])
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
    fresh, _ = model_and_batches()
    fresh = wrap(fresh, "fsdp2")
    fresh_optimizer = AmalgamOptimizer(fresh.parameters(), student=student, warmup_steps=2)
    model_state, optim_state = get_state_dict(fresh, fresh_optimizer)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=folder)
    set_state_dict(fresh, fresh_optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    train(fresh, fresh_optimizer, batches[half:])
    return fresh


def main(mode: str, student: str, out: str) -> None:
    dist.init_process_group("gloo")
    model, batches = model_and_batches()  # every rank sees the same batch: the mean gradient is the batch's
    model = wrap(model, "fsdp2" if mode == "fsdp2-resume" else mode)
    optimizer = AmalgamOptimizer(model.parameters(), student=student, warmup_steps=2)
    if mode == "fsdp2-resume":
        model = resumed_through_dcp(model, optimizer, student, batches, out + ".dcp")
    else:
        train(model, optimizer, batches)
    module = model.module if mode == "ddp" else model
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in module.named_parameters()}
    if dist.get_rank() == 0:
        save_file(full, out)
    dist.barrier()  # no process tears gloo down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
