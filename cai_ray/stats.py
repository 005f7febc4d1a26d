"""Confidence intervals and paired tests for evaluation metrics (pure: numpy and math only).

Everything returns plain floats in small named tuples, so results unpack as tuples and log
straight to MLflow. scipy is not used: the few distributions needed (normal, Student t with
integer degrees of freedom, binomial, chi-square with one degree of freedom) have short exact
forms, and keeping them here avoids a dependency for a handful of numbers.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple, Sequence

import numpy as np


class Interval(NamedTuple):
    estimate: float
    lo: float
    hi: float


class McNemar(NamedTuple):
    b01: int  # a failed, b succeeded
    b10: int  # a succeeded, b failed
    p_value: float


def _as_finite(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}] is not a finite number: {array[bad[0]]}")
    return array


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def wilson(successes: int, n: int, z: float = 1.96) -> Interval:
    """Wilson score interval for a proportion: (p, lo, hi).

    n == 0 gives (nan, 0.0, 1.0) rather than raising: a metric with no parsed verdicts is still
    logged, and an interval spanning everything says honestly that nothing is known.
    """
    if isinstance(successes, bool) or isinstance(n, bool) or int(successes) != successes or int(n) != n:
        raise ValueError(f"successes and n must be integers, got {successes!r} and {n!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if not z > 0:
        raise ValueError(f"z must be positive, got {z}")
    if n == 0:
        return Interval(math.nan, 0.0, 1.0)
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # Rounding can push the bounds a hair past [0, 1] at p = 0 or 1.
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def _t_cdf_series(t: float, df: int) -> float:
    """P(T <= t) for integer df, from the finite trigonometric series (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:
        term, total = 1.0, 0.0
        if df > 1:
            total = term = math.cos(theta)
            for k in range(3, df - 1, 2):
                term *= c2 * (k - 1) / k
                total += term
        two_sided = 2 / math.pi * (theta + s * total)
    else:
        term = total = 1.0
        for k in range(2, df - 1, 2):
            term *= c2 * (k - 1) / k
            total += term
        two_sided = s * total
    return 0.5 + two_sided / 2


def t_quantile(q: float, df: int) -> float:
    """Student t quantile for integer df >= 1, exact to ~1e-10 (scipy's t.ppf without scipy)."""
    if not 0 < q < 1 or int(df) != df or df < 1:
        raise ValueError(f"need 0 < q < 1 and integer df >= 1, got q={q}, df={df}")
    if q < 0.5:
        return -t_quantile(1 - q, df)
    z = NormalDist().inv_cdf(q)
    if df > 200:
        # Cornish-Fisher series in 1/df (A&S 26.7.5); at df > 200 its error is far below 1e-10,
        # and the exact series would need df/2 terms per evaluation.
        g1 = (z**3 + z) / 4
        g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
        g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
        g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
        return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4
    lo, hi = z, z
    while _t_cdf_series(hi, df) < q:  # t quantiles are never below the normal one
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_cdf_series(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean with a Student-t interval (n - 1 degrees of freedom).

    A single value has no spread to estimate: (value, nan, nan). No values raises.
    """
    array = _as_finite(values, "values")
    _check_confidence(confidence)
    if array.size == 0:
        raise ValueError("values is empty: a mean needs at least one value")
    mean = float(array.mean())
    if array.size == 1:
        return Interval(mean, math.nan, math.nan)
    half = t_quantile(0.5 + confidence / 2, array.size - 1) * float(array.std(ddof=1)) / math.sqrt(array.size)
    return Interval(mean, mean - half, mean + half)


def summarize_over_seeds(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean over training seeds with a t interval; with 3-5 seeds the t factor (4.30 at n=3)
    matters, which is why this is not a normal approximation."""
    return mean_ci(values, confidence)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> Interval:
    """Mean of per-prompt differences a - b with a percentile bootstrap interval.

    Prompts are resampled as pairs, so the interval reflects that both systems saw the same
    prompts. The same seed gives the same interval.
    """
    x, y = _as_finite(a, "a"), _as_finite(b, "b")
    if x.size != y.size:
        raise ValueError(f"a and b must be paired: lengths {x.size} and {y.size} differ")
    if x.size == 0:
        raise ValueError("a and b are empty: nothing to compare")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    _check_confidence(confidence)
    diff = x - y
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    # Resample in chunks so n_boot x n indices never need more than a few MB at once.
    chunk = max(1, 2_000_000 // diff.size)
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        means[start : start + rows] = diff[rng.integers(0, diff.size, size=(rows, diff.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return Interval(float(diff.mean()), float(lo), float(hi))


def mcnemar(a_bool: Sequence[bool], b_bool: Sequence[bool], exact_below: int = 25) -> McNemar:
    """McNemar's test on paired outcomes (e.g. attack success per prompt, before vs after).

    Only discordant pairs matter. With fewer than `exact_below` of them the two-sided exact
    binomial test is used; otherwise chi-square (1 df) with continuity correction. No
    discordant pairs gives p = 1.
    """
    x, y = np.asarray(a_bool), np.asarray(b_bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"a_bool and b_bool must be paired 1-D sequences, got shapes {x.shape} and {y.shape}")
    for name, array in (("a_bool", x), ("b_bool", y)):
        if array.size and not np.isin(array, [0, 1]).all():
            raise ValueError(f"{name} must hold only booleans (or 0/1)")
    x, y = x.astype(bool), y.astype(bool)
    b01, b10 = int(np.sum(~x & y)), int(np.sum(x & ~y))
    discordant = b01 + b10
    if discordant == 0:
        return McNemar(b01, b10, 1.0)
    if discordant < exact_below:
        tail = sum(math.comb(discordant, k) for k in range(min(b01, b10) + 1)) / 2**discordant
        return McNemar(b01, b10, min(1.0, 2 * tail))
    statistic = (abs(b01 - b10) - 1) ** 2 / discordant
    # Chi-square with 1 df is a squared standard normal: P(X > s) = erfc(sqrt(s / 2)).
    return McNemar(b01, b10, math.erfc(math.sqrt(statistic / 2)))
