"""Statistics of paired seeds: Student's t quantiles without scipy, the paired difference of two optimizers with
its t-interval, and the replicate variance components of a replicates x seeds layout (meta-stability)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes' ``betacf``)."""
    tiny, eps = 1e-300, 3e-16  # eps just above the float spacing at 1, which d * c can settle on
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betai(a: float, b: float, x: float, y: float) -> float:
    """Regularized incomplete beta function I_x(a, b), given ``x`` and ``y = 1 - x`` (both computed without
    cancellation by the caller)."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, y) / b


def _t_probability_beyond(t: float, df: float, central: bool) -> float:
    """For Student's t with ``df`` degrees of freedom and ``t >= 0``: P(T > t), or P(0 < T < t) when
    ``central`` (each the better-conditioned side for its range of quantiles)."""
    x, y = df / (df + t * t), t * t / (df + t * t)
    return 0.5 * (_betai(0.5, df / 2.0, y, x) if central else _betai(df / 2.0, 0.5, x, y))


def t_quantile(p: float, df: float) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom (what ``scipy.stats.t.ppf`` returns),
    by bisection on the regularized incomplete beta function down to adjacent floats: within 1e-10 of the
    exact value for ``df`` up to 1e5 and ``p`` in [1e-6, 1 - 1e-6]. ``p`` of 0 or 1 gives -inf or inf; ``p``
    outside [0, 1] or ``df <= 0`` gives NaN."""
    if not (0.0 <= p <= 1.0) or not df > 0:
        return float("nan")
    if p == 0.5:
        return 0.0
    if p in (0.0, 1.0):
        return math.copysign(math.inf, p - 0.5)
    tail = 1.0 - p if p > 0.5 else p  # P(T > |quantile|)
    central = tail > 0.25  # then solve P(0 < T < t) = 0.5 - tail instead (exact subtraction there)
    target = abs(p - 0.5) if central else tail

    def below(t: float) -> bool:  # is t below the quantile's magnitude?
        value = _t_probability_beyond(t, df, central)
        return value < target if central else value > target

    lo, hi = 0.0, 1.0
    while below(hi):
        lo, hi = hi, 2.0 * hi
        if math.isinf(hi):
            return math.copysign(math.inf, p - 0.5)
    while lo < (mid := 0.5 * (lo + hi)) < hi:
        lo, hi = (mid, hi) if below(mid) else (lo, mid)
    t = 0.5 * (lo + hi)
    return t if p > 0.5 else -t


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over paired seeds with its two-sided t confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    sd: float
    confidence: float = 0.95

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """t-interval of the mean paired difference ``a - b`` (seeds paired by position); pairs with a NaN on
    either side are dropped. With fewer than 2 pairs the interval is NaN."""
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired samples differ in length: {a_arr.shape} vs {b_arr.shape}")
    d = (a_arr - b_arr)[np.isfinite(a_arr - b_arr)]
    n = len(d)
    if n == 0:
        return PairedDifference(float("nan"), float("nan"), float("nan"), 0, float("nan"), confidence)
    mean = float(d.mean())
    if n < 2:
        return PairedDifference(mean, float("nan"), float("nan"), n, float("nan"), confidence)
    sd = float(d.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n, sd, confidence)


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
    half = t_quantile(0.975, r - 1) * float(rep_means.std(ddof=1)) / math.sqrt(r)
    return VarianceComponents(float(grand), float(grand - half), float(grand + half), math.sqrt(meta_var),
                              math.sqrt(ms_res) if k > 1 else float("nan"), r, k)




def nanmean(values) -> float:
    """Mean of the finite values (NaN when none)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def nanstd(values) -> float:
    """Sample standard deviation of the finite values (NaN with fewer than 2)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.std(ddof=1)) if len(values) > 1 else float("nan")
