"""The paper's comparisons at CPU scale, with this project's own numbers (README "Results").

    python benchmarks/reproduce_paper.py --budget small --max-minutes 170     # resumable: rerun to continue
    python benchmarks/reproduce_paper.py --budget small --stage train         # only the meta-training

Four studies (docs/method.md#evaluation for the protocol):

(a) mechanisms: mean vs min-max vs choice amalgamation of the small pool, and choice of the large pool;
(b) the large-pool choice student vs the α = 0 RNNProp baseline, every teacher, the oracle and tuned Adam on every
    problem of the suite;
(c) meta-stability against the perturbation's magnitude: 8 replicates per setting, min-max of the small pool,
    meta-trained on the cheap MLP problem and scored on its final log training loss (the paper's Fig. 6);
(d) the same perturbed and unperturbed students off their training problem.

Everything lands in ``--out`` (default ``benchmarks/results/reproduce-<budget>``): the students (one folder each,
Hub layout), ``evaluate/`` (the suite's cache, JSON, tables and plots) and ``results.md``. Meta-training resumes
from its checkpoints and finished evaluation runs are cached, so a killed or ``--max-minutes``-bounded run loses at
most one period or one run. Budgets: ``small`` about 3 hours on 2 cores; ``full`` the same studies at the ``cpu``
preset with 8 replicates everywhere and 10 seeds (days on 2 cores; hours on a many-core machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from amalgam_plugin.engine import Perturbation, amalgamate
from amalgam_plugin.engine.presets import PRESETS, Preset

REPO = Path(__file__).resolve().parents[1]

QUICK = PRESETS["quick"]
# (c)'s recipe: a shortened quick preset, cheap enough for 8 replicates of every setting
STABILITY = Preset(
    "stability", "the quick preset shortened to 2 stages of 2 periods of 4 trajectories (study c)",
    QUICK.choice, replace(QUICK.student, depths=[1, 2], validation_depths=[2, 5], trajectories_per_period=4,
                          min_periods=2, max_periods=2, num_chances=0),
    eval_seeds=3, eval_textbook=False, notes=["study (c) recipe: 2 stages x 2 periods x 4 trajectories"])


@dataclass(frozen=True)
class Student:
    """One student to meta-train: its study, its label, its amalgamate arguments."""

    study: str
    label: str
    replicate: int
    pool: str
    mechanism: str
    preset: Preset
    problem: str = "train"
    imitation: str = "il_more"
    perturbation: Perturbation = field(default_factory=Perturbation)

    @property
    def folder(self) -> str:
        return f"students/{self.label}/r{self.replicate}"


@dataclass(frozen=True)
class Budget:
    main_preset: Preset
    main_replicates: int
    stability_preset: Preset
    stability_replicates: int
    stability_settings: tuple[tuple[str, float], ...]
    seeds: int  # evaluation seeds of (a), (b), (d)
    stability_seeds: int  # evaluation seeds of (c), per replicate
    problems: tuple[str, ...]  # (b)'s suite
    off_problems: tuple[str, ...]  # (d)'s problems
    steps: int = 1000


BUDGETS = {
    "small": Budget(QUICK, 1, STABILITY, 8,
                    (("none", 0.0), ("gaussian-adaptive", 1e-3), ("gaussian-adaptive", 1e-2),
                     ("pgd-adaptive-clipped", 1e-3)),
                    seeds=5, stability_seeds=2, problems=("train", "mlp", "smallbatch", "wider", "deeper"),
                    off_problems=("train",)),
    "full": Budget(PRESETS["cpu"], 8, QUICK, 8,
                   (("none", 0.0), ("gaussian-adaptive", 5e-4), ("gaussian-adaptive", 1e-3),
                    ("gaussian-adaptive", 2e-3), ("gaussian-adaptive", 5e-3), ("gaussian-adaptive", 1e-2),
                    ("pgd-adaptive-clipped", 1e-4), ("pgd-adaptive-clipped", 1e-3)),
                   seeds=10, stability_seeds=5,
                   problems=("train", "mlp", "smallbatch", "wider", "deeper", "train-mnist", "fmnist"),
                   off_problems=("train", "smallbatch", "wider")),
}


def setting_label(kind: str, magnitude: float) -> str:
    return "unperturbed" if kind == "none" else f"{kind}-{magnitude:g}"


def plan(budget: Budget) -> list[Student]:
    """Every student of the four studies, cheapest study first within the main ones."""
    students = []
    for r in range(budget.main_replicates):
        for pool, mechanism in (("small", "mean"), ("small", "minmax"), ("small", "choice"), ("large", "choice")):
            students.append(Student("a", f"{mechanism}-{pool}", r, pool, mechanism, budget.main_preset))
        students.append(Student("b", "alpha0", r, "large", "choice", budget.main_preset, imitation="none"))
    for r in range(budget.stability_replicates):
        for kind, magnitude in budget.stability_settings:
            students.append(Student("c", f"mlp-{setting_label(kind, magnitude)}", r, "small", "minmax",
                                    budget.stability_preset, "mlp", perturbation=Perturbation(kind, magnitude)))
    return students


def train(students: list[Student], out: Path, deadline: float) -> bool:
    """Meta-train every student not yet written; False when the deadline stopped one at a checkpoint."""
    for s in students:
        folder = out / s.folder
        if (folder / "config.json").exists():
            continue
        minutes = (deadline - time.time()) / 60
        if minutes < 1:
            return False
        print(f"[train] {s.folder} ({s.mechanism} {s.pool}, {s.preset.name}, {s.problem}, "
              f"{setting_label(s.perturbation.kind, s.perturbation.epsilon)})", flush=True)
        done = amalgamate(pool=s.pool, mechanism=s.mechanism, preset=s.preset, problem=s.problem, out=folder,
                          seed=s.replicate, resume=(folder / "training").exists(), max_minutes=minutes,
                          imitation=s.imitation, evaluate=False, perturbation=s.perturbation)
        if done is None:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--stage", choices=("all", "train", "evaluate"), default="all")
    parser.add_argument("--out", default=None)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--workers", type=int, default=2, help="evaluation worker processes (1 thread each)")
    args = parser.parse_args(argv)
    budget = BUDGETS[args.budget]
    out = Path(args.out or REPO / "benchmarks" / "results" / f"reproduce-{args.budget}")
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else float("inf")
    students = plan(budget)
    if args.stage in ("all", "train") and not train(students, out, deadline):
        print("stopped at a checkpoint (--max-minutes); rerun the same command to continue", file=sys.stderr)
        return 3
    if args.stage in ("all", "evaluate"):
        from reproduce_studies import evaluate_studies

        if not evaluate_studies(budget, students, out, args.workers, deadline):
            print("stopped between runs (--max-minutes); rerun the same command to continue", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
