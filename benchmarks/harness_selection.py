"""Issue 25: a normalized student with and without its harness, chosen on meta-training validation, never on the
held-out suite.

The harness (docs/method.md#normalized: Newton-Schulz orthogonalization of the update of every tensor of rank >= 2,
AdamW for tensors of rank <= 1) is a switch of the student's config. This runs the student as it is and with the
harness switched on, at a few learning rates, on validation data carved from the training data of the mixture's
families: the Train CNN and the sigmoid MLP (1,000 validation digits of the training digits, ``selection_problem``)
and a byte-level LSTM and transformer LM (1,000 of the 4,000 training windows). Mean best log validation loss over
paired seeds, per problem and summed.

    python benchmarks/harness_selection.py amalgam-choice-large-quick --cache runs/harness-selection.json
"""

from __future__ import annotations

import argparse
import copy

from amalgam_plugin import hub
from amalgam_plugin.evaluate import evaluate
from amalgam_plugin.evaluate.baselines import student_factory
from amalgam_plugin.problems import Problem, language_model, make_problem, selection_problem
from amalgam_plugin.problems.text import CharLSTM, TinyTransformer

VARIANTS = ((False, 1e-3), (False, 3e-3), (True, 1e-3), (True, 3e-3), (True, 1e-2))  # (harness, lr)
SEEDS = (0, 1)


def problems() -> dict[str, Problem]:
    return {"train": make_problem("train"), "mlp": make_problem("mlp"),
            "lstm64": language_model(CharLSTM(64), "lstm64"),
            "tf64x2": language_model(TinyTransformer(64, 2), "tf64x2")}


def with_harness(student, on: bool):
    student = copy.deepcopy(student)
    student.config.orthogonalize = student.config.adamw_1d = on
    return student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("student", help="a normalized student (folder or bundled name)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--cache", help="the evaluation cache (a rerun runs nothing again)")
    args = parser.parse_args()
    student = hub.load_student(args.student)
    if student.config.student_type != "normalized":
        parser.error(f"{args.student!r} is a {student.config.student_type} student; it has no harness")
    totals: dict[str, float] = {}
    for name, problem in problems().items():
        candidates = {f"harness={'on' if on else 'off'} lr={lr:g}": student_factory(with_harness(student, on), lr=lr)
                      for on, lr in VARIANTS}
        evaluation = evaluate(selection_problem(problem), candidates, SEEDS, args.steps, cache=args.cache, workers=1,
                              progress=False)
        for label in candidates:
            mean = evaluation.mean(label)
            totals[label] = totals.get(label, 0.0) + mean
            print(f"{name}: {label}: {mean:.3f}", flush=True)
    for label, total in totals.items():
        print(f"sum over the four: {label}: {total:.3f}")


if __name__ == "__main__":
    main()
