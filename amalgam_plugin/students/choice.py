"""The choice network (docs/method.md#choice-network; the authors' l2o: policies/abstract_choice.py), the
intermediate teacher of optimal-choice amalgamation: a soft choice, per scalar and per step, among a pool of
analytical updates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..teachers import POOLS, TEACHERS, Teacher, check_tensors, in_context
from .base import Dense, HubStudent, StudentConfig, check_real, check_sizes, lstm_stack, run_lstm_stack, zero_lstm_state

MAX_POOL = 32


@dataclass
class ChoiceConfig(StudentConfig):
    """``pool`` lists ``[name, hparams]`` pairs of named (differentiable) teachers; default: the large choice
    pool (docs/method.md#choice-pools)."""

    student_type: ClassVar[str] = "choice"
    card_fields: ClassVar[tuple[str, ...]] = ("hidden_sizes", "time_scale")

    pool: list = field(default_factory=lambda: [[n, dict(kw)] for n, kw in POOLS["choice-large"].members])
    hidden_sizes: list[int] = field(default_factory=lambda: [20, 20])
    time_scale: float = 2000.0

    def validate(self) -> None:
        super().validate()
        check_sizes("hidden_sizes", self.hidden_sizes)
        check_real("time_scale", self.time_scale, 0.0, 1e12, low_open=True)
        if not isinstance(self.pool, list) or not 1 <= len(self.pool) <= MAX_POOL:
            raise ValueError(f"pool must be a list of 1 to {MAX_POOL} [teacher, hyper-parameters] pairs")
        for i, member in enumerate(self.pool):
            if not (isinstance(member, (list, tuple)) and len(member) == 2 and isinstance(member[1], dict)):
                raise ValueError(f"pool[{i}] must be a [teacher name, hyper-parameters] pair, got {member!r}")
            if not isinstance(member[0], str):
                raise ValueError(f"pool[{i}]'s teacher must be a name, got {member[0]!r}")
            TEACHERS.lookup(member[0])
            for key, value in member[1].items():
                check_real(f"pool[{i}].{key}", value, -1e12, 1e12)


def rank_features(rank: int | Tensor, n: int, like: Tensor) -> Tensor:
    """One-hot rank == 1, 2, 3, for one tensor (an int) or per coordinate (a tensor [n]). Rank-4 conv kernels
    get all zeros: a quirk kept on purpose (docs/method.md#deviations)."""
    if isinstance(rank, Tensor):
        return torch.stack([(rank == r) for r in (1, 2, 3)], dim=-1).to(like.dtype)
    return like.new_tensor([float(rank == r) for r in (1, 2, 3)]).expand(n, 3)


class ChoiceNet(nn.Module, HubStudent):
    config_class = ChoiceConfig

    def __init__(self, config: ChoiceConfig | None = None):
        super().__init__()
        self.config = config or ChoiceConfig()
        self.pool: list[Teacher] = [TEACHERS.lookup(name).make(**kw) for name, kw in self.config.pool]  # built once
        # over tensorwise teachers it needs the parameters and shapes in its state at every step (``in_context``)
        self.tensorwise = any(t.tensorwise for t in self.pool)
        sizes = list(self.config.hidden_sizes)
        self.recurrent = lstm_stack(sizes, input_size=len(self.config.pool) + 4)
        self.choice = Dense(sizes[-1], len(self.config.pool))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for cell in self.recurrent:
            cell.reset_parameters(generator)
        self.choice.reset_parameters(generator)

    def init_state(self, n: int, like: Tensor) -> dict:
        zeros = like.new_zeros(n)
        return {
            "t": 0,
            "pool": [t.init(zeros) for t in self.pool],
            **zero_lstm_state(list(self.config.hidden_sizes), n, like),
        }

    def check_shapes(self, shapes: list[tuple[int, ...]]) -> None:
        """A ValueError when a teacher of its pool cannot act on tensors of these shapes (``check_tensors``)."""
        check_tensors(self.pool, shapes)

    def _pool_step(self, grad: Tensor, state: dict) -> tuple[Tensor, dict]:
        if self.tensorwise and "params" not in state:
            raise ValueError("a choice network over tensorwise teachers (adamw, lion, adafactor, muon) needs the "
                             "parameters and shapes in its state (teachers.in_context), which meta-training gives")
        deltas, pool_states = [], []
        for teacher, s in zip(self.pool, state["pool"], strict=True):
            d, s = teacher.update(grad, in_context(teacher, s, state.get("params"), state.get("shapes", [])))
            deltas.append(d)
            pool_states.append(s)
        own = {k: v for k, v in state.items() if k not in ("params", "shapes")}
        return torch.stack(deltas, dim=-1), {**own, "pool": pool_states, "t": state["t"] + 1}

    def warmup_step(self, grad: Tensor, state: dict) -> dict:
        """Warm-up: pool states and the time counter advance, the LSTM state stays frozen."""
        return self._pool_step(grad, state)[1]

    def weights(self, grad: Tensor, state: dict, rank: int | Tensor) -> tuple[Tensor, Tensor, dict]:
        """Softmax weights over the pool, the pool's updates [n, K], and the new state."""
        updates, new_state = self._pool_step(grad, state)
        n = grad.shape[0]
        time = grad.new_full((n, 1), state["t"] / self.config.time_scale)  # not clipped, as the authors' code
        x = torch.cat([updates, time, rank_features(rank, n, grad)], dim=-1)
        h, lstm_state = run_lstm_stack(self.recurrent, x, state)
        e = torch.exp(self.choice(h))
        return e / (e.sum(-1, keepdim=True) + 1e-10), updates, {**new_state, **lstm_state}

    def forward(self, grad: Tensor, state: dict, rank: int | Tensor = 1) -> tuple[Tensor, dict]:
        c, updates, new_state = self.weights(grad, state, rank)
        return (c * updates).sum(-1), new_state
