"""Statistics over seeds: mean and standard deviation, and Student's t interval of a mean (for
the paired differences fine-tuned - scratch), with no dependency beyond the standard library."""

from __future__ import annotations

import math
import statistics


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for fewer than two values)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def t_within(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` degrees of freedom (Abramowitz & Stegun 26.7.3-4,
    exact for integer df)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    term, total = 1.0, 0.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(level: float, df: int) -> float:
    """The t such that P(|T| <= t) = `level` (e.g. 0.95: the two-sided 95% critical value)."""
    low, high = 0.0, 1e3
    for _ in range(200):  # bisection: t_within increases with t
        mid = (low + high) / 2
        low, high = (mid, high) if t_within(mid, df) < level else (low, mid)
    return (low + high) / 2


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """Mean and its `level` confidence interval (Student's t), None for fewer than two values."""
    if len(values) < 2:
        return None
    mean, sd = mean_std(values)
    half = t_quantile(level, len(values) - 1) * sd / math.sqrt(len(values))
    return mean, mean - half, mean + half


def points_spread(mean: float, sd: float | None) -> str:
    """A mean ± standard deviation of fractions, in percent ("–" for a missing deviation)."""
    return f"{100 * mean:.2f} ± {100 * sd:.2f}" if sd is not None else f"{100 * mean:.2f} ± –"


def points_interval(mean: float, low: float, high: float) -> str:
    """A mean difference of fractions and its interval, in signed percentage points."""
    return f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"
