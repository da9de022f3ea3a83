"""bench/stats.py, the benches' intervals over seeds, against printed t tables and sums done by hand."""

from __future__ import annotations

import math

import pytest

from bench.stats import mean_ci, paired_diff_ci, t_quantile, verdict


@pytest.mark.parametrize(("df", "level", "table"), [
    (1, 0.95, 12.706), (2, 0.95, 4.303), (4, 0.95, 2.776), (10, 0.95, 2.228), (4, 0.90, 2.132), (2, 0.99, 9.925),
])
def test_t_quantile_matches_the_printed_table(df, level, table):
    assert t_quantile(df, level) == pytest.approx(table, abs=5e-4)


def test_t_quantile_tends_to_the_normal_quantile():
    assert t_quantile(100000) == pytest.approx(1.95996, abs=1e-4)


def test_mean_ci_of_three_seeds_by_hand():
    mean, half = mean_ci([1.0, 2.0, 4.0])
    # mean 7/3; sample variance ((-4/3)^2 + (-1/3)^2 + (5/3)^2) / 2 = 7/3; half = 4.303 * sqrt(7/3) / sqrt(3)
    assert mean == pytest.approx(7 / 3)
    assert half == pytest.approx(4.302653 * math.sqrt(7 / 3) / math.sqrt(3), rel=1e-5)


def test_paired_difference_by_hand():
    diff, half = paired_diff_ci([1.0, 1.5, 2.0], [0.8, 1.0, 1.9])
    # differences 0.2, 0.5, 0.1: mean 0.26667, sample sd 0.20817, half = 4.303 * 0.20817 / sqrt(3)
    assert diff == pytest.approx(0.266667, abs=1e-6)
    assert half == pytest.approx(0.517115, abs=1e-5)
    assert verdict(diff, half) == "spans zero"


def test_pairing_cancels_what_a_seed_shares():
    # Seeds move both methods alike; the method is always 0.05 to 0.07 better. Apart, the intervals of
    # the two means overlap; paired, the difference is clearly above zero.
    baseline = [1.2, 1.8, 1.5, 1.0, 1.6]
    better = [b + d for b, d in zip(baseline, [0.05, 0.07, 0.06, 0.05, 0.07])]
    (m_better, h_better), (m_base, h_base) = mean_ci(better), mean_ci(baseline)
    assert m_better - h_better < m_base + h_base
    diff, half = paired_diff_ci(better, baseline)
    assert diff == pytest.approx(0.06)
    assert verdict(diff, half) == "above zero"
    assert verdict(-diff, half) == "below zero"


def test_one_seed_has_no_interval():
    mean, half = mean_ci([1.5])
    assert mean == 1.5 and math.isnan(half)
    assert verdict(0.3, half) == "spans zero"


@pytest.mark.parametrize(("call", "message"), [
    (lambda: paired_diff_ci([1.0, 2.0], [1.0]), "same seed order"),
    (lambda: mean_ci([]), "one result per seed"),
    (lambda: mean_ci([1.0, float("nan")]), "finite"),
    (lambda: t_quantile(0), "number of seeds minus one"),
    (lambda: t_quantile(3, 95), "between 0 and 1"),
])
def test_bad_input_is_refused_with_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()
