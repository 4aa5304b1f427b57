"""How a phase's final checkpoint is chosen (``ScheduleConfig.select``): ``best`` (the last stage's best
validation), ``last`` (the final period) or ``horizon`` (docs/method.md#horizon-selection), which this module runs.

A short validation truncation says little about a run as long as the evaluation's, so under ``horizon`` each
stage's best checkpoint (and, with ``horizon_start``, the student before meta-training) trains the problem
``horizon_seeds`` times for ``horizon_steps`` steps on validation digits carved from the training digits; the lowest
mean best log validation loss is kept (a diverged run counts as infinitely bad). With the start among the
candidates, a student that meta-training made worse over the evaluation's horizon is not kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..evaluate import run, student_factory
from ..problems import Problem, selection_problem
from .distributed import Group
from .learner import Learner

SELECTIONS = ("best", "last", "horizon")
# ``--select`` names the final model in one word: a selection; "average", the best-validation transitions with
# the last stage's weight average as the student (``ScheduleConfig.average_last_stage``); "horizon-start", horizon
# selection over the student before meta-training and each stage's best checkpoint
SELECT_FLAGS = {**{name: {"select": name, "average_last_stage": False, "horizon_start": False} for name in SELECTIONS},
                "average": {"select": "best", "average_last_stage": True, "horizon_start": False},
                "horizon-start": {"select": "horizon", "average_last_stage": False, "horizon_start": True}}


def select_flag(recipe: dict) -> str | None:
    """The ``--select`` value that gives a recipe's final-model settings (``recipe``: its settings by name; one
    recorded before a setting existed had its default); None when no value gives them."""
    recipe = {"select": "best", "average_last_stage": False, "horizon_start": False, **recipe}
    return next((flag for flag, settings in SELECT_FLAGS.items()
                 if all(recipe[k] == v for k, v in settings.items())), None)


HORIZON_FIRST_SEED = 100  # the selection runs' seeds: apart from the evaluation's 0..9, so no draw is shared


def horizon_candidates(stages: int, with_start: bool) -> list[str]:
    """The saved-tensor prefixes horizon selection weighs: the student before meta-training (``initial``), then each
    stage's checkpoint."""
    return (["initial."] if with_start else []) + [f"stage{stage}." for stage in range(stages)]


def select_over_horizon(learner: Learner, saved: dict[str, Tensor], problem: Problem, candidates: list[str],
                        steps: int, seeds: int, group: Group) -> dict:
    """Restore into ``learner`` the candidate (a prefix of ``saved``'s tensors, :func:`horizon_candidates`) whose
    ``seeds`` runs of ``steps`` steps reach the lowest mean best log validation loss; returns the choice's scores
    for the log. The processes of ``group`` share the runs."""
    target = selection_problem(problem, n_val=min(1000, len(problem.data.train_x) // 5))
    runs = [(prefix, HORIZON_FIRST_SEED + k) for prefix in candidates for k in range(seeds)]
    scores = torch.zeros(len(runs), dtype=torch.float64)
    for j, (prefix, seed) in enumerate(runs):
        if group.owns(j):
            learner.restore(saved, prefix)
            result = run(target, student_factory(learner.student), seed, steps, name=prefix.rstrip("."))
            scores[j] = math.inf if result.diverged else result.best_log_heldout
    means = group.sum(scores).view(len(candidates), seeds).mean(1).tolist()
    chosen = min(range(len(candidates)), key=lambda k: means[k])
    learner.restore(saved, candidates[chosen])
    names = [prefix.rstrip(".") for prefix in candidates]
    return dict(steps=steps, seeds=[seed for _, seed in runs[:seeds]], candidates=names, scores=means,
                chosen=names[chosen])
