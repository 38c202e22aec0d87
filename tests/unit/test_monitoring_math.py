"""The final arithmetic against scikit-learn and numpy on the same samples."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from exporter.monitoring_math import (
    percentiles_from_buckets,
    pooled_variance,
    roc_auc_bucket_error_bound,
    roc_auc_from_counts,
)


def _class_counts(y, score, decimals=None):
    """Per-distinct-score (or per-bucket) positive and negative counts, ascending."""
    keys = score if decimals is None else np.floor(score * 10**decimals)
    values, inverse = np.unique(keys, return_inverse=True)
    positives = np.bincount(inverse, weights=y, minlength=len(values))
    negatives = np.bincount(inverse, weights=1 - y, minlength=len(values))
    return positives, negatives


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    score = np.round(rng.beta(2, 5, 2000), 2)  # two decimals: many ties, as in car_loan
    y = (rng.random(2000) < score).astype(float)
    assert roc_auc_from_counts(*_class_counts(y, score)) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_auc_with_exact_zero_and_one_scores():
    score = np.array([0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.2])
    y = np.array([0, 1, 1, 1, 0, 1, 0.0])
    assert roc_auc_from_counts(*_class_counts(y, score)) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


@pytest.mark.parametrize("y", [np.zeros(5), np.ones(5)])
def test_auc_absent_with_one_class(y):
    score = np.linspace(0.1, 0.5, 5)
    assert roc_auc_from_counts(*_class_counts(y, score)) is None
    assert roc_auc_bucket_error_bound(*_class_counts(y, score), pure=np.zeros(5, dtype=bool)) is None


@pytest.mark.parametrize("seed", range(5))
def test_bucketed_auc_within_its_error_bound(seed):
    rng = np.random.default_rng(seed)
    score = rng.beta(1, 30, 5000)  # continuous CTR-like scores, many per 1e-3 bucket
    y = (rng.random(5000) < score * 3).astype(float)
    exact = roc_auc_score(y, score)
    positives, negatives = _class_counts(y, score, decimals=3)
    bucketed = roc_auc_from_counts(positives, negatives)
    bound = roc_auc_bucket_error_bound(positives, negatives, pure=np.zeros(len(positives), dtype=bool))
    assert 0 < bound < 0.5
    assert abs(bucketed - exact) <= bound
    assert bucketed != pytest.approx(exact, abs=1e-9)  # the bucketing really changed the number


def test_pure_buckets_make_the_auc_exact():
    score = np.round(np.random.default_rng(7).random(500), 2)
    y = (np.random.default_rng(8).random(500) < score).astype(float)
    positives, negatives = _class_counts(y, score, decimals=4)  # every bucket one distinct score
    assert roc_auc_bucket_error_bound(positives, negatives, pure=np.ones(len(positives), dtype=bool)) == 0.0
    assert roc_auc_from_counts(positives, negatives) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1001])
def test_percentiles_of_pure_buckets_match_numpy_linear(n):
    rng = np.random.default_rng(n)
    sample = np.round(rng.random(n), 1)  # ties
    values, counts = np.unique(sample, return_counts=True)
    got = percentiles_from_buckets(values, values, counts)
    for q, value in got.items():
        assert value == pytest.approx(np.percentile(sample, q, method="linear"), abs=1e-12), q
    assert sorted(got) == [1, 5, 25, 50, 75, 95, 99]


def test_percentiles_of_impure_buckets_within_the_bucket_width():
    sample = np.random.default_rng(3).random(5000)
    keys = np.floor(sample * 100)
    buckets = [sample[keys == k] for k in np.unique(keys)]
    got = percentiles_from_buckets([b.min() for b in buckets], [b.max() for b in buckets], [len(b) for b in buckets])
    for q, value in got.items():
        assert abs(value - np.percentile(sample, q)) < 0.01, q


def test_evenly_spaced_bucket_is_exact():
    sample = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9])  # first bucket holds 0.1..0.5, evenly spaced
    got = percentiles_from_buckets([0.1, 0.9], [0.5, 0.9], [5, 1])
    for q, value in got.items():
        assert value == pytest.approx(np.percentile(sample, q), abs=1e-12), q


def test_percentiles_of_empty_sample():
    assert percentiles_from_buckets(np.array([]), np.array([]), np.array([], dtype=int)) == {}


def test_pooled_variance_matches_numpy_where_the_naive_formula_fails():
    rng = np.random.default_rng(11)
    sample = 0.5 + rng.normal(0, 1e-9, 100_000)  # tiny variance: sum of squares minus square of sum cancels
    keys = np.floor(sample * 1e4)
    groups = [sample[keys == k] for k in np.unique(keys)]
    edges = [k * 1e-4 for k in np.unique(keys)]
    variance = pooled_variance(
        [len(g) for g in groups],
        edges,
        [np.sum(g - e) for g, e in zip(groups, edges, strict=False)],
        [np.sum((g - e) ** 2) for g, e in zip(groups, edges, strict=False)],
    )
    assert variance == pytest.approx(np.var(sample), rel=1e-6)
    naive = np.mean(sample**2) - np.mean(sample) ** 2
    assert abs(naive - np.var(sample)) > 1e-3 * np.var(sample)  # the naive formula really is off here
