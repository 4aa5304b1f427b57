"""Meta-training driven by the curriculum (docs/method.md#curriculum): the control flow over stages, periods,
repeats and best-checkpoint reloads, validation, the log and the progress bar. The math of a meta-step is the
estimator's (``estimator.py``), averaging and applying meta-gradients the learner's (``learner.py``), the choice of
the final checkpoint ``selection.py``'s.

Checkpointed after every period so that ``--resume`` continues with exactly the numbers of an uninterrupted run.
Exact resumption comes from two rules: every random draw comes from a generator seeded by the run seed and the
position in the curriculum (phase, stage, period, attempt, trajectory), and a checkpoint holds everything else
(student and meta-optimizer tensors in one safetensors file, the bookkeeping as JSON in its metadata).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..amalgamation import imitation_weight
from ..problems import Problem
from ..teachers import Teacher
from .distributed import Group, current_group
from .estimator import Estimate, EstimatorConfig, TruncatedEstimator
from .learner import Learner, LearnerConfig, load_checkpoint, resume_from_latest, save_checkpoint
from .pes import PESEstimator
from .selection import SELECTIONS, horizon_candidates, select_over_horizon

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleConfig:
    """The curriculum of one phase (docs/method.md#curriculum): stages, periods, validation and the final choice.
    Lists are per stage; a shorter list repeats its last value."""

    depths: list[int] = field(default_factory=lambda: [1, 2, 5, 10])  # truncations per trajectory
    validation_depths: list[int] = field(default_factory=lambda: [2, 5, 10, 20])
    trajectories_per_period: int = 10
    validation_trajectories: int = 10
    warmup_unrolls: list[int] = field(default_factory=lambda: [1])
    min_periods: int = 6  # a stage runs periods 0..5 at least
    num_chances: int = 5  # then continues while period − best period < num_chances
    max_periods: int = 0  # a hard cap per stage for bounded recipes (0: none)
    max_repeat: int = 4
    repeat_threshold: float = 0.5
    # "best": best-validation checkpoint of the last stage; "last": the final period; "horizon": of the stages'
    # best-validation checkpoints, the one whose whole training runs reach the lowest validation loss (selection.py)
    select: str = "best"
    horizon_steps: int = 1000  # "horizon": steps of each run, the evaluation's horizon
    horizon_seeds: int = 2  # "horizon": runs per checkpoint
    horizon_start: bool = False  # "horizon": the student before meta-training is a candidate too
    # the last stage keeps the mean of the student's weights after each of its meta-updates (Polyak averaging)
    # instead of its best-validation checkpoint: one noisy meta-update cannot decide the student
    average_last_stage: bool = False
    validation_seed: int = 12345
    imitation_schedule: str = "il_more"  # the imitation weight per stage (docs/method.md#imitation-weight)

    def __post_init__(self):
        for name in ("depths", "validation_depths"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ValueError(f"{name} needs at least one truncation in every stage, got {getattr(self, name)}")
        if min(self.trajectories_per_period, self.validation_trajectories) < 1:
            raise ValueError(f"a period needs at least one trajectory and one validation trajectory, got "
                             f"{self.trajectories_per_period} and {self.validation_trajectories}")
        if self.select not in SELECTIONS:
            raise ValueError(f"unknown select {self.select!r}; valid: {', '.join(SELECTIONS)}")
        if self.select == "horizon" and not (self.horizon_steps >= 1 and self.horizon_seeds >= 1):
            raise ValueError(f"horizon selection needs positive steps and seeds, got {self.horizon_steps} and "
                             f"{self.horizon_seeds}")
        if self.horizon_start and self.select != "horizon":
            raise ValueError(f"horizon_start weighs the start in horizon selection: it needs select='horizon', got "
                             f"{self.select!r}")

    @property
    def stages(self) -> int:
        return len(self.depths)

    def at(self, values: list, stage: int):
        return values[min(stage, len(values) - 1)]


@dataclass(frozen=True)
class PhaseConfig:
    """One meta-training phase's recipe: its curriculum, its gradient estimator and its learner. Recorded (run
    config, model card) as one flat dict of settings, :meth:`settings`; :meth:`of` and :meth:`changed` take
    settings by name, each going to the config that owns it."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)

    @classmethod
    def of(cls, **settings) -> PhaseConfig:
        return cls().changed(**settings)

    def changed(self, **settings) -> PhaseConfig:
        """This recipe with the named settings changed; an unknown name is a ValueError."""
        parts = {part: getattr(self, part) for part in ("schedule", "estimator", "learner")}
        owners = {f.name: part for part, config in parts.items() for f in fields(config)}
        unknown = sorted(settings.keys() - owners.keys())
        if unknown:
            raise ValueError(f"unknown recipe settings {', '.join(unknown)}; valid: {', '.join(owners)}")
        return PhaseConfig(**{part: replace(config, **{k: v for k, v in settings.items() if owners[k] == part})
                              for part, config in parts.items()})

    def settings(self) -> dict:
        """Every setting by name, as recorded in a run's config and a model card's recipe."""
        return {**asdict(self.schedule), **asdict(self.estimator), **asdict(self.learner)}


AVERAGE = "average."  # the saved tensors of the last stage's weight average (``average_last_stage``)
STATS = ("loss", "meta_loss", "imitation", "steps", "skipped", "finite")  # an Estimate's fields, in a table row


def estimate_of(row: torch.Tensor) -> Estimate:
    loss, meta_loss, imitation, steps, skipped, finite = row.tolist()
    return Estimate(loss, meta_loss, imitation, int(steps), int(skipped), bool(finite))


def seed_for(*parts) -> int:
    """A 63-bit seed from the run seed and a position in the curriculum."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Progress:
    """The curriculum's bookkeeping; the JSON half of a checkpoint."""

    stage: int = 0
    period: int = 0
    attempt: int = 0
    repeats: int = 0
    best_validation: float = math.inf
    best_period: int = -1
    previous_validation: float | None = None
    previous_stage_best: float | None = None
    meta_steps: int = 0
    skipped_inner_steps: int = 0
    skipped_meta_steps: int = 0
    seconds: float = 0.0
    log_lines: int = 0  # lines of log.jsonl covered by this checkpoint (a resumed run drops the rest)
    done: bool = False
    history: list[dict] = field(default_factory=list)


def read_progress(path: Path) -> Progress:
    """The bookkeeping of a checkpoint file."""
    return Progress(**load_checkpoint(path)[0])


class Curriculum:
    """Runs one phase: meta-trains ``student`` on ``problem`` against ``teachers`` under ``config``."""

    def __init__(self, student: nn.Module, problem: Problem, teachers: list[Teacher], config: PhaseConfig,
                 workdir: Path, seed: int, phase: str = "student", group: Group | None = None):
        self.student, self.problem, self.teachers = student, problem, teachers
        self.cfg, self.per_step = config.schedule, config.estimator.trajectories_per_step
        self.unroll_length = config.estimator.unroll_length
        self.workdir, self.seed, self.phase = Path(workdir), seed, phase
        self.group = group or current_group()
        if self.group.size > self.per_step:
            raise ValueError(f"{self.group.size} processes need at least as many trajectories per meta-step, got "
                             f"{self.per_step}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.workdir / "checkpoint.safetensors"
        self.log_path = self.workdir / "log.jsonl"
        self.estimator = self._estimator(student, problem, teachers, config.estimator)
        self.learner = Learner(student, config.learner, self.group)
        self.progress = Progress()
        self.saved: dict[str, torch.Tensor] = {}  # best-of-stage and start-of-period tensors, the average's sums
        self.average_at_start: dict[str, torch.Tensor] = {}  # the average's tensors at the period's start

    def _estimator(self, student: nn.Module, problem: Problem, teachers: list[Teacher], config: EstimatorConfig):
        if config.gradient_estimator == "pes":
            held = -(-self.per_step // self.group.size)  # this process's trajectories at once
            return PESEstimator(student, problem, teachers, config, held)
        return TruncatedEstimator(student, problem, teachers, config)

    def _warmup_steps(self, stage: int) -> int:
        return self.cfg.at(self.cfg.warmup_unrolls, stage) * self.unroll_length

    def train_period(self) -> float:
        """Meta-train for one period; returns the mean training meta loss."""
        cfg, pr = self.cfg, self.progress
        alpha = imitation_weight(cfg.imitation_schedule, pr.stage) if self.teachers else 0.0
        losses: list[float] = []
        for first in range(0, cfg.trajectories_per_period, self.per_step):
            slots = range(first, min(first + self.per_step, cfg.trajectories_per_period))
            losses += self._train_together(list(slots), alpha)
        return sum(losses) / len(losses) if losses else math.inf

    def _train_together(self, slots: list[int], alpha: float) -> list[float]:
        """Trajectories ``slots`` side by side, each unrolled to the stage's depth, with one meta-update per
        truncation averaging their meta-gradients (this process runs the slots it owns); their meta losses."""
        cfg, pr = self.cfg, self.progress
        trajectories = {}
        for j, t in enumerate(slots):
            if self.group.owns(j):
                seed = seed_for(self.seed, self.phase, pr.stage, pr.period, pr.attempt, t)
                trajectories[j] = self.estimator.trajectory(torch.Generator().manual_seed(seed),
                                                            self._warmup_steps(pr.stage), with_teachers=alpha > 0)
        active, losses = list(range(len(slots))), []
        for u in range(cfg.at(cfg.depths, pr.stage)):
            if not active:
                break
            started = time.perf_counter()
            gradients = self.learner.gradient_table(len(slots))
            stats = torch.zeros(len(slots), len(STATS), dtype=torch.float64)
            for j in active:
                if j in trajectories:
                    est = self.estimator.estimate(trajectories[j], alpha)
                    stats[j] = torch.tensor([getattr(est, k) for k in STATS], dtype=torch.float64)
                    if est.finite:
                        self.learner.record(gradients, j)
            self.group.sum(stats)
            estimates = {j: estimate_of(stats[j]) for j in active}
            applied = [j for j in active if estimates[j].finite]
            self.learner.step(gradients, applied)
            if applied:
                self._add_to_average()
            seconds = round(time.perf_counter() - started, 3)
            for j in active:
                est = estimates[j]
                losses += [est.meta_loss] if est.finite else []
                pr.meta_steps += 1
                pr.skipped_meta_steps += not est.finite
                pr.skipped_inner_steps += int(est.skipped)
                self._log(dict(event="meta_step", phase=self.phase, stage=pr.stage, period=pr.period,
                               attempt=pr.attempt, trajectory=slots[j], unroll=u, meta_loss=est.meta_loss,
                               imitation=est.imitation, alpha=alpha, loss=est.loss, applied=est.finite,
                               inner_steps=int(est.steps), skipped_inner=int(est.skipped), seconds=seconds))
                self.bar.update(1)
            # a trajectory whose objective blew up ends there
            active = [j for j in active if estimates[j].steps >= self.unroll_length]
        return losses

    def validate(self) -> float:
        """Mean meta loss (α = 0) on fixed-seed trajectories of the next stage's depth, training digits only."""
        cfg, stage = self.cfg, self.progress.stage
        values = torch.zeros(cfg.validation_trajectories, dtype=torch.float64)
        for t in range(cfg.validation_trajectories):
            if self.group.owns(t):
                gen = torch.Generator().manual_seed(seed_for(cfg.validation_seed, t))
                traj = self.estimator.trajectory(gen, self._warmup_steps(stage), with_teachers=False)
                values[t] = self.estimator.evaluate(traj, cfg.at(cfg.validation_depths, stage))
        total = 0.0
        for value in self.group.sum(values).tolist():
            if not math.isfinite(value):
                return math.inf
            total += value
        return total / max(cfg.validation_trajectories, 1)

    # -- the curriculum's control flow ------------------------------------------------------------------

    def _should_repeat(self, train_loss: float, validation: float) -> bool:
        pr, cfg = self.progress, self.cfg
        if pr.repeats >= cfg.max_repeat or (pr.stage == 0 and pr.period == 0):
            return False
        if pr.period == 0:
            reference, value = pr.previous_stage_best, train_loss
        else:
            reference, value = pr.previous_validation, validation
        if reference is None or not math.isfinite(reference):
            return not math.isfinite(value)
        return not value <= reference + cfg.repeat_threshold * abs(reference)

    def _stage_over(self) -> bool:
        pr, cfg = self.progress, self.cfg
        periods_done = pr.period + 1
        if cfg.max_periods and periods_done >= cfg.max_periods:
            return True
        return periods_done >= cfg.min_periods and pr.period - pr.best_period >= cfg.num_chances

    def run(self, resume: bool = False, deadline: float | None = None) -> bool:
        """Run to the end (True) or until the next period would pass ``deadline`` (False, resumable)."""
        resumed = resume and self._resume()
        if resumed:
            logger.info("resumed %s at stage %d period %d", self.phase, self.progress.stage, self.progress.period)
            if self.group.main:
                lines = self.log_path.read_text().splitlines(keepends=True) if self.log_path.exists() else []
                self.log_path.write_text("".join(lines[: self.progress.log_lines]))
        elif self.group.main and self.log_path.exists():  # a fresh start (or nothing to resume from): a fresh log
            self.log_path.unlink()
        pr = self.progress
        if not resumed and self.cfg.select == "horizon" and self.cfg.horizon_start:
            self.saved.update(self.learner.snapshot("initial."))
        self.bar = tqdm(total=pr.meta_steps + self.remaining_meta_steps(), initial=pr.meta_steps,
                        desc=f"amalgam {self.phase}", unit="meta-step", dynamic_ncols=True,
                        disable=not self.group.main)
        last_period_seconds = 0.0
        try:
            while not pr.done:
                late = deadline is not None and time.time() + last_period_seconds > deadline
                if self.group.main_says(late):
                    return False
                started = time.perf_counter()
                self.saved.update(self.learner.snapshot("start."))
                self.average_at_start = {k: v.clone() for k, v in self.saved.items() if k.startswith(AVERAGE)}
                train_loss = self.train_period()
                validation = self.validate()
                self._end_period(train_loss, validation)
                last_period_seconds = time.perf_counter() - started
                pr.seconds += last_period_seconds
                self._checkpoint()
                self.bar.total = pr.meta_steps + self.remaining_meta_steps()
                self.bar.refresh()
        finally:
            self.bar.close()
        self._restore_final()
        return True

    def _end_period(self, train_loss: float, validation: float) -> None:
        pr, cfg = self.progress, self.cfg
        record = dict(event="period", phase=self.phase, stage=pr.stage, period=pr.period, attempt=pr.attempt,
                      train_meta_loss=train_loss, validation=validation)
        if self._should_repeat(train_loss, validation):
            record["repeated"] = True
            self._log(record)
            pr.history.append(record)
            self.learner.restore(self.saved, "start.")
            self.saved = {**{k: v for k, v in self.saved.items() if not k.startswith(AVERAGE)}, **self.average_at_start}
            pr.repeats += 1
            pr.attempt += 1
            return
        self._log(record)
        pr.history.append(record)
        if validation < pr.best_validation or pr.best_period < 0:
            pr.best_validation, pr.best_period = validation, pr.period
            self.saved.update(self.learner.snapshot("best."))
        pr.previous_validation, pr.repeats, pr.attempt = validation, 0, 0
        if not self._stage_over():
            pr.period += 1
            return
        if cfg.select != "last":  # stage transitions and the final model reload the stage's best period
            self.learner.restore(self.saved, "best.")
        if cfg.average_last_stage and pr.stage == cfg.stages - 1:
            self._load_average()
        if cfg.select == "horizon":
            self.saved.update(self.learner.snapshot(f"stage{pr.stage}."))
        if pr.stage == cfg.stages - 1:
            pr.done = True
            if cfg.select == "horizon":
                self._select_over_horizon()
            self.saved.update(self.learner.snapshot("final."))
            return
        pr.previous_stage_best = pr.best_validation
        pr.stage, pr.period, pr.best_validation, pr.best_period = pr.stage + 1, 0, math.inf, -1

    def _add_to_average(self) -> None:
        """``average_last_stage``: the running float64 sum of the student's weights after each meta-update of the
        last stage, and their count (kept with the checkpoint, so a resumed run averages the same weights)."""
        if not (self.cfg.average_last_stage and self.progress.stage == self.cfg.stages - 1):
            return
        for name, value in self.student.state_dict().items():
            weights = value.detach().to("cpu", torch.float64, copy=True)
            key = f"{AVERAGE}weights.{name}"
            self.saved[key] = self.saved[key] + weights if key in self.saved else weights
        self.saved[f"{AVERAGE}count"] = self.saved.get(f"{AVERAGE}count", torch.zeros((), dtype=torch.float64)) + 1

    def _load_average(self) -> None:
        """The student's weights become the last stage's average (unchanged when the stage made no update)."""
        if f"{AVERAGE}count" not in self.saved:
            return
        count, prefix = self.saved[f"{AVERAGE}count"], f"{AVERAGE}weights."
        means = {k[len(prefix):]: v / count for k, v in self.saved.items() if k.startswith(prefix)}
        self.student.load_state_dict(means)  # cast to the student's dtype and device

    def _select_over_horizon(self) -> None:
        cfg = self.cfg
        candidates = horizon_candidates(cfg.stages, cfg.horizon_start)
        scores = select_over_horizon(self.learner, self.saved, self.problem, candidates, cfg.horizon_steps,
                                     cfg.horizon_seeds, self.group)
        record = dict(event="horizon_selection", phase=self.phase, **scores)
        self._log(record)
        self.progress.history.append(record)

    def _resume(self) -> bool:
        """Every process resumes from the same checkpoint, or none does (one clear error on every process)."""
        try:
            resumed, error = resume_from_latest(self.ckpt_path, self._restore_checkpoint), None
        except ValueError as err:
            resumed, error = False, err
        same = self.group.same_everywhere(self.progress.meta_steps if resumed else -1)
        if not self.group.all_agree(error is None and same):
            raise error or ValueError(f"the processes found different checkpoints in {str(self.workdir)!r}: every "
                                      "process must see the same output folder (a shared filesystem)")
        return resumed

    def _restore_checkpoint(self, progress: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.learner.restore(tensors, "current.")
        self.progress = Progress(**progress)
        self.saved = {k: v for k, v in tensors.items() if not k.startswith("current.")}

    def _restore_final(self) -> None:
        self.learner.restore(self.saved, "final.")

    def _checkpoint(self) -> None:
        if not self.group.main:
            return
        keep = {k: v for k, v in self.saved.items() if not k.startswith("start.")}
        save_checkpoint(self.ckpt_path, asdict(self.progress), {**keep, **self.learner.snapshot("current.")})

    def remaining_meta_steps(self) -> int:
        """Meta-steps still to run if every stage stops as early as it may (no repeats): the progress bar's total
        grows by a period's worth whenever a stage takes another chance, and never runs past it."""
        cfg, pr = self.cfg, self.progress
        if pr.done:
            return 0

        def periods(at_least: int) -> int:
            return min(at_least, cfg.max_periods) if cfg.max_periods else at_least

        per_period = [cfg.trajectories_per_period * cfg.at(cfg.depths, s) for s in range(cfg.stages)]
        now = max(periods(max(cfg.min_periods, 1)) - pr.period, 1) * per_period[pr.stage]
        return now + sum(periods(max(cfg.min_periods, 1)) * per_period[s] for s in range(pr.stage + 1, cfg.stages))

    def _log(self, record: dict) -> None:
        if self.group.main:
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.progress.log_lines += 1
