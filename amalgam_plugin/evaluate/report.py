"""The report of an evaluation: :class:`Evaluation` holds the runs of several optimizers on the same paired seeds
and gives their means, the paired differences against a reference with 95% t-intervals, markdown or plain tables,
mean curves and a PNG plot; :meth:`Evaluation.add_oracle` adds the best pool member (docs/method.md#baselines)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .runs import RunResult
from .statistics import PairedDifference, paired_difference


def markdown_cell(text: str) -> str:
    """``text`` as one markdown table cell: a ``|`` is escaped and a line break becomes a space, so a label cannot
    split a row or end the table."""
    return " ".join(str(text).replace("|", "\\|").splitlines())


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(map(markdown_cell, cells)) + " |"



@dataclass
class Evaluation:
    """Runs of several optimizers on the same paired seeds.

    ``runs[name]`` lists one :class:`RunResult` per seed, in the order of ``seeds``. ``notes[name]`` says
    how a baseline was chosen (shown under the table); ``reference`` names the optimizer the paired
    differences are taken against (``None``: the first one).
    """

    problem: str
    seeds: list[int]
    steps: int
    eval_every: int
    runs: dict[str, list[RunResult]] = field(default_factory=dict)
    reference: str | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.runs)

    def values(self, name: str, metric: str = "best_log_heldout") -> np.ndarray:
        if name not in self.runs:
            raise ValueError(f"unknown optimizer {name!r}; evaluated: {', '.join(self.runs)}")
        return np.array([r.metric(metric) for r in self.runs[name]], dtype=float)

    def mean(self, name: str, metric: str = "best_log_heldout") -> float:
        v = self.values(name, metric)
        v = v[np.isfinite(v)]
        return float(v.mean()) if len(v) else float("nan")

    def paired(
        self, reference: str | None = None, metric: str = "best_log_heldout", confidence: float = 0.95
    ) -> dict[str, PairedDifference]:
        """``name -> paired difference (name - reference)`` for every other optimizer."""
        ref = reference or self.reference or self.names[0]
        ref_values = self.values(ref, metric)
        return {n: paired_difference(self.values(n, metric), ref_values, confidence) for n in self.names if n != ref}

    def add_oracle(self, members: Iterable[str], label: str = "oracle", metric: str = "best_log_heldout") -> str:
        """Add the member with the lowest mean ``metric`` (held-out, as the paper's oracle: a choice that
        favours the baseline) under ``label``; returns the chosen member's name."""
        members = list(members)
        if not members:
            raise ValueError("the oracle needs at least one pool member")
        best = min(members, key=lambda n: (math.isnan(self.mean(n, metric)), self.mean(n, metric)))
        self.runs[label] = self.runs[best]
        self.notes[label] = (
            f"= {best}: the pool member with the lowest mean {metric} on these held-out runs "
            f"(chosen among {', '.join(members)}; favours the baseline)"
        )
        return best

    def rows(self, reference: str | None = None) -> list[dict[str, Any]]:
        ref = reference or self.reference or self.names[0]
        diffs = self.paired(ref)
        rows = []
        for n in self.names:
            runs = self.runs[n]
            rows.append(
                {
                    "name": n,
                    "best_log_heldout": self.mean(n, "best_log_heldout"),
                    "final_log_heldout": self.mean(n, "final_log_heldout"),
                    "train_last100": self.mean(n, "train_last100"),
                    "diff": None if n == ref else diffs[n],
                    "diverged": sum(r.diverged for r in runs),
                    "n": len(runs),
                }
            )
        return rows

    def table(self, fmt: str = "markdown", reference: str | None = None) -> str:
        """The evaluation table (docs/method.md#evaluation): means over seeds and the paired difference of best
        log held-out loss against the reference (negative = better than the reference) with its 95% t-interval."""
        if fmt not in ("markdown", "plain"):
            raise ValueError(f"unknown table format {fmt!r}; valid: markdown, plain")
        ref = reference or self.reference or self.names[0]
        header = [
            "optimizer",
            "best log held-out",
            "final log held-out",
            "train loss (last 100)",
            f"Δ best vs {ref} [95% CI]",
            "diverged",
        ]
        body = []
        for row in self.rows(ref):
            body.append(
                [
                    row["name"],
                    f"{row['best_log_heldout']:.3f}",
                    f"{row['final_log_heldout']:.3f}",
                    f"{row['train_last100']:.3f}",
                    "reference" if row["diff"] is None else str(row["diff"]),
                    f"{row['diverged']}/{row['n']}",
                ]
            )
        if fmt == "markdown":
            lines = [_markdown_row(header), "|" + "|".join(" --- " for _ in header) + "|", *map(_markdown_row, body)]
        else:
            widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
            lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body]]
        return "\n".join(lines)

    def protocol(self) -> str:
        """One sentence stating what the table measures."""
        return (
            f"Problem `{self.problem}`, {len(self.seeds)} paired seed{'s' if len(self.seeds) != 1 else ''} "
            f"({', '.join(map(str, self.seeds))}), "
            f"{self.steps} steps, held-out loss on all held-out examples every {self.eval_every} steps; "
            "log = natural log; intervals: 95% t-intervals of the mean paired difference."
        )

    def notes_text(self) -> str:
        return "\n".join(f"- {n}: {text}" for n, text in self.notes.items())

    def mean_curves(self) -> dict[str, tuple[list[int], list[float]]]:
        """``name -> (eval steps, mean held-out loss over the seeds)``; a diverged run's missing points are
        skipped (nan-mean)."""
        curves = {}
        for n, runs in self.runs.items():
            steps = max((r.eval_steps for r in runs), key=len)
            grid = np.full((len(runs), len(steps)), np.nan)
            for i, r in enumerate(runs):
                values = np.asarray(r.heldout[: len(steps)], dtype=float)
                grid[i, : len(values)] = np.where(np.isfinite(values), values, np.nan)
            with np.errstate(all="ignore"):
                counts = np.isfinite(grid).sum(0)
                mean = np.where(counts > 0, np.nansum(grid, 0) / np.maximum(counts, 1), np.nan)
            curves[n] = (list(steps), mean.tolist())
        return curves

    def plot(self, path: str | os.PathLike, title: str | None = None, highlight: str | None = None) -> Path:
        """PNG of the mean held-out loss against steps (log scale), one line per optimizer
        (``amalgam_plugin.plots.mean_curves``)."""
        from ..plots import mean_curves

        return mean_curves(self, Path(path), title, highlight)

    def to_dict(self) -> dict:
        return {
            "problem": self.problem,
            "seeds": list(self.seeds),
            "steps": self.steps,
            "eval_every": self.eval_every,
            "reference": self.reference,
            "notes": dict(self.notes),
            "runs": {n: [r.to_dict() for r in runs] for n, runs in self.runs.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        runs = {n: [RunResult.from_dict(r) for r in rs] for n, rs in data["runs"].items()}
        return cls(
            data["problem"],
            list(data["seeds"]),
            data["steps"],
            data["eval_every"],
            runs,
            data.get("reference"),
            dict(data.get("notes", {})),
        )
