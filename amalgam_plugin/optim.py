"""AmalgamOptimizer: a frozen learned student behind the ``torch.optim.Optimizer`` interface.

The rules (DESIGN, "The runtime optimizer's rules"):

* ``lr`` multiplies the student's own update (1.0 = as trained); ``lr = 0`` leaves the parameters unchanged
  (the state may still advance), so LR schedulers and DCP's ``lr = 0`` state initialisation work.
* ``weight_decay`` is decoupled and in AdamW units: ``p -= lr * weight_decay * decay_ref_lr * p``.
* Warm-up: the first ``warmup_steps`` steps of every parameter are plain SGD at the student's ``warmup_lr``
  (times ``lr``); the student's moments advance, its LSTM state stays frozen.
* Fallback groups (``use_fallback=True``, or parameters picked by ``fallback=``) run AdamW at
  ``fallback_lr * lr`` with the group's ``weight_decay`` in ordinary AdamW units.
* State is lazy, per parameter, tensors and numbers only; student state is float32 whatever the parameter
  dtype and survives ``load_state_dict`` bit-exactly (torch would cast it to the parameter dtype).
* Every param group records ``student_id`` (name, revision, content hash); loading a state dict produced by
  another student raises ``ValueError``.

Speed: for RNNProp students all learned-phase parameters of a (device, dtype) pair are packed into chunks of
at most ``chunk_size`` coordinates and run through one fused LSTM kernel per chunk, so a model made of many
small tensors costs about the same per coordinate as one made of a few large ones, and the temporary memory of
a step is bounded by the chunk, not by the model.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .students.rnnprop import RNNProp

logger = logging.getLogger(__name__)

DEFAULT_STUDENT = "paper-choice-large"
"""The bundled student used when none is named: the paper's optimal-choice (large pool) RNNProp."""

CPU_CHUNK = 2**13
"""Coordinates per LSTM call on CPU: the chunk's buffers stay near the core's L2/L3 (measured: 2**12..2**14
are within a few percent, 2**16 is ~40% slower), and Python's per-chunk cost stays small; 2**13 halves the
workspace (7 MB)."""
ACCELERATOR_CHUNK = 2**18
"""On GPUs a chunk must fill the device; temporary memory is still bounded (~2**18 * 250 floats = 256 MB)."""

STATE_WARN_BYTES = 4 * 1024**3
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8

_SHA_RE = re.compile(r"sha256:([0-9a-f]{64})")


# --- student identity -------------------------------------------------------------------------------------


def _student_id(student: nn.Module) -> str:
    """``"NAME@REVISION sha256:HEX"``; only the hash (the content hash of the hub module, as in the model
    cards) is compared, the rest is for people reading it."""
    from .hub import student_identity  # lazy: the runtime optimizer needs the hub only for names

    info = student_identity(student)
    name = info["name"] or getattr(student.config, "student_type", type(student).__name__)
    return f"{name}@{info['revision'] or 'local'} sha256:{info['sha256']}"


def _sha_of(student_id: str | None) -> str | None:
    match = _SHA_RE.search(student_id or "")
    return match.group(1) if match else None


def _resolve_student(student: nn.Module | str | os.PathLike, revision: str | None) -> nn.Module:
    if isinstance(student, nn.Module):
        return student
    if isinstance(student, (str, os.PathLike)):
        try:
            from .hub import load_student
        except ImportError as err:
            raise ImportError(
                f"cannot resolve student {str(student)!r}: amalgam_plugin.hub is unavailable ({err}); "
                "pass a student nn.Module instead"
            ) from err
        return load_student(os.fspath(student), revision=revision)
    raise TypeError(
        f"student must be an nn.Module, a name, a folder or a Hub repo id; got {type(student).__name__}"
    )


# --- nested student state <-> flat per-parameter state ----------------------------------------------------


def _flatten(state: Any, prefix: str = "") -> dict[str, Any]:
    """{"pool": [{"m": t}], "t": 0} -> {"pool.0.m": t, "t": 0}: torch's state must be one flat dict."""
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(state))
    else:
        return {prefix: state}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _unflatten(flat: dict[str, Any], template: Any, prefix: str = "") -> Any:
    if isinstance(template, dict):
        return {k: _unflatten(flat, v, f"{prefix}.{k}" if prefix else k) for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        return [_unflatten(flat, v, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(template)]
    return flat[prefix]


# --- the fused RNNProp kernel -----------------------------------------------------------------------------


class _RNNPropKernel:
    """RNNProp's weights rearranged for speed on one device.

    * Layer l computes ``z = [in_l, h_l] @ [kernel; recurrent_kernel] + bias`` in one addmm on a contiguous
      input buffer ``[in_l | h_l]``; the new ``h_l`` is written straight into the next layer's buffer.
    * Gate columns are reordered from (i, f, c, o) to (i, f, o, c) and every tanh is computed as
      ``tanh(y) = 1 - 2 sigmoid(-2y)`` with the factor -2 folded into the weights: CPU ``tanh`` is ~15x
      slower than ``sigmoid`` in torch's vectorised kernels, so one ``sigmoid_`` covers a whole layer, and
      the ``1 - 2s`` form lets ``addcmul`` finish ``h = o * tanh(c)`` in one op.
    """

    def __init__(self, student: RNNProp, device: torch.device):
        cfg = student.config
        self.sizes = [int(u) for u in cfg.hidden_sizes]
        self.inputs = [2, *self.sizes[:-1]]
        self.beta1, self.beta2, self.eps = float(cfg.beta1), float(cfg.beta2), float(cfg.epsilon)
        self.scale = float(cfg.output_scale)
        self.weights, self.biases = [], []
        for cell, u in zip(student.recurrent, self.sizes, strict=True):
            order = torch.cat([torch.arange(2 * u), torch.arange(3 * u, 4 * u), torch.arange(2 * u, 3 * u)])
            factor = torch.ones(4 * u, dtype=torch.float64)
            factor[3 * u :] = -2.0  # the cell candidate goes through tanh
            w = torch.cat([cell.kernel.detach(), cell.recurrent_kernel.detach()], dim=0).double()[:, order]
            self.weights.append((w * factor).to(device, torch.float32).contiguous())
            self.biases.append((cell.bias.detach().double()[order] * factor).to(device, torch.float32))
        self.out_w = (-2 * student.delta.kernel.detach().double()).to(device, torch.float32).contiguous()
        self.out_b = (-2 * student.delta.bias.detach().double()).to(device, torch.float32).contiguous()

    def workspace_columns(self) -> dict[str, int]:
        """Column count of every [rows, cols] buffer a chunk needs (``in{l}`` = [in_l | h_l], ``c{l}``...)."""
        u_max = max(self.sizes)
        cols = {f"in{i}": n_in + u for i, (n_in, u) in enumerate(zip(self.inputs, self.sizes, strict=True))}
        cols.update({f"c{i}": u for i, u in enumerate(self.sizes)})
        cols.update(hout=self.sizes[-1], z=4 * u_max, t=u_max, g=1, m=1, v=1, d=1)
        return cols

    def h_out(self, w: dict[str, Tensor], layer: int) -> Tensor:
        """Where layer ``layer`` writes its new h: the next layer's input columns, or ``hout``."""
        if layer + 1 < len(self.sizes):
            return w[f"in{layer + 1}"][:, : self.sizes[layer]]
        return w["hout"]

    def h_in(self, w: dict[str, Tensor], layer: int) -> Tensor:
        """Where layer ``layer`` reads its old h (filled from the state before ``run``)."""
        return w[f"in{layer}"][:, self.inputs[layer] :]

    def run(self, w: dict[str, Tensor], g: Tensor, m: Tensor, v: Tensor, cs: list[Tensor]) -> Tensor:
        """One step for a chunk, in place.  g, m, v: [L]; cs[l]: [L, u_l]; ``h_in`` buffers hold the old h's.

        Leaves the new moments in m, v, the new cells in cs, the new h's in the ``h_out`` buffers and returns
        Δ (not yet scaled by lr), a view of ``w["d"]``.
        """
        b1, b2 = self.beta1, self.beta2
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        delta = w["d"].view(-1)
        denom = torch.div(v, 1 - b2, out=delta).add_(self.eps).sqrt_()  # delta is free until the end
        x = w["in0"]
        torch.div(m, denom, out=x[:, 0]).div_(1 - b1)
        torch.div(g, denom, out=x[:, 1])
        for layer, u in enumerate(self.sizes):
            z = w["z"][:, : 4 * u]
            torch.addmm(self.biases[layer], w[f"in{layer}"], self.weights[layer], out=z)
            z.sigmoid_()
            i, f, o, cand = z[:, :u], z[:, u : 2 * u], z[:, 2 * u : 3 * u], z[:, 3 * u :]
            c = cs[layer]
            c.mul_(f).add_(i).addcmul_(i, cand, value=-2.0)  # c = f*c + i*tanh(c~), tanh(c~) = 1 - 2*cand
            t = torch.mul(c, -2.0, out=w["t"][:, :u]).sigmoid_()
            torch.addcmul(o, o, t, value=-2.0, out=self.h_out(w, layer))  # h = o*tanh(c) = o - 2*o*t
        torch.addmm(self.out_b, w["hout"], self.out_w, out=w["d"])
        return delta.sigmoid_().mul_(-2.0 * self.scale).add_(self.scale)  # scale * tanh(y)


# --- the optimizer ----------------------------------------------------------------------------------------


class AmalgamOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` driven by a frozen learned student (rules: the module docstring).

    Args:
        params: tensors, ``(name, tensor)`` pairs or param-group dicts, as for any torch optimizer.
        student: an ``nn.Module`` student, or a bundled name, folder or Hub repo id (resolved by
            ``amalgam_plugin.hub.load_student``). Default: :data:`DEFAULT_STUDENT`.
        lr: multiplier on the student's update (1.0 = as trained).
        weight_decay: decoupled, AdamW units (scaled by the student's ``decay_ref_lr``).
        warmup_steps: SGD warm-up length per parameter; ``None`` = the student's config, 0 disables.
        maximize: ascend instead of descend.
        fallback: predicate ``(name, param) -> bool`` (or ``(param) -> bool`` without names) choosing
            parameters that run AdamW instead of the student.
        fallback_lr: AdamW learning rate of fallback groups (times the group's ``lr``).
        foreach: accepted for API compatibility (the student path is always batched).
        differentiable: must be False (the student runs frozen under ``no_grad``).
        revision: Hub revision used when ``student`` is a repo id.
        chunk_size: coordinates per fused LSTM call (bounds the temporary memory of a step); ``None`` picks
            :data:`CPU_CHUNK` on CPU and :data:`ACCELERATOR_CHUNK` elsewhere.
    """

    def __init__(
        self,
        params: Iterable,
        student: nn.Module | str | os.PathLike = DEFAULT_STUDENT,
        lr: float | Tensor = 1.0,
        weight_decay: float = 0.0,
        warmup_steps: int | None = None,
        maximize: bool = False,
        fallback: Callable[..., bool] | None = None,
        fallback_lr: float = 1e-3,
        foreach: bool | None = None,
        differentiable: bool = False,
        *,
        revision: str | None = None,
        chunk_size: int | None = None,
        capturable: bool = False,
        fused: bool | None = None,
    ):
        if float(lr) < 0:
            raise ValueError(f"lr must be >= 0, got {float(lr)}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if warmup_steps is not None and warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 or None, got {warmup_steps}")
        if differentiable or capturable or fused:
            raise ValueError(
                "AmalgamOptimizer supports differentiable=False, capturable=False, fused=None/False only: "
                "the student runs frozen under torch.no_grad"
            )
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

        self.student = _resolve_student(student, revision)
        self.student.requires_grad_(False)
        self.student.eval()
        self.chunk_size = chunk_size
        self._fallback = fallback
        self._student_id = _student_id(self.student)
        self._devices: dict[torch.device, Any] = {}  # device -> float32 student copy or _RNNPropKernel
        cfg = self.student.config
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=int(cfg.warmup_steps if warmup_steps is None else warmup_steps),
            maximize=maximize,
            fallback_lr=fallback_lr,
            use_fallback=False,
            betas=ADAMW_BETAS,  # fallback AdamW only
            eps=ADAMW_EPS,  # fallback AdamW only
            foreach=foreach,
            differentiable=False,
            capturable=False,
            fused=False,
            student_id=self._student_id,
        )
        super().__init__(self._split_fallback(params), defaults)
        self._register_hooks()
        self._warn_if_state_large()

    @classmethod
    def from_pretrained(cls, name_or_path: nn.Module | str | os.PathLike, params: Iterable,
                        **kwargs: Any) -> AmalgamOptimizer:
        """``AmalgamOptimizer(params, student=name_or_path, **kwargs)``."""
        return cls(params, student=name_or_path, **kwargs)

    # --- construction helpers --------------------------------------------------------------------------

    def _split_fallback(self, params: Iterable) -> list[dict]:
        """Move parameters chosen by ``fallback`` into sibling groups marked ``use_fallback=True``."""
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of tensors or dicts, not a Tensor")
        items = list(params)
        groups = [dict(g) for g in items] if items and isinstance(items[0], dict) else [{"params": items}]
        if self._fallback is None:
            return groups
        out = []
        for group in groups:
            ps = group["params"]
            ps = [ps] if isinstance(ps, Tensor) else list(ps)
            if group.get("use_fallback") or not ps:
                out.append(group)
                continue
            names = group.get("param_names")
            keep, move = [], []
            for i, p in enumerate(ps):
                if isinstance(p, tuple):
                    chosen = self._fallback(p[0], p[1])
                elif names is not None:
                    chosen = self._fallback(names[i], p)
                else:
                    chosen = self._fallback(p)
                (move if chosen else keep).append((i, p))
            for part, extra in ((keep, {}), (move, {"use_fallback": True})):
                if not part:
                    continue
                new = {**group, **extra, "params": [p for _, p in part]}
                if names is not None:
                    new["param_names"] = [names[i] for i, _ in part]
                out.append(new)
        return out or groups

    def _floats_per_coordinate(self) -> int:
        if isinstance(self.student, RNNProp):
            return 2 + 2 * sum(self.student.config.hidden_sizes)
        flat = _flatten(self.student.init_state(1, torch.zeros(1)))
        return sum(v.numel() for v in flat.values() if isinstance(v, Tensor))

    def _warn_if_state_large(self) -> None:
        student_n = sum(p.numel() for g in self.param_groups if not g["use_fallback"] for p in g["params"])
        fallback_n = sum(p.numel() for g in self.param_groups if g["use_fallback"] for p in g["params"])
        nbytes = 4 * (student_n * self._floats_per_coordinate() + 2 * fallback_n)
        if nbytes > STATE_WARN_BYTES:
            warnings.warn(
                f"AmalgamOptimizer state will take about {nbytes / 1024**3:.1f} GiB "
                f"({self._floats_per_coordinate()} float32 per student-driven parameter); consider fallback "
                "groups (AdamW) for the largest tensors, e.g. embeddings",
                stacklevel=3,
            )

    def _register_hooks(self) -> None:
        # torch's load_state_dict itself calls __setstate__, so register at most once per instance.
        if AmalgamOptimizer._stash_state not in self._optimizer_load_state_dict_pre_hooks.values():
            self.register_load_state_dict_pre_hook(AmalgamOptimizer._stash_state)
            self.register_load_state_dict_post_hook(AmalgamOptimizer._restore_state)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(student=self.student, chunk_size=self.chunk_size, _student_id=self._student_id,
                     _fallback=self._fallback)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_devices", {})
        for group in self.param_groups:
            group.setdefault("use_fallback", False)
            group.setdefault("fallback_lr", 1e-3)
        self._register_hooks()

    # --- state_dict: identity check and float32 state kept exact ---------------------------------------

    @staticmethod
    def _stash_state(opt: AmalgamOptimizer, state_dict: dict) -> dict:
        """Check the student identity, then take the state out so torch cannot cast it."""
        mine = _sha_of(opt._student_id)
        for i, group in enumerate(state_dict["param_groups"]):
            theirs = group.get("student_id")
            if theirs is None:
                warnings.warn("loading an optimizer state dict that records no student_id", stacklevel=4)
            elif _sha_of(theirs) != mine:
                raise ValueError(
                    f"optimizer state of param group {i} was produced by student {theirs!r}, but this "
                    f"optimizer runs {opt._student_id!r}; load the same student to resume (student state "
                    "is not portable between students)"
                )
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        opt._stashed = (state_dict["state"], saved_ids)
        return {**state_dict, "state": {}}

    @staticmethod
    def _restore_state(opt: AmalgamOptimizer) -> None:
        """Put the stashed state back: on each parameter's device, float32 kept, copied (no aliasing)."""
        stashed, saved_ids = opt.__dict__.pop("_stashed", ({}, []))
        params = [p for g in opt.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):  # torch maps ids to params by position
            if saved_id in stashed:
                opt.state[p] = {k: _restore_value(k, v, p) for k, v in stashed[saved_id].items()}

    # --- the step ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient. ``closure`` (optional) re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "AmalgamOptimizer does not support sparse gradients; use dense ones "
                        "(e.g. nn.Embedding(sparse=False))"
                    )
            if not params:
                continue
            if group["use_fallback"]:
                self._adamw_group(group, params)
            else:
                self._student_group(group, params)
        return loss

    def _adamw_group(self, group: dict, params: list[Tensor]) -> None:
        """AdamW exactly as ``torch.optim.AdamW`` (single-tensor form), state float32."""
        lr = float(group["lr"]) * float(group["fallback_lr"])
        wd = float(group["weight_decay"])
        beta1, beta2 = group["betas"]
        eps = float(group["eps"])
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            grad = p.grad.float()
            if group["maximize"]:
                grad = -grad
            work = p if p.dtype == torch.float32 else p.float()
            state["step"] += 1
            step = float(state["step"])
            work.mul_(1 - lr * wd)
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            denom = (state["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(eps)
            work.addcdiv_(state["exp_avg"], denom, value=-lr / bias_correction1)
            if work is not p:
                p.copy_(work)

    def _on_device(self, device: torch.device) -> Any:
        """The student (or its fused kernel) on ``device``, float32, built once per device."""
        if device not in self._devices:
            if isinstance(self.student, RNNProp):
                self._devices[device] = _RNNPropKernel(self.student, device)
            else:
                self._devices[device] = copy.deepcopy(self.student).to(device=device, dtype=torch.float32)
        return self._devices[device]

    def _init_state(self, p: Tensor) -> dict:
        flat = _flatten(self.student.init_state(p.numel(), p.new_zeros((), dtype=torch.float32)))
        # A Python int: read every step to pick warm-up or learned, and an int costs no tensor op or sync.
        return {"step": 0, **flat}

    def _student_group(self, group: dict, params: list[Tensor]) -> None:
        lr = float(group["lr"])
        cfg = self.student.config
        decay = lr * float(group["weight_decay"]) * float(cfg.decay_ref_lr)
        sign = -1.0 if group["maximize"] else 1.0
        warm, learned = [], []
        for p in params:
            state = self.state[p]
            if not state:
                state.update(self._init_state(p))
            (warm if state["step"] < group["warmup_steps"] else learned).append(p)
            state["step"] = int(state["step"]) + 1
        if decay != 0.0:
            torch._foreach_mul_(params, 1.0 - decay)
        if warm and isinstance(self.student, RNNProp):
            self._rnnprop_warmup(warm, sign, lr * float(cfg.warmup_lr))
        else:
            for p in warm:
                self._warmup_update(p, sign, lr * float(cfg.warmup_lr))
        if not learned:
            return
        if isinstance(self.student, RNNProp):
            by_key: dict[tuple, list[Tensor]] = {}
            for p in learned:
                by_key.setdefault((p.device, p.dtype), []).append(p)
            for (device, _), ps in by_key.items():
                self._rnnprop_batched(ps, self._on_device(device), sign, lr)
        else:
            for p in learned:
                self._generic_update(p, sign, lr)

    def _flat_grad(self, p: Tensor, sign: float) -> Tensor:
        g = p.grad.reshape(-1).to(torch.float32)
        return -g if sign < 0 else g

    def _rnnprop_warmup(self, params: list[Tensor], sign: float, step_size: float) -> None:
        """RNNProp's warm-up for many tensors at once: moments by foreach ops, SGD on the parameters."""
        cfg = self.student.config
        grads = [self._flat_grad(p, sign) for p in params]
        ms, vs = [self.state[p]["m"] for p in params], [self.state[p]["v"] for p in params]
        torch._foreach_mul_(ms, cfg.beta1)
        torch._foreach_add_(ms, grads, alpha=1 - cfg.beta1)
        torch._foreach_mul_(vs, cfg.beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - cfg.beta2)
        if step_size != 0.0:
            for p, g in zip(params, grads, strict=True):
                _apply_flat(p, g, -step_size)

    def _warmup_update(self, p: Tensor, sign: float, step_size: float) -> None:
        """SGD at warmup_lr; the student's moments advance, its LSTM state does not."""
        state = self.state[p]
        g = self._flat_grad(p, sign)
        template = self.student.init_state(1, g)
        nested = _unflatten(state, template)
        _write_state(state, self.student.update_moments(g, nested))
        if step_size != 0.0:
            _apply_flat(p, g, -step_size)

    def _generic_update(self, p: Tensor, sign: float, lr: float) -> None:
        """Any student: one ``forward`` per parameter on its flat gradient and the tensor's rank."""
        student = self._on_device(p.device)
        state = self.state[p]
        g = self._flat_grad(p, sign)
        nested = _unflatten(state, self.student.init_state(1, g))
        delta, new = student(g, nested, rank=p.dim())
        _write_state(state, new)
        if lr != 0.0:
            _apply_flat(p, delta, -lr)

    def _rnnprop_batched(self, params: list[Tensor], kernel: _RNNPropKernel, sign: float, lr: float) -> None:
        """Pack the parameters' coordinates into chunks and run the fused kernel once per chunk."""
        device = params[0].device
        chunk = self.chunk_size or (CPU_CHUNK if device.type == "cpu" else ACCELERATOR_CHUNK)
        rows = min(sum(p.numel() for p in params), chunk)
        columns = kernel.workspace_columns()
        buf = torch.empty(rows * sum(columns.values()), device=device, dtype=torch.float32)
        workspace, at = {}, 0
        for name, cols in columns.items():  # one allocation, carved into [rows, cols] buffers
            workspace[name] = buf[at : at + rows * cols].view(rows, cols)
            at += rows * cols
        # Non-contiguous parameters are updated through a contiguous copy written back at the end.
        flats = [p.view(-1) if p.is_contiguous() else p.detach().contiguous().view(-1) for p in params]
        grads = [self._flat_grad(p, sign) for p in params]
        states = [self.state[p] for p in params]

        segments: list[tuple[int, int, int]] = []  # (param index, start, stop) packed into the current chunk
        filled = 0
        for i, n in enumerate(p.numel() for p in params):
            start = 0
            while start < n:
                take = min(n - start, rows - filled)
                segments.append((i, start, start + take))
                filled, start = filled + take, start + take
                if filled == rows:
                    self._rnnprop_chunk(segments, states, flats, grads, workspace, kernel, lr)
                    segments, filled = [], 0
        if segments:
            self._rnnprop_chunk(segments, states, flats, grads, workspace, kernel, lr)
        for p, flat in zip(params, flats, strict=True):
            if not p.is_contiguous():
                p.copy_(flat.view_as(p))

    @staticmethod
    def _rnnprop_chunk(segments: list[tuple[int, int, int]], states: list[dict], flats: list[Tensor],
                       grads: list[Tensor], workspace: dict[str, Tensor], kernel: _RNNPropKernel,
                       lr: float) -> None:
        """Gather the chunk's state into the workspace, run the kernel, scatter back, move the parameters."""
        lens = [b - a for _, a, b in segments]
        length = sum(lens)
        full = length == next(iter(workspace.values())).shape[0]
        w = workspace if full else {k: v[:length] for k, v in workspace.items()}
        n_layers = len(kernel.sizes)

        def state_views(key: str) -> list[Tensor]:  # whole small tensors need no slicing
            return [t if (a == 0 and b == len(t)) else t[a:b] for t, a, b in
                    ((states[i][key], a, b) for i, a, b in segments)]

        def gather(dst: Tensor, key: str) -> None:
            torch._foreach_copy_(list(dst.split(lens)), state_views(key))

        def scatter(key: str, src: Tensor) -> None:
            torch._foreach_copy_(state_views(key), list(src.split(lens)))

        g = w["g"].view(-1)
        torch._foreach_copy_(list(g.split(lens)), [grads[i][a:b] for i, a, b in segments])
        if len(segments) == 1:  # one tensor: update m, v, c in place through views of its state
            (i, a, b), keys = segments[0], ("m", "v", *(f"c{layer}" for layer in range(n_layers)))
            m, v, *cs = (states[i][key][a:b] for key in keys)
        else:
            m, v = w["m"].view(-1), w["v"].view(-1)
            cs = [w[f"c{layer}"] for layer in range(n_layers)]
            for dst, key in ((m, "m"), (v, "v"), *((c, f"c{layer}") for layer, c in enumerate(cs))):
                gather(dst, key)
        for layer in range(n_layers):
            gather(kernel.h_in(w, layer), f"h{layer}")

        delta = kernel.run(w, g, m, v, cs)

        for layer in range(n_layers):
            scatter(f"h{layer}", kernel.h_out(w, layer))
        if len(segments) > 1:
            for src, key in ((m, "m"), (v, "v"), *((c, f"c{layer}") for layer, c in enumerate(cs))):
                scatter(key, src)
        if lr != 0.0:
            torch._foreach_add_([flats[i][a:b] for i, a, b in segments], list(delta.split(lens)), alpha=-lr)


def _write_state(state: dict, new_nested: Any) -> None:
    """Store a student's new (nested) state into a parameter's flat state, in place where a tensor exists."""
    for k, v in _flatten(new_nested).items():
        if isinstance(state.get(k), Tensor) and isinstance(v, Tensor):
            state[k].copy_(v)
        else:
            state[k] = v


def _apply_flat(p: Tensor, delta: Tensor, alpha: float) -> None:
    """p += alpha * delta, delta flat float32 in the parameter's logical order; computed in float32."""
    if p.is_contiguous():
        p.view(-1).add_(delta, alpha=alpha)
    else:
        p.copy_((p.float().reshape(-1) + alpha * delta).view_as(p))


def _restore_value(key: str, value: Any, p: Tensor) -> Any:
    if not isinstance(value, Tensor):
        return copy.deepcopy(value)
    if key == "step":  # counters stay on the CPU so reading them never syncs an accelerator
        return value.to("cpu", torch.float32, copy=True)
    dtype = torch.float32 if value.is_floating_point() else value.dtype
    return value.to(device=p.device, dtype=dtype, copy=True)
