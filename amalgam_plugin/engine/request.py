"""What an ``amalgamate`` call asks for, and every check of it: :func:`check_request` refuses a bad request with
one ValueError naming the bad value (and the valid ones) before any work is done or any file is written."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..amalgamation import IMITATION_SCHEDULES, MECHANISMS
from ..problems import PROBLEMS, Problem
from ..students import STUDENTS, ChoiceConfig, ChoiceNet, StudentConfig
from ..teachers import POOLS, TEACHERS, make_pool
from .curriculum import PhaseConfig
from .distributed import launched_world_size, resolve_device
from .outdir import check_out
from .perturbations import Perturbation
from .pes import check_memory, optimizee_size, state_floats
from .presets import PRESETS, Preset
from .selection import SELECT_FLAGS

DEFAULT_THREADS = 1
"""torch threads of meta-training. Measured on 2 cores (README, "Threads"): two threads are a third faster when
the machine is idle and more than twice as slow when one other process is busy; the evaluation runs in worker
processes of one thread each."""
MAX_TRAJECTORIES_PER_STEP = 1000
# student recipe settings a request changes through their own arguments, not ``settings``
SET_BY_OTHER_ARGUMENTS = {"select": "--select", "average_last_stage": "--select", "horizon_start": "--select",
                          "trajectories_per_step": "--trajectories-per-step", "perturbation": "--perturb",
                          "perturbation_magnitude": "--perturb-magnitude", "perturbation_steps": "--perturb-steps",
                          "mechanism": "--mechanism", "imitation_schedule": "--imitation"}


@dataclass(frozen=True)
class AmalgamateRequest:
    """The arguments of :func:`~amalgam_plugin.engine.amalgamate` (documented there)."""

    pool: str | list = "large"
    mechanism: str = "choice"
    preset: str | Preset = "quick"
    problem: str | Problem = "train"
    out: str | os.PathLike = "amalgam-student"
    seed: int = 0
    resume: bool = False
    max_minutes: float | None = None
    imitation: str = "il_more"
    evaluate: bool = True
    data_root: str | os.PathLike | None = None
    threads: int | None = DEFAULT_THREADS
    student: str | None = None  # None: the preset's
    full_eval: bool = False
    workers: int | None = None
    overwrite: bool = False
    perturbation: Perturbation | None = None
    trajectories_per_step: int | None = None
    device: str = "cpu"
    select: str | None = None
    settings: dict | None = None  # the student's recipe settings changed by name (``--set``)
    student_config: dict | None = None  # fields of the student's config.json changed by name (``--student-config``)

    @property
    def choice_phase(self) -> bool:
        """Whether a choice network is trained first (choice amalgamation with teachers)."""
        return self.mechanism == "choice" and self.imitation != "none"


def preset_of(request: AmalgamateRequest) -> Preset:
    preset = request.preset
    if not isinstance(preset, (str, Preset)):
        raise ValueError(f"preset must be a name ({PRESETS.valid()}) or a Preset, got {preset!r}")
    return preset if isinstance(preset, Preset) else PRESETS.lookup(preset)


def with_student_type(request: AmalgamateRequest) -> AmalgamateRequest:
    """``request`` with its student type named: the preset's where it names none."""
    return request if request.student is not None else replace(request, student=preset_of(request).student_type)


def check_request(request: AmalgamateRequest) -> None:
    """Every argument of ``request``, checked before any work."""
    r = with_student_type(request)
    for name in ("resume", "evaluate", "full_eval", "overwrite"):
        if not isinstance(getattr(r, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(r, name)!r}")
    if r.max_minutes is not None and not (_is_number(r.max_minutes) and r.max_minutes > 0):
        raise ValueError(f"max_minutes must be > 0, got {r.max_minutes}")
    _integer("seed", r.seed, -(2**63), 2**64 - 1)  # the range torch.Generator.manual_seed takes
    cpus = os.cpu_count() or 1
    if r.threads is not None:
        _integer("threads", r.threads, 1, cpus, f"between 1 and this machine's {cpus} CPUs")
    if r.workers is not None:  # the card's evaluation forks this many one-thread processes: no more than CPUs
        _integer("workers", r.workers, 1, cpus, f"between 1 and this machine's {cpus} CPUs")
    if r.select is not None and r.select not in SELECT_FLAGS:
        raise ValueError(f"unknown select {r.select!r}; valid: {', '.join(SELECT_FLAGS)}")
    check_settings(r.settings, preset_of(r).student)
    resolve_device(r.device)
    processes = launched_world_size()
    if r.trajectories_per_step is not None:
        _integer("trajectories per step", r.trajectories_per_step, processes, MAX_TRAJECTORIES_PER_STEP,
                 f"between the number of processes ({processes}) and {MAX_TRAJECTORIES_PER_STEP}")
    if not isinstance(r.out, (str, os.PathLike)):
        raise ValueError(f"out must be a folder path, got {r.out!r}")
    if r.data_root is not None and not isinstance(r.data_root, (str, os.PathLike)):
        raise ValueError(f"data_root must be a folder path, got {r.data_root!r}")
    MECHANISMS.lookup(r.mechanism)
    IMITATION_SCHEDULES.lookup(r.imitation)
    if isinstance(r.problem, str):
        PROBLEMS.lookup(r.problem)
    elif not isinstance(r.problem, Problem):
        raise ValueError(f"problem must be a name ({PROBLEMS.valid()}) or a Problem, got {r.problem!r}")
    if not STUDENTS.lookup(r.student).trainable:
        trainable = ", ".join(n for n, e in STUDENTS.items() if e.trainable)
        raise ValueError(f"student type {r.student!r} is not meta-trained by amalgamate; trainable: {trainable}")
    student_config_of(r)
    make_pool(r.pool)
    if r.choice_phase:
        choice_pool(r.pool)
    if r.perturbation is not None and not isinstance(r.perturbation, Perturbation):
        raise ValueError(f"perturbation must be a Perturbation, got {r.perturbation!r}")
    if r.perturbation is not None and r.perturbation.kind == "none" and (r.perturbation.magnitude or 0) > 0:
        raise ValueError("a perturbation magnitude was given without a perturbation kind (--perturb)")
    check_pes_memory(r, recipe_of(r, processes), processes)
    check_out(Path(r.out), r.overwrite)


def check_settings(settings: dict | None, recipe: PhaseConfig) -> None:
    """Each changed setting names one of the recipe's, not one another argument sets, with a value of its type
    (JSON's: an integer where a float is expected too; a list of the same kind of items; numbers finite and not
    negative, as every number of a recipe is). The recipe's own checks run when :func:`recipe_of` builds it."""
    if settings is None:
        return
    if not isinstance(settings, dict):
        raise ValueError(f"settings must be a dict of recipe settings by name, got {settings!r}")
    current = recipe.settings()
    for name, value in settings.items():
        if name in SET_BY_OTHER_ARGUMENTS:
            raise ValueError(f"the setting {name!r} has its own argument: {SET_BY_OTHER_ARGUMENTS[name]}")
        if name not in current:
            raise ValueError(f"unknown recipe setting {name!r}; valid: "
                             f"{', '.join(k for k in current if k not in SET_BY_OTHER_ARGUMENTS)}")
        if not _same_kind(value, current[name]):
            raise ValueError(f"the setting {name!r} takes a value like {json.dumps(current[name])}, got "
                             f"{json.dumps(value)}")


def _same_kind(value, like) -> bool:
    if isinstance(like, list):
        return isinstance(value, list) and len(value) > 0 and all(_same_kind(v, like[0]) for v in value)
    if _is_number(like):
        return (_is_number(value) and math.isfinite(value) and value >= 0
                and (isinstance(like, float) or isinstance(value, int)))
    return type(value) is type(like)


# fields of a student's config.json that are no choice of the run: the format and the record of its origin
NOT_STUDENT_CHOICES = ("format_version", "provenance")


def student_config_of(request: AmalgamateRequest) -> StudentConfig:
    """The config the run's student starts from: its type's defaults with ``request.student_config``'s fields
    (``{"orthogonalize": true}``), each checked by the config itself (a ValueError naming a bad one)."""
    config_class = STUDENTS.lookup(with_student_type(request).student).config
    changes = request.student_config or {}
    if not isinstance(changes, dict):
        raise ValueError(f"student_config must be a dict of config fields by name, got {changes!r}")
    valid = [f.name for f in fields(config_class) if f.name not in NOT_STUDENT_CHOICES]
    unknown = [name for name in changes if name not in valid]
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} of a {config_class.student_type} student's config; valid: "
                         f"{', '.join(valid)}")
    return config_class(**changes)


def recipe_of(request: AmalgamateRequest, processes: int) -> Preset:
    """The preset's recipe as ``request`` changes it: ``select``, ``settings``, the trajectories per meta-step (the
    request's, or one per process when a launcher started several) and the perturbation."""
    recipe = preset_of(request)
    student = recipe.student
    if request.select is not None:
        student = student.changed(**SELECT_FLAGS[request.select])
    if request.settings:
        student = student.changed(**request.settings)
    per_step = request.trajectories_per_step or (processes if processes > 1 else None)
    choice = recipe.choice
    if per_step is not None:
        choice = choice.changed(trajectories_per_step=per_step)
        student = student.changed(trajectories_per_step=per_step)
    p = request.perturbation
    if p is not None and p.active:
        if recipe.student.estimator.perturbation != "none":
            raise ValueError(f"preset {recipe.name!r} already perturbs ({recipe.student.estimator.perturbation}); "
                             "pass one or the other")
        student = student.changed(perturbation=p.kind, perturbation_magnitude=p.epsilon, perturbation_steps=p.steps)
    return replace(recipe, choice=choice, student=student)


def check_pes_memory(request: AmalgamateRequest, recipe: Preset, processes: int) -> None:
    """A phase meta-trained by PES whose particles would not fit in the free memory is refused before any work."""
    entry = STUDENTS.lookup(request.student)
    phases = [(recipe.student, lambda: entry.module(student_config_of(request)))]
    if request.choice_phase:
        phases.append((recipe.choice, lambda: ChoiceNet(ChoiceConfig(pool=choice_pool(request.pool)))))
    for phase, module in phases:
        if phase.estimator.gradient_estimator == "pes":
            held = -(-phase.estimator.trajectories_per_step // processes)  # this process's trajectories at once
            check_memory(optimizee_size(request.problem), state_floats(module()), phase.estimator.pes_pairs, held,
                         resolve_device(request.device))


def choice_pool(pool: str | list) -> list:
    """The choice network's own pool (docs/method.md#choice-pools) for a preset pool name; a custom pool is used
    as given."""
    if isinstance(pool, str) and f"choice-{pool}" in POOLS:
        return [[n, dict(kw)] for n, kw in POOLS[f"choice-{pool}"].members]
    teachers = make_pool(pool)
    for t in teachers:
        if t.name not in TEACHERS:
            raise ValueError(f"a choice network needs named, differentiable teachers; {t.name!r} is not one "
                             f"(valid: {TEACHERS.valid()})")
    return [[t.name, dict(t.hparams)] for t in teachers]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(name: str, value, low: int, high: int, bounds: str = "") -> None:
    """A ValueError unless ``value`` is an integer in [low, high] (``bounds`` says so in words)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be {bounds or f'an integer in [{low}, {high}]'}, got {value!r}")
