"""``amalgam evaluate``: optimizers on a suite of problems under the project's protocol (docs/method.md#evaluation).

Each problem runs every candidate (a student: bundled name, folder or repo id; or any torch optimizer by dotted
name, ``torch.optim.AdamW:lr=1e-3``) and every replicate of each ``--replicates`` group on the same paired seeds,
beside the baselines: the pool's teachers in both forms, the oracle and torch Adam tuned on the training digits.
Metrics per optimizer: best log held-out loss, final log training loss, optimization stability, evaluation
stability; per replicate group also meta-stability, the replicate-to-replicate spread with the evaluation noise
removed (:func:`variance_components`).

The output folder holds ``amalgam-evaluate.json`` (the marker that it is an ``amalgam evaluate`` folder),
``cache.json`` (finished runs: an interrupted evaluation resumes), ``candidates.json`` (what each label was, so
a changed student's runs are dropped), ``results.json``, ``results.md`` and ``plots/`` (per problem: held-out
curves with bands, a bar chart with intervals, held-out loss against training time).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import evaluate as ev
from .cards import embed_evaluation
from .evaluate.cache import canonical, key_fields, load_runs, save_runs, specification
from .evaluate.metrics import METRICS
from .evaluate.report import markdown_cell
from .evaluate.statistics import nanmean, nanstd, variance_components
from .files import write_text_atomically
from .problems import evaluable_problem, make_problem
from .teachers import parse_spec, torch_optimizer

logger = logging.getLogger(__name__)

MARKER = "amalgam-evaluate.json"
MARKER_CONTENT = {"written_by": "amalgam evaluate (amalgam-plugin)", "folder_format": 1}
SUITE_METRICS = ("best_log_heldout", "final_log_train", "optimization_stability")  # per run, averaged over runs
GROUP_METRICS = ("best_log_heldout", "final_log_train")  # per replicate group: variance components


def run_metrics(run: ev.RunResult) -> dict[str, float]:
    return {name: METRICS[name].of(run) for name in SUITE_METRICS}


# --- what is evaluated ---------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """A named, specified optimizer factory; a changed specification (another student under the same label)
    invalidates its cached runs."""

    label: str
    factory: ev.Specified
    group: str | None = None  # the replicate group it belongs to

    @property
    def spec(self) -> dict:
        return specification(self.label, self.factory)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def optimizer_candidate(spec: str) -> Candidate:
    """A torch optimizer by dotted class name with ``key=value`` arguments: ``torch.optim.AdamW:lr=1e-3``."""
    name, kwargs = parse_spec(spec)
    for key, value in kwargs.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{_short(name)}: {key}={_short(str(value))} is not a finite number")
    return Candidate(spec, ev.torch_factory(torch_optimizer(name, kwargs), **kwargs))


def student_candidate(spec: str, label: str | None = None, group: str | None = None) -> Candidate:
    """A student (bundled name, folder or Hub repo id), validated and loaded once; run through AmalgamOptimizer."""
    return Candidate(label or spec.rstrip("/"), ev.student_factory(spec), group)


def _is_folder(spec: str) -> bool:
    try:
        return Path(spec).exists()
    except (OSError, ValueError):  # a name too long for a path, or one with a NUL byte: no folder
        return False


def candidate(spec: str) -> Candidate:
    """A student or, for a dotted name that is no folder, a torch optimizer."""
    head = spec.partition(":")[0]
    if "." in head and "/" not in head and not _is_folder(spec):
        return optimizer_candidate(spec)
    return student_candidate(spec)


def replicate_group(pattern: str, label: str | None = None) -> list[Candidate]:
    """The student folders matching a glob: the replicates of one configuration (group label: ``label`` or the
    pattern; each member's: the group's and its folder's name)."""
    folders = sorted(p for p in glob.glob(pattern) if Path(p, "config.json").is_file())
    if len(folders) < 2:
        raise ValueError(f"--replicates {pattern!r} matches {len(folders)} student folder(s); meta-stability "
                         "needs at least 2")
    label = label or pattern
    return [student_candidate(f, f"{label} [{Path(f).name}]", label) for f in folders]


# --- running -------------------------------------------------------------------------------------------------


@dataclass
class SuiteResult:
    problems: dict[str, ev.Evaluation] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    reference: str | None = None

    def optimizer_rows(self, problem: str) -> list[dict]:
        evaluation = self.problems[problem]
        diffs = evaluation.paired(self.reference) if self.reference in evaluation.runs else {}
        rows = []
        for name, runs in evaluation.runs.items():
            metrics = [run_metrics(r) for r in runs]
            means = {metric: nanmean([m[metric] for m in metrics]) for metric in SUITE_METRICS}
            rows.append({
                "name": name, **means, "evaluation_stability": nanstd([m["best_log_heldout"] for m in metrics]),
                "diff": diffs.get(name), "diverged": sum(r.diverged for r in runs), "runs": len(runs),
                "group": next((g for g, members in self.groups.items() if name in members), None),
            })
        return rows

    def group_rows(self, problem: str) -> list[dict]:
        evaluation, rows = self.problems[problem], []
        for group, members in self.groups.items():
            row = {"group": group, "replicates": len(members)}
            for metric in GROUP_METRICS:
                y = np.array([[r.metric(metric) for r in evaluation.runs[m]] for m in members])
                row[metric] = variance_components(y).__dict__
            rows.append(row)
        return rows

    def to_dict(self) -> dict:
        return {"reference": self.reference, "groups": self.groups,
                "problems": {p: {"protocol": e.protocol(), "notes": e.notes, "optimizers": [
                    {**row, "diff": None if row["diff"] is None else row["diff"].__dict__}
                    for row in self.optimizer_rows(p)], "replicate_groups": self.group_rows(p),
                    "runs": _curves(e)} for p, e in self.problems.items()}}


def _curves(evaluation: ev.Evaluation) -> dict:
    """Each run's held-out curve and times (its per-step training losses stay in the cache)."""
    return {n: [{k: v for k, v in r.to_dict().items() if k != "train_losses"} for r in runs]
            for n, runs in evaluation.runs.items()}


def _is_ours(out: Path) -> bool:
    try:
        return json.loads((out / MARKER).read_text()) == MARKER_CONTENT
    except (OSError, ValueError):
        return False


def check_output_folder(out: Path, overwrite: bool = False) -> None:
    """``out`` may receive an evaluation: it is new, empty or one of ours (it holds our marker), or ``overwrite``
    says that our files may replace theirs. Refused otherwise: a user's results.md or cache.json is never
    overwritten unasked."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {str(out)!r} is a file")
    if out.exists() and any(out.iterdir()) and not _is_ours(out) and not overwrite:
        raise ValueError(f"output folder {str(out)!r} is not empty and holds no amalgam evaluate run (no {MARKER}); "
                         "choose a new folder, or pass --overwrite")


def _claim_output_folder(out: Path) -> None:
    """Mark ``out`` as ours; a folder that was not (``overwrite``) has its cache files emptied first, so that no
    file of theirs is taken for cached runs."""
    out.mkdir(parents=True, exist_ok=True)
    if not _is_ours(out):
        for name in ("cache.json", "candidates.json"):
            if (out / name).exists():
                write_text_atomically(out / name, "{}")
        write_text_atomically(out / MARKER, json.dumps(MARKER_CONTENT, indent=1) + "\n")


def _known_candidates(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        known = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{str(path)!r} is not a valid list of candidates (not JSON: {err})") from None
    if not isinstance(known, dict) or not all(isinstance(v, str) for v in known.values()):
        raise ValueError(f"{str(path)!r} is not a list of candidates: a JSON object of label: specification")
    return known


def _drop_stale_runs(cache: Path, candidates: Sequence[Candidate]) -> None:
    """A candidate whose specification changed since its runs were cached (another student under the same label)
    is re-run (its runs are keyed by specification), and the runs of its old specification are dropped unless
    another candidate still has it."""
    ids_path = cache.with_name("candidates.json")
    known = _known_candidates(ids_path)
    current = {c.label: canonical(c.spec) for c in candidates}
    stale = {label for label, spec in current.items() if known.get(label, spec) != spec}
    if stale:
        logger.warning("re-running %s: changed since their runs were cached", ", ".join(sorted(stale)))
        old = {known[label] for label in stale} - set(current.values())
        runs = load_runs(cache)
        save_runs(cache, {k: v for k, v in runs.items()
                          if (fields := key_fields(k)) is None or canonical(fields["optimizer"]) not in old})
    write_text_atomically(ids_path, json.dumps({**known, **current}, indent=1))


def run_suite(candidates: Sequence[Candidate], problems: Sequence[str], seeds: Sequence[int], out: Path,
              steps: int = 1000, eval_every: int = 25, pool: str | None = "large",
              forms: Sequence[str] = ("paper", "torch"), tune_seeds: int = 3, workers: int | None = None,
              data_root: str | None = None, progress: bool = True, overwrite: bool = False) -> SuiteResult:
    """Every candidate (and baseline, unless ``pool`` is None) on every problem and seed; results in ``out``, which
    must be new, empty or an earlier evaluation's folder (or ``overwrite``: :func:`check_output_folder`)."""
    for name in problems:
        evaluable_problem(name)
    labels = [c.label for c in candidates]
    duplicated = sorted({n for n in labels if labels.count(n) > 1})
    if duplicated:
        raise ValueError(f"optimizers listed twice: {', '.join(duplicated)}")
    check_output_folder(out, overwrite)
    _claim_output_folder(out)
    cache = out / "cache.json"
    load_runs(cache)  # a damaged cache is reported before any run
    _drop_stale_runs(cache, candidates)
    result = SuiteResult(reference=labels[0] if labels else None)
    for c in candidates:
        if c.group:
            result.groups.setdefault(c.group, []).append(c.label)
    factories = {c.label: c.factory for c in candidates}
    for name in problems:
        problem = make_problem(name, data_root)
        if pool is None:
            evaluation = ev.evaluate(problem, factories, seeds, steps, eval_every, cache=cache, progress=progress,
                                     workers=workers)
        else:
            evaluation = ev.evaluate_with_baselines(problem, factories, pool, seeds, steps, eval_every, forms,
                                                    tune_seeds=list(seeds)[:tune_seeds], cache=cache,
                                                    progress=progress, workers=workers)
        result.problems[name] = evaluation
    write_outputs(result, out)
    return result


# --- outputs -------------------------------------------------------------------------------------------------


def fmt_number(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def markdown(result: SuiteResult, plots: Mapping[str, Mapping[str, str]] | None = None) -> str:
    lines = ["# amalgam evaluate", ""]
    for problem, evaluation in result.problems.items():
        lines += [f"## {problem}", "", evaluation.protocol() + " Optimization stability: std of "
                  "log(G2 * held-out) - log(held-out) over a run's evaluation points (G2: Gaussian filter, σ = 2 "
                  "points), averaged over runs; evaluation stability: std of best log held-out over the seeds.", "",
                  f"| optimizer | best log held-out | Δ vs {markdown_cell(result.reference)} [95% CI] | "
                  "final log train | optimization stability | evaluation stability | diverged |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in result.optimizer_rows(problem):
            diff = "reference" if row["diff"] is None else str(row["diff"])
            lines.append(f"| {markdown_cell(row['name'])} | {fmt_number(row['best_log_heldout'])} | {diff} | "
                         f"{fmt_number(row['final_log_train'])} | {fmt_number(row['optimization_stability'], 4)} | "
                         f"{fmt_number(row['evaluation_stability'])} | {row['diverged']}/{row['runs']} |")
        groups = result.group_rows(problem)
        if groups:
            lines += ["", "Replicate groups (meta-stability σ_meta: the spread between replicates with the "
                      "evaluation noise σ_eval removed; the interval is over the replicates' means):", "",
                      "| group | replicates | best log held-out [95% CI] | σ_meta | σ_eval | final log train | "
                      "σ_meta (train) |", "| --- | --- | --- | --- | --- | --- | --- |"]
            for g in groups:
                b, t = g["best_log_heldout"], g["final_log_train"]
                lines.append(f"| {markdown_cell(g['group'])} | {g['replicates']} | {fmt_number(b['mean'])} "
                             f"[{fmt_number(b['low'])}, {fmt_number(b['high'])}] | {fmt_number(b['meta_std'])} | "
                             f"{fmt_number(b['eval_std'])} | {fmt_number(t['mean'])} | {fmt_number(t['meta_std'])} |")
        if evaluation.notes:
            lines += ["", evaluation.notes_text()]
        for caption, path in (plots or {}).get(problem, {}).items():
            lines += ["", f"![{caption}]({path})"]
        lines.append("")
    return "\n".join(lines)


def json_safe(value):
    """``value`` with every non-finite float replaced by None: strict JSON that any tool reads."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_outputs(result: SuiteResult, out: Path) -> None:
    from . import plots

    plot_files = {p: plots.problem_plots(e, out / "plots", highlight=result.reference)
                  for p, e in result.problems.items()}
    relative = {p: {caption: os.path.relpath(path, out) for caption, path in files.items()}
                for p, files in plot_files.items()}
    write_text_atomically(out / "results.json", json.dumps(json_safe(result.to_dict()), indent=1, allow_nan=False)
                          + "\n")
    write_text_atomically(out / "results.md", markdown(result, relative))


def embed_in_card(result: SuiteResult, out: Path, folder: Path) -> Path:
    """Put the evaluation (tables and plots) into the model card of the student in ``folder``
    (:func:`amalgam_plugin.cards.embed_evaluation`). Returns the card's path."""
    return embed_evaluation(folder, out / "plots", result.problems, lambda plots: markdown(result, plots))
