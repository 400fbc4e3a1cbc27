"""Paired comparisons over seeds: the 95% t-interval of the differences, what a null result rules
out, and the area under a logged curve. Pure functions, no I/O, no scipy.

Two arms trained with the same seed share their initialisation and data order, so the difference
of a metric between them, seed by seed, removes most of the seed-to-seed spread; the interval is
over those differences (a paired t-interval), not over the two arms' spreads.

A null result is only as informative as its interval is narrow: ``excluded_effects`` says how
large an effect in each direction the interval still rules out ("excludes an advantage larger than
54 steps and a disadvantage larger than 31 steps"), so "no significant difference" reads as a bound.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Two-sided 95% critical values of Student's t (the 0.975 quantile) for df = 1..60, to the third
# decimal as in printed tables (computed with mpmath's regularised incomplete beta function).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
         2.040, 2.037, 2.035, 2.032, 2.030, 2.028, 2.026, 2.024, 2.023, 2.021,
         2.020, 2.018, 2.017, 2.015, 2.014, 2.013, 2.012, 2.011, 2.010, 2.009,
         2.008, 2.007, 2.006, 2.005, 2.004, 2.003, 2.002, 2.002, 2.001, 2.000)
Z_975 = 1.960  # the normal quantile: t's limit as df grows


def t_critical(df: int) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom.

    df = 1..60 from the table; beyond 60, interpolated linearly in 1/df between t(60) and the
    normal 1.960 (t is close to linear in 1/df there: this gives 1.980 at df = 120, exact 1.9799)."""
    if df < 1:
        raise ValueError(f"a t-interval needs df >= 1 (at least 2 pairs), got df={df}")
    if df <= len(T_975):
        return T_975[df - 1]
    last = len(T_975)
    return Z_975 + (T_975[-1] - Z_975) * last / df


@dataclass(frozen=True)
class PairedInterval:
    """The differences a_i - b_i, their mean and sample SD (n - 1), and the 95% t-interval of the
    mean. ``low``/``high`` are None below 2 pairs (no spread to estimate), ``mean`` None at 0."""
    differences: tuple[float, ...]
    n: int
    mean: float | None
    sd: float | None
    low: float | None
    high: float | None

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def paired_interval(a, b) -> PairedInterval:
    """The 95% interval of mean(a_i - b_i) over pairs matched by seed: mean ± t(n-1)·SD/√n."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same length, got {len(a)} and {len(b)}")
    differences = tuple(float(x) - float(y) for x, y in zip(a, b))
    n = len(differences)
    if n == 0:
        return PairedInterval(differences, 0, None, None, None, None)
    mean = statistics.fmean(differences)
    if n < 2:
        return PairedInterval(differences, n, mean, None, None, None)
    sd = statistics.stdev(differences)
    half = t_critical(n - 1) * sd / math.sqrt(n)
    return PairedInterval(differences, n, mean, sd, mean - half, mean + half)


@dataclass(frozen=True)
class ExcludedEffects:
    """What a 95% interval rules out, in the sign convention "positive = ``positive`` word".

    ``largest_positive``: every effect in the positive direction larger than this is excluded
    (0 when the interval lies at or below zero: it excludes every positive effect); likewise
    ``largest_negative`` as a magnitude in the negative direction. None when there is no interval."""
    excludes_zero: bool
    largest_positive: float | None
    largest_negative: float | None
    text: str


def _amount(value: float, unit: str) -> str:
    return f"{value:.3g}" + (f" {unit}" if unit else "")


def _a(word: str) -> str:
    return f"a{'n' * (word[:1] in 'aeiou')} {word}"


def excluded_effects(interval: PairedInterval, positive: str = "advantage", negative: str = "disadvantage",
                     unit: str = "") -> ExcludedEffects:
    """Say what ``interval`` (of differences signed so that positive = ``positive``) excludes:
    e.g. "excludes an advantage larger than 54 steps and a disadvantage larger than 31 steps", or,
    when it lies on one side of zero, "excludes zero: an advantage of 12 to 54 steps (...)".
    Below 2 pairs: "pending" and no bounds."""
    if interval.low is None:
        return ExcludedEffects(False, None, None, f"pending ({interval.n} pair{'s' * (interval.n != 1)}; needs 2)")
    largest_positive, largest_negative = max(interval.high, 0.0), max(-interval.low, 0.0)

    def side(word: str, bound: float) -> str:
        return f"{_a(word)} larger than {_amount(bound, unit)}" if bound > 0 else f"any {word}"

    bounds = f"excludes {side(positive, largest_positive)} and {side(negative, largest_negative)}"
    if interval.low > 0:
        text = f"excludes zero: {_a(positive)} of {_amount(interval.low, '')} to {_amount(interval.high, unit)} ({bounds})"
    elif interval.high < 0:
        text = f"excludes zero: {_a(negative)} of {_amount(-interval.high, '')} to {_amount(-interval.low, unit)} ({bounds})"
    else:
        text = bounds
    return ExcludedEffects(interval.excludes_zero, largest_positive, largest_negative, text)


def curve_area(points, normalise: bool = False) -> float | None:
    """Area under the curve through (step, value) ``points`` by the trapezoid rule over the logged
    steps (sorted by step). ``normalise``: divided by the step span, i.e. the curve's mean level
    (a single point's level is its value). None for no points."""
    points = sorted((float(s), float(v)) for s, v in points)
    if not points:
        return None
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(points, points[1:]))
    if not normalise:
        return area
    span = points[-1][0] - points[0][0]
    return area / span if span else points[0][1]
