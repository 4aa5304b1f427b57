"""transformers: ``optim="amalgam"`` with the stock Trainer, ``--optim amalgam``, optim_args, fallback, resume.

Real Trainer runs on a tiny GPT-2 (byte-level, bytes of a standard-library source file), the paper's trained
student, past the student's warm-up (or with it disabled).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import amalgam_plugin.integrations.transformers as hf_integration
import pytest
import torch
from amalgam_plugin.integrations import UnsupportedLibraryError, register
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from amalgam_plugin.optim import AmalgamOptimizer

ROOT = Path(__file__).resolve().parents[1]


class ByteWindows(Dataset):
    """Consecutive 32-byte windows of a real text: ``logging/__init__.py`` from the standard library."""

    def __init__(self, count: int = 64, length: int = 32):
        data = Path(logging.__file__).read_bytes()[: count * length]
        self.tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long().view(count, length)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=256, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                        eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config)


def training_args(out: Path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(out), optim="amalgam", learning_rate=5e-5, max_steps=4, per_device_train_batch_size=4,
        lr_scheduler_type="constant", weight_decay=0.1, save_strategy="no", logging_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def inner(trainer: Trainer) -> AmalgamOptimizer:
    optimizer = trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps ours
    assert isinstance(optimizer, AmalgamOptimizer)
    return optimizer


def learned_branch_ran(optimizer: AmalgamOptimizer) -> bool:
    """The student's LSTM state moved (it stays at zero during the warm-up)."""
    return any(
        "h0" in state and state["h0"].abs().sum() > 0 for state in optimizer.state.values()
    )  # fmt: skip


def test_registration_is_idempotent_and_picklable():
    size, handler = len(OptimizerNames), hf_integration.amalgam_handler
    assert register(["transformers"]) == ["transformers"]
    hf_integration.register()
    assert len(OptimizerNames) == size
    member = OptimizerNames("amalgam")
    assert member is OptimizerNames.AMALGAM and member.value == "amalgam" and member in list(OptimizerNames)
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS

    assert _OPTIMIZER_HANDLERS["amalgam"] is handler
    args = TrainingArguments(output_dir="unused", optim="amalgam", report_to=[])
    assert args.to_dict()["optim"] == "amalgam"
    assert pickle.loads(pickle.dumps(args)).optim is member  # training_args.bin


def test_command_line_optim_amalgam(paper_student_name):
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "unused", "--optim", "amalgam", "--optim_args",
         f"student={paper_student_name},lr_multiplier=2", "--report_to", "none"]
    )  # fmt: skip
    assert args.optim is OptimizerNames.AMALGAM
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, tiny_gpt2())
    from amalgam_plugin.hub import student_identity

    assert cls is AmalgamOptimizer and sorted(kwargs) == ["lr", "student"] and kwargs["lr"] == 2.0
    assert student_identity(kwargs["student"])["name"] == paper_student_name  # loaded once, by the handler


def test_unknown_optim_args_name_the_valid_ones(paper_student_name):
    args = TrainingArguments(output_dir="unused", optim="amalgam", optim_args="bogus=1", report_to=[])
    with pytest.raises(ValueError, match="bogus.*valid options.*lr_multiplier"):
        Trainer.get_optimizer_cls_and_kwargs(args, tiny_gpt2())
    args = TrainingArguments(output_dir="unused", optim="amalgam", optim_args="lr=3", report_to=[])
    with pytest.raises(ValueError, match="lr_multiplier"):
        Trainer.get_optimizer_cls_and_kwargs(args, tiny_gpt2())


def test_unsupported_transformers_layout_fails_clearly():
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS

    for names, handlers in ((OptimizerNames, None), (OptimizerNames, {}), (int, _OPTIMIZER_HANDLERS)):
        with pytest.raises(UnsupportedLibraryError) as err:
            hf_integration.check_internals(names, handlers)
        message = str(err.value)
        assert __import__("transformers").__version__ in message and "optimizer_cls_and_kwargs" in message
    assert "optimizer_cls_and_kwargs" in hf_integration.__doc__  # the stable route is documented


def test_trainer_ignores_learning_rate_and_uses_the_multiplier(paper_student_name, tmp_path, caplog):
    args = training_args(tmp_path, optim_args=f"student={paper_student_name},lr_multiplier=0.5,warmup_steps=0")
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model=model, args=args, train_dataset=ByteWindows())
    with caplog.at_level(logging.WARNING, logger="amalgam_plugin.integrations"):
        result = trainer.train()
    ignored = [r for r in caplog.records if "learning rate 5e-05 is ignored" in r.getMessage()]
    assert len(ignored) == 1
    optimizer = inner(trainer)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.5, 0.5]  # not 5e-5
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.5]  # constant schedule
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.1]  # Trainer's groups kept
    assert learned_branch_ran(optimizer) and result.global_step == 4
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trainer_gives_a_normalized_student_its_learning_rate(tmp_path, caplog):
    """A normalized student's lr is AdamW's: the group lr is learning_rate x lr_multiplier, nothing is ignored."""
    args = training_args(tmp_path, learning_rate=3e-3,
                         optim_args="student=amalgam-choice-large-quick,lr_multiplier=0.5")
    model = tiny_gpt2()
    trainer = Trainer(model=model, args=args, train_dataset=ByteWindows())
    with caplog.at_level(logging.WARNING, logger="amalgam_plugin.integrations"):
        result = trainer.train()
    assert not [r for r in caplog.records if "is ignored" in r.getMessage()]
    optimizer = inner(trainer)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [1.5e-3, 1.5e-3]
    assert optimizer.student.config.student_type == "normalized" and result.global_step == 4


def test_stable_route_optimizer_cls_and_kwargs(paper_student_name, tmp_path):
    args = training_args(tmp_path, optim="adamw_torch")
    trainer = Trainer(
        model=tiny_gpt2(), args=args, train_dataset=ByteWindows(),
        optimizer_cls_and_kwargs=(AmalgamOptimizer, {"lr": 1.0, "student": paper_student_name, "warmup_steps": 0}),
    )  # fmt: skip
    trainer.train()
    optimizer = inner(trainer)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [1.0, 1.0] and learned_branch_ran(optimizer)


def test_fallback_groups_through_optim_args(paper_student_name, tmp_path):
    args = training_args(
        tmp_path, optim_args=f"student={paper_student_name},fallback=embeddings+norms,fallback_lr=1e-3,warmup_steps=0"
    )
    model = tiny_gpt2()
    trainer = Trainer(model=model, args=args, train_dataset=ByteWindows())
    trainer.train()
    optimizer = inner(trainer)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = [
        (g["use_fallback"], g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups
    ]
    fallback = set().union(*(ns for fb, _, ns in by_group if fb))
    assert fallback == {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                        "transformer.h.0.ln_1.bias", "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
                        "transformer.ln_f.weight", "transformer.ln_f.bias"}  # fmt: skip
    assert (True, 0.1, {"transformer.wte.weight", "transformer.wpe.weight"}) in by_group  # decay kept
    assert all(g["lr"] == 1.0 for g in optimizer.param_groups)
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert ("exp_avg" in optimizer.state[p]) == group["use_fallback"]  # AdamW state vs student state
    with pytest.raises(ValueError, match="invalid fallback"):
        hf_integration.fallback_param_groups(model, "embedings", 0.0)


def test_resume_from_checkpoint_matches_uninterrupted_run(paper_student_name, tmp_path):
    """Gradient accumulation 2, cosine schedule, warm-up ending before the checkpoint: exact continuation."""
    common = dict(
        optim_args=f"student={paper_student_name},warmup_steps=2", max_steps=6, gradient_accumulation_steps=2,
        per_device_train_batch_size=2, lr_scheduler_type="cosine", save_strategy="steps", save_steps=3,
    )  # fmt: skip
    model_a = tiny_gpt2()
    trainer_a = Trainer(model=model_a, args=training_args(tmp_path / "a", **common), train_dataset=ByteWindows())
    trainer_a.train()
    assert learned_branch_ran(inner(trainer_a))
    group = trainer_a.optimizer.param_groups[0]
    assert group["initial_lr"] == 1.0 and group["lr"] < 1.0  # the cosine schedule scaled the multiplier

    model_b = tiny_gpt2(seed=1)  # the checkpoint must supply the weights, the optimizer and scheduler states
    trainer_b = Trainer(model=model_b, args=training_args(tmp_path / "b", **common), train_dataset=ByteWindows())
    trainer_b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_optim_amalgam_alone_uses_the_default_student(tmp_path):
    from amalgam_plugin.optim import DEFAULT_STUDENT

    trainer = Trainer(model=tiny_gpt2(), args=training_args(tmp_path), train_dataset=ByteWindows())
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, AmalgamOptimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 1.0]
    assert optimizer.param_groups[0]["student_id"].startswith(DEFAULT_STUDENT)
