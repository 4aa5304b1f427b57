"""Issue 25: horizon selection over the four validation families instead of the Train CNN alone.

Horizon selection (docs/method.md#horizon-selection) keeps the stage whose 1,000-step runs on validation digits
of the Train CNN are best; every normalized run so far then lost 0.24-0.51 from that stage to its last one. This
scores every stage checkpoint of the given meta-training work folders on the four validation families of
``harness_selection.problems`` (the Train CNN, the sigmoid MLP, a byte-level LSTM and transformer LM; data carved
from their training data), at 2e-3 (``--lr``), seeds 0-2, 1,000 steps (``--lengths``), beside the bundled
``normalized-choice-modern-mixaug`` (at 2e-3), summed over the four (lower is better); with ``--broad``, over six:
also a residual batch-norm CNN and a tabular regression, members of the families ``mix-broad`` adds
(``harness_variants.validation_families``). Never the held-out suite.

    python benchmarks/stage_selection.py runs/mixaug-seed1 runs/pes-mixaug --cache runs/harness-variants.json
    python benchmarks/stage_selection.py runs/broad --broad --cache runs/harness-variants.json
    python benchmarks/stage_selection.py runs/broad --export "broad stage1" runs/broad-stage1   # writes that stage
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import harness_variants  # beside this script: the four-family comparison

from amalgam_plugin import hub
from amalgam_plugin.engine.learner import load_checkpoint, student_weights

CHECKPOINT = Path("training/student/checkpoint.safetensors")  # the student phase's, under a run's --out folder


def stages(folder: Path) -> dict[str, object]:
    """``{"<folder> stageK": student}``: the folder's student with each stage's saved weights."""
    student = hub.load_student(str(folder))
    saved = load_checkpoint(folder / CHECKPOINT)[1]  # validated: readable, finite
    numbers = sorted({int(k.split(".")[0][5:]) for k in saved if k.startswith("stage")})
    found = {}
    for k in numbers:
        staged = copy.deepcopy(student)
        staged.load_state_dict(student_weights(saved, f"stage{k}."))
        found[f"{folder.name} stage{k}"] = staged
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="meta-training --out folders of normalized students")
    parser.add_argument("--cache", help="the evaluation cache (a rerun runs nothing again)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--broad", action="store_true", help="six validation families instead of four")
    parser.add_argument("--lr", type=float, default=2e-3, help="the rate every stage runs at (default: 2e-3)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000],
                        help="run lengths in steps, their scores summed (default: 1000)")
    parser.add_argument("--export", nargs=2, metavar=("STAGE", "FOLDER"),
                        help='write one stage ("<folder name> stageK") as a student folder instead of scoring')
    args = parser.parse_args()
    found = {}
    for folder in args.folders:
        if not (folder / CHECKPOINT).is_file():
            parser.error(f"{folder}: no {CHECKPOINT} (the work folder of a meta-training run is needed)")
        found |= stages(folder)
    if args.export:
        label, out = args.export
        if label not in found:
            parser.error(f"no stage {label!r}; found: {', '.join(sorted(found))}")
        if Path(out).exists():
            parser.error(f"{out} exists: not overwritten")
        print(f"written: {hub.save_student(found[label], out)}")
        return
    if args.lr <= 0:
        parser.error("--lr must be positive")
    variants = {label: (student, False, 2e-3 if label == "bundled" else args.lr) for label, student in
                {"bundled": hub.load_student(harness_variants.STUDENT), **found}.items()}
    harness_variants.compare_on_families("stages", variants, args.cache, args.workers, args.broad,
                                         tuple(args.lengths))


if __name__ == "__main__":
    main()
