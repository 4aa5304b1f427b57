"""The checks of ``AmalgamOptimizer``'s arguments: one clear error per mistake, raised before any work is done.

As torch's optimizers do, a value of the wrong type is a ``TypeError`` (``lr="1e-3"`` from a config file, a
module instead of its parameters) and a number out of range a ``ValueError``; unlike them, infinite numbers are
refused too, since any of them makes the parameters non-finite at the first step.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from torch import Tensor, nn


def _number(name: str, value: Any) -> float:
    """``value`` as a float, or a TypeError naming the option (a one-element tensor counts as a number)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if isinstance(value, Real):
        return float(value)
    raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")


def check_non_negative(name: str, value: Any) -> None:
    number = _number(name, value)
    if not (number >= 0 and math.isfinite(number)):  # NaN fails both
        raise ValueError(f"{name} must be >= 0 and finite, got {number}")


def check_count(name: str, value: Any, low: int) -> None:
    """An integer option (not a bool, not a float) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def check_betas(betas: Any) -> None:
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= _number(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")


def check_options(options: dict) -> None:
    """The numeric options of a param group (or of the constructor), whichever of them ``options`` holds."""
    for name in ("lr", "weight_decay", "fallback_lr", "eps"):
        if name in options:
            check_non_negative(name, options[name])
    if options.get("warmup_steps") is not None:
        check_count("warmup_steps", options["warmup_steps"], 0)
    if options.get("chunk_size") is not None:
        check_count("chunk_size", options["chunk_size"], 1)
    if "betas" in options:
        check_betas(options["betas"])


def checked_params(params: Any) -> list:
    """A group's parameters as a list of tensors or ``(name, tensor)`` pairs, none of them complex.

    Raises:
        TypeError: a module (``model`` for ``model.parameters()``) or anything else that is not a tensor.
        ValueError: a complex tensor (its imaginary part would be lost).
    """
    if isinstance(params, nn.Module):
        raise TypeError(f"optimizer can only optimize Tensors, but got the module {type(params).__name__}; "
                        "pass model.parameters() (or model.named_parameters()) instead of the model")
    items = [params] if isinstance(params, Tensor) else list(params)
    for item in items:
        tensor = item[1] if isinstance(item, tuple) and len(item) == 2 else item
        if not isinstance(tensor, Tensor):
            hint = "; pass model.parameters() instead of modules" if isinstance(tensor, nn.Module) else ""
            raise TypeError(f"optimizer can only optimize Tensors, but one of the params is "
                            f"{type(tensor).__module__}.{type(tensor).__qualname__}{hint}")
        if tensor.is_complex():
            raise ValueError("complex parameters are not supported (their imaginary part would be lost); "
                             "optimize torch.view_as_real(p) instead")
    return items
