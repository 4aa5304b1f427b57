"""The paper's optimizees as functional models: parameters are a plain list of tensors (docs/method.md#problems).

Keras conventions: VALID convolutions, ReLU, Glorot-uniform kernels, zero biases.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import Registry


def glorot(shape: tuple[int, ...], fan_in: int, fan_out: int, generator: torch.Generator) -> Tensor:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(shape, generator=generator) * 2 - 1) * limit


def conv_params(c_in: int, c_out: int, k: int, generator: torch.Generator) -> list[Tensor]:
    w = glorot((c_out, c_in, k, k), c_in * k * k, c_out * k * k, generator)
    return [w, torch.zeros(c_out)]


def dense_params(n_in: int, n_out: int, generator: torch.Generator) -> list[Tensor]:
    return [glorot((n_out, n_in), n_in, n_out, generator), torch.zeros(n_out)]


@dataclass(frozen=True)
class Architecture:
    name: str
    init_params: Callable[[torch.Generator], list[Tensor]]
    forward: Callable[[list[Tensor], Tensor], Tensor]  # images [B, 1, 28, 28] -> logits [B, 10]


def conv_net(convs: list[tuple[int, int]], pool_after: set[int], name: str) -> Architecture:
    """Convolutions ``(channels, kernel)``, a 2x2 max-pool after the listed layer indices, then Dense(10)."""
    side, c_in = 28, 1
    for i, (c_out, k) in enumerate(convs):
        side = side - k + 1
        if i in pool_after:
            side //= 2
        c_in = c_out
    flat = side * side * c_in

    def init(generator: torch.Generator) -> list[Tensor]:
        params, c = [], 1
        for c_out, k in convs:
            params += conv_params(c, c_out, k, generator)
            c = c_out
        return params + dense_params(flat, 10, generator)

    def forward(params: list[Tensor], x: Tensor) -> Tensor:
        for i in range(len(convs)):
            x = F.relu(F.conv2d(x, params[2 * i], params[2 * i + 1]))
            if i in pool_after:
                x = F.max_pool2d(x, 2)
        return F.linear(x.flatten(1), params[-2], params[-1])

    return Architecture(name, init, forward)


def mlp(hidden: int = 20) -> Architecture:
    """The paper's "2-layer MLP": Dense(20, sigmoid) -> Dense(10)."""

    def init(generator: torch.Generator) -> list[Tensor]:
        return dense_params(784, hidden, generator) + dense_params(hidden, 10, generator)

    def forward(params: list[Tensor], x: Tensor) -> Tensor:
        h = torch.sigmoid(F.linear(x.flatten(1), params[0], params[1]))
        return F.linear(h, params[2], params[3])

    return Architecture("mlp", init, forward)


def relu_mlp(widths: list[int], name: str) -> Architecture:
    """Dense(w, ReLU) for each width, then Dense(10): the deeper MLPs of the ``mix-aug`` mixture."""
    sizes = [784, *widths, 10]

    def init(generator: torch.Generator) -> list[Tensor]:
        return [t for n_in, n_out in zip(sizes, sizes[1:], strict=False) for t in dense_params(n_in, n_out, generator)]

    def forward(params: list[Tensor], x: Tensor) -> Tensor:
        h = x.flatten(1)
        for k in range(0, len(params) - 2, 2):
            h = F.relu(F.linear(h, params[k], params[k + 1]))
        return F.linear(h, params[-2], params[-1])

    return Architecture(name, init, forward)


ARCHITECTURES: Registry[Architecture] = Registry("architecture", {
    "train": (conv_net([(16, 3), (32, 5)], {0, 1}, "train"), "the paper's Train CNN, 18,122 parameters"),
    "wider": (conv_net([(32, 3), (64, 5)], {0, 1}, "wider"), "Train with twice the filters"),
    "deeper": (conv_net([(16, 3), (32, 3), (32, 3), (64, 3), (64, 3)], {2, 4}, "deeper"), "five convolutions"),
    "mlp": (mlp(), "one hidden layer of 20 sigmoid units"),
})
