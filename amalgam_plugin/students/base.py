"""What every student shares: Keras-layout layers (so the paper's weights load by name) and the Hub mixin."""

from __future__ import annotations

import math

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

FORMAT_VERSION = 1
PAPER_URL = "https://arxiv.org/abs/2203.06474"


class HubStudent(
    PyTorchModelHubMixin,
    library_name="amalgam-plugin",
    tags=["optimizer", "learned-optimizer", "optimizer-amalgamation", "pytorch"],
    license="mit",
    paper_url=PAPER_URL,
    repo_url="https://github.com/VITA-Group/OptimizerAmalgamation",
):
    """Marker base: students save and load through huggingface_hub (config.json + model.safetensors)."""


def glorot_uniform_(weight: Tensor, generator: torch.Generator | None) -> Tensor:
    fan_in, fan_out = weight.shape[0], weight.shape[1]
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return weight.uniform_(-limit, limit, generator=generator)


def orthogonal_(weight: Tensor, generator: torch.Generator | None) -> Tensor:
    rows, cols = weight.shape
    a = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))
    q = q if rows >= cols else q.T
    with torch.no_grad():
        return weight.copy_(q[:rows, :cols].to(weight.dtype))


def fast_tanh(x: Tensor) -> Tensor:
    """tanh(x) = 2·sigmoid(2x) − 1: the same function, but torch's CPU tanh is ~8x slower than its sigmoid."""
    return torch.sigmoid(2 * x) * 2 - 1


class KerasLSTMCell(nn.Module):
    """An LSTM cell in Keras layout: kernel [in, 4u], recurrent_kernel [u, 4u], one bias, gates i, f, c, o."""

    def __init__(self, input_size: int, units: int):
        super().__init__()
        self.units = units
        self.kernel = nn.Parameter(torch.empty(input_size, 4 * units))
        self.recurrent_kernel = nn.Parameter(torch.empty(units, 4 * units))
        self.bias = nn.Parameter(torch.zeros(4 * units))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        glorot_uniform_(self.kernel, generator)
        orthogonal_(self.recurrent_kernel, generator)
        with torch.no_grad():
            self.bias.zero_()
            self.bias[self.units : 2 * self.units] = 1.0  # unit_forget_bias

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        z = torch.addmm(self.bias, x, self.kernel) + h @ self.recurrent_kernel
        i, f, g, o = z.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * fast_tanh(g)
        return torch.sigmoid(o) * fast_tanh(c), c


class Dense(nn.Module):
    """A Keras Dense layer: kernel [in, out], bias [out]."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.empty(input_size, output_size))
        self.bias = nn.Parameter(torch.zeros(output_size))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        glorot_uniform_(self.kernel, generator)
        with torch.no_grad():
            self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.kernel)


def lstm_stack(sizes: list[int], input_size: int) -> nn.ModuleList:
    cells, width = [], input_size
    for units in sizes:
        cells.append(KerasLSTMCell(width, units))
        width = units
    return nn.ModuleList(cells)


def zero_lstm_state(sizes: list[int], n: int, like: Tensor) -> dict[str, Tensor]:
    state = {}
    for layer, units in enumerate(sizes):
        state[f"h{layer}"] = like.new_zeros(n, units)
        state[f"c{layer}"] = like.new_zeros(n, units)
    return state


def run_lstm_stack(cells: nn.ModuleList, x: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    new_state = {}
    for layer, cell in enumerate(cells):
        x, c = cell(x, state[f"h{layer}"], state[f"c{layer}"])
        new_state[f"h{layer}"], new_state[f"c{layer}"] = x, c
    return x, new_state
