"""Train a tiny GPT-2 on Python's own standard library with the stock ``Trainer`` and ``optim="amalgam"``.

    python examples/train_with_trainer.py            # 400 steps (100 warm-up + 300 learned), about 40 s on 2 cores
    python examples/train_with_trainer.py --optim-args "student=paper-choice-large,fallback=embeddings"
    python examples/train_with_trainer.py --smoke    # a few steps, for tests
    python examples/train_with_trainer.py --optim adamw_torch --learning-rate 3e-3   # the baseline

The corpus is the ``.py`` files of the running interpreter's standard library (always on disk, no download),
byte-level (vocabulary 256, no tokenizer); the last files are held out. The model is a randomly initialised
GPT-2 of about 0.12M parameters. ``learning_rate`` is left at the Trainer's default and ignored by the learned
optimizer (one log line); the cosine schedule scales the student's update.
"""

from __future__ import annotations

import argparse
import logging
import sysconfig
import tempfile
import time

import amalgam_plugin.integrations.transformers  # noqa: F401  (registers optim="amalgam")
import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from amalgam_plugin.problems.text import stdlib_bytes  # the split meta-training's language models also use


class Windows(Dataset):
    """``count`` windows of ``length`` bytes at seeded random offsets; labels = inputs (the model shifts)."""

    def __init__(self, tokens: torch.Tensor, length: int, count: int, seed: int):
        self.tokens, self.length = tokens, length
        generator = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(tokens) - length, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.tokens[self.starts[i] : self.starts[i] + self.length]
        return {"input_ids": window, "labels": window}


class PrintLoss(TrainerCallback):
    """Print the logged training loss (the loss going down) and the evaluation loss."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 (Trainer's callback API)
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
            print(f"step {state.global_step:4d}  train loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.3g}")


def tiny_gpt2(context: int) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=256, n_positions=context, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps (the student warms up for 100)")
    parser.add_argument("--smoke", action="store_true", help="10 steps without the student's warm-up")
    parser.add_argument("--optim", default="amalgam", help="TrainingArguments.optim (amalgam, adamw_torch, ...)")
    parser.add_argument("--optim-args", default="student=paper-choice-large",
                        help="TrainingArguments.optim_args (of optim amalgam)")
    parser.add_argument("--learning-rate", type=float, default=5e-5,
                        help="TrainingArguments.learning_rate (Trainer's default; ignored by the student, logged)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--lr-scheduler", default="cosine", help="TrainingArguments.lr_scheduler_type")
    parser.add_argument("--output-dir", default=None, help="default: a temporary folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on busy machines)")
    args = parser.parse_args(argv)
    optim_args = args.optim_args
    if args.smoke:
        args.steps = 10
        optim_args = ",".join(filter(None, [optim_args, "warmup_steps=0"]))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_tokens, held_tokens = stdlib_bytes(2_000_000)
    train = Windows(train_tokens, args.context, args.steps * args.batch_size, args.seed)
    held = Windows(held_tokens, args.context, 256, args.seed + 1)
    model = tiny_gpt2(args.context)
    print(
        f"GPT-2 {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters, byte-level, "
        f"{len(train_tokens) / 1e6:.1f}M training bytes of {sysconfig.get_paths()['stdlib']}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=args.output_dir or tmp,
            optim=args.optim,
            optim_args=optim_args if args.optim == "amalgam" else None,
            learning_rate=args.learning_rate,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,
            lr_scheduler_type=args.lr_scheduler,
            logging_steps=max(1, args.steps // 8),
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            seed=args.seed,
            dataloader_num_workers=0,
        )
        printer = PrintLoss()
        trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=held,
                          callbacks=[printer])  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # PrintLoss prints a shorter line
        before = trainer.evaluate()["eval_loss"]
        started = time.time()
        trainer.train()
        elapsed = time.time() - started
        after = trainer.evaluate()["eval_loss"]
    groups = trainer.optimizer.param_groups
    print(
        f"held-out loss {before:.4f} -> {after:.4f} (bits per byte {after / 0.6931:.3f}), {elapsed:.1f} s, "
        f"optimizer {type(trainer.optimizer.optimizer).__name__}, initial group lrs "
        f"{sorted({g['initial_lr'] for g in groups})}"
    )
    return {"first_loss": printer.losses[0], "last_loss": printer.losses[-1], "held_before": before,
            "held_after": after}  # fmt: skip


if __name__ == "__main__":
    main()
