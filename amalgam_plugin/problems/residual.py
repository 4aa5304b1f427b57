"""Residual CNNs with batch norm, a family of the ``mix-broad`` mixture (docs/method.md#broad-mixture)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn(c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out)]


class ZeroGainBatchNorm(nn.BatchNorm2d):
    """Batch norm whose gain starts at 0, so that a residual block starts as its shortcut (timm's default)."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.zeros_(self.weight)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN added to the shortcut (a strided 1x1 conv-BN where the block downsamples), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.branch = nn.Sequential(*conv_bn(c_in, c_out, stride), nn.ReLU(), *conv_bn(c_out, c_out)[:1],
                                    ZeroGainBatchNorm(c_out))
        self.shortcut = nn.Sequential(*conv_bn(c_in, c_out, stride, 1)) if stride > 1 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.shortcut(x) + self.branch(x))


def residual_cnn(widths: list[int], pool_stem: bool = False) -> nn.Sequential:
    """A conv-BN-ReLU stem of ``widths[0]`` channels (max-pooled with ``pool_stem``), one residual block per width
    (the first at the stem's resolution, each later one halving it), global average pooling, Dense(10)."""
    stem = [*conv_bn(1, widths[0]), nn.ReLU(), *([nn.MaxPool2d(2)] if pool_stem else [])]
    blocks = [ResidualBlock(c_in, c_out, 1 if i == 0 else 2)
              for i, (c_in, c_out) in enumerate(zip([widths[0], *widths[:-1]], widths, strict=True))]
    return nn.Sequential(*stem, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], 10))


__all__ = ["ResidualBlock", "ZeroGainBatchNorm", "conv_bn", "residual_cnn"]
