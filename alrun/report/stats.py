"""Statistics for comparing strategies over seeds: t confidence intervals, AULC, cost to reach.

Seeds are replicates. A 95 % interval is ``mean ± t(0.975, n-1) · s / sqrt(n)`` (Student t,
sample standard deviation); with fewer than two values there is no interval and the report
says so instead of inventing one. With two, t(0.975, 1) = 12.7: the interval is ±9 standard
deviations wide, so the report says it is too wide to compare rather than calling a difference
"not significant" (or drawing a band from -1 to 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta (Numerical Recipes, Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student t cumulative distribution function."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse of :func:`t_cdf` by bisection (p in (0.5, 1))."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


#: fewer seeds than this give an interval too wide to compare anything with (see above)
MIN_SEEDS_TO_COMPARE = 3


@dataclass(frozen=True)
class Estimate:
    """Mean of n replicates with its 95 % t interval half-width (None when n < 2)."""

    mean: float
    half_width: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    @property
    def too_wide(self) -> bool:
        """An interval exists but from so few seeds that it cannot separate anything."""
        return self.half_width is not None and self.n < MIN_SEEDS_TO_COMPARE

    def clipped(self, low: float, high: float) -> tuple[float, float] | None:
        """The interval limited to the metric's range (None without an interval)."""
        if self.half_width is None:
            return None
        return max(low, self.mean - self.half_width), min(high, self.mean + self.half_width)

    def text(self, digits: int = 3) -> str:
        if self.half_width is None:
            return f"{self.mean:.{digits}f} (n={self.n}, no CI: needs ≥ 2 seeds)"
        if self.too_wide:
            return (
                f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f} "
                f"(n={self.n}: interval too wide to compare)"
            )
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f} (n={self.n})"


def mean_ci(values: Sequence[float], level: float = 0.95) -> Estimate:
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("mean_ci of no values")
    if data.size < 2:
        return Estimate(float(data.mean()), None, int(data.size))
    sem = float(data.std(ddof=1)) / math.sqrt(data.size)
    q = t_quantile(0.5 + level / 2.0, data.size - 1)
    return Estimate(float(data.mean()), q * sem, int(data.size))


def aulc(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under the learning curve (trapezoids) divided by the x range: the curve's mean
    height, in mAP units, so runs of different length or cost units compare."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2 or x[-1] == x[0]:
        return float(y[-1]) if y.size else float("nan")
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    return area / float(x[-1] - x[0])


def first_reaching(x: Sequence[float], y: Sequence[float], target: float) -> float | None:
    """The first x where y >= target (round granularity), or None if never."""
    for xi, yi in zip(x, y):
        if yi >= target - 1e-12:
            return float(xi)
    return None


@dataclass(frozen=True)
class PairedDifference:
    estimate: Estimate
    seeds: tuple[int, ...]

    @property
    def verdict(self) -> str:
        e = self.estimate
        if e.half_width is None:
            return f"cannot compute a CI from {e.n} paired seed(s)"
        if e.too_wide:
            t = t_quantile(0.975, e.n - 1)
            return f"{e.n} seeds: interval too wide to compare (t = {t:.1f})"
        if e.low <= 0.0 <= e.high:  # type: ignore[operator]
            return "not significant (95% CI contains 0)"
        return "significant (95% CI excludes 0)" + (" — better" if e.mean > 0 else " — worse")


def paired_difference(
    strategy: dict[int, float], baseline: dict[int, float]
) -> PairedDifference | None:
    """strategy - baseline over the seeds both have; None when no seed is shared."""
    seeds = tuple(sorted(set(strategy) & set(baseline)))
    if not seeds:
        return None
    return PairedDifference(mean_ci([strategy[s] - baseline[s] for s in seeds]), seeds)
