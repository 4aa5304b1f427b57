"""The normalized student: a lean MLP rule whose update is normalized per tensor, so that ``lr`` is AdamW's
(docs/method.md#normalized). In the spirit of Celo2 (Moudgil, Knyazev, Belilovsky 2026) and PyLO; its own design.

State per coordinate (4 floats): three momenta ``m_i ← β_i m_i + (1 − β_i) g`` at β = (0.5, 0.9, 0.99) and one
second moment ``v ← β₂ v + (1 − β₂) g²`` at β₂ = 0.999, all bias-corrected by the step count t (the optimizer's
own per-parameter ``step`` at run time, a number beside the state in meta-training), so the rule needs no warm-up.

Features: ``g/d, m̂₁/d, m̂₂/d, m̂₃/d`` with ``d = √v̂ + ε`` (scale-free ratios, as Adam's) and 1 for a tensor of
rank ≥ 2. Rule: ``y = w₂ · relu(W₁ x + b₁) + b₂`` per coordinate (0 where v = 0: never a gradient), then per tensor
``u = y / RMS(y)``: every tensor's update has RMS 1 whatever the MLP's output scale, and the step is ``lr · u``.
So ``lr`` means what it means for AdamW (1e-3 moves a tensor by 1e-3 RMS per step) and the user's schedules and
warm-ups act on it directly; there is no fixed SGD warm-up. Meta-training has no ``lr``: the engine applies
``config.lr · u`` (the learning rate the rule was trained at, and the optimizer's default).

Normalizing per tensor (not a bounded per-coordinate output, as the lean student's ``0.1 · tanh``) is Celo2's
choice: the MLP only picks a direction; its scale, which does not transfer across problems, is the user's ``lr``.
Its inputs are ratios already, so unlike Celo2 they need no per-tensor input normalization (one pass less).

The harness (Celo2's), each part a switch in ``config.json``, all off by default:

* ``orthogonalize``: tensors of rank ≥ 2 get ``y`` orthogonalized by Newton-Schulz (as Muon; a rank > 2 tensor as
  the matrix ``[shape[0], rest]``), then RMS-normalized (coordinates that never had a gradient still stay put);
  ``ns_steps`` iterations; with ``ns_rank`` r > 0, only on the update's r strongest directions, found by a
  randomized sketch, the rest scaled as a whole (``sketched_newton_schulz``: O(r·mn) where the iteration is O(m²n);
  a matrix with a side of at most r takes the whole iteration, cheap there);
* ``adamw_1d``: tensors of rank ≤ 1 (biases, norms) get AdamW's update ``lr · m̂₂/(√v̂ + ε)`` from the same state
  (β₁ = betas[1] = 0.9, β₂ = 0.999, ε = 1e-8: torch's defaults). Embeddings are matrices, orthogonalized too;
  the optimizer's ``fallback=`` gives them to AdamW by name, as Muon does (worse for the bundled student on
  validation: docs/results.md#harness-variants);
* ``weight_decay``: decoupled, AdamW's ``θ ← θ(1 − lr·wd)``: the optimizer's default ``weight_decay``;
* ``adamw_size``: each tensor's unit update is scaled by the RMS of AdamW's direction ``m̂₂/(√v̂ + ε)`` for that
  tensor, so it moves as far as AdamW would at the same ``lr`` (about ``0.2·lr`` once its gradients are mostly
  noise, up to ``lr`` while they agree) in the rule's direction: AdamW's own annealing under a constant ``lr``.

With either of the first two on, a model with no tensor of rank ≥ 2 is refused (``check_parameters``).

The student works per tensor, so it takes the tensors' shapes where coordinate-wise students take ranks
(``per_tensor``): the engine passes its trajectory's shapes, the optimizer each tensor's (``NormalizedKernel``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import HubStudent, State, check_int, check_real
from .lean import (
    COMPILE_MIN,
    MomentsConfig,
    _compiler_mode,
    compiled_or_false,
    mlp_layers,
    mlp_weights,
    start_at_momentum_,
)

STATE_KEYS = ("m0", "m1", "m2", "v")
ADAM_MOMENT = "m1"  # the momentum at β = 0.9: AdamW's first moment in the harness
NORM_EPS = 1e-30  # inside the RMS: a tensor whose update is all zero stays zero
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Newton-Schulz quintic, as Muon's
Shapes = list[tuple[int, ...]]


@dataclass
class NormalizedConfig(MomentsConfig):
    student_type: ClassVar[str] = "normalized"
    card_fields: ClassVar[tuple[str, ...]] = ("hidden_size", "betas", "beta2", "epsilon", "lr", "orthogonalize",
                                              "adamw_1d", "weight_decay", "ns_steps", "adamw_size", "ns_rank")
    lr_note: ClassVar[str] = ("lr is AdamW's: each tensor moves by lr RMS per step, or with adamw_size as far as "
                              "AdamW would at that lr (the default is config.lr), so LR schedules act as on AdamW; "
                              "weight_decay is AdamW's")

    beta2: float = 0.999
    epsilon: float = 1e-8
    lr: float = 1e-3  # meta-training's step RMS, and the optimizer's default lr
    orthogonalize: bool = False
    adamw_1d: bool = False
    weight_decay: float = 0.0
    ns_steps: int = 5
    adamw_size: bool = False
    ns_rank: int = 0  # 0: Newton-Schulz on the whole matrix; r: on its r strongest directions (sketched)
    warmup_steps: int = 0  # no SGD warm-up: lr and the user's schedule set the scale from the first step
    decay_ref_lr: float = 1.0  # weight decay in AdamW's own units: θ ← θ(1 − lr·wd)

    def validate(self) -> None:
        super().validate()
        check_real("lr", self.lr, 0.0, 10.0, low_open=True)
        for name in ("orthogonalize", "adamw_1d", "adamw_size"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        check_real("weight_decay", self.weight_decay, 0.0, 10.0)
        check_int("ns_steps", self.ns_steps, 1, 20)
        check_int("ns_rank", self.ns_rank, 0, 1024)


# --- the formula's parts (shared by the module and the runtime kernel) ----------------------------------------


def tensor_shapes(shapes: Any, n: int) -> Shapes:
    """The tensors' shapes from one shape or a list of them; a ValueError when they do not cover ``n``
    coordinates (or are ranks: a per-tensor rule cannot tell where a tensor ends from ranks)."""
    if isinstance(shapes, (torch.Size, tuple)):
        shapes = [shapes]
    if not isinstance(shapes, list) or not all(isinstance(s, (torch.Size, tuple)) for s in shapes):
        raise ValueError(f"the normalized student works per tensor: it needs the tensors' shapes (one shape or a "
                         f"list), got {type(shapes).__name__}")
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if sum(math.prod(s) for s in shapes) != n:
        raise ValueError(f"tensor shapes {shapes} do not cover the {n} coordinates given")
    return shapes


def corrections(config: NormalizedConfig, step: int) -> tuple[list[float], float]:
    """Adam's bias corrections ``1 − β^t`` of the three momenta and of the second moment at step ``t`` ≥ 1."""
    return [1 - beta**step for beta in config.betas], 1 - config.beta2**step


def rms(y: Tensor) -> Tensor:
    return y.square().mean().sqrt()


def rms_normalized(y: Tensor) -> Tensor:
    return y * torch.rsqrt(y.square().mean() + NORM_EPS)


def newton_schulz(update: Tensor, shape: tuple[int, ...], steps: int) -> Tensor:
    """The flat ``update`` of a tensor of ``shape`` (rank ≥ 2) orthogonalized as the matrix ``[shape[0], rest]``:
    singular values pushed towards 1 by the quintic iteration (Muon's), directions kept. Float32, flat out."""
    x = wide(update, shape)
    flipped = x.shape[0] != shape[0]
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if flipped else x).reshape(-1)


def wide(update: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The flat ``update`` as the matrix ``[shape[0], rest]``, transposed if it has more rows than columns (a view)."""
    x = update.reshape(shape[0], -1)
    return x if x.shape[0] <= x.shape[1] else x.T


def quintic_gain(sigma: Tensor, steps: int) -> Tensor:
    """``f(σ)/σ`` where ``f`` is ``steps`` iterations of Newton-Schulz's quintic on a singular value ``σ`` of the
    Frobenius-normalized matrix (what ``newton_schulz`` multiplies each singular value by; ``a^steps`` at σ = 0)."""
    a, b, c = NS_COEFFICIENTS
    gain = torch.ones_like(sigma)
    for _ in range(steps):
        s2 = (sigma * gain).square()
        gain = gain * (a + b * s2 + c * s2 * s2)
    return gain


def sketched_newton_schulz(x: Tensor, steps: int, rank: int, seed: int,
                           sum_sq: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Newton-Schulz on the ``rank`` strongest directions of the wide matrix ``x`` (``m <= n``, ``m > rank``): the
    low-rank correction ``(left, right)`` such that ``x + left @ right`` is, up to a positive factor, ``x`` with the
    singular values ``s`` of its sketched top subspace multiplied by ``f(σ)/σ`` and every other direction by what
    the iteration does to their RMS singular value.

    The subspace is a randomized range sketch (Halko, Martinsson and Tropp 2011: ``rank`` Gaussian test vectors
    drawn from ``seed``, one power iteration, without which a strong direction's part outside the sketch, a few
    percent, is left uncompressed): four passes of skinny matmuls over ``x`` and one rank-``rank`` update,
    O(rank·mn) where the whole iteration is O(m²n). Exact (equal to ``newton_schulz``) for a matrix of rank
    ``<= rank``. ``sum_sq``: ``x``'s sum of squares when the caller has it (one pass less)."""
    m, n = x.shape
    total = x.square().sum() if sum_sq is None else sum_sq
    gen = torch.Generator(device=x.device).manual_seed(seed)
    q = torch.randn(n, rank, generator=gen, device=x.device, dtype=x.dtype)
    u = torch.linalg.qr(x @ (x.T @ (x @ q))).Q  # m x rank: the sketch's range after one power iteration
    w, s, right = torch.linalg.svd(u.T @ x, full_matrices=False)  # x's part in that range: (u w) diag(s) right
    norm = total.sqrt() + 1e-7
    rest = (total - s.square().sum()).clamp_min(0) / (m - rank)  # the other directions' mean squared value
    bulk_gain = quintic_gain(rest.sqrt() / norm, steps)
    top = s * quintic_gain(s / norm, steps) / bulk_gain  # the top singular values, relative to the rest's
    return (u @ w) * (top - s), right


def orthogonalized_(update: Tensor, shape: tuple[int, ...], config: NormalizedConfig, step: int,
                    sum_sq: Tensor | None = None) -> Tensor:
    """The harness's ``orthogonalize`` of one flat tensor: ``newton_schulz``, or with ``ns_rank`` its sketch. Given
    ``sum_sq`` (the kernel, whose buffer it may overwrite), the sketch works in place; else on a copy (autograd)."""
    x = wide(update, shape)
    if not config.ns_rank or x.shape[0] <= config.ns_rank:
        return newton_schulz(update, shape, config.ns_steps)
    left, right = sketched_newton_schulz(x, config.ns_steps, config.ns_rank, step, sum_sq)
    out = update if sum_sq is not None else update.clone()
    wide(out, shape).addmm_(left, right)
    return out


class Normalized(nn.Module, HubStudent):
    """Per tensor on flat ``[n]`` tensors: ``forward(grad, state, shapes)``, shapes covering the ``n`` coordinates."""

    config_class = NormalizedConfig
    per_tensor = True  # takes the tensors' shapes where coordinate-wise students take ranks

    def __init__(self, config: NormalizedConfig | None = None):
        super().__init__()
        self.config = config or NormalizedConfig()
        self.hidden, self.delta = mlp_layers(self.config.hidden_size)  # the lean student's: 5 features
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Start at normalized Adam, ``y = m̂₂/d``: hidden units 0 and 1 carry ±m̂₂/d and the output reads their
        difference; the other units start random with small output weights (a random MLP first spends
        meta-training escaping diverging rules, docs/method.md#lean)."""
        start_at_momentum_(self.hidden, self.delta, generator, 1.0)

    def init_state(self, n: int, like: Tensor) -> State:
        return {k: like.new_zeros(n) for k in STATE_KEYS}

    def warmup_step(self, grad: Tensor, state: State) -> State:
        """The accumulators' update and the step count (all of the state; nothing recurrent to freeze)."""
        cfg = self.config
        new: State = {f"m{i}": beta * state[f"m{i}"] + (1 - beta) * grad for i, beta in enumerate(cfg.betas)}
        new["v"] = cfg.beta2 * state["v"] + (1 - cfg.beta2) * grad * grad
        new["step"] = int(state.get("step", 0)) + 1
        return new

    def check_parameters(self, shapes: Shapes) -> None:
        """A ValueError when the harness is on and none of the tensors is a matrix (nothing for it to act on)."""
        cfg = self.config
        if (cfg.orthogonalize or cfg.adamw_1d) and not any(len(s) >= 2 for s in shapes):
            raise ValueError(f"the normalized student's harness (orthogonalize={cfg.orthogonalize}, adamw_1d="
                             f"{cfg.adamw_1d}) needs a tensor of rank >= 2, but all {len(shapes)} tensors given "
                             "have rank <= 1; switch the harness off in its config.json")

    def forward(self, grad: Tensor, state: State, shapes: Any) -> tuple[Tensor, State]:
        """``(config.lr · u, new_state)``; the parameters move by ``-config.lr · u``."""
        cfg = self.config
        shapes = tensor_shapes(shapes, grad.numel())
        self.check_parameters(shapes)
        new = self.warmup_step(grad, state)
        moment_fixes, second_fix = corrections(cfg, new["step"])
        # the floor keeps the meta-gradient finite where v = 0 (d√v/dv = inf); √1e-30 is far below ε
        denom = torch.sqrt(new["v"].clamp_min(1e-30) / second_fix) + cfg.epsilon
        moments = [new[f"m{i}"] / fix for i, fix in enumerate(moment_fixes)]
        sizes = [math.prod(s) for s in shapes]
        matrix = torch.cat([grad.new_full((n,), float(len(s) >= 2)) for n, s in zip(sizes, shapes, strict=True)])
        x = torch.stack([grad / denom, *(m / denom for m in moments), matrix], dim=-1)
        y = self.delta(torch.relu(self.hidden(x))).squeeze(-1) * (new["v"] > 0)
        adam = moments[1] / denom
        touched = new["v"] > 0
        parts = [self._harness(*pieces, shape, new["step"]) for *pieces, shape
                 in zip(y.split(sizes), adam.split(sizes), touched.split(sizes), shapes, strict=True)]
        return cfg.lr * torch.cat(parts), new

    def _harness(self, y: Tensor, adam: Tensor, touched: Tensor, shape: tuple[int, ...], step: int) -> Tensor:
        """One tensor's unit update: AdamW's direction, the orthogonalized or the plain normalized rule."""
        cfg = self.config
        if cfg.adamw_1d and len(shape) <= 1:
            return adam
        if cfg.orthogonalize and len(shape) >= 2:  # it mixes coordinates: masked again
            y = orthogonalized_(y, shape, cfg, step) * touched
        return rms_normalized(y) * (rms(adam) if cfg.adamw_size else 1.0)


# --- the runtime kernel --------------------------------------------------------------------------------------

EAGER_CHUNK = 2**14


def _fused(g: Tensor, m0: Tensor, m1: Tensor, m2: Tensor, v: Tensor, out: Tensor, scales: Tensor, matrix: float,
           c: dict) -> Tensor:
    """One tensor's accumulators (in place) and the MLP's output into ``out`` in elementwise arithmetic, the MLP
    unrolled into scalars; returns AdamW's direction ``m̂₂/(√v̂ + ε)`` (one of the MLP's inputs). ``scales``: the
    bias corrections folded as in ``_rule`` (a tensor, so a new step count is no new graph)."""
    b0, b1, b2 = c["betas"]
    m0n, m1n, m2n = b0 * m0 + (1 - b0) * g, b1 * m1 + (1 - b1) * g, b2 * m2 + (1 - b2) * g
    vn = c["beta2"] * v + (1 - c["beta2"]) * g * g
    inv = 1.0 / (torch.sqrt(vn) + scales[4])
    x = (g * (inv * scales[0]), m0n * (inv * scales[1]), m1n * (inv * scales[2]), m2n * (inv * scales[3]))
    w1 = c["w1"]
    y = c["b2"]
    for j, w2j in enumerate(c["w2"]):
        z = x[0] * w1[0][j] + x[1] * w1[1][j] + x[2] * w1[2][j] + x[3] * w1[3][j] + (c["b1"][j] + matrix * w1[4][j])
        y = y + torch.relu(z) * w2j
    y = y * (vn > 0)
    m0.copy_(m0n)
    m1.copy_(m1n)
    m2.copy_(m2n)
    v.copy_(vn)
    out.copy_(y)
    return x[2]


def fused_rule(g: Tensor, m0: Tensor, m1: Tensor, m2: Tensor, v: Tensor, out: Tensor, scales: Tensor,
               matrix: float, c: dict) -> None:
    """``_fused`` returning nothing: compiled, one loop with no temporaries and no output but the state and ``out``
    (a returned tensor would be written out). Its sum of squares is left out (a reduction would specialise the
    graph to tensor sizes)."""
    _fused(g, m0, m1, m2, v, out, scales, matrix, c)


def fused_rule_sized(g: Tensor, m0: Tensor, m1: Tensor, m2: Tensor, v: Tensor, out: Tensor, adam: Tensor,
                     scales: Tensor, matrix: float, c: dict) -> None:
    """``fused_rule`` that also writes AdamW's direction into ``adam`` (for ``adamw_size``), in the same loop."""
    adam.copy_(_fused(g, m0, m1, m2, v, out, scales, matrix, c))


class NormalizedKernel:
    """The optimizer's step. The rule's output ``y`` of a tensor goes to a buffer with its sum of squares, then
    one pass ``θ −= lr · y / RMS(y)``. For a (device, dtype) group of at least 2²⁰ coordinates where a compiler
    works, ``y`` comes from ``fused_rule`` compiled (as the lean student's step); else eagerly by chunks: per chunk
    the accumulators (while in cache), the features, one ``addmm`` → ``relu`` → one ``addmv``. Temporary memory:
    one buffer of the largest tensor plus a chunk's workspace (compiled with ``adamw_size``, a second buffer for
    AdamW's direction). Both give the module's numbers within float tolerance."""

    per_tensor = True  # the optimizer passes the tensors' shapes (their local shards' under DTensor)

    def __init__(self, student: Normalized, device: torch.device, chunk_size: int | None = None):
        self.config = student.config
        self.w1, self.b1, self.w2, self.b2 = mlp_weights(student, device)
        self.chunk = chunk_size or EAGER_CHUNK
        self.constants = {"betas": [float(b) for b in self.config.betas], "beta2": float(self.config.beta2),
                          "w1": student.hidden.kernel.detach().double().tolist(),
                          "b1": student.hidden.bias.detach().double().tolist(),
                          "w2": student.delta.kernel.detach().double().flatten().tolist(),
                          "b2": float(student.delta.bias.detach().double())}
        self.mode = _compiler_mode()
        self._compiled = None  # built on first use; False once a compiler failed

    def warmup(self, grads: list[Tensor], states: list[State]) -> None:
        cfg = self.config
        for i, beta in enumerate(cfg.betas):
            torch._foreach_lerp_([s[f"m{i}"] for s in states], grads, 1 - beta)
        vs = [s["v"] for s in states]
        torch._foreach_mul_(vs, cfg.beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - cfg.beta2)

    def step(self, flats: list[Tensor], grads: list[Tensor], states: list[State], lr: float,
             shapes: list[tuple[int, ...]]) -> None:
        shapes = [tuple(s) if isinstance(s, (tuple, torch.Size)) else s for s in shapes]
        if not all(isinstance(s, tuple) for s in shapes):
            raise ValueError("the normalized student's kernel needs each tensor's shape, not its rank")
        largest = max(f.numel() for f in flats)
        total = sum(f.numel() for f in flats)
        use_compiler = self.mode == "always" or (self.mode == "auto" and total >= COMPILE_MIN)
        compiled = self._compiled_rule() if use_compiler else None
        out = torch.empty(largest, device=flats[0].device)
        # the sized compiled rule writes AdamW's direction beside y; the eager one sums its squares by chunks
        adam = torch.empty(largest, device=flats[0].device) if compiled and self.config.adamw_size else None
        work = None if compiled is not None else self._workspace(largest, flats[0].device)
        for p, g, s, shape in zip(flats, grads, states, shapes, strict=True):
            self._one(p, g, s, lr, shape, out[: p.numel()], None if adam is None else adam[: p.numel()], work,
                      compiled)

    def _compiled_rule(self):
        if self._compiled is None:  # probed with the scales of step 1
            scales = self._scales(*corrections(self.config, 1))
            self._compiled = (compiled_or_false(fused_rule_sized, scales, self.constants, "normalized", tensors=7)
                              if self.config.adamw_size else
                              compiled_or_false(fused_rule, scales, self.constants, "normalized"))
        return self._compiled or None

    def _one(self, p: Tensor, g: Tensor, s: State, lr: float, shape: tuple[int, ...], out: Tensor,
             adam: Tensor | None, work: tuple[Tensor, Tensor] | None, compiled) -> None:
        cfg = self.config
        if p.numel() == 0:  # nothing to update (nor an RMS to take)
            return
        step = int(s["step"])  # the optimizer's count, this step included
        moment_fixes, second_fix = corrections(cfg, step)
        if cfg.adamw_1d and len(shape) <= 1:  # AdamW as torch.optim.AdamW computes it
            self.warmup([g], [s])
            denom = (s["v"].sqrt() / math.sqrt(second_fix)).add_(cfg.epsilon)
            if lr != 0.0:
                p.addcdiv_(s[ADAM_MOMENT], denom, value=-lr / moment_fixes[1])
            return
        matrix = float(len(shape) >= 2)
        if compiled is not None:
            buffers = (out,) if adam is None else (out, adam)
            compiled(g, s["m0"], s["m1"], s["m2"], s["v"], *buffers, self._scales(moment_fixes, second_fix), matrix,
                     self.constants)
            sum_sq = torch.dot(out, out)
            adam_sq = None if adam is None else torch.dot(adam, adam)
        else:
            sum_sq, adam_sq = self._rule(g, s, moment_fixes, second_fix, matrix, out, work)
        if cfg.orthogonalize and len(shape) >= 2:
            out = orthogonalized_(out, shape, cfg, step, sum_sq)
            # the mask v > 0 as floats (v >= 0); on a CPU reading min(v) costs a fifth of it and is enough
            if out.device.type != "cpu" or s["v"].min() <= 0:
                out.mul_(s["v"].sign())
            sum_sq = torch.dot(out, out)
        if lr != 0.0:
            scale = torch.rsqrt(sum_sq / p.numel() + NORM_EPS)
            if cfg.adamw_size:  # × the RMS of AdamW's direction
                scale = scale * torch.sqrt(adam_sq / p.numel())
            p.addcmul_(out, scale, value=-lr)

    def _scales(self, moment_fixes: list[float], second_fix: float) -> Tensor:
        """``[√fix₂, √fix₂/fix₀, √fix₂/fix₁, √fix₂/fix₂', ε√fix₂]``: the bias corrections on the inputs g, m₀, m₁,
        m₂ of ``1/(√v + ε√fix₂)``, which is ``1/(√(v/fix₂) + ε)`` over √fix₂."""
        root = math.sqrt(second_fix)
        values = [root] + [root / fix for fix in moment_fixes] + [self.config.epsilon * root]
        return torch.tensor(values, device=self.w1.device)

    def _workspace(self, largest: int, device: torch.device) -> tuple[Tensor, Tensor]:
        rows = min(largest, self.chunk)
        return torch.empty(rows, 4, device=device), torch.empty(rows, self.config.hidden_size, device=device)

    def _rule(self, g: Tensor, s: State, moment_fixes: list[float], second_fix: float, matrix: float, out: Tensor,
              work: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The accumulators and the MLP's output ``y`` into ``out``, by chunks; returns ``Σ y²`` and (``adamw_size``)
        the sum of squares of AdamW's direction, which is the m₂ feature column times ``scales[2]``.
        The bias corrections and the rank feature are folded into the first layer's weights:
        ``src/fix/(√(v/fix₂) + ε) = src · (√fix₂/fix) / (√v + ε√fix₂)``."""
        cfg = self.config
        scales = self._scales(moment_fixes, second_fix)
        w1 = self.w1[:4] * scales[:4, None]
        b1 = self.b1 + matrix * self.w1[4]
        eps = cfg.epsilon * math.sqrt(second_fix)
        x, h = work
        rows = len(x)
        sums, adam_sums = [], []
        for a in range(0, g.numel(), rows):
            b = min(a + rows, g.numel())
            xs, hs, ys = x[: b - a], h[: b - a], out[a:b]
            gs, vs = g[a:b], s["v"][a:b]
            for i, beta in enumerate(cfg.betas):
                s[f"m{i}"][a:b].lerp_(gs, 1 - beta)
            vs.mul_(cfg.beta2).addcmul_(gs, gs, value=1 - cfg.beta2)
            inv = torch.sqrt(vs, out=ys).add_(eps).reciprocal_()
            for col, src in enumerate((gs, s["m0"][a:b], s["m1"][a:b], s["m2"][a:b])):
                torch.mul(src, inv, out=xs[:, col])
            if cfg.adamw_size:
                adam_sums.append(torch.dot(xs[:, 2], xs[:, 2]))
            torch.addmm(b1, xs, w1, out=hs).relu_()
            torch.addmv(self.b2, hs, self.w2, out=ys).mul_(vs > 0)
            sums.append(torch.dot(ys, ys))
        adam_sq = torch.stack(adam_sums).sum() * scales[2] ** 2 if cfg.adamw_size else None
        return torch.stack(sums).sum(), adam_sq
