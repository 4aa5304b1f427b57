"""Meta-training on several processes (docs/method.md#distributed), started by ``torchrun`` or ``accelerate
launch``: each process runs its share of the trajectories of a meta-step, and every process applies the same
averaged meta-gradient, so all hold the same student.

A run's numbers do not depend on how its trajectories are spread: each trajectory's meta-gradient and statistics
fill its own row of a table that is summed across processes (adding zeros is exact), and every process then
reduces the table's rows in the same order, as a single process does with the whole table.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

CPU = torch.device("cpu")


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun, accelerate launch) started; 1 outside one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Group:
    """This process's place among the meta-training processes (a single process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    device: torch.device = CPU  # where the collectives' tensors live (gloo: CPU, NCCL: this process's GPU)

    @property
    def main(self) -> bool:
        """Rank 0 writes the checkpoints, the log and the student."""
        return self.rank == 0

    def owns(self, slot: int) -> bool:
        return slot % self.size == self.rank

    def sum(self, table: Tensor) -> Tensor:
        """The table summed over all processes, in place (each process filled only its own rows)."""
        if self.size > 1:
            shared = table.to(self.device)
            dist.all_reduce(shared)
            table.copy_(shared)
        return table

    def main_value(self, value: int) -> int:
        """Rank 0's ``value``, on every process."""
        if self.size == 1:
            return value
        shared = torch.tensor([value], device=self.device)
        dist.broadcast(shared, 0)
        return int(shared.item())

    def main_says(self, flag: bool) -> bool:
        """Rank 0's decision, for every process (deadlines are read from rank 0's clock)."""
        return bool(self.main_value(int(flag)))

    def same_everywhere(self, value: int) -> bool:
        """Whether every process holds rank 0's ``value``."""
        return self.all_agree(self.main_value(value) == value)

    def all_agree(self, ok: bool) -> bool:
        """True on every process when ``ok`` holds on every process."""
        if self.size == 1:
            return ok
        value = torch.tensor([int(ok)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())


def current_group() -> Group:
    if dist.is_available() and dist.is_initialized():
        nccl = dist.get_backend() == "nccl"
        return Group(dist.get_rank(), dist.get_world_size(),
                     torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))
    return Group()


def resolve_device(device: str | torch.device) -> torch.device:
    """The device meta-training runs on: ``cpu``, or ``cuda`` (this process's GPU under a launcher). A ValueError
    when there is no such device."""
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from err
    if device.type == "cpu":
        return device
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available here (torch.cuda.is_available() is "
                         f"{torch.cuda.is_available()}); use --device cpu")
    if device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


@contextmanager
def launched_group(device: torch.device = CPU) -> Iterator[Group]:
    """The process group a launcher describes (its environment: MASTER_ADDR, RANK, WORLD_SIZE, ...), joined for the
    duration and left at the end when it was joined here: NCCL when meta-training runs on a GPU, gloo on the CPU."""
    joined = launched_world_size() > 1 and not dist.is_initialized()
    if joined:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield current_group()
        if joined:  # every process is done before gloo is torn down (it may abort a process that is not)
            dist.barrier()
    finally:
        if joined:
            dist.destroy_process_group()


def agreed(group: Group, check):
    """``check()`` on every process; its ValueError is raised on every process (one that passed names the other's
    refusal), so none waits for a peer that stopped."""
    try:
        result, error = check(), None
    except ValueError as err:
        result, error = None, err
    if not group.all_agree(error is None):
        raise error or ValueError("another process refused this request (see its message)")
    return result
