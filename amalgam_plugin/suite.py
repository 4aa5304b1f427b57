"""``amalgam evaluate``: optimizers on a suite of problems under the project's protocol (docs/method.md#evaluation).

Each problem runs every candidate (a student: bundled name, folder or repo id; or any torch optimizer by dotted
name, ``torch.optim.AdamW:lr=1e-3``) and every replicate of each ``--replicates`` group on the same paired seeds,
beside the baselines: the pool's teachers in both forms, the oracle and torch Adam tuned on the training digits.
Metrics per optimizer: best log held-out loss, final log training loss, optimization stability, evaluation
stability; per replicate group also meta-stability, the replicate-to-replicate spread with the evaluation noise
removed (:func:`variance_components`).

The output folder holds ``cache.json`` (finished runs: an interrupted evaluation resumes), ``results.json``,
``results.md`` and ``plots/`` (per problem: held-out curves with bands, a bar chart with intervals, held-out loss
against training time).
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
from .problems import evaluable_problem, make_problem
from .teachers import parse_spec, torch_optimizer

logger = logging.getLogger(__name__)

STABILITY_SIGMA = 2.0  # the Gaussian filter's σ, in evaluation points (the paper: 2 epochs)


# --- metrics -------------------------------------------------------------------------------------------------


def gaussian_smooth(values: np.ndarray, sigma: float = STABILITY_SIGMA, truncate: float = 4.0) -> np.ndarray:
    """A 1-D Gaussian filter with edge ("nearest") padding and a kernel cut at ``truncate`` σ (what
    ``scipy.ndimage.gaussian_filter1d`` computes with ``mode="nearest"``)."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    return np.convolve(np.pad(np.asarray(values, dtype=float), radius, mode="edge"), weights, mode="valid")


def optimization_stability(heldout: Sequence[float], sigma: float = STABILITY_SIGMA) -> float:
    """std over the evaluation points of log(G_σ ∗ loss) − log(loss): how much a run's held-out curve jitters
    around its own smoothed trend (0 for a smooth curve). Non-finite points (a diverged run's tail) are dropped;
    NaN with fewer than 2 points."""
    values = np.asarray(heldout, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) < 2:
        return float("nan")
    return float(np.std(np.log(gaussian_smooth(values, sigma)) - np.log(values)))


@dataclass(frozen=True)
class VarianceComponents:
    """Replicates r x paired seeds k: y = μ + u_r + s_k + e, u_r ~ N(0, σ²_meta), e ~ N(0, σ²_eval)."""

    mean: float
    low: float  # 95% t-interval of the mean over the replicates' means
    high: float
    meta_std: float  # σ_meta: meta-stability (lower is more stable)
    eval_std: float  # σ_eval: the run-to-run noise left once replicate and seed effects are removed
    replicates: int
    seeds: int


def variance_components(y: np.ndarray) -> VarianceComponents:
    """Method-of-moments (REML when not truncated) estimate of the replicate variance of a balanced two-way
    layout without interaction: the seeds are paired across replicates, so their shared effect is removed
    before the replicates are compared. σ²_meta = max(0, (MS_replicate − MS_residual) / K). Seeds with a NaN in
    any replicate are dropped."""
    y = np.asarray(y, dtype=float)
    if y.ndim != 2:
        raise ValueError(f"variance_components needs a replicates x seeds matrix, got shape {y.shape}")
    y = y[:, np.isfinite(y).all(axis=0)]
    r, k = y.shape
    if r < 2 or k < 1:
        nan = float("nan")
        return VarianceComponents(float(y.mean()) if y.size else nan, nan, nan, nan, nan, r, k)
    grand = y.mean()
    rep_means, seed_means = y.mean(axis=1), y.mean(axis=0)
    ms_rep = k * float(((rep_means - grand) ** 2).sum()) / (r - 1)
    residual = y - rep_means[:, None] - seed_means[None, :] + grand
    ms_res = float((residual**2).sum()) / ((r - 1) * (k - 1)) if k > 1 else float("nan")
    meta_var = max(0.0, (ms_rep - ms_res) / k) if k > 1 else float("nan")
    half = ev.t_quantile(0.975, r - 1) * float(rep_means.std(ddof=1)) / math.sqrt(r)
    return VarianceComponents(float(grand), float(grand - half), float(grand + half), math.sqrt(meta_var),
                              math.sqrt(ms_res) if k > 1 else float("nan"), r, k)


def final_log_train(run: ev.RunResult) -> float:
    """log of the mean training loss over the last 100 steps (the paper: log training loss at the end)."""
    value = run.train_last100
    return math.log(value) if math.isfinite(value) and value > 0 else float("nan")


def run_metrics(run: ev.RunResult) -> dict[str, float]:
    return {"best_log_heldout": run.best_log_heldout, "final_log_train": final_log_train(run),
            "optimization_stability": optimization_stability(run.heldout)}


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def _nanstd(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.std(ddof=1)) if len(values) > 1 else float("nan")


# --- what is evaluated ---------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """A named optimizer factory and what identifies it (a changed fingerprint invalidates its cached runs)."""

    label: str
    factory: ev.OptimizerFactory
    fingerprint: str
    group: str | None = None  # the replicate group it belongs to


def optimizer_candidate(spec: str) -> Candidate:
    """A torch optimizer by dotted class name with ``key=value`` arguments: ``torch.optim.AdamW:lr=1e-3``."""
    name, kwargs = parse_spec(spec)
    cls = torch_optimizer(name, kwargs)
    return Candidate(spec, lambda params: cls(params, **kwargs), spec)


def student_candidate(spec: str, label: str | None = None, group: str | None = None) -> Candidate:
    """A student (bundled name, folder or Hub repo id), validated and loaded once; run through AmalgamOptimizer."""
    from .hub import content_hash, load_student

    student = load_student(spec)
    return Candidate(label or spec.rstrip("/"), ev.student_factory(student), content_hash(student), group)


def candidate(spec: str) -> Candidate:
    """A student or, for a dotted name that is no folder, a torch optimizer."""
    head = spec.partition(":")[0]
    if "." in head and "/" not in head and not Path(spec).exists():
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
            best = [m["best_log_heldout"] for m in metrics]
            rows.append({
                "name": name, "best_log_heldout": _nanmean(best),
                "final_log_train": _nanmean([m["final_log_train"] for m in metrics]),
                "optimization_stability": _nanmean([m["optimization_stability"] for m in metrics]),
                "evaluation_stability": _nanstd(best),
                "diff": diffs.get(name), "diverged": sum(r.diverged for r in runs), "runs": len(runs),
                "group": next((g for g, members in self.groups.items() if name in members), None),
            })
        return rows

    def group_rows(self, problem: str) -> list[dict]:
        evaluation, rows = self.problems[problem], []
        for group, members in self.groups.items():
            row = {"group": group, "replicates": len(members)}
            for metric in ("best_log_heldout", "final_log_train"):
                y = np.array([[run_metrics(r)[metric] for r in evaluation.runs[m]] for m in members])
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


def _drop_stale_runs(cache: Path, candidates: Sequence[Candidate]) -> None:
    """A candidate whose fingerprint changed since its runs were cached (another student under the same label)
    loses those runs."""
    ids_path = cache.with_name("candidates.json")
    known = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    stale = {c.label for c in candidates if known.get(c.label, c.fingerprint) != c.fingerprint}
    if stale and cache.exists():
        logger.warning("re-running %s: changed since their runs were cached", ", ".join(sorted(stale)))
        runs = json.loads(cache.read_text())
        cache.write_text(json.dumps({k: v for k, v in runs.items() if k.split("|")[0] not in stale}))
    ids_path.write_text(json.dumps({**known, **{c.label: c.fingerprint for c in candidates}}, indent=1))


def run_suite(candidates: Sequence[Candidate], problems: Sequence[str], seeds: Sequence[int], out: Path,
              steps: int = 1000, eval_every: int = 25, pool: str | None = "large",
              forms: Sequence[str] = ("paper", "torch"), tune_seeds: int = 3, workers: int | None = None,
              data_root: str | None = None, progress: bool = True) -> SuiteResult:
    """Every candidate (and baseline, unless ``pool`` is None) on every problem and seed; results in ``out``."""
    for name in problems:
        evaluable_problem(name)
    labels = [c.label for c in candidates]
    duplicated = sorted({n for n in labels if labels.count(n) > 1})
    if duplicated:
        raise ValueError(f"optimizers listed twice: {', '.join(duplicated)}")
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache.json"
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
                  f"| optimizer | best log held-out | Δ vs {result.reference} [95% CI] | final log train | "
                  "optimization stability | evaluation stability | diverged |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in result.optimizer_rows(problem):
            diff = "reference" if row["diff"] is None else str(row["diff"])
            lines.append(f"| {row['name']} | {fmt_number(row['best_log_heldout'])} | {diff} | "
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
                lines.append(f"| {g['group']} | {g['replicates']} | {fmt_number(b['mean'])} [{fmt_number(b['low'])}, "
                             f"{fmt_number(b['high'])}] | {fmt_number(b['meta_std'])} | {fmt_number(b['eval_std'])} | "
                             f"{fmt_number(t['mean'])} | {fmt_number(t['meta_std'])} |")
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
    (out / "results.json").write_text(json.dumps(json_safe(result.to_dict()), indent=1, allow_nan=False) + "\n")
    (out / "results.md").write_text(markdown(result, relative))


def embed_in_card(result: SuiteResult, out: Path, folder: Path) -> Path:
    """Put the evaluation (tables and plots) into the model card of the student in ``folder``
    (:func:`amalgam_plugin.cards.embed_evaluation`). Returns the card's path."""
    return embed_evaluation(folder, out / "plots", result.problems, lambda plots: markdown(result, plots))
