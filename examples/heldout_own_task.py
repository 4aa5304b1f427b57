"""Score a student against tuned AdamW on your own model and data (docs/heldout.md#your-own-task).

A function of no arguments returns a task built by ``task_from_module``: a model factory, training and held-out
tensors, and a loss. Then:

    amalgam evaluate --suite heldout lean-choice-large-mix --task examples/heldout_own_task.py:make_task --seeds 5

runs the student untuned, AdamW over its learning-rate grid and at 1e-3, Lion and Muon, on 5 paired seeds, and
prints one table (written to ./amalgam-evaluation/results.md and results.json). Here the model is a small MLP
classifying scikit-learn's bundled breast-cancer data (569 tumours, 30 features; nothing is downloaded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amalgam_plugin.heldout import HeldoutTask, task_from_module


class TumourClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(30, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def make_task() -> HeldoutTask:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.as_tensor(data.data, dtype=torch.float32)
    y = torch.as_tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held = order[119:], order[:119]  # 450 to train on, 119 held out
    mean, std = x[train].mean(0), x[train].std(0)  # standardized with the training rows' statistics only
    x = (x - mean) / std
    return task_from_module("breast-cancer-mlp", TumourClassifier, (x[train], y[train]), (x[held], y[held]),
                            F.cross_entropy, steps=200, batch_size=32, eval_every=20)


if __name__ == "__main__":
    task = make_task()
    print(f"{task.name}: {task.steps} steps at batch {task.batch_size}; run it with\n  amalgam evaluate --suite "
          "heldout lean-choice-large-mix --task examples/heldout_own_task.py:make_task --seeds 5")
