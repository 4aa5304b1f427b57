"""Amalgamate a student with a preset, then evaluate it by docs/method.md#evaluation on the held-out digits against:
the α = 0 RNNProp baseline meta-trained on the same student recipe, every pool member in the paper's form and in
torch's textbook form, torch Adam tuned on the training digits, and the paper's pre-trained choice-large
student: by default the bundled ``paper-choice-large`` (the replicate of the 8 chosen on the training digits by
benchmarks/select_paper_students.py); with ``--paper-students DIR`` (the authors' release converted to .npz, see
benchmarks/select_paper_students.py) the median of its 8 replicates, ranked on the training digits.

Prints each optimizer's mean best log held-out loss, the paired differences to the new student with 95%
intervals, and the meta-training wall time. Resumable: rerun the same command (meta-training resumes from its
checkpoints, finished evaluation runs are cached).

    python benchmarks/amalgamate.py --preset quick            # ~15 min meta-training x 2, then the evaluation
    python benchmarks/amalgamate.py --preset cpu --max-minutes 170
    python benchmarks/amalgamate.py --preset quick --paper-students DIR    # against the median paper replicate
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from amalgam_plugin import evaluate as ev
from amalgam_plugin.engine import amalgamate
from amalgam_plugin.hub import load_student, student_from_npz
from amalgam_plugin.problems import make_problem

REPO = Path(__file__).resolve().parents[1]
SELECTION = REPO / "benchmarks" / "results" / "paper_selection.json"
BUNDLED_PAPER = "paper-choice-large"


def median_paper_replicate(variant: str = "choice-large") -> tuple[str, float]:
    """The replicate with the median selection score (training digits only) among the paper's 8."""
    scores: dict[str, list[float]] = {}
    for runs in json.loads(SELECTION.read_text()).values():
        for key, run in runs.items():
            name = key.split("|")[0]
            if name.rsplit("-", 1)[0] == variant:
                scores.setdefault(name, []).append(run["best_log_val"])
    if not scores:
        raise SystemExit(f"no {variant} scores in {SELECTION}; run benchmarks/select_paper_students.py first")
    ranked = sorted(scores, key=lambda n: np.mean(scores[n]))
    name = ranked[(len(ranked) - 1) // 2]
    return name, float(np.mean(scores[name]))


def paper_comparison(paper_students: str | None) -> tuple[str, str, str]:
    """(row label, student source, one line on how it was chosen) of the paper's choice-large student: the
    median replicate of ``paper_students/choice-large-{1..8}.npz``, or else the bundled one."""
    if paper_students is not None:
        from select_paper_students import require_paper_students

        folder = require_paper_students(paper_students, [f"choice-large-{rep}" for rep in range(1, 9)])
        name, score = median_paper_replicate()
        how = f"{name} from {folder}, the median of 8 by mean best log loss {score:.3f} on training digits"
        return f"paper {name} (median of 8)", str(folder / f"{name}.npz"), how
    provenance = load_student(BUNDLED_PAPER).config.provenance
    selection = provenance.get("selection", {})
    stem = selection.get("chosen") or provenance.get("source_file", "?").removesuffix(".npz")
    score = selection.get("scores", {}).get(stem, {}).get("mean_best_log_val", float("nan"))
    how = (f"bundled {BUNDLED_PAPER} = {stem}, the best of 8 by mean best log loss {score:.3f} on training digits "
           "(--paper-students DIR compares against the median replicate instead)")
    return f"paper {stem} (bundled)", BUNDLED_PAPER, how


def paper_student(source: str):
    return student_from_npz(source) if source.endswith(".npz") else load_student(source)


def _train(args, imitation: str, out: Path, deadline: float) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    minutes = max((deadline - time.time()) / 60, 1e-6)
    amalgamate(pool=args.pool, mechanism=args.mechanism, preset=args.preset, problem=args.problem, out=out,
               seed=args.seed, resume=True, max_minutes=minutes, imitation=imitation, evaluate=False)


def meta_training_seconds(out: Path) -> float:
    """Meta-training time recorded in the checkpoints (sums the phases; survives resumption)."""
    from amalgam_plugin.engine.curriculum import read_progress

    paths = [out / "training" / phase / "checkpoint.safetensors" for phase in ("choice", "student")]
    return sum(read_progress(p).seconds for p in paths if p.exists())


def run_side_by_side(target, arg_lists: list[tuple], what: str) -> None:
    """Run ``target(*args)`` for each argument tuple in its own process and wait for all of them."""
    procs = [mp.get_context("spawn").Process(target=target, args=args) for args in arg_lists]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a {what} process failed (exit {p.exitcode})")


def train_both(args, workdir: Path, deadline: float) -> None:
    """The new student and the alpha = 0 baseline, side by side in two processes (one thread each)."""
    run_side_by_side(_train, [(args, "il_more", workdir / "student", deadline),
                              (args, "none", workdir / "alpha0", deadline)], "meta-training")


def optimizers(args, student_dir: Path, baseline_dir: Path, paper: tuple[str, str], tuned) -> dict:
    label, source = paper
    return {
        "new student": ev.student_factory(load_student(str(student_dir))),
        "alpha=0 RNNProp": ev.student_factory(load_student(str(baseline_dir))),
        label: ev.student_factory(paper_student(source)),
        **ev.pool_baselines(args.pool, forms=("paper", "torch")),
        tuned.name: tuned.factory,
    }


def _worker(args, names: list[str], cache: str, student_dir, baseline_dir, paper, tuned) -> None:
    torch.set_num_threads(1)
    all_factories = optimizers(args, student_dir, baseline_dir, paper, tuned)
    ev.evaluate(make_problem(args.problem), {n: all_factories[n] for n in names}, list(range(args.seeds)),
                args.steps, cache=cache, progress=False)


def evaluate_in_parallel(args, factories: dict, workdir: Path, *context) -> None:
    """Fill per-worker caches in ``args.workers`` processes; the caller then reads them all back."""
    names = list(factories)
    chunks = [names[i :: args.workers] for i in range(args.workers)]
    run_side_by_side(_worker, [(args, chunk, str(workdir / f"cache_{i}.json"), *context)
                               for i, chunk in enumerate(chunks)], "evaluation")


def merged_cache(workdir: Path) -> Path:
    merged = {}
    for path in sorted(workdir.glob("cache_*.json")):
        merged.update(json.loads(path.read_text()))
    out = workdir / "cache.json"
    out.write_text(json.dumps(merged))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", choices=["quick", "cpu", "paper", "smoke"])
    parser.add_argument("--pool", default="large")
    parser.add_argument("--mechanism", default="choice")
    parser.add_argument("--problem", default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=10, help="paired evaluation seeds (>= 10 for the report)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="evaluation processes (1 thread each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per meta-training process")
    parser.add_argument("--max-minutes", type=float, default=600, help="meta-training budget of this call")
    parser.add_argument("--out", default=None, help="work folder (default benchmarks/runs/PRESET)")
    parser.add_argument("--paper-students", default=None, metavar="DIR",
                        help="folder with the authors' choice-large-1.npz .. choice-large-8.npz: compare against the "
                             "median replicate (default: the bundled paper-choice-large)")
    parser.add_argument("--bundle", default=None, help="also save the new student, with this evaluation in its "
                                                       "card, to this folder (e.g. hub_models/NAME)")
    args = parser.parse_args(argv)
    paper_label, paper_source, paper_how = paper_comparison(args.paper_students)  # checks DIR before training
    workdir = Path(args.out or REPO / "benchmarks" / "runs" / args.preset)
    workdir.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60 * args.max_minutes

    train_both(args, workdir, deadline)
    student_dir, baseline_dir = workdir / "student", workdir / "alpha0"
    student_seconds, baseline_seconds = meta_training_seconds(student_dir), meta_training_seconds(baseline_dir)
    if not (student_dir / "model.safetensors").exists() or not (baseline_dir / "model.safetensors").exists():
        print("meta-training stopped at a checkpoint (--max-minutes); rerun the same command to continue")
        return 3

    problem = make_problem(args.problem)
    seeds = list(range(args.seeds))
    tuned = ev.tune_adam(problem, seeds[:3], args.steps, cache=workdir / "tuning.json", progress=False)
    context = (student_dir, baseline_dir, (paper_label, paper_source), tuned)
    factories = optimizers(args, *context)
    evaluate_in_parallel(args, factories, workdir, *context)
    evaluation = ev.evaluate(problem, factories, seeds, args.steps, reference="new student",
                             notes={tuned.name: tuned.how}, cache=merged_cache(workdir), progress=False)
    evaluation.add_oracle([n for n in factories if n.endswith("(paper)")], label="oracle (best paper-form member)")

    print(f"# amalgamate benchmark: preset {args.preset}, {args.mechanism} amalgamation of the {args.pool} pool "
          f"on {args.problem}, meta-training seed {args.seed}")
    print(f"meta-training wall time: new student {student_seconds / 60:.1f} min, "
          f"alpha=0 baseline {baseline_seconds / 60:.1f} min (side by side, {args.threads} thread(s) each)")
    print(f"paper student: {paper_how}")
    print(f"evaluation: {len(seeds)} paired seeds x {args.steps} steps on the {len(problem.data.heldout()[0])} "
          "held-out digits; difference = optimizer - new student (negative: better than the new student)\n")
    print(evaluation.table(fmt="plain"))
    print(f"\nadam tuning: {tuned.how}")
    (workdir / "report.md").write_text(evaluation.table(fmt="markdown"))
    if args.bundle:
        bundle(args, student_dir, evaluation)
    return 0


def bundle(args, student_dir: Path, evaluation) -> None:
    """Save the new student with this evaluation in its card (e.g. into hub_models/)."""
    from amalgam_plugin.engine import model_card
    from amalgam_plugin.engine.presets import get_preset
    from amalgam_plugin.hub import save_student

    config = json.loads((student_dir / "training" / "run_config.json").read_text())
    student = load_student(str(student_dir))
    card = model_card(student, config, get_preset(config["preset"]))
    card = replace(card, seeds={**card.seeds, "evaluation": evaluation.seeds},
                   notes=[*card.notes, f"evaluated by `python benchmarks/amalgamate.py --preset {args.preset}` "
                          f"({len(evaluation.seeds)} paired seeds; the table's reference is this student)"])
    save_student(student, args.bundle, card=card, evaluation=evaluation, reference="new student")
    print(f"bundled the new student into {args.bundle}")


if __name__ == "__main__":
    sys.exit(main())
