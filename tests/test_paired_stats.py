"""The paired t-interval, what a null result excludes, and the area under a curve, against values
computed by hand and published t quantiles."""
from __future__ import annotations

import math

import pytest

from gatepro_dist.experiments.paired_stats import (PairedInterval, curve_area, excluded_effects, paired_interval,
                                                    t_critical)


@pytest.mark.parametrize("df, quantile", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045), (60, 2.000)])
def test_t_critical_matches_published_quantiles(df, quantile):
    assert t_critical(df) == pytest.approx(quantile, abs=5e-4)


def test_t_critical_beyond_the_table_goes_to_the_normal_quantile():
    assert t_critical(120) == pytest.approx(1.980, abs=5e-4)  # exact 1.9799
    assert t_critical(1000) == pytest.approx(1.9623, abs=5e-4)
    assert t_critical(60) > t_critical(61) > t_critical(1000) > 1.96
    with pytest.raises(ValueError, match="df >= 1"):
        t_critical(0)


def test_interval_of_differences_one_two_three():
    interval = paired_interval([11, 12, 13], [10, 10, 10])  # differences 1, 2, 3
    assert interval.differences == (1.0, 2.0, 3.0) and interval.n == 3
    assert interval.mean == 2.0 and interval.sd == 1.0
    half = 4.303 / math.sqrt(3)  # 2.484
    assert interval.low == pytest.approx(2 - half, abs=1e-9) and interval.high == pytest.approx(2 + half, abs=1e-9)
    assert interval.low == pytest.approx(-0.484, abs=5e-4) and not interval.excludes_zero


def test_interval_of_two_pairs_uses_t_with_one_degree_of_freedom():
    interval = paired_interval([4, 6], [0, 0])  # mean 5, SD √2, half-width 12.706·√2/√2
    assert interval.sd == pytest.approx(math.sqrt(2))
    assert (interval.low, interval.high) == pytest.approx((5 - 12.706, 5 + 12.706), abs=1e-9)


def test_interval_that_excludes_zero():
    interval = paired_interval([10, 12, 11, 13], [0, 0, 0, 0])  # mean 11.5, SD 1.291, t(3) 3.182
    assert interval.low == pytest.approx(11.5 - 3.182 * 1.2909944 / 2, abs=1e-6)
    assert interval.excludes_zero


def test_fewer_than_two_pairs_give_no_interval():
    one = paired_interval([3.0], [1.0])
    assert (one.n, one.mean, one.sd, one.low, one.high) == (1, 2.0, None, None, None) and not one.excludes_zero
    none = paired_interval([], [])
    assert (none.n, none.mean, none.low) == (0, None, None)
    with pytest.raises(ValueError, match="same length"):
        paired_interval([1, 2], [1])


def test_a_null_result_says_how_large_an_effect_it_excludes():
    effects = excluded_effects(PairedInterval((), 3, 11.5, 20.0, -31.0, 54.0), unit="steps")
    assert effects.text == "excludes an advantage larger than 54 steps and a disadvantage larger than 31 steps"
    assert (effects.largest_positive, effects.largest_negative, effects.excludes_zero) == (54.0, 31.0, False)


def test_an_interval_above_zero_excludes_every_opposite_effect():
    effects = excluded_effects(PairedInterval((), 3, 30.0, 5.0, 12.0, 54.0), unit="steps")
    assert effects.excludes_zero and (effects.largest_positive, effects.largest_negative) == (54.0, 0.0)
    assert effects.text == ("excludes zero: an advantage of 12 to 54 steps "
                            "(excludes an advantage larger than 54 steps and any disadvantage)")
    below = excluded_effects(PairedInterval((), 3, -0.05, 0.01, -0.08, -0.02), "reduction", "increase")
    assert below.excludes_zero and (below.largest_positive, below.largest_negative) == (0.0, 0.08)
    assert below.text == "excludes zero: an increase of 0.02 to 0.08 (excludes any reduction and an increase larger than 0.08)"


def test_a_single_pair_is_pending():
    effects = excluded_effects(paired_interval([5], [3]))
    assert effects.text.startswith("pending (1 pair") and effects.largest_positive is None and not effects.excludes_zero


def test_curve_area_is_the_trapezoid_over_the_logged_steps():
    assert curve_area([(0, 0), (10, 10)]) == 50.0
    assert curve_area([(0, 0), (10, 10)], normalise=True) == 5.0
    points = [(11, 10), (0, 0), (1, 10)]  # uneven steps, unsorted: 0→1 area 5, 1→11 area 100
    assert curve_area(points) == 105.0
    assert curve_area(points, normalise=True) == pytest.approx(105 / 11)
    assert curve_area([(5, 7)], normalise=True) == 7.0 and curve_area([(5, 7)]) == 0.0
    assert curve_area([]) is None
