"""RNNProp, the student of the paper (docs/method.md#rnnprop; the authors' l2o: policies/rnnprop_2016.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import (
    Dense,
    HubStudent,
    StudentConfig,
    check_real,
    check_sizes,
    fast_tanh,
    lstm_stack,
    run_lstm_stack,
    zero_lstm_state,
)


@dataclass
class RNNPropConfig(StudentConfig):
    """RNNProp's architecture (plus :class:`StudentConfig`'s runtime protocol)."""

    student_type: ClassVar[str] = "rnnprop"
    card_fields: ClassVar[tuple[str, ...]] = ("hidden_sizes", "output_scale", "beta1", "beta2", "epsilon")

    hidden_sizes: list[int] = field(default_factory=lambda: [20, 20])
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-10
    output_scale: float = 0.1

    def validate(self) -> None:
        super().validate()
        check_sizes("hidden_sizes", self.hidden_sizes)
        check_real("beta1", self.beta1, 0.0, 1.0, high_open=True)
        check_real("beta2", self.beta2, 0.0, 1.0, high_open=True)
        check_real("epsilon", self.epsilon, 0.0, 1.0, low_open=True)
        check_real("output_scale", self.output_scale, 0.0, 100.0, low_open=True)


class RNNProp(nn.Module, HubStudent):
    """Coordinate-wise: every scalar of every tensor is one row of the batch.

    State per scalar: the moments m, v and the LSTM states (h, c) of each layer; tensors are flat
    (``[n]`` for moments, ``[n, units]`` for the LSTM).
    """

    config_class = RNNPropConfig

    def __init__(self, config: RNNPropConfig | None = None):
        super().__init__()
        self.config = config or RNNPropConfig()
        sizes = list(self.config.hidden_sizes)
        self.recurrent = lstm_stack(sizes, input_size=2)
        self.delta = Dense(sizes[-1], 1)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for cell in self.recurrent:
            cell.reset_parameters(generator)
        self.delta.reset_parameters(generator)

    def init_state(self, n: int, like: Tensor) -> dict[str, Tensor]:
        zeros = like.new_zeros(n)
        return {"m": zeros, "v": zeros.clone(), **zero_lstm_state(list(self.config.hidden_sizes), n, like)}

    def warmup_step(self, grad: Tensor, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Step 1 of the rule alone: what runs during the warm-up, with the LSTM state frozen."""
        cfg = self.config
        m = cfg.beta1 * state["m"] + (1 - cfg.beta1) * grad
        v = cfg.beta2 * state["v"] + (1 - cfg.beta2) * grad * grad
        return {**state, "m": m, "v": v}

    def features(self, grad: Tensor, m: Tensor, v: Tensor) -> Tensor:
        """[m̂/√(v̂+ε), g/√(v̂+ε)] with the constant bias correction m̂ = m/(1−β1), v̂ = v/(1−β2)."""
        cfg = self.config
        denom = torch.sqrt(v / (1 - cfg.beta2) + cfg.epsilon)
        return torch.stack([m / (1 - cfg.beta1) / denom, grad / denom], dim=-1)

    def forward(
        self, grad: Tensor, state: dict[str, Tensor], rank: int | Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """grad: flat ``[n]``. Returns Δ (the parameter moves by −Δ) and the new state. ``rank`` is part of the
        student protocol and unused here: RNNProp has no per-tensor features."""
        state = self.warmup_step(grad, state)
        x = self.features(grad, state["m"], state["v"])
        h, lstm_state = run_lstm_stack(self.recurrent, x, state)
        delta = self.config.output_scale * fast_tanh(self.delta(h)).squeeze(-1)
        return delta, {**state, **lstm_state}
