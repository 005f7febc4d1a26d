import math
import re

import numpy as np
import pytest

from cai_ray import stats
from cai_ray.stats import mcnemar, mean_ci, paired_bootstrap, summarize_over_seeds, t_quantile, wilson


def closed_form_wilson(k, n, z):
    p = k / n
    centre = (2 * k + z * z) / (2 * (n + z * z))
    half = z * math.sqrt(n * p * (1 - p) + z * z / 4) / (n + z * z)
    return centre - half, centre + half


# ------------------------------------------------------------------ Wilson


@pytest.mark.parametrize(
    "k,n,lo,hi",
    [(8, 10, 0.4902, 0.9433), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (5, 10, 0.2366, 0.7634)],
)
def test_wilson_known_values(k, n, lo, hi):
    p, got_lo, got_hi = wilson(k, n)
    assert p == k / n
    assert (round(got_lo, 4), round(got_hi, 4)) == (lo, hi)


@pytest.mark.parametrize("k,n,z", [(3, 7, 1.96), (41, 161, 2.576), (1, 1000, 1.0), (999, 1000, 1.96)])
def test_wilson_matches_closed_form(k, n, z):
    _, lo, hi = wilson(k, n, z)
    ref_lo, ref_hi = closed_form_wilson(k, n, z)
    assert lo == pytest.approx(max(0.0, ref_lo), abs=1e-12)
    assert hi == pytest.approx(min(1.0, ref_hi), abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_edge_cases():
    p, lo, hi = wilson(0, 0)
    assert math.isnan(p) and (lo, hi) == (0.0, 1.0)
    assert wilson(0, 10).lo == 0.0  # not a tiny negative from rounding
    with pytest.raises(ValueError, match="successes <= n"):
        wilson(11, 10)
    with pytest.raises(ValueError, match="successes <= n"):
        wilson(-1, 10)
    with pytest.raises(ValueError, match="must be integers"):
        wilson(2.5, 10)
    with pytest.raises(ValueError, match="z must be positive"):
        wilson(1, 10, z=0)


# ------------------------------------------------------------------ t quantiles and mean_ci


@pytest.mark.parametrize(
    "df,q,expected",
    [(1, 0.975, 12.706204736), (2, 0.975, 4.302652730), (4, 0.975, 2.776445105),
     (9, 0.995, 3.249835542), (30, 0.975, 2.042272456), (1000, 0.975, 1.962339081)],
)
def test_t_quantile_table(df, q, expected):
    assert t_quantile(q, df) == pytest.approx(expected, rel=1e-8)
    assert t_quantile(1 - q, df) == pytest.approx(-expected, rel=1e-8)


def test_t_quantile_against_scipy_when_available():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 50, 199, 200, 201, 5000):
        for q in (0.6, 0.9, 0.975, 0.999):
            assert t_quantile(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-9)


def test_mean_ci_t_interval():
    mean, lo, hi = mean_ci([0.2, 0.3, 0.25])
    assert mean == pytest.approx(0.25)
    # sd 0.05, se 0.05/sqrt(3), t(2) 4.302652730
    half = 4.302652730 * 0.05 / math.sqrt(3)
    assert (lo, hi) == (pytest.approx(0.25 - half), pytest.approx(0.25 + half))
    assert all(type(x) is float for x in (mean, lo, hi))


def test_mean_ci_edge_cases():
    mean, lo, hi = mean_ci([0.4])
    assert mean == 0.4 and math.isnan(lo) and math.isnan(hi)
    assert mean_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="values is empty"):
        mean_ci([])
    with pytest.raises(ValueError, match=re.escape("values[1] is not a finite number")):
        mean_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([0.1, 0.2], confidence=95)


def test_summarize_over_seeds_is_wider_with_fewer_seeds():
    three = summarize_over_seeds([0.30, 0.34, 0.32])
    six = summarize_over_seeds([0.30, 0.34, 0.32, 0.30, 0.34, 0.32])
    assert three.estimate == pytest.approx(0.32) and six.estimate == pytest.approx(0.32)
    assert (three.hi - three.lo) > (six.hi - six.lo)


# ------------------------------------------------------------------ paired bootstrap


def test_paired_bootstrap_reproducible_and_sensible():
    rng = np.random.default_rng(7)
    base = rng.random(300)
    a, b = base + 0.1 + rng.normal(0, 0.05, 300), base
    first = paired_bootstrap(a, b, n_boot=1000, seed=3)
    assert first == paired_bootstrap(a, b, n_boot=1000, seed=3)
    assert first != paired_bootstrap(a, b, n_boot=1000, seed=4)
    diff, lo, hi = first
    assert diff == pytest.approx(float(np.mean(a - b)))
    assert lo < diff < hi
    # the percentile interval's width should be close to the normal-theory 2 * 1.96 * SE
    se = float(np.std(a - b, ddof=1)) / math.sqrt(300)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_paired_bootstrap_pairing_matters():
    # A large shared per-prompt effect cancels in paired differences: the interval stays narrow.
    base = np.linspace(0, 100, 200)
    _, lo, hi = paired_bootstrap(base + 1.0, base, n_boot=500)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


def test_paired_bootstrap_accepts_bools_and_checks_input():
    diff, lo, hi = paired_bootstrap([True, True, False, True], [False, True, False, False], n_boot=200)
    assert diff == 0.5 and 0.0 <= lo <= diff <= hi <= 1.0
    with pytest.raises(ValueError, match="lengths 3 and 2 differ"):
        paired_bootstrap([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap([1], [2], n_boot=0)
    with pytest.raises(ValueError, match=re.escape("b[0] is not a finite number")):
        paired_bootstrap([1.0], [float("inf")])


def test_paired_bootstrap_large_input_chunks():
    a = np.zeros(20_000)
    a[::4] = 1.0
    diff, lo, hi = paired_bootstrap(a, np.zeros(20_000), n_boot=300, seed=1)
    assert diff == 0.25 and lo < 0.25 < hi and hi - lo < 0.02


# ------------------------------------------------------------------ McNemar


def table(b01, b10, both=0, neither=0):
    a = [False] * b01 + [True] * b10 + [True] * both + [False] * neither
    b = [True] * b01 + [False] * b10 + [True] * both + [False] * neither
    return a, b


def test_mcnemar_exact_small_table():
    # 2 vs 8 discordant: two-sided binomial p = 2 * (1 + 10 + 45) / 1024
    assert mcnemar(*table(2, 8, both=30, neither=40)) == (2, 8, 0.109375)
    assert mcnemar(*table(3, 17)).p_value == pytest.approx(0.0025768280029296875)
    assert mcnemar(*table(5, 5)).p_value == 1.0


def test_mcnemar_chi_square_large_table():
    # Concordant cells 101 and 33, discordant 121 and 59: (|121-59|-1)^2/180 = 20.672, p = 5.45e-6
    b01, b10, p = mcnemar(*table(59, 121, both=101, neither=33))
    assert (b01, b10) == (59, 121)
    assert p == pytest.approx(5.450094825427117e-06, rel=1e-9)


def test_mcnemar_edge_cases():
    assert mcnemar([True, False], [True, False]) == (0, 0, 1.0)
    assert mcnemar([], []) == (0, 0, 1.0)
    assert mcnemar(np.array([1, 0, 0]), np.array([0, 1, 1])) == (2, 1, 1.0)
    with pytest.raises(ValueError, match="paired 1-D"):
        mcnemar([True], [True, False])
    with pytest.raises(ValueError, match="a_bool must hold only booleans"):
        mcnemar([2, 0], [1, 0])


def test_stats_imports_no_scipy_or_ray():
    source = open(stats.__file__).read()
    assert not re.search(r"^\s*(import|from)\s+(scipy|ray|torch)\b", source, flags=re.M)
