"""Intervals, paired tests and rater agreement for evaluation numbers (pure: numpy and scipy).

The unit of independence is the *request*: several sampled responses to one request, or one
request wrapped in several jailbreak templates, are correlated, so they are averaged into one
value per request before any interval or test is computed (``unit_interval``,
``paired_units``).  Counting them as independent would shrink intervals by up to the square
root of the number of responses per request.

Everything returns plain floats (or None where a number is undefined) in small named tuples,
so results unpack as tuples and log straight to JSON and MLflow.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
from scipy import stats as sps


class Interval(NamedTuple):
    estimate: float
    lo: float
    hi: float


class Paired(NamedTuple):
    diff: float        # mean over units of (b - a)
    lo: float
    hi: float
    n: int             # units both arms have
    b_better: int      # units where b > a
    a_better: int      # units where a > b
    p_value: float     # two-sided sign test on the units that differ


class Kappa(NamedTuple):
    kappa: float | None  # None when undefined (both raters constant and agreeing)
    agreement: float | None
    n: int


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


def wilson(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a proportion: (p, lo, hi).

    n == 0 gives (nan, 0.0, 1.0) rather than raising: a metric with nothing to count is still
    reported, and an interval spanning everything says honestly that nothing is known.
    """
    if isinstance(successes, bool) or isinstance(n, bool) or int(successes) != successes or int(n) != n:
        raise ValueError(f"successes and n must be integers, got {successes!r} and {n!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    _check_confidence(confidence)
    if n == 0:
        return Interval(math.nan, 0.0, 1.0)
    ci = sps.binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return Interval(successes / n, max(0.0, float(ci.low)), min(1.0, float(ci.high)))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean with a Student-t interval (n - 1 degrees of freedom).

    A single value has no spread to estimate: (value, nan, nan).  No values raises.
    """
    array = _as_finite(values, "values")
    _check_confidence(confidence)
    if array.size == 0:
        raise ValueError("values is empty: a mean needs at least one value")
    mean = float(array.mean())
    if array.size == 1:
        return Interval(mean, math.nan, math.nan)
    half = float(sps.t.ppf(0.5 + confidence / 2, array.size - 1)) * float(array.std(ddof=1)) / math.sqrt(array.size)
    return Interval(mean, mean - half, mean + half)


def summarize_over_seeds(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean over training seeds with a t interval; with 3-5 seeds the t factor (4.30 at n=3)
    matters, which is why this is not a normal approximation."""
    return mean_ci(values, confidence)


def _bootstrap_mean(values: np.ndarray, n_boot: int, seed: int, confidence: float) -> tuple[float, float]:
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    _check_confidence(confidence)
    result = sps.bootstrap((values,), np.mean, n_resamples=int(n_boot), confidence_level=confidence,
                           method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def unit_interval(values: Sequence[float], rate: bool, n_boot: int = 2000, seed: int = 0,
                  confidence: float = 0.95) -> Interval:
    """Mean of per-unit values (one per request) with a bootstrap interval over units.

    This is the cluster bootstrap: resampling requests keeps each request's responses together.
    When every unit has the same value the bootstrap cannot see variation it never observed and
    collapses to a point; a rate then gets the Wilson interval over units instead (e.g. 0 of 40
    requests gives [0, 0.09], not [0, 0]), a mean keeps the point.  No units: (nan, nan, nan).
    """
    x = _as_finite(values, "values")
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if np.ptp(x) == 0:
        if rate and mean in (0.0, 1.0):
            return wilson(int(mean) * x.size, x.size, confidence)
        return Interval(mean, mean, mean)
    lo, hi = _bootstrap_mean(x, n_boot, seed, confidence)
    return Interval(mean, lo, hi)


def paired_units(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0,
                 confidence: float = 0.95) -> Paired:
    """b - a over units both arms have (same requests, in the same order).

    Interval: bootstrap over units of the per-unit differences.  Test: the two-sided sign test on
    the units whose values differ (exact binomial); with one 0/1 outcome per unit this is
    McNemar's exact test.  No unit differs: p = 1.
    """
    x, y = _as_finite(a, "a"), _as_finite(b, "b")
    if x.size != y.size:
        raise ValueError(f"a and b must be paired: lengths {x.size} and {y.size} differ")
    if x.size == 0:
        raise ValueError("a and b are empty: nothing to compare")
    diff = y - x
    b_better, a_better = int((diff > 0).sum()), int((diff < 0).sum())
    p = 1.0 if b_better + a_better == 0 else float(sps.binomtest(b_better, b_better + a_better).pvalue)
    if np.ptp(diff) == 0:
        lo = hi = float(diff[0])
    else:
        lo, hi = _bootstrap_mean(diff, n_boot, seed, confidence)
    return Paired(float(diff.mean()), lo, hi, int(x.size), b_better, a_better, min(1.0, p))


# Kept over sklearn.metrics.cohen_kappa_score (installed only as mlflow's dependency, not ours): it
# returns nan with a warning where kappa is undefined (p_e = 1); this returns None beside the agreement and n.
def cohen_kappa(a: Sequence, b: Sequence) -> Kappa:
    """Cohen's kappa of two raters' labels on the same items (yes/no, or any categories).

    kappa = (p_o - p_e) / (1 - p_e), with p_o the observed agreement and p_e the agreement
    expected from each rater's own label shares.  Undefined (None) when p_e = 1: both raters gave
    one and the same label to every item, so there is no chance level to beat.
    """
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"a and b must be paired 1-D sequences, got shapes {x.shape} and {y.shape}")
    if x.size == 0:
        return Kappa(None, None, 0)
    observed = float((x == y).mean())
    expected = float(sum((x == label).mean() * (y == label).mean() for label in np.union1d(x, y)))
    if expected >= 1.0:
        return Kappa(None, observed, int(x.size))
    return Kappa((observed - expected) / (1 - expected), observed, int(x.size))


# ---------------------------------------------------------------- sweeps: seeds, families, power


class Crossed(NamedTuple):
    diff: float        # mean over requests of (mean over b's seeds - mean over a's seeds)
    lo: float
    hi: float
    n: int             # requests every seed of both sides rated
    p_value: float     # two-sided, from the same bootstrap replicates


def crossed_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                      confidence: float = 0.95) -> Crossed:
    """b - a where rows are requests and columns training seeds (a: requests x s, b: requests x k).

    Requests and seeds are crossed random factors, so each replicate resamples both at once
    (the two-way "pigeonhole" bootstrap, Owen 2007): n requests with replacement, and
    independently s of a's seeds and k of b's, then the mean over the drawn requests of the
    drawn seeds' mean difference.  A side with one seed contributes no training variance (its
    seed is held fixed).  p: twice the smaller share of replicates on either side of zero, with
    the +1 of a Monte Carlo p-value (smallest possible 2 / (n_boot + 1)).
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"a and b must be requests x seeds with the same requests, got {x.shape} and {y.shape}")
    if x.size == 0 or y.size == 0 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("a and b need at least one request and seed each, all finite")
    _check_confidence(confidence)
    rng = np.random.default_rng(seed)
    n = x.shape[0]

    def weights(k: int) -> np.ndarray:  # replicate x k: how often each index was drawn, over k
        return rng.multinomial(k, np.full(k, 1 / k), size=int(n_boot)) / k

    w_req, w_a, w_b = weights(n), weights(x.shape[1]), weights(y.shape[1])
    per_request = y @ w_b.T - x @ w_a.T               # requests x replicates
    reps = np.einsum("ir,ri->i", w_req, per_request)  # one mean difference per replicate
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(reps, [tail, 1 - tail])
    p = 2 * min((reps <= 0).sum() + 1, (reps >= 0).sum() + 1) / (n_boot + 1)
    return Crossed(float((y.mean(axis=1) - x.mean(axis=1)).mean()), float(lo), float(hi), n, min(1.0, float(p)))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (scipy has Benjamini-Hochberg, not Holm): the i-th smallest of
    m p-values times (m - i + 1), made monotone, capped at 1.  None (no test) stays None."""
    known = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (len(known) - rank) * p))
        out[i] = running
    return out


def icc_oneway(groups: Sequence[Sequence[float]]) -> float | None:
    """Intraclass correlation ICC(1) of values grouped by request (one-way ANOVA, unequal sizes).

    (MSB - MSW) / (MSB + (n0 - 1) MSW), n0 = (N - sum n_i^2 / N) / (k - 1).  None when it cannot
    be estimated: fewer than two groups, no group with two values, or no variation at all.
    """
    arrays = [np.asarray(g, dtype=float) for g in groups if len(g)]
    sizes = np.array([g.size for g in arrays])
    k, total = len(arrays), int(sizes.sum())
    if k < 2 or total == k:
        return None
    grand = np.concatenate(arrays).mean()
    msb = sum(g.size * (g.mean() - grand) ** 2 for g in arrays) / (k - 1)
    msw = sum(((g - g.mean()) ** 2).sum() for g in arrays) / (total - k)
    n0 = (total - (sizes ** 2).sum() / total) / (k - 1)
    denominator = msb + (n0 - 1) * msw
    return None if denominator <= 0 else float((msb - msw) / denominator)


def min_detectable_difference(base_rate: float, requests: int, samples_per_request: float, icc: float,
                              seeds_a: int = 1, seeds_b: int = 1, alpha: float = 0.05,
                              power: float = 0.8) -> float:
    """Smallest true difference in a rate a two-sided test at ``alpha`` finds with ``power``.

    (z_{1-alpha/2} + z_power) * sqrt(p (1 - p) deff / (n m) * (1/s_a + 1/s_b)): two arms rated on
    the same n requests with m responses each, the design effect deff = 1 + (m - 1) icc counting
    correlated responses of one request, each side averaged over its seeds' independent samples.
    The arms are treated as independent (pairing by request can only shrink this) and training
    variance between seeds is not included (unknown before a sweep has run).
    """
    if not 0 < base_rate < 1 or requests < 1 or samples_per_request < 1 or not 0 < power < 1:
        raise ValueError(f"need 0 < base_rate < 1, requests >= 1, samples >= 1, 0 < power < 1; got "
                         f"{base_rate}, {requests}, {samples_per_request}, {power}")
    _check_confidence(1 - alpha)
    deff = 1 + (samples_per_request - 1) * min(1.0, max(0.0, icc))
    variance = base_rate * (1 - base_rate) * deff / (requests * samples_per_request) * (1 / seeds_a + 1 / seeds_b)
    return float((sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)) * math.sqrt(variance))
