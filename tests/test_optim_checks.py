"""AmalgamOptimizer refuses bad arguments up front, one clear error each, as torch's optimizers do (TypeError for
a wrong type, ValueError for a bad number), in the constructor and in add_param_group alike."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from amalgam_plugin.optim import AmalgamOptimizer

BAD_NUMBERS = [
    dict(fallback_lr=float("nan")), dict(fallback_lr=float("inf")), dict(fallback_lr=-1e-3),
    dict(lr=float("inf")), dict(weight_decay=float("inf")),
    dict(eps=float("nan")), dict(eps=-1e-8),
    dict(betas=(0.9, float("nan"))), dict(betas=(1.0, 0.999)), dict(betas=(-0.1, 0.999)),
    dict(warmup_steps=-1), dict(chunk_size=0),
]
BAD_TYPES = [
    dict(lr="1e-3"), dict(fallback_lr="1e-3"), dict(weight_decay="0.1"), dict(eps="1e-8"), dict(betas="0.9"),
    dict(betas=(0.9, "0.999")), dict(warmup_steps=2.5), dict(warmup_steps="10"), dict(chunk_size="64"),
]


@pytest.mark.parametrize("kwargs", BAD_NUMBERS, ids=str)
def test_non_finite_or_out_of_range_numbers_are_refused(paper_student, kwargs):
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AmalgamOptimizer([p], student=paper_student, **kwargs)
    assert torch.equal(p, torch.zeros(3))


@pytest.mark.parametrize("kwargs", BAD_TYPES, ids=str)
def test_values_of_the_wrong_type_are_a_type_error_as_in_adamw(paper_student, kwargs):
    name = next(iter(kwargs))
    if name in ("lr", "weight_decay", "eps", "betas"):  # what torch does with the same value
        with pytest.raises(TypeError):
            torch.optim.AdamW([nn.Parameter(torch.zeros(3))], **kwargs)
    with pytest.raises(TypeError, match=name):
        AmalgamOptimizer([nn.Parameter(torch.zeros(3))], student=paper_student, **kwargs)


def test_a_nan_fallback_lr_would_have_made_the_parameters_non_finite(paper_student):
    """Why fallback_lr is checked: the fallback AdamW multiplies every update by it."""
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="fallback_lr must be >= 0 and finite, got nan"):
        AmalgamOptimizer([{"params": [p], "use_fallback": True}], student=paper_student, fallback_lr=math.nan)


def test_a_module_instead_of_its_parameters_is_a_type_error(paper_student):
    model = nn.Sequential(nn.Linear(3, 2))
    for wrong in (model, model[0], [model[0]], [{"params": model}]):
        with pytest.raises(TypeError, match=r"optimizer can only optimize Tensors.*model\.parameters\(\)"):
            AmalgamOptimizer(wrong, student=paper_student)
    with pytest.raises(TypeError, match="optimizer can only optimize Tensors"):
        AmalgamOptimizer(["weight"], student=paper_student)
    opt = AmalgamOptimizer(model.parameters(), student=paper_student)  # the right way still works
    assert len(opt.param_groups[0]["params"]) == 2


def test_add_param_group_checks_like_the_constructor(paper_student):
    opt = AmalgamOptimizer(nn.Linear(3, 2).parameters(), student=paper_student)
    extra = nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"model\.parameters\(\)"):
        opt.add_param_group({"params": extra})
    with pytest.raises(TypeError, match="lr must be a number, got str"):
        opt.add_param_group({"params": extra.parameters(), "lr": "1e-3"})
    with pytest.raises(ValueError, match="fallback_lr must be >= 0 and finite"):
        opt.add_param_group({"params": list(extra.parameters()), "use_fallback": True, "fallback_lr": math.inf})
    with pytest.raises(ValueError, match="complex parameters"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.complex64))]})
    with pytest.raises(TypeError, match="warmup_steps must be an integer"):
        opt.add_param_group({"params": extra.parameters(), "warmup_steps": "10"})
    assert len(opt.param_groups) == 1  # nothing half-added
    opt.add_param_group({"params": extra.parameters(), "lr": 0.5, "warmup_steps": None})  # None: the default
    assert opt.param_groups[1]["lr"] == 0.5 and len(opt.param_groups[1]["params"]) == 2
    assert opt.param_groups[1]["warmup_steps"] == opt.defaults["warmup_steps"]
    for p in opt.param_groups[1]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()


def test_a_one_element_tensor_lr_is_still_accepted(paper_student):
    p = nn.Parameter(torch.zeros(3))
    opt = AmalgamOptimizer([p], student=paper_student, lr=torch.tensor(0.5), warmup_steps=0)
    p.grad = torch.ones(3)
    opt.step()
    assert torch.isfinite(p).all() and not torch.equal(p, torch.zeros(3))
