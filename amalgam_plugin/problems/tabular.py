"""Tabular regressions, a family of the ``mix-broad`` mixture (docs/method.md#broad-mixture): one column of a table
scikit-learn ships (wine, breast cancer) predicted from the others. The held-out suite's table (diabetes) is not
among them."""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor, nn

from .data import DigitSplit

TABLES = ("wine", "breast_cancer")


@cache
def table(name: str) -> Tensor:
    """Every row of one of ``TABLES`` (features only), each column standardized."""
    from sklearn import datasets

    x = torch.as_tensor(getattr(datasets, f"load_{name}")().data, dtype=torch.float32)
    return (x - x.mean(0)) / x.std(0)


def column_regression(name: str, column: int) -> DigitSplit:
    """Inputs: every column of the table but ``column``; target: ``column`` (``[rows, 1]``). All rows are
    training rows: meta-training reads no held-out data."""
    x = table(name)
    inputs = torch.cat([x[:, :column], x[:, column + 1:]], dim=1)
    return DigitSplit(f"{name}-column{column}", inputs, x[:, column : column + 1], inputs[:0], x[:0, :1])


def regression_mlp(n_in: int, widths: list[int]) -> nn.Sequential:
    """Linear + ReLU for each width, then one linear output."""
    sizes = [n_in, *widths]
    layers = [m for a, b in zip(sizes, sizes[1:], strict=False) for m in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], 1))


__all__ = ["TABLES", "column_regression", "regression_mlp", "table"]
