"""Recipes (docs/method.md#presets): ``paper`` (the full recipe, for a GPU or a long run), ``cpu`` (about 1
hour on 2 CPU cores, resumable) and ``quick`` (about 20,400 plain passes of the Train CNN: 7 minutes on 2 idle CPU
cores today), both evaluation included."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..registry import Registry
from .curriculum import PhaseConfig

# The choice network's fixed schedule (docs/method.md#curriculum) ("cl_fixed"), meta loss only, the last period is kept.
PAPER_CHOICE = PhaseConfig.of(
    unroll_length=100, depths=[1, 2, 5, 5, 5], validation_depths=[10], trajectories_per_period=10,
    validation_trajectories=1, warmup_unrolls=[0, 1], min_periods=1, max_periods=1, num_chances=0,
    repeat_threshold=0.9, select="last", imitation_schedule="none",
)
# The student's curriculum (docs/method.md#curriculum).
PAPER_STUDENT = PhaseConfig()


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    choice: PhaseConfig
    student: PhaseConfig
    eval_seeds: int = 10
    eval_steps: int = 1000
    eval_textbook: bool = True  # also evaluate the pool's textbook (torch) forms
    student_type: str = "rnnprop"  # the student type a run meta-trains unless it names one (``--student``)
    notes: list[str] = field(default_factory=list)


PRESETS: Registry[Preset] = Registry("preset", {name: (preset, preset.description) for name, preset in {
    "paper": Preset("paper", "the paper's full recipe (a GPU or a long run)", PAPER_CHOICE,
                    PAPER_STUDENT),
    "cpu": Preset(
        "cpu",
        "about 1 hour on 2 CPU cores, resumable, including the full evaluation: quick's 20-step truncations "
        "over the paper's four curriculum stages, 12 trajectories per period, horizon selection",
        PAPER_CHOICE.changed(unroll_length=20, trajectories_per_period=12, validation_depths=[5],
                second_order=False, max_repeat=0, meta_lr=3e-3),
        PAPER_STUDENT.changed(unroll_length=20, trajectories_per_period=12, validation_trajectories=2,
                min_periods=4, num_chances=0, max_periods=4, second_order=False, max_repeat=0, meta_lr=3e-3,
                select="horizon"),
        notes=["first-order meta-gradients (second-order terms dropped) for speed on a CPU",
               "truncations of 20 steps instead of 100, over the paper's stages (depths 1, 2, 5, 10)",
               "12 trajectories per period (the paper: 10), 2 validation trajectories (10), exactly 4 periods per "
               "stage (at least 6), no repeated periods (up to 4)",
               "horizon selection: the stage whose best checkpoint's 1000-step runs reach the lowest validation "
               "loss (the paper: the last stage's best)",
               "meta learning rate 3e-3 (the paper: 1e-3) for the short budget"],
    ),
    "quick": Preset(
        "quick",
        "the normalized student in about 20,400 plain passes of the Train CNN (6 min measured idle here, about 15 at "
        "45 ms a pass, one torch thread), then a reduced evaluation",
        PAPER_CHOICE.changed(unroll_length=20, depths=[1, 2, 5], trajectories_per_period=8,
                validation_depths=[5], second_order=False, max_repeat=0, meta_lr=3e-3),
        PAPER_STUDENT.changed(unroll_length=20, depths=[1, 2], validation_depths=[2, 5],
                trajectories_per_period=8, validation_trajectories=1, min_periods=2, num_chances=1,
                max_periods=3, second_order=False, max_repeat=0, meta_lr=3e-3, select="horizon",
                horizon_start=True),
        eval_seeds=3, eval_textbook=False, student_type="normalized",
        notes=["the normalized student (the paper: RNNProp), which starts as a normalized Adam",
               "first-order meta-gradients (second-order terms dropped) for speed on a CPU",
               "truncations of 20 steps instead of 100; the student's 2 curriculum stages (depths 1, 2), the "
               "choice network's 3 (1, 2, 5); no repeated periods",
               "meta learning rate 3e-3 (the paper: 1e-3) for the short budget",
               "the student is, of its start and its stages' best-validation checkpoints, the one whose 1000-step "
               "runs on validation digits train best (the paper: the last stage's best-validation checkpoint)",
               "reduced evaluation: 3 paired seeds, the pool in the paper's form and tuned torch Adam"],
    ),
    "smoke": Preset(
        "smoke",
        "seconds: checks the whole pipeline (tests, CI); the student it makes is not useful",
        PAPER_CHOICE.changed(unroll_length=5, depths=[1, 1], trajectories_per_period=1, validation_depths=[1],
                warmup_unrolls=[0, 1], second_order=False),
        PAPER_STUDENT.changed(unroll_length=5, depths=[1, 1], validation_depths=[1], trajectories_per_period=1,
                validation_trajectories=1, warmup_unrolls=[1], min_periods=1, num_chances=0, max_periods=2,
                second_order=False),
        eval_seeds=2, eval_steps=50, eval_textbook=False,
        notes=["smoke preset: a pipeline check, not a useful student"],
    ),
}.items()})


def get_preset(name: str) -> Preset:
    return PRESETS.lookup(name)
