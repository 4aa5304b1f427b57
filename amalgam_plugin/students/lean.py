"""The lean student: 4 floats of state per parameter and a very small MLP per coordinate (docs/method.md#lean).

State per coordinate: three momenta at time scales β ∈ {0.5, 0.9, 0.99} and one second moment (β2 = 0.99).
Features: g, m₁, m₂, m₃ divided by √(v + ε), and one per-tensor feature, 1 for a matrix or larger (rank ≥ 2)
and 0 for a vector or scalar. Update: Δ = s · tanh(w₂ · relu(W₁ x + b₁) + b₂), bounded by s as RNNProp's is, and
0 for a coordinate that has never had a non-zero gradient (v = 0).

``LeanKernel`` is its runtime kernel: the whole update of a tensor as one elementwise pass (the MLP unrolled into
scalar arithmetic, which ``torch.compile`` turns into one loop), or, where no compiler works, an eager path by
chunks that computes the same function with matrix products.
"""

from __future__ import annotations

import logging
import os
import types
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import Dense, HubStudent, State, StudentConfig, check_int, check_real

logger = logging.getLogger(__name__)

STATE_KEYS = ("m0", "m1", "m2", "v")
INIT_GAIN = 0.05  # the initial rule's step: 0.1 · 0.05 · m₂/√v, about Adam's at lr 0.005


@dataclass
class MomentsConfig(StudentConfig):
    """The fields of a small MLP over three momenta and a second moment (the lean and normalized students)."""

    hidden_size: int = 16
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9, 0.99])
    beta2: float = 0.99
    epsilon: float = 1e-12

    def validate(self) -> None:
        super().validate()
        check_int("hidden_size", self.hidden_size, 2, 256)
        if not isinstance(self.betas, list) or len(self.betas) != 3:
            raise ValueError(f"betas must be a list of 3 momentum decays, got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            check_real(f"betas[{i}]", beta, 0.0, 1.0, high_open=True)
        check_real("beta2", self.beta2, 0.0, 1.0, high_open=True)
        check_real("epsilon", self.epsilon, 0.0, 1.0, low_open=True)


@dataclass
class LeanConfig(MomentsConfig):
    student_type: ClassVar[str] = "lean"
    card_fields: ClassVar[tuple[str, ...]] = ("hidden_size", "output_scale", "betas", "beta2", "epsilon")

    output_scale: float = 0.1

    def validate(self) -> None:
        super().validate()
        check_real("output_scale", self.output_scale, 0.0, 100.0, low_open=True)


def mlp_layers(hidden_size: int, inputs: int = 5) -> tuple[Dense, Dense]:
    """A lean-style student's MLP: ``inputs`` features → ``hidden_size`` units → one output."""
    return Dense(inputs, hidden_size), Dense(hidden_size, 1)


def start_at_momentum_(hidden: Dense, delta: Dense, generator: torch.Generator | None, gain: float) -> None:
    """The MLP's output starts at ``gain · x₂`` (the β = 0.9 momentum feature): hidden units 0 and 1 carry ±x₂
    and the output reads their difference; the other units start random with small output weights."""
    hidden.reset_parameters(generator)
    delta.reset_parameters(generator)
    with torch.no_grad():
        delta.kernel.mul_(0.1)
        hidden.kernel[:, :2] = 0.0
        hidden.kernel[2, 0], hidden.kernel[2, 1] = 1.0, -1.0
        delta.kernel[0, 0], delta.kernel[1, 0] = gain, -gain


def mlp_weights(student: nn.Module, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``W₁, b₁, w₂ (flat), b₂`` of a lean-style student in float32 on ``device``, for a runtime kernel."""
    return tuple(t.detach().to(device, torch.float32) for t in (
        student.hidden.kernel, student.hidden.bias, student.delta.kernel.flatten(), student.delta.bias))


def compiled_or_false(function, tensor: Tensor, constants: dict, name: str, tensors: int = 6):
    """``function(tensors flat tensors, tensor, matrix, constants)`` compiled by ``torch.compile`` and run once on a
    probe, or False (with a warning) where no compiler works: the caller's eager path computes the same.

    The Python floats (the rule's weights in ``constants``, the rank feature ``matrix``) are compiled in as
    constants: by default torch.compile passes each float as a runtime double, and the unrolled MLP then converts
    a hundred of them per vector of coordinates, which halves the step's speed (benchmarks/step_overhead.py). So
    each call compiles with ``specialize_float``, and each kernel has its own copy of ``function``: the compile
    cache, and its recompile limit, belong to one student, whose two graphs (matrix 0 and 1) serve every shape."""
    try:
        own = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                                 function.__defaults__, function.__closure__)
        compiled = torch.compile(own, dynamic=True, fullgraph=True)
        constant_floats = torch._dynamo.config.patch(specialize_float=True)  # made once: a new one costs 4x to enter

        def with_constant_floats(*args):
            with constant_floats:
                return compiled(*args)

        # both graphs now, from plain tensors: a graph first built on a view fails its guard on other views
        for matrix in (0.0, 1.0):
            with_constant_floats(*(torch.zeros(4, device=tensor.device) for _ in range(tensors)), tensor, matrix,
                                 constants)
        return with_constant_floats
    except Exception as err:  # noqa: BLE001 (no compiler here)
        logger.warning("torch.compile unavailable for the %s student's step (%s); using the eager path", name,
                       str(err).splitlines()[0] if str(err) else type(err).__name__)
        return False


def rank_feature(rank: int | Tensor | None, like: Tensor) -> Tensor:
    """1.0 for coordinates of a tensor of rank ≥ 2, else 0.0 (an int rank per tensor, or one per coordinate)."""
    if rank is None:
        return like.new_zeros(())
    return (torch.as_tensor(rank, device=like.device) >= 2).to(like.dtype)


class Lean(nn.Module, HubStudent):
    """Coordinate-wise on flat ``[n]`` tensors, like every student."""

    config_class = LeanConfig
    inputs = 5

    def __init__(self, config: LeanConfig | None = None):
        super().__init__()
        self.config = config or LeanConfig()
        self.hidden, self.delta = mlp_layers(self.config.hidden_size, self.inputs)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Start at a momentum rule, Δ ≈ 0.1·tanh(INIT_GAIN · m₂/√v) (β 0.9): hidden units 0 and 1 carry ±m₂/√v
        and the output reads their difference; the other units start random with small output weights.
        Meta-training from a random MLP first spends its budget escaping diverging rules."""
        start_at_momentum_(self.hidden, self.delta, generator, INIT_GAIN)

    def init_state(self, n: int, like: Tensor) -> State:
        return {k: like.new_zeros(n) for k in STATE_KEYS}

    def warmup_step(self, grad: Tensor, state: State) -> State:
        """The accumulators' update (all of the state: a lean student has no recurrent state to freeze)."""
        cfg = self.config
        new = {f"m{i}": beta * state[f"m{i}"] + (1 - beta) * grad for i, beta in enumerate(cfg.betas)}
        new["v"] = cfg.beta2 * state["v"] + (1 - cfg.beta2) * grad * grad
        return new

    def features(self, grad: Tensor, state: State, rank) -> Tensor:
        inv = torch.rsqrt(state["v"] + self.config.epsilon)
        matrix = rank_feature(rank, grad).expand_as(grad)
        return torch.stack([grad * inv, state["m0"] * inv, state["m1"] * inv, state["m2"] * inv, matrix], dim=-1)

    def forward(self, grad: Tensor, state: State, rank: int | Tensor | None = None) -> tuple[Tensor, State]:
        state = self.warmup_step(grad, state)
        h = torch.relu(self.hidden(self.features(grad, state, rank)))
        delta = self.config.output_scale * torch.tanh(self.delta(h).squeeze(-1))
        return delta * (state["v"] > 0), state


# --- the runtime kernel --------------------------------------------------------------------------------------

COMPILE_MIN = 2**20
"""Coordinates of one (device, dtype) group from which the compiled step is used: below it, eager chunks cost
less than a compiled call's guards, and small models (and the tests) never wait for a compiler."""
EAGER_CHUNK = 2**14


def _constants(student: Lean) -> dict:
    """The weights as Python floats, baked into the unrolled elementwise step."""
    cfg = student.config
    w1 = student.hidden.kernel.detach().double().tolist()  # [5][H]
    return {"betas": [float(b) for b in cfg.betas], "beta2": float(cfg.beta2), "eps": float(cfg.epsilon),
            "scale": float(cfg.output_scale), "w1": w1, "b1": student.hidden.bias.detach().double().tolist(),
            "w2": student.delta.kernel.detach().double().flatten().tolist(),
            "b2": float(student.delta.bias.detach().double())}


def elementwise_step(p: Tensor, g: Tensor, m0: Tensor, m1: Tensor, m2: Tensor, v: Tensor, lr: Tensor,
                     matrix: float, c: dict) -> None:
    """One tensor's whole update in elementwise arithmetic, in place: the accumulators, then p -= lr · Δ. Eager,
    this is many passes over the tensor; compiled, one loop with no temporaries."""
    b0, b1, b2 = c["betas"]
    m0n, m1n, m2n = b0 * m0 + (1 - b0) * g, b1 * m1 + (1 - b1) * g, b2 * m2 + (1 - b2) * g
    vn = c["beta2"] * v + (1 - c["beta2"]) * g * g
    inv = torch.rsqrt(vn + c["eps"])
    x = (g * inv, m0n * inv, m1n * inv, m2n * inv)
    w1 = c["w1"]
    out = c["b2"]
    for j, w2j in enumerate(c["w2"]):
        z = x[0] * w1[0][j] + x[1] * w1[1][j] + x[2] * w1[2][j] + x[3] * w1[3][j] + (c["b1"][j] + matrix * w1[4][j])
        out = out + torch.relu(z) * w2j
    delta = c["scale"] * torch.tanh(out) * (vn > 0)
    m0.copy_(m0n)
    m1.copy_(m1n)
    m2.copy_(m2n)
    v.copy_(vn)
    p.sub_(lr * delta)


def _compiler_mode() -> str:
    mode = os.environ.get("AMALGAM_COMPILE", "auto")
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"AMALGAM_COMPILE must be auto, always or never, got {mode!r}")
    return mode


class LeanKernel:
    """Warm-up by foreach ops; the learned step compiled (one elementwise loop per tensor) for large groups
    where a compiler works, else eager by chunks. Both compute the same function within float tolerance."""

    def __init__(self, student: Lean, device: torch.device, chunk_size: int | None = None):
        self.config = student.config
        self.constants = _constants(student)
        self.w1, self.b1, self.w2, self.b2 = mlp_weights(student, device)
        self.chunk = chunk_size or EAGER_CHUNK
        self.mode = _compiler_mode()
        self._compiled = None  # built on first use; False once a compiler failed

    def warmup(self, grads: list[Tensor], states: list[State]) -> None:
        cfg = self.config
        for i, beta in enumerate(cfg.betas):
            ms = [s[f"m{i}"] for s in states]
            torch._foreach_mul_(ms, beta)
            torch._foreach_add_(ms, grads, alpha=1 - beta)
        vs = [s["v"] for s in states]
        torch._foreach_mul_(vs, cfg.beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - cfg.beta2)

    def step(self, flats: list[Tensor], grads: list[Tensor], states: list[State], lr: float,
             ranks: list[int]) -> None:
        total = sum(f.numel() for f in flats)
        compiled = self._compiled_step() if self.mode == "always" or (self.mode == "auto" and total >= COMPILE_MIN) \
            else None
        lr_t = torch.tensor(lr, dtype=torch.float32, device=flats[0].device)
        workspace = None if compiled is not None else self._workspace(max(f.numel() for f in flats), flats[0].device)
        for p, g, s, rank in zip(flats, grads, states, ranks, strict=True):
            if p.numel() == 0:  # no coordinate to update (and the chunks of the eager path would be empty)
                continue
            matrix = 1.0 if rank >= 2 else 0.0
            if compiled is not None:
                compiled(p, g, s["m0"], s["m1"], s["m2"], s["v"], lr_t, matrix, self.constants)
            else:
                self._eager(p, g, s, lr, matrix, workspace)

    def _compiled_step(self):
        if self._compiled is None:
            lr = torch.tensor(0.0, device=self.w1.device)
            self._compiled = compiled_or_false(elementwise_step, lr, self.constants, "lean")
        return self._compiled or None

    def _workspace(self, largest: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """One step's chunk buffers (features, hidden, output), shared by all of its tensors."""
        rows = min(largest, self.chunk)
        return (torch.empty(rows, 5, device=device), torch.empty(rows, self.config.hidden_size, device=device),
                torch.empty(rows, device=device))

    def _eager(self, p: Tensor, g: Tensor, s: State, lr: float, matrix: float,
               workspace: tuple[Tensor, Tensor, Tensor]) -> None:
        """The same step by chunks of coordinates: features [c, 5] → one addmm → relu → one addmv."""
        cfg = self.config
        for i, beta in enumerate(cfg.betas):
            s[f"m{i}"].mul_(beta).add_(g, alpha=1 - beta)
        s["v"].mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
        n = p.numel()
        x, h, d = workspace
        rows = min(n, len(d))
        x[:rows, 4] = matrix
        for a in range(0, n, rows):
            b = min(a + rows, n)
            xs, hs, ds = x[: b - a], h[: b - a], d[: b - a]
            inv = torch.add(s["v"][a:b], cfg.epsilon, out=ds).rsqrt_()
            for col, key in enumerate((None, "m0", "m1", "m2")):
                torch.mul(g[a:b] if key is None else s[key][a:b], inv, out=xs[:, col])
            torch.addmm(self.b1, xs, self.w1, out=hs).relu_()
            torch.addmv(self.b2, hs, self.w2, out=ds).tanh_().mul_(s["v"][a:b] > 0)
            if lr != 0.0:
                p[a:b].add_(ds, alpha=-lr * cfg.output_scale)
