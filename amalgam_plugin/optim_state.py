"""How ``AmalgamOptimizer``'s per-parameter state crosses ``state_dict`` / ``load_state_dict``: a sharded
(DTensor) parameter's student state leaves in the parameter's own layout and comes back flat and local; every
restored value is a copy on the parameter's device, student state kept float32."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor


def sharded_state(state_dict: dict, params: list[Tensor], live: dict) -> dict:
    """A sharded (DTensor) parameter's student state leaves as DTensors shaped like the parameter (plus the
    state's own trailing dimensions) and sharded like it, so distributed checkpointing saves each process's
    shard, as it does AdamW's ``exp_avg``; :func:`local_state` takes them back to the local flat layout.
    ``params``: the optimizer's parameters in state-dict order; ``live``: its state."""
    for index, saved in state_dict["state"].items():
        p = params[index]
        if not hasattr(p, "to_local") or p not in live or "exp_avg" in saved:
            continue
        from torch.distributed.tensor import DTensor

        local, shared = p.to_local(), dict(saved)  # ``saved`` is the live state: never modify it
        for key, value in saved.items():
            if isinstance(value, Tensor) and key != "step":
                rest = tuple(value.shape[1:])
                shared[key] = DTensor.from_local(value.reshape(*local.shape, *rest), p.device_mesh,
                                                 p.placements, run_check=False,
                                                 shape=torch.Size((*p.shape, *rest)),
                                                 stride=_contiguous_strides((*p.shape, *rest)))
        state_dict["state"][index] = shared
    return state_dict


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def local_state(saved: dict, group: dict, p: Tensor) -> dict:
    """A sharded parameter's saved student state (DTensors shaped like it) back in the local flat layout."""
    if group["use_fallback"] or not hasattr(p, "to_local"):
        return saved
    local_n = p.to_local().numel()
    return {k: v.to_local().reshape(local_n, *v.shape[p.dim():]) if hasattr(v, "to_local") else v
            for k, v in saved.items()}


def restore_value(key: str, value: Any, p: Tensor) -> Any:
    if not isinstance(value, Tensor):
        return copy.deepcopy(value)
    if key == "step":  # counters stay on the CPU so reading them never syncs an accelerator
        return value.to("cpu", torch.float32, copy=True)
    dtype = torch.float32 if value.is_floating_point() else value.dtype
    return value.to(device=p.device, dtype=dtype, copy=True)
