"""One run of the held-out suite: a task, an optimizer and a seed, trained for the task's steps under its schedule,
its held-out loss read every ``eval_every`` steps (docs/heldout.md#runs).

An optimizer is a plain dict, so that it can be part of a cache key: ``{"kind": "adamw", "lr": 1e-3}``,
``{"kind": "lion", "lr": 1e-4}``, ``{"kind": "muon", "lr": 0.02}`` (Muon on the hidden 2-D matrices, AdamW at its
default for the rest) or ``{"kind": "student", "name": "paper-choice-large"}`` (untuned: its defaults).
"""

from __future__ import annotations

import math
import resource
import tempfile
import time
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..problems import shuffled_batches
from .task import HeldoutTask, heldout_loss

OPTIMIZER_KINDS = ("adamw", "lion", "muon", "student")
MUON_FALLBACK_LR = 1e-3  # AdamW's default, for what Muon does not take


def optimizer_label(spec: dict) -> str:
    if spec["kind"] == "student":
        return spec["name"]
    return {"adamw": "AdamW", "lion": "Lion", "muon": "Muon+AdamW"}[spec["kind"]] + f" lr={spec['lr']:g}"


def hidden_matrices(task: HeldoutTask, model: nn.Module) -> list[str]:
    """Names of the parameters Muon takes: 2-D, not an embedding, and not the output layer (the parameters named
    by the task's ``output_layers``, or else the last 2-D parameter)."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices = [(n, p) for n, p in model.named_parameters() if p.ndim == 2 and id(p) not in embedded]
    if task.output_layers:
        return [n for n, _ in matrices if not any(n.startswith(prefix) for prefix in task.output_layers)]
    return [n for n, _ in matrices[:-1]]


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on the hidden matrices and ``torch.optim.AdamW`` on the rest, stepped together; its
    param groups are theirs, so a learning-rate schedule scales both."""

    def __init__(self, hidden: list[Tensor], rest: list[Tensor], lr: float):
        self.parts = [torch.optim.Muon(hidden, lr=lr, weight_decay=0.01), torch.optim.AdamW(rest, lr=MUON_FALLBACK_LR)]
        super().__init__(hidden + rest, {})
        self.param_groups = [g for part in self.parts for g in part.param_groups]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        for part in self.parts:
            part.step()

    def states(self) -> list[dict]:
        return [part.state for part in self.parts]


def build_optimizer(spec: dict, task: HeldoutTask, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kind = spec["kind"]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=spec["lr"])
    if kind == "lion":
        from timm.optim import Lion

        return Lion(params, lr=spec["lr"])
    if kind == "muon":
        hidden = set(hidden_matrices(task, model))
        if not hidden:
            raise ValueError(f"task {task.name!r} has no hidden 2-D matrix for Muon")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return MuonAdamW([p for n, p in named if n in hidden], [p for n, p in named if n not in hidden], spec["lr"])
    if kind == "student":
        from ..optim import AmalgamOptimizer

        return AmalgamOptimizer.from_pretrained(spec["name"], params)
    raise ValueError(f"unknown optimizer kind {kind!r}; valid: {', '.join(OPTIMIZER_KINDS)}")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (its ``state``)."""
    states = optimizer.states() if isinstance(optimizer, MuonAdamW) else [optimizer.state]

    def size(value) -> int:  # noqa: ANN001 (any state value)
        if isinstance(value, Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if isinstance(value, list | tuple):
            return sum(size(v) for v in value)
        return 0

    return sum(size(s) for state in states for s in state.values())


class _Recorder:
    """The run's held-out curve and its training time (evaluation excluded)."""

    def __init__(self, task: HeldoutTask, model: nn.Module):
        self.task, self.model = task, model
        self.curve: list[tuple[int, float]] = []
        self.train_seconds = 0.0
        self.steps_done = 0
        self.diverged = False

    def after_step(self, step: int, loss: float | None, seconds: float) -> bool:
        """Record one step; False stops the run (a non-finite training loss, where the loop sees it, or
        held-out loss)."""
        self.train_seconds += seconds
        self.steps_done = step
        if loss is not None and not math.isfinite(loss):
            self.diverged = True
            return False
        if step % self.task.eval_every == 0 or step == self.task.steps:
            value = heldout_loss(self.task, self.model)
            self.curve.append((step, value))
            if not math.isfinite(value):
                self.diverged = True
                return False
        return True


def _train_plain(task: HeldoutTask, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int,
                 recorder: _Recorder) -> None:
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, task.lr_factor)
    x, y = task.data().train
    batches: Iterable = shuffled_batches(x, y, task.batch_size, torch.Generator().manual_seed(seed))
    for step, batch in zip(range(1, task.steps + 1), batches, strict=False):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        schedule.step()
        if not recorder.after_step(step, loss.item(), time.perf_counter() - started):
            return


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, x: Tensor, y: Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.x[i], "labels": self.y[i]}


def _train_with_trainer(task: HeldoutTask, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int,
                        recorder: _Recorder) -> None:
    """Through ``transformers.Trainer`` as a user runs it: its data order, its loss (the model's own), its schedule
    built from ``lr_scheduler_type`` and ``warmup_steps``, its default gradient clipping at norm 1."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001 (Trainer's callback API)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            seconds = time.perf_counter() - self.started
            if not recorder.after_step(state.global_step, None, seconds):
                control.should_training_stop = True

    record = Record()

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=task.steps, per_device_train_batch_size=task.batch_size,
            lr_scheduler_type="cosine" if task.schedule == "warmup-cosine" else "constant",
            warmup_steps=task.warmup_steps, logging_strategy="no", save_strategy="no", report_to=[],
            disable_tqdm=True, use_cpu=True, seed=seed, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=_Pairs(*task.data().train),
                          optimizers=(optimizer, None), callbacks=[record])
        trainer.remove_callback(PrinterCallback)  # the suite prints its own progress
        trainer.train()


def train_run(task: HeldoutTask, spec: dict, seed: int) -> dict:
    """Train ``task`` with the optimizer ``spec`` from seed ``seed``: the held-out curve, its best and final log
    loss, time per training step, the optimizer's state bytes and the process's peak resident memory."""
    torch.manual_seed(seed)
    model = task.model()
    optimizer = build_optimizer(spec, task, model)
    recorder = _Recorder(task, model)
    (_train_with_trainer if task.trainer else _train_plain)(task, model, optimizer, seed, recorder)
    logs = [math.log(v) for _, v in recorder.curve if math.isfinite(v) and v > 0]
    return {
        "curve": [(step, value if math.isfinite(value) else None) for step, value in recorder.curve],
        "best_log_heldout": min(logs) if logs else None,  # None: no finite held-out loss (JSON has no NaN)
        "final_log_heldout": logs[-1] if logs and not recorder.diverged else None,
        "diverged": recorder.diverged,
        "steps_done": recorder.steps_done,
        "seconds_per_step": recorder.train_seconds / max(1, recorder.steps_done),
        "state_bytes": state_bytes(optimizer),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "parameters": sum(p.numel() for p in model.parameters()),
    }
