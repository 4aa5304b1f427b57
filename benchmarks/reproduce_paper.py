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

# the quick preset's budget with its former three student stages, the paper's final rule (the last stage's
# best-validation checkpoint) and its RNNProp student: these studies reproduce the paper's claims, not today's
# default job
QUICK = replace(PRESETS["quick"], student=PRESETS["quick"].student.changed(
    depths=[1, 2, 5], validation_depths=[2, 5, 10], select="best", average_last_stage=False, horizon_start=False))
# (c)'s recipe: a shortened quick preset, cheap enough for 8 replicates of every setting
STABILITY = Preset(
    "stability", "the quick preset with 4 trajectories per period and exactly 2 periods per stage (study c)",
    QUICK.choice, QUICK.student.changed(trajectories_per_period=4, min_periods=2, max_periods=2, num_chances=0),
    eval_seeds=3, eval_textbook=False, notes=["study (c) recipe: 3 stages x 2 periods x 4 trajectories"])


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
    problems: dict[str, int]  # (a) and (b)'s suite: problem -> paired seeds
    stability_seeds: int  # evaluation seeds of (c) and (d), per replicate
    off_problems: tuple[str, ...]  # (d)'s problems
    forms: tuple[str, ...] = ("paper",)  # the teachers' forms among (b)'s baselines
    steps: int = 1000


BUDGETS = {
    "small": Budget(QUICK, 1, STABILITY, 8,
                    (("none", 0.0), ("gaussian-adaptive", 1e-3), ("gaussian-adaptive", 1e-2),
                     ("pgd-adaptive-clipped", 1e-3)),
                    problems={"train": 5, "mlp": 5, "smallbatch": 3, "wider": 2, "deeper": 2}, stability_seeds=2,
                    off_problems=("train",)),
    # seconds: the whole pipeline on a few steps (the test suite runs it; its numbers mean nothing)
    "smoke": Budget(PRESETS["smoke"], 1, PRESETS["smoke"], 2, (("none", 0.0), ("gaussian-adaptive", 1e-2)),
                    problems={"mlp": 2}, stability_seeds=2, off_problems=("train",), steps=30),
    "full": Budget(PRESETS["cpu"], 8, QUICK, 8,
                   (("none", 0.0), ("gaussian-adaptive", 5e-4), ("gaussian-adaptive", 1e-3),
                    ("gaussian-adaptive", 2e-3), ("gaussian-adaptive", 5e-3), ("gaussian-adaptive", 1e-2),
                    ("pgd-adaptive-clipped", 1e-4), ("pgd-adaptive-clipped", 1e-3)),
                   problems={p: 10 for p in ("train", "mlp", "smallbatch", "wider", "deeper", "train-mnist",
                                             "fmnist")},
                   stability_seeds=5, off_problems=("train", "smallbatch", "wider"), forms=("paper", "torch")),
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
                          imitation=s.imitation, evaluate=False, perturbation=s.perturbation, student="rnnprop")
        if done is None:
            return False
    return True


# --- evaluation -----------------------------------------------------------------------------------------------


def _candidates(students: list[Student], out: Path, study: str) -> list:
    """One candidate per label, or a replicate group where a label has several replicates."""
    from amalgam_plugin import suite

    labels = list(dict.fromkeys(s.label for s in students if s.study == study))
    found = []
    for label in labels:
        replicates = [s for s in students if s.label == label]
        if len(replicates) == 1:
            found.append(suite.student_candidate(str(out / replicates[0].folder), label))
        else:
            found += suite.replicate_group(str(out / "students" / label / "r*"), label)
    return found


def evaluate_studies(budget: Budget, students: list[Student], out: Path, workers: int, deadline: float) -> bool:
    """Each study's suite (cached, so a rerun resumes), then ``results.md``; False when the deadline came first
    (checked between problems)."""
    from amalgam_plugin import suite

    main_students = _candidates(students, out, "a") + _candidates(students, out, "b")
    choice_large = [c for c in main_students if c.label.startswith("choice-large")]
    main_students = choice_large + [c for c in main_students if c not in choice_large]  # the reference first
    stability = _candidates(students, out, "c")
    results = {}
    main_jobs = [("ab", problem, main_students, seeds, "large") for problem, seeds in budget.problems.items()]
    # the training problem first, then the perturbation studies, then the rest of the suite (costliest last)
    jobs = [*main_jobs[:1], ("c", "mlp", stability, budget.stability_seeds, None)]
    jobs += [("d", problem, stability, budget.stability_seeds, None) for problem in budget.off_problems]
    jobs += main_jobs[1:]
    for study, problem, candidates, seeds, pool in jobs:
        if time.time() > deadline:
            return False
        print(f"[evaluate] study {study} on {problem}, {seeds} seeds", flush=True)
        folder = out / "evaluate" / f"{study}-{problem}"
        results[(study, problem)] = suite.run_suite(candidates, [problem], list(range(seeds)), folder, budget.steps,
                                                    pool=pool, forms=budget.forms, workers=workers)
        (out / "results.md").write_text(report(budget, results))  # what is done so far, rewritten as it grows
    print(f"written: {out / 'results.md'}")
    return True


def _row(result, problem: str, name: str) -> dict | None:
    return next((r for r in result.optimizer_rows(problem) if r["name"] == name), None)


def _diff(row: dict | None) -> str:
    if row is None:
        return "n/a"
    return "reference" if row["diff"] is None else str(row["diff"])


def report(budget: Budget, results: dict) -> str:
    """The claim-by-claim tables of README "Results"."""
    from amalgam_plugin.suite import fmt_number

    lines = [f"# Reproduction at CPU scale ({budget.main_preset.name} recipe for (a) and (b), "
             f"{budget.stability_preset.name} recipe for (c) and (d))", "",
             "Best log held-out loss: mean over paired seeds (lower is better). Δ: paired difference to the "
             "large-pool choice student with its 95% t-interval (negative: better than that student).", ""]
    lines += ["## (a) Mechanisms and (b) the student against its baselines", ""]
    for (study, problem), result in results.items():
        if study != "ab":
            continue
        lines += [f"### {problem} ({len(result.problems[problem].seeds)} seeds)", "",
                  "| optimizer | best log held-out | Δ vs choice-large [95% CI] | final log train |",
                  "| --- | --- | --- | --- |"]
        for row in result.optimizer_rows(problem):
            lines.append(f"| {row['name']} | {fmt_number(row['best_log_heldout'])} | {_diff(row)} | "
                         f"{fmt_number(row['final_log_train'])} |")
        lines.append("")
    for study, title in (("c", "(c) Meta-stability against the perturbation (training problem: mlp)"),
                         ("d", "(d) The same students off their training problem")):
        for (s, problem), result in results.items():
            if s != study:
                continue
            lines += [f"## {title}: {problem}", "",
                      "| setting | replicates | best log held-out [95% CI] | σ_meta | final log train | "
                      "σ_meta (train) | σ_eval (train) |", "| --- | --- | --- | --- | --- | --- | --- |"]
            for g in result.group_rows(problem):
                b, t = g["best_log_heldout"], g["final_log_train"]
                lines.append(f"| {g['group']} | {g['replicates']} | {fmt_number(b['mean'])} [{fmt_number(b['low'])}, "
                             f"{fmt_number(b['high'])}] | {fmt_number(b['meta_std'])} | {fmt_number(t['mean'])} | "
                             f"{fmt_number(t['meta_std'])} | {fmt_number(t['eval_std'])} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=list(BUDGETS), default="small")
    parser.add_argument("--stage", choices=("all", "train", "evaluate"), default="all")
    parser.add_argument("--studies", default="abc",
                        help="which studies' students to meta-train (default abc; d reuses c's): run two "
                             "processes with --studies ab and --studies c to use two cores")
    parser.add_argument("--out", default=None)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--workers", type=int, default=2, help="evaluation worker processes (1 thread each)")
    args = parser.parse_args(argv)
    budget = BUDGETS[args.budget]
    out = Path(args.out or REPO / "benchmarks" / "results" / f"reproduce-{args.budget}")
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else float("inf")
    students = plan(budget)
    if args.stage in ("all", "train") and not train([s for s in students if s.study in args.studies], out, deadline):
        print("stopped at a checkpoint (--max-minutes); rerun the same command to continue", file=sys.stderr)
        return 3
    if args.stage in ("all", "evaluate"):
        if not evaluate_studies(budget, students, out, args.workers, deadline):
            print("stopped between runs (--max-minutes); rerun the same command to continue", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
