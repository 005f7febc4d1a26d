"""Statistics with worked numbers: Wilson, t intervals, intervals over requests, sign test, kappa."""

import math

import numpy as np
import pytest

from cai_ray.stats import cohen_kappa, mean_ci, paired_units, summarize_over_seeds, unit_interval, wilson

# ------------------------------------------------------------------ Wilson


@pytest.mark.parametrize(
    "k,n,lo,hi",
    [(8, 10, 0.4902, 0.9433), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (5, 10, 0.2366, 0.7634)],
)
def test_wilson_known_values(k, n, lo, hi):
    p, got_lo, got_hi = wilson(k, n)
    assert p == k / n
    assert (round(got_lo, 4), round(got_hi, 4)) == (lo, hi)


def test_wilson_matches_its_closed_form():
    # centre (2k + z^2) / (2(n + z^2)), half z sqrt(n p (1-p) + z^2/4) / (n + z^2); z = 1.959964
    k, n, z = 41, 161, 1.959963984540054
    p = k / n
    centre = (2 * k + z * z) / (2 * (n + z * z))
    half = z * math.sqrt(n * p * (1 - p) + z * z / 4) / (n + z * z)
    _, lo, hi = wilson(k, n)
    assert (lo, hi) == (pytest.approx(centre - half, abs=1e-9), pytest.approx(centre + half, abs=1e-9))


def test_wilson_edge_cases():
    p, lo, hi = wilson(0, 0)
    assert math.isnan(p) and (lo, hi) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes <= n"):
        wilson(11, 10)
    with pytest.raises(ValueError, match="must be integers"):
        wilson(2.5, 10)
    with pytest.raises(ValueError, match="confidence"):
        wilson(1, 10, confidence=1.0)


# ------------------------------------------------------------------ t intervals


def test_mean_ci_t_interval():
    mean, lo, hi = mean_ci([0.2, 0.3, 0.25])
    # sd 0.05, se 0.05/sqrt(3), t(0.975, 2 df) = 4.302652730
    half = 4.302652730 * 0.05 / math.sqrt(3)
    assert mean == pytest.approx(0.25)
    assert (lo, hi) == (pytest.approx(0.25 - half), pytest.approx(0.25 + half))
    assert all(type(x) is float for x in (mean, lo, hi))


def test_mean_ci_single_value_and_empty():
    mean, lo, hi = mean_ci([3.0])
    assert mean == 3.0 and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])
    with pytest.raises(ValueError, match=r"values\[1\] is not a finite number"):
        mean_ci([1.0, float("nan")])
    assert summarize_over_seeds([1.0, 2.0, 3.0]).estimate == pytest.approx(2.0)


# ------------------------------------------------------------------ intervals over requests


def test_unit_interval_is_the_mean_of_per_request_values_with_a_seeded_bootstrap():
    per_request = [0.0, 0.2, 1.0, 0.6, 0.0, 0.4, 1.0, 0.8]  # e.g. 5 templates per request
    value, lo, hi = unit_interval(per_request, rate=True, n_boot=4000, seed=3)
    assert value == pytest.approx(0.5)
    assert 0.0 < lo < 0.5 < hi < 1.0
    assert unit_interval(per_request, rate=True, n_boot=4000, seed=3) == (value, lo, hi)


def test_responses_duplicated_within_requests_leave_the_interval_unchanged():
    # Rates are per request first: sampling every request k more times at the same rate changes
    # nothing, whereas counting responses as independent would shrink the interval by sqrt(k).
    rng = np.random.default_rng(0)
    responses = {f"r{i}": list(rng.integers(0, 2, size=3).astype(float)) for i in range(30)}
    once = [np.mean(v) for v in responses.values()]
    thrice = [np.mean(v * 3) for v in responses.values()]
    assert unit_interval(once, True, seed=1) == unit_interval(thrice, True, seed=1)
    naive = unit_interval([x for v in responses.values() for x in v * 3], True, seed=1)
    width = unit_interval(once, True, seed=1)
    assert naive.hi - naive.lo < 0.7 * (width.hi - width.lo)  # about 1/2 here


def test_unit_interval_degenerate_rates_fall_back_to_wilson_over_requests():
    # 0 of 40 requests: a bootstrap says [0, 0]; Wilson over the 40 units says [0, 3.84/43.84].
    value, lo, hi = unit_interval([0.0] * 40, rate=True)
    assert (value, lo) == (0.0, 0.0) and hi == pytest.approx(1.959964 ** 2 / (40 + 1.959964 ** 2), abs=1e-5)
    assert unit_interval([1.0] * 10, rate=True).lo == pytest.approx(0.7225, abs=1e-4)
    assert unit_interval([4.0, 4.0], rate=False) == (4.0, 4.0, 4.0)
    assert all(math.isnan(x) for x in unit_interval([], rate=True))


# ------------------------------------------------------------------ paired tests over requests


def test_paired_units_sign_test_worked_numbers():
    # b beats a on 6 requests, loses on 1, ties on 3: p = 2 * P(X <= 1 | n=7, 1/2) = 2 * 8/128 = 0.125.
    a = [0, 0, 0, 0, 0, 0, 1, 1, 0, 0.5]
    b = [1, 1, 1, 1, 1, 1, 0, 1, 0, 0.5]
    d = paired_units(a, b, n_boot=2000, seed=0)
    assert (d.n, d.b_better, d.a_better) == (10, 6, 1)
    assert d.p_value == pytest.approx(0.125)
    assert d.diff == pytest.approx(0.5)
    assert d.lo < 0.5 < d.hi


def test_paired_units_with_one_outcome_per_request_is_mcnemars_exact_test():
    # 0/1 outcomes: discordant pairs 9 (b) vs 2 (a); McNemar exact p = 2 * sum_{k<=2} C(11,k) / 2^11.
    a = [0] * 9 + [1] * 2 + [1] * 5 + [0] * 4
    b = [1] * 9 + [0] * 2 + [1] * 5 + [0] * 4
    expected = 2 * (1 + 11 + 55) / 2 ** 11
    assert paired_units(a, b).p_value == pytest.approx(expected)


def test_paired_units_identical_arms_and_bad_input():
    d = paired_units([0.5, 1.0], [0.5, 1.0])
    assert (d.diff, d.lo, d.hi, d.p_value) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="paired"):
        paired_units([1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="empty"):
        paired_units([], [])


# ------------------------------------------------------------------ agreement


def test_cohen_kappa_worked_numbers():
    # p_o = 6/8; each rater says yes half the time, p_e = 0.5; kappa = (0.75 - 0.5) / 0.5 = 0.5.
    k = cohen_kappa([1, 1, 1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1, 1, 0])
    assert (k.kappa, k.agreement, k.n) == (pytest.approx(0.5), 0.75, 8)
    # One rater always yes: p_e = 0.5 * 1 + 0.5 * 0 = 0.5, p_o = 0.5 -> kappa 0 (chance level).
    assert cohen_kappa([1, 1, 1, 1], [1, 0, 1, 0]).kappa == pytest.approx(0.0)
    # Perfect disagreement on a balanced set: kappa -1.
    assert cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]).kappa == pytest.approx(-1.0)


def test_cohen_kappa_undefined_cases():
    assert cohen_kappa([True] * 5, [True] * 5).kappa is None  # both constant and agreeing
    assert cohen_kappa([], []) == (None, None, 0)
    with pytest.raises(ValueError, match="paired"):
        cohen_kappa([1, 0], [1])


# ------------------------------------------------------------------ sweeps


def test_holm_worked_numbers():
    from cai_ray.stats import holm

    # sorted 0.01, 0.03, 0.04 (m=3): 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; max(0.06, 1 x 0.04) = 0.06
    adjusted = holm([0.01, 0.04, 0.03, None])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and adjusted[3] is None
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def test_crossed_bootstrap_resamples_requests_and_seeds():
    from cai_ray.stats import crossed_bootstrap

    a = np.zeros((20, 1))
    same = crossed_bootstrap(a, a, n_boot=500)
    assert (same.diff, same.lo, same.hi, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    all_lower = crossed_bootstrap(a, -np.ones((20, 2)), n_boot=500)
    assert all_lower.diff == -1.0 and all_lower.p_value == pytest.approx(2 / 501)
    # Seeds that disagree widen the interval beyond what requests alone give: one seed at -1 on
    # every request, the other at 0.
    seeds = crossed_bootstrap(a, np.column_stack([-np.ones(20), np.zeros(20)]), n_boot=2000)
    assert seeds.diff == -0.5 and seeds.lo == pytest.approx(-1.0) and seeds.hi == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same requests"):
        crossed_bootstrap(np.zeros((3, 1)), np.zeros((4, 1)))


def test_icc_and_minimum_detectable_difference_worked_numbers():
    from cai_ray.stats import icc_oneway, min_detectable_difference

    # grand 0.5; MSB (2(.25) + 2(.25) + 0) / 2 = 0.5; MSW 0.5 / 3; n0 = 2 -> (0.5 - 1/6) / (0.5 + 1/6) = 0.5
    assert icc_oneway([[1, 1], [0, 0], [1, 0]]) == pytest.approx(0.5)
    assert icc_oneway([[1], [0]]) is None  # one response per request: not estimable
    # (1.959964 + 0.841621) sqrt(0.88 x 0.12 / 1000 x 2) = 0.04070
    assert min_detectable_difference(0.88, 1000, 1, 0.0) == pytest.approx(0.040707, abs=1e-5)
    # m = 4 responses fully correlated count as one: the same as one response per request.
    assert min_detectable_difference(0.88, 1000, 4, 1.0) == pytest.approx(0.040707, abs=1e-5)
    # ... and uncorrelated ones as four requests' worth.
    assert min_detectable_difference(0.88, 1000, 4, 0.0) == pytest.approx(0.040707 / 2, abs=1e-5)
