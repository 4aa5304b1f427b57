"""Byte-level language models on the running interpreter's standard library, for meta-training beyond MNIST
(docs/method.md#mixtures): the ``.py`` files are always on disk, so nothing is downloaded. The first 90% of the
bytes are for training and the last 10% are held out, as in ``examples/train_with_trainer.py``."""

from __future__ import annotations

import sysconfig
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DigitSplit

CONTEXT = 32
MAX_BYTES = 2_000_000


def stdlib_bytes(max_bytes: int = MAX_BYTES) -> tuple[Tensor, Tensor]:
    """The standard library's top-level ``.py`` files, sorted by name, as bytes: (the first 90%, the last 10%),
    the split of meta-training's language models and of ``examples/train_with_trainer.py``."""
    data, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data.append(path.read_bytes())
        size += len(data[-1])
        if size >= max_bytes:
            break
    tokens = torch.frombuffer(bytearray(b"".join(data)[:max_bytes]), dtype=torch.uint8).long()
    cut = int(0.9 * len(tokens))
    return tokens[:cut], tokens[cut:]


@cache
def stdlib_windows(windows: int = 4000, heldout_windows: int = 1000) -> DigitSplit:
    """Windows of CONTEXT + 1 bytes at seeded offsets: inputs are the first CONTEXT bytes, labels the next byte
    of each position; training windows from the first 90% of the bytes, held-out ones from the rest."""
    train, heldout = stdlib_bytes()
    generator = torch.Generator().manual_seed(0)

    def cut_windows(part: Tensor, count: int) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, len(part) - CONTEXT - 1, (count,), generator=generator)
        w = torch.stack([part[s : s + CONTEXT + 1] for s in starts.tolist()])
        return w[:, :-1], w[:, 1:]

    return DigitSplit("stdlib-bytes", *cut_windows(train, windows), *cut_windows(heldout, heldout_windows))


def next_byte_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


class CharLSTM(nn.Module):
    """Embedding, one LSTM layer, a linear head over the 256 bytes."""

    def __init__(self, width: int):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.lstm = nn.LSTM(width, width, batch_first=True)
        self.head = nn.Linear(width, 256)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(self.embed(x))[0])


class Block(nn.Module):
    """A pre-norm causal transformer block (no dropout)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, w)
        x = x + self.proj(attended)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Byte embedding plus learned positions, ``layers`` causal blocks, a final norm and a linear head."""

    def __init__(self, width: int, layers: int, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Embedding(CONTEXT, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.position.weight[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))
