"""RNNProp's fast runtime kernel (registered with the ``rnnprop`` student type): the same numbers as
``RNNProp.forward`` within float32 tolerance, several times faster on CPU, except that a coordinate whose gradient
has been exactly zero at every step so far does not move.

All learned-phase parameters of a device are packed into chunks of at most ``chunk_size`` coordinates and run
through one fused LSTM step per chunk, so a model made of many small tensors costs about the same per
coordinate as one made of a few large ones, and the temporary memory of a step is bounded by the chunk, not by
the model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import State
from .rnnprop import RNNProp

CPU_CHUNK = 2**13
"""Coordinates per LSTM call on CPU: the chunk's buffers stay near the core's L2/L3 (measured: 2**12..2**14
are within a few percent, 2**16 is ~40% slower), and Python's per-chunk cost stays small; 2**13 halves the
workspace (7 MB)."""
ACCELERATOR_CHUNK = 2**18
"""On GPUs a chunk must fill the device; temporary memory is still bounded (~2**18 * 250 floats = 256 MB)."""


class _FusedWeights:
    """RNNProp's weights rearranged for speed on one device, and the fused step of one chunk.

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
        delta.sigmoid_().mul_(-2.0 * self.scale).add_(self.scale)  # scale * tanh(y)
        # the runtime's one addition to the rule: a coordinate whose gradient has been exactly zero at every step
        # so far (v is still 0) stays still, as with torch's optimizers (docs/method.md#runtime)
        return delta.mul_(v > 0)


class RNNPropKernel:
    """The runtime kernel: warm-up by foreach ops, the learned step by chunks through :class:`_FusedWeights`."""

    def __init__(self, student: RNNProp, device: torch.device, chunk_size: int | None = None):
        self.config = student.config
        self.fused = _FusedWeights(student, device)
        self.chunk = chunk_size or (CPU_CHUNK if device.type == "cpu" else ACCELERATOR_CHUNK)

    def warmup(self, grads: list[Tensor], states: list[State]) -> None:
        """The moments advance (foreach ops over all tensors); the LSTM state stays frozen."""
        cfg = self.config
        ms, vs = [s["m"] for s in states], [s["v"] for s in states]
        torch._foreach_mul_(ms, cfg.beta1)
        torch._foreach_add_(ms, grads, alpha=1 - cfg.beta1)
        torch._foreach_mul_(vs, cfg.beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - cfg.beta2)

    def step(self, flats: list[Tensor], grads: list[Tensor], states: list[State], lr: float,
             ranks: list[int]) -> None:
        """Pack the parameters' coordinates into chunks and run the fused step once per chunk."""
        kernel = self.fused
        rows = min(sum(len(f) for f in flats), self.chunk)
        columns = kernel.workspace_columns()
        buf = torch.empty(rows * sum(columns.values()), device=flats[0].device, dtype=torch.float32)
        workspace, at = {}, 0
        for name, cols in columns.items():  # one allocation, carved into [rows, cols] buffers
            workspace[name] = buf[at : at + rows * cols].view(rows, cols)
            at += rows * cols
        segments: list[tuple[int, int, int]] = []  # (param index, start, stop) packed into the current chunk
        filled = 0
        for i, n in enumerate(len(f) for f in flats):
            start = 0
            while start < n:
                take = min(n - start, rows - filled)
                segments.append((i, start, start + take))
                filled, start = filled + take, start + take
                if filled == rows:
                    _chunk(segments, states, flats, grads, workspace, kernel, lr)
                    segments, filled = [], 0
        if segments:
            _chunk(segments, states, flats, grads, workspace, kernel, lr)


def _chunk(segments: list[tuple[int, int, int]], states: list[State], flats: list[Tensor], grads: list[Tensor],
           workspace: dict[str, Tensor], kernel: _FusedWeights, lr: float) -> None:
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
