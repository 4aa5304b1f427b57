"""The baselines of the evaluation protocol (docs/method.md#baselines): :func:`pool_baselines` (each pool member in
the paper's form and in torch's textbook form), :func:`tune_adam` (torch Adam tuned over a learning-rate grid,
chosen on the *training* digits through ``selection_problem`` by default), the oracle
(:meth:`Evaluation.add_oracle`), and :func:`evaluate_with_baselines`, the protocol in one call. Students run
through ``amalgam_plugin.optim.AmalgamOptimizer`` (:func:`student_factory`) with their configured warm-up.

Every factory here is :class:`Specified`: its runs are cached under its full specification.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..problems import Problem, selection_problem
from ..teachers import Teacher, TeacherOptimizer, make_pool
from .cache import Specified
from .report import Evaluation
from .runner import evaluate
from .runs import OptimizerFactory

logger = logging.getLogger(__name__)

ADAM_TUNING_LRS = (1e-3, 2e-3, 5e-3, 1e-2)


def torch_factory(cls: type[torch.optim.Optimizer], **kwargs: Any) -> Specified:
    """``cls(params, **kwargs)``, specified by its class and every hyper-parameter (its ``defaults``, the ones not
    given included)."""

    def describe() -> dict[str, Any]:
        defaults = cls([nn.Parameter(torch.zeros(1))], **kwargs).defaults
        return {"optimizer": f"{cls.__module__}.{cls.__qualname__}", "hparams": defaults}

    return Specified(lambda params: cls(params, **kwargs), describe)


def _base_label(teacher: Teacher, form: str) -> str:
    return f"{teacher.name} {teacher.hparams.get('lr', '')} ({form})".replace("  ", " ")


def _labels(pool: Sequence[Teacher], form: str) -> list[str]:
    """Each member's row label, ``"adam 0.005 (paper)"``; members that share a name and learning rate but differ
    in other hyper-parameters also show those (``"adam 0.005 beta1=0.5,beta2=0.9 (paper)"``), so no two
    different teachers share a row."""
    base = [_base_label(t, form) for t in pool]
    labels = []
    for teacher, label in zip(pool, base, strict=True):
        twins = [t for t, b in zip(pool, base, strict=True) if b == label]
        differing = sorted(k for k in teacher.hparams if k != "lr" and len({repr(t.hparams.get(k)) for t in twins}) > 1)
        extra = ",".join(f"{k}={teacher.hparams[k]}" for k in differing)
        labels.append(label if not extra else label.replace(f" ({form})", f" {extra} ({form})"))
    return labels


def textbook_factory(teacher: Teacher) -> OptimizerFactory | None:
    """torch's textbook counterpart of a paper-form teacher at the same learning rate
    (docs/method.md#textbook-forms: the Keras baselines): Adam(lr), RMSprop(lr, alpha=rho), SGD(lr), and for
    Momentum SGD(lr, momentum=0.9) (the Keras "momentum" baseline, an effective step 10x that of the EMA form).
    AddSign/PowerSign have none: ``None``."""
    hp, lr = teacher.hparams, teacher.hparams.get("lr")
    name = teacher.name
    if name == "adam":
        return torch_factory(torch.optim.Adam, lr=lr, betas=(hp["beta1"], hp["beta2"]))
    if name == "rmsprop":
        return torch_factory(torch.optim.RMSprop, lr=lr, alpha=hp["rho"])
    if name == "sgd":
        return torch_factory(torch.optim.SGD, lr=lr)
    if name == "momentum":
        return torch_factory(torch.optim.SGD, lr=lr, momentum=0.9)
    return None


def teacher_factory(teacher: Teacher) -> OptimizerFactory:
    """A paper-form teacher as a torch optimizer (``TeacherOptimizer``), specified by its name and every
    hyper-parameter."""
    return Specified(lambda params: TeacherOptimizer(params, teacher),
                     lambda: {"teacher": teacher.name, "hparams": dict(teacher.hparams), "form": "paper"})


def pool_baselines(
    pool: str | Sequence[str | Teacher], forms: Sequence[str] = ("paper", "torch")
) -> dict[str, OptimizerFactory]:
    """The pool baselines (docs/method.md#baselines): each member in the paper's form (``"adam 0.005 (paper)"``)
    and, where one exists, torch's textbook form (``"adam 0.005 (torch)"``)."""
    for form in forms:
        if form not in ("paper", "torch"):
            raise ValueError(f"unknown baseline form {form!r}; valid: paper, torch")
    teachers = make_pool(pool)
    baselines: dict[str, OptimizerFactory] = {}
    for teacher, paper, textbook_label in zip(teachers, _labels(teachers, "paper"), _labels(teachers, "torch"),
                                              strict=True):
        if "paper" in forms:
            baselines[paper] = teacher_factory(teacher)
        textbook = textbook_factory(teacher) if "torch" in forms else None
        if textbook is not None:
            baselines[textbook_label] = textbook
    return baselines


def torch_adam(lr: float) -> OptimizerFactory:
    return torch_factory(torch.optim.Adam, lr=lr)


@dataclass(frozen=True)
class TunedChoice:
    """Result of :func:`tune_adam`: the chosen learning rate, each candidate's score, how it was chosen."""

    name: str
    lr: float
    scores: dict[float, float]
    how: str

    @property
    def factory(self) -> OptimizerFactory:
        return torch_adam(self.lr)


def tune_adam(
    problem: Problem,
    seeds: Sequence[int],
    steps: int = 1000,
    eval_every: int = 25,
    lrs: Sequence[float] = ADAM_TUNING_LRS,
    select_on: str = "selection",
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> TunedChoice:
    """torch Adam tuned over ``lrs`` by the mean best log loss over ``seeds``.

    ``select_on="selection"`` (default): the choice is made on ``selection_problem(problem)``, whose
    validation set is 1,000 *training* digits, so the held-out digits stay unseen. ``select_on="heldout"``:
    the choice is made on the held-out loss itself (oracle tuning, which favours the baseline;
    docs/method.md#baselines).
    ``workers``: as in :func:`evaluate`.
    """
    if select_on not in ("selection", "heldout"):
        raise ValueError(f"unknown select_on {select_on!r}; valid: selection, heldout")
    target = selection_problem(problem) if select_on == "selection" else problem
    candidates = {f"torch adam lr={lr:g}": torch_adam(lr) for lr in lrs}
    tuning = evaluate(target, candidates, seeds, steps, eval_every, cache=cache, progress=progress, workers=workers)
    scores = {lr: tuning.mean(f"torch adam lr={lr:g}") for lr in lrs}
    best = min(lrs, key=lambda lr: (math.isnan(scores[lr]), scores[lr]))
    where = (
        "1,000 validation digits carved from the training digits (selection_problem)"
        if select_on == "selection"
        else "the held-out digits (oracle tuning, favours the baseline)"
    )
    how = (
        f"lr chosen from {{{', '.join(f'{lr:g}' for lr in lrs)}}} by mean best log loss on {where}, "
        f"seeds {list(seeds)}, {steps} steps; scores: "
        + ", ".join(f"{lr:g}: {scores[lr]:.3f}" for lr in lrs)
        + f"; chosen lr={best:g}"
    )
    logger.info("tuned torch Adam: %s", how)
    return TunedChoice(f"torch adam tuned (lr={best:g})", best, scores, how)


def student_factory(student: Any, **kwargs: Any) -> OptimizerFactory:
    """Evaluate a student (module, bundled name, folder or repo id) through ``AmalgamOptimizer`` with its
    configured warm-up (``kwargs`` go to the optimizer, e.g. ``warmup_steps=0``); specified by the student's
    content hash (config and weights) and ``kwargs``. A name, folder or repo id is loaded once, here."""
    from ..hub import content_hash, load_student
    from ..optim import AmalgamOptimizer

    if not isinstance(student, nn.Module):
        student = load_student(os.fspath(student), revision=kwargs.pop("revision", None))
    return Specified(lambda params: AmalgamOptimizer(params, student=student, **kwargs),
                     lambda: {"student": content_hash(student), "optimizer": "AmalgamOptimizer", "options": kwargs})


def _baseline_notes(tuned: TunedChoice, baselines: Iterable[str]) -> dict[str, str]:
    notes = {tuned.name: "torch.optim.Adam; " + tuned.how}
    for name in baselines:
        notes[name] = (
            "paper form (docs/method.md#teachers), TeacherOptimizer"
            if name.endswith("(paper)")
            else ("torch textbook form (docs/method.md#textbook-forms; Momentum = SGD(lr, momentum=0.9))")
        )
    return notes


def evaluate_with_baselines(
    problem: Problem,
    candidates: Mapping[str, OptimizerFactory],
    pool: str | Sequence[str | Teacher],
    seeds: Sequence[int],
    steps: int = 1000,
    eval_every: int = 25,
    forms: Sequence[str] = ("paper", "torch"),
    tune_seeds: Sequence[int] | None = None,
    tune_on: str = "selection",
    reference: str | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> Evaluation:
    """The evaluation protocol in one call: ``candidates`` (e.g. ``{"student": student_factory(module)}``) against
    every pool member in the paper's and torch's forms (:func:`pool_baselines`), the oracle (the best member on
    the held-out metric, :meth:`Evaluation.add_oracle`) and torch Adam tuned by :func:`tune_adam` (on the
    training digits by default, with ``tune_seeds`` or else ``seeds``). ``reference`` defaults to the first
    candidate. Every choice is written into ``Evaluation.notes``, which the model card prints under the table.
    ``workers``: as in :func:`evaluate` (the tuning runs first, then the evaluation runs)."""
    baselines = pool_baselines(pool, forms)
    clash = sorted(set(candidates) & set(baselines))
    if clash:
        raise ValueError(f"candidate names clash with baseline names: {', '.join(clash)}")
    tuned = tune_adam(problem, list(tune_seeds or seeds), steps, eval_every, select_on=tune_on, cache=cache,
                      progress=progress, workers=workers)
    optimizers = {**candidates, **baselines, tuned.name: tuned.factory}
    evaluation = evaluate(problem, optimizers, seeds, steps, eval_every, reference or next(iter(candidates), None),
                          _baseline_notes(tuned, baselines), cache, progress, workers)
    evaluation.add_oracle(list(baselines))
    return evaluation
