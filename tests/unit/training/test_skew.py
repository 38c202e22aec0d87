"""Training/serving skew from serving counts (exporter.training.skew): the edge cases the
store tests do not reach, against numbers computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exporter.training.schema import FeatureSummary
from exporter.training.skew import Bins, ServingCounts, bins, feature_skew, standardized_mean_difference

DEVICE = FeatureSummary(
    name="device", kind="categorical", count=100, missing_ratio=0.2, categories={"a": 0.75, "b": 0.25}
)
HOUR = FeatureSummary(
    name="hour", kind="numeric", count=10, missing_ratio=0.0, mean=1.5, stddev=0.5, min=1.0, max=2.0,
    value_shares=[(1.0, 0.5), (2.0, 0.5)],
)  # fmt: skip


def test_standardized_mean_difference_by_hand():
    # Austin 2009, eq. 1: (1 - 0) / sqrt((1 + 1) / 2) = 1; (3 - 1) / sqrt((4 + 0) / 2) = sqrt(2)
    assert standardized_mean_difference(1.0, 1.0, 0.0, 1.0) == 1.0
    assert standardized_mean_difference(3.0, 2.0, 1.0, 0.0) == pytest.approx(math.sqrt(2))
    assert standardized_mean_difference(5.0, 0.0, 5.0, 0.0) == 0.0  # the same constant
    assert standardized_mean_difference(7.0, 0.0, 5.0, 0.0) is None  # two different constants


def test_a_summary_of_the_other_kind_gives_no_bins_and_no_skew():
    assert bins(DEVICE, "numeric", 30) == Bins()
    skew = feature_skew(
        "1h", "device", "numeric", DEVICE, Bins(), ServingCounts(rows=4, missing=1, shifted_sum=6.0, moment_rows=3)
    )
    assert skew.mean == 2.0 and skew.psi is None and skew.missing_ratio_delta is None


def test_an_empty_window_has_counts_but_no_ratios():
    skew = feature_skew(
        "1h", "hour", "numeric", HOUR, bins(HOUR, "numeric", 30), ServingCounts(0, 0, bin_counts=(0, 0, 0))
    )
    assert (skew.rows, skew.missing_ratio, skew.mean, skew.psi, skew.missing_ratio_delta) == (0, None, None, None, None)


def test_categorical_psi_and_unseen_share_by_hand():
    plan = bins(DEVICE, "categorical", 30)
    assert plan.categories == ("a", "b")
    # 10 rows: 2 missing, a 4, b 1, 3 unseen ("c")
    skew = feature_skew(
        "1h", "device", "categorical", DEVICE, plan, ServingCounts(10, 2, category_counts=(4, 1), unlisted=3)
    )
    expected = np.array([0.75 * 0.8, 0.25 * 0.8, 1e-4, 0.2])  # a, b, the rest (0, floored), missing
    actual = np.array([0.4, 0.1, 0.3, 0.2])
    assert skew.psi == pytest.approx(float(np.sum((actual - expected) * np.log(actual / expected))))
    assert skew.unseen_ratio == 3 / 8 and dict(skew.categories) == {"a": 0.5, "b": 0.125, "__other__": 0.375}
    assert skew.missing_ratio_delta == pytest.approx(0.0)
    # Cut to one category by max_categories: b is counted as not listed, unseen is unknown.
    cut = bins(DEVICE, "categorical", 1)
    skew = feature_skew(
        "1h", "device", "categorical", DEVICE, cut, ServingCounts(10, 2, category_counts=(4,), unlisted=4)
    )
    assert skew.unseen_ratio is None and dict(skew.categories) == {"a": 0.5, "__other__": 0.5}


def test_numeric_psi_on_exact_value_bins_by_hand():
    plan = bins(HOUR, "numeric", 30)
    assert plan.edges == (1.0, 2.0) and plan.shift == 1.5
    # 4 rows: values 2, 2, 3 (above every training value) and one missing; shifted by 1.5
    counts = ServingCounts(
        4, 1, shifted_sum=0.5 + 0.5 + 1.5, shifted_squares=0.25 + 0.25 + 2.25, moment_rows=3, bin_counts=(0, 2, 1)
    )
    skew = feature_skew("1h", "hour", "numeric", HOUR, plan, counts)
    assert skew.mean == pytest.approx(7 / 3) and skew.stddev == pytest.approx(np.std([2, 2, 3]))
    e = np.maximum([0.5, 0.5, 0.0, 0.0], 1e-4)
    a = np.maximum([0.0, 0.5, 0.25, 0.25], 1e-4)
    assert skew.psi == pytest.approx(float(np.sum((a - e) * np.log(a / e))))
    assert skew.standardized_mean_difference == pytest.approx((7 / 3 - 1.5) / math.sqrt((np.var([2, 2, 3]) + 0.25) / 2))


def test_stored_standard_deviations_past_1e154_do_not_overflow():
    """The API accepts any finite float: squaring a stddev of 1e160 overflowed and downed the
    model's features source (attack 2026-12-01). hypot does not square."""
    assert standardized_mean_difference(50.0, 1e160, 50.0, 1e160) == 0.0
    assert standardized_mean_difference(1e160, 1e160, 0.0, 1e160) == pytest.approx(1.0)
    assert standardized_mean_difference(1e308, 1.0, -1e308, 1.0) is None  # the difference overflows


def test_a_value_past_the_moment_bound_leaves_mean_and_stddev_absent_not_wrong():
    """A window where one present value was not summed (|value| > MOMENT_BOUND) has bins and
    a missing share but no mean, stddev or SMD: a stddev of 0.0 from cancelled infinities
    would read as real."""
    counts = ServingCounts(4, 0, shifted_sum=3.0, shifted_squares=5.0, moment_rows=3, bin_counts=(1, 2, 1))
    skew = feature_skew("1h", "hour", "numeric", HOUR, bins(HOUR, "numeric", 30), counts)
    assert skew.mean is None and skew.stddev is None and skew.standardized_mean_difference is None
    assert skew.psi is not None and skew.missing_ratio == 0.0
    huge = FeatureSummary.model_validate(
        {
            "name": "x",
            "kind": "numeric",
            "count": 10,
            "missing_ratio": 0.0,
            "mean": 1e200,
            "stddev": 1.0,
            "min": 0.0,
            "max": 1e201,
        }
    )
    assert bins(huge, "numeric", 30).shift == 0.0  # a shift past the bound would overflow the sums itself
