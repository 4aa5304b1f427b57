"""One ``amalgamate`` run, what ``amalgam amalgamate`` runs: the request checked, the output folder locked,
meta-training with its run record, then (rank 0) the student in Hub layout with its card and the run's summary.

Mean and min-max amalgamation train the student against the pool directly; choice amalgamation first trains a
choice network on the pool with the meta loss alone, then distils it into the student as the single teacher
(docs/method.md#mechanisms). Work files (checkpoints, JSONL logs, the run's config, its summary, the lock) live in
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
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..files import write_text_atomically
from ..problems import Problem, make_problem
from ..students import STUDENTS, ChoiceConfig, ChoiceNet
from ..teachers import Teacher, make_pool
from ..threads import torch_threads
from .card_evaluation import against_best_baseline, evaluate_student
from .curriculum import Curriculum, PhaseConfig, read_progress
from .distributed import Group, agreed, launched_group, resolve_device
from .outdir import RUN_CONFIG, WORKDIR, run_lock
from .perturbations import Perturbation
from .presets import Preset
from .provenance import model_card
from .request import (
    DEFAULT_THREADS,
    AmalgamateRequest,
    check_request,
    choice_pool,
    recipe_of,
    student_config_of,
    with_student_type,
)
from .unroll import frozen_choice_teacher

logger = logging.getLogger(__name__)

# what a resumed run must share with the one that wrote the checkpoints (the thread count too: matrix products
# sum in another order with another count, so the student would be one nobody can reproduce)
RUN_KEYS = ("pool", "mechanism", "preset", "problem", "seed", "imitation", "student", "student_config", "threads",
            "choice_recipe", "student_recipe", "device")


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
    student: str | None = None,
    full_eval: bool = False,
    workers: int | None = None,
    overwrite: bool = False,
    perturbation: Perturbation | None = None,
    trajectories_per_step: int | None = None,
    device: str = "cpu",
    select: str | None = None,
    settings: dict | None = None,
    student_config: dict | None = None,
) -> Path | None:
    """Amalgamate ``pool`` into a ``student`` (a trainable type of the student registry; None: the preset's
    ``student_type``) and write it to ``out`` in Hub layout, with a model card evaluating it on the held-out data.

    Returns the output folder, or None when ``max_minutes`` stopped the run at a checkpoint (rerun with
    ``resume=True`` to continue with exactly the numbers of an uninterrupted run). Every argument is checked before
    any work (:func:`~amalgam_plugin.engine.request.check_request`): a bad one is a ValueError.
    ``imitation="none"`` trains the α = 0 baseline (meta loss only, no teachers).
    ``threads``: torch threads of meta-training (restored afterwards; None: leave as is). The card's evaluation
    runs in ``workers`` processes of one thread each (None: one per CPU core); it is the preset's reduced
    evaluation, reusing the known baseline runs of ``KNOWN_RUNS``, unless ``full_eval`` (10 paired seeds, both
    forms of every teacher, everything re-run). ``OUT/training/summary.json`` holds the result against the best
    baseline and the times. A non-empty ``out`` that holds no earlier run is refused unless ``overwrite`` (with
    ``resume`` too); an ``out`` another run is writing is refused.
    ``perturbation``: the student's weights are perturbed during its meta-training (docs/method.md#perturbations).
    ``trajectories_per_step``: trajectories whose meta-gradients are averaged into one meta-update (None: the
    preset's, or the number of processes when a launcher started several; docs/method.md#distributed). Under
    ``torchrun``/``accelerate launch`` the processes share each meta-step's trajectories; rank 0 writes the student,
    the other processes return ``out`` once meta-training is done.
    ``device``: where meta-training runs, ``cpu`` or ``cuda`` (each process its own GPU under a launcher, NCCL);
    the card's evaluation runs on the CPU.
    ``select``: how the student's final checkpoint is chosen, one of ``SELECT_FLAGS`` (None: the preset's;
    docs/method.md#horizon-selection, docs/method.md#weight-averaging).
    ``settings``: the student's recipe settings changed by name (``{"depths": [1, 2, 5]}``; docs/method.md#presets),
    each to a value of its type; a setting another argument gives (``select``, ...) is refused here.
    ``student_config``: fields of the student's ``config.json`` changed by name before it is meta-trained
    (``{"orthogonalize": True, "adamw_1d": True}``: the normalized student's harness), each checked by the config.
    """
    return run(AmalgamateRequest(
        pool=pool, mechanism=mechanism, preset=preset, problem=problem, out=out, seed=seed, resume=resume,
        max_minutes=max_minutes, imitation=imitation, evaluate=evaluate, data_root=data_root, threads=threads,
        student=student, full_eval=full_eval, workers=workers, overwrite=overwrite, perturbation=perturbation,
        trajectories_per_step=trajectories_per_step, device=device, select=select,
        settings=settings, student_config=student_config))


def run(request: AmalgamateRequest) -> Path | None:
    """:func:`amalgamate` of a request."""
    place = resolve_device(request.device)
    out = Path(request.out)
    with ExitStack() as held:
        with launched_group(place) as group:
            agreed(group, lambda: check_request(request))
            request = with_student_type(request)
            recipe = recipe_of(request, group.size)
            problem = request.problem
            task = (make_problem(problem, request.data_root) if isinstance(problem, str) else problem).on(place)
            agreed(group, lambda: held.enter_context(run_lock(out)) if group.main else None)
            with caller_state_kept(request.threads):
                trained = _meta_train_run(request, recipe, task, group)
        if trained is None or not group.main:
            return None if trained is None else out
        with caller_state_kept(request.threads):
            return _finish(request, recipe, *trained)


@contextmanager
def caller_state_kept(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch threads (None: leave as is); afterwards the caller's thread count and global
    random state are as they were (modules built without a generator draw from the global one)."""
    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        yield


def _versions() -> dict:
    import huggingface_hub
    import safetensors

    return {"python": platform.python_version(), "torch": torch.__version__,
            "huggingface_hub": huggingface_hub.__version__, "safetensors": safetensors.__version__,
            "platform": platform.platform(), "cpu": cpu_name()}


def cpu_name() -> str:
    """The CPU's model name (Linux), else the architecture: float rounding, and so the student, depends on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown"


def run_config(request: AmalgamateRequest, recipe: Preset, task: Problem, processes: int, device: torch.device
               ) -> dict:
    """The run's record (``OUT/training/run_config.json``): what it was asked, its recipe, where and with what."""
    pool = request.pool
    return {"pool": pool if isinstance(pool, str) else list(map(str, pool)), "mechanism": request.mechanism,
            "preset": recipe.name, "problem": task.name, "data": task.data.name, "seed": request.seed,
            "imitation": request.imitation, "student": request.student,
            "student_config": request.student_config or {}, "full_eval": request.full_eval,
            "max_minutes": request.max_minutes, "choice_recipe": recipe.choice.settings(),
            "student_recipe": recipe.student.settings(), "notes": recipe.notes, "processes": processes,
            "device": device.type, "threads": torch.get_num_threads(), "versions": _versions(), "argv": sys.argv}


def _with_new_settings(config):
    """A run's config with the recipe settings added since it was written (the estimator's) at their defaults,
    and no change to the student's config where it has none, which is what that run did."""
    if not isinstance(config, dict):
        return config
    defaults = PhaseConfig().settings()
    return {"student_config": {}, **config, **{k: {**defaults, **config[k]} for k in ("choice_recipe", "student_recipe")
                                               if isinstance(config.get(k), dict)}}


def _check_same_run(path: Path, config: dict) -> None:
    """--resume continues only the run that wrote the checkpoints: the same pool, recipe, problem and seed."""
    if not path.exists():
        return
    try:
        saved = _with_new_settings(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise ValueError(f"--resume: the run's config {str(path)!r} is unreadable ({err}); use another --out or "
                         "drop --resume to start over") from err
    fresh = json.loads(json.dumps(config, default=str))
    changed = [k for k in RUN_KEYS if not isinstance(saved, dict) or saved.get(k) != fresh.get(k)]
    if changed:
        raise ValueError(f"--resume: {path.parent.parent} holds a different run (changed: {', '.join(changed)}); "
                         "use another --out or drop --resume to start over")


def _meta_train_run(request: AmalgamateRequest, recipe: Preset, task: Problem, group: Group):
    """Meta-training on ``task`` (on its device) with its run record; (student, task, config, started), or None
    when the deadline stopped it at a checkpoint."""
    workdir = Path(request.out) / WORKDIR
    config = run_config(request, recipe, task, group.size, task.device)
    if request.resume:
        agreed(group, lambda: _check_same_run(workdir / RUN_CONFIG, config))
    if group.main:
        write_text_atomically(workdir / RUN_CONFIG, json.dumps(config, indent=2, default=str))
    started = time.time()
    deadline = started + 60 * request.max_minutes if request.max_minutes is not None else None
    student = meta_train(request, recipe, task, workdir, deadline)
    if student is None:
        logger.warning("stopped at a checkpoint after %.1f min; rerun with --resume to continue",
                       (time.time() - started) / 60)
        return None
    return student, task, config, started


def meta_train(request: AmalgamateRequest, recipe: Preset, problem: Problem, workdir: Path,
               deadline: float | None) -> nn.Module | None:
    """Both phases on ``problem.device``; returns the trained student, or None when the deadline stopped it at a
    checkpoint. ``recipe.student`` carries the perturbation, which acts on the student's phase only."""
    seed, resume = request.seed, request.resume
    generator = torch.Generator().manual_seed(seed)
    student_cfg = recipe.student.changed(mechanism=request.mechanism, imitation_schedule=request.imitation)
    if request.choice_phase:
        chooser = ChoiceNet(ChoiceConfig(pool=choice_pool(request.pool)))
        chooser.reset_parameters(generator)
        chooser.to(problem.device)
        if not Curriculum(chooser, problem, [], recipe.choice, workdir / "choice", seed, "choice").run(
                resume=resume, deadline=deadline):
            return None
        chooser.requires_grad_(False).eval()
        teachers: list[Teacher] = [frozen_choice_teacher(chooser)]
    else:
        teachers = make_pool(request.pool) if request.imitation != "none" else []
    student = STUDENTS.lookup(request.student).module(student_config_of(request))
    student.reset_parameters(generator)
    student.to(problem.device)
    if not Curriculum(student, problem, teachers, student_cfg, workdir / "student", seed, "student").run(
            resume=resume, deadline=deadline):
        return None
    return student


def horizon_selection(log: Path) -> dict | None:
    """The ``horizon_selection`` event of a phase's log, or None when the phase did not select over the horizon."""
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return next((e for e in reversed(events) if e["event"] == "horizon_selection"), None)


def meta_training_seconds(workdir: Path, this_piece: float) -> float:
    """A resumed run's meta-training time over all its pieces: the periods' seconds its phases' checkpoints add
    up (``Progress.seconds``), or this piece's wall time where that is longer (it adds the set-up)."""
    periods = sum(read_progress(path).seconds for path in workdir.glob("*/checkpoint.safetensors"))
    return max(periods, this_piece)


def _finish(request: AmalgamateRequest, recipe: Preset, student, task, config, started) -> Path:
    """Rank 0 after meta-training: the student in Hub layout with its card, and the run's summary."""
    out, workdir = Path(request.out), Path(request.out) / WORKDIR
    student.requires_grad_(False).eval().cpu()
    task = task.reference().on("cpu")
    save_file(student.state_dict(), str(workdir / "student.safetensors"))
    trained = time.time()
    evaluation = (evaluate_student(student, request.pool, recipe, task, workdir, request.full_eval, request.workers)
                  if request.evaluate else None)
    from .. import hub

    evaluated = time.time()
    meta_training = meta_training_seconds(workdir, trained - started) if request.resume else trained - started
    seconds = {"meta_training": meta_training, "evaluation": evaluated - trained if evaluation else None,
               "resumed": request.resume}
    card = model_card(student, config, recipe, seconds, horizon_selection(workdir / "student" / "log.jsonl"))
    hub.save_student(student, out, card=card, evaluation=evaluation)
    summary = {"folder": str(out), "meta_training_seconds": round(meta_training, 1),
               "evaluation_seconds": round(evaluated - trained, 1), "threads": torch.get_num_threads(),
               "processes": config["processes"],
               **(against_best_baseline(evaluation) if evaluation is not None else {})}
    write_text_atomically(workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return out
