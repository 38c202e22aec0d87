"""The final arithmetic on aggregates returned by the database.

The database returns small aggregates (per-distinct-score or per-bucket counts, sums);
these functions turn them into the exported numbers. Every input array is ordered by
ascending score (or bucket) and has one entry per distinct score (or bucket).
"""

from __future__ import annotations

import math

import numpy as np

#: Log loss clips probabilities to [EPS, 1 - EPS] (docs/metrics.md).
LOGLOSS_EPS = 1e-15

#: Percentiles exported as ``mlmon_prediction_score_percentile{percentile=...}``.
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def roc_auc_from_counts(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """ROC AUC from per-score class counts, by the Mann–Whitney U statistic.

    AUC = (sum over positive/negative pairs of [s_pos > s_neg] + 0.5 [s_pos == s_neg]) / (P N)
    (Mann & Whitney 1947; Hanley & McNeil 1982), which equals scikit-learn's
    ``roc_auc_score`` with ties. ``positives[i]`` and ``negatives[i]`` count the labeled
    predictions at the i-th smallest score. O(distinct scores).

    Returns:
        The AUC in [0, 1], or ``None`` when either class is absent (AUC undefined;
        never 0 or 0.5).
    """
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    negatives_below = np.cumsum(neg) - neg
    return float(np.sum(pos * (negatives_below + 0.5 * neg)) / (n_pos * n_neg))


def roc_auc_bucket_error_bound(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """Largest possible |AUC(buckets) - AUC(exact scores)| when scores were bucketed.

    Pairs in different buckets are ordered exactly by their buckets; a positive/negative
    pair inside one bucket counts ½ but its true contribution is 0, ½ or 1, so the error
    is at most sum_b 0.5 pos_b neg_b / (P N).

    Returns:
        The bound in [0, 0.5], or ``None`` when either class is absent.
    """
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    return float(0.5 * np.sum(pos * neg) / (n_pos * n_neg))


def percentiles_from_counts(values: np.ndarray, counts: np.ndarray, percentiles=PERCENTILES) -> dict[int, float]:
    """Percentiles of a sample given as sorted distinct values and their counts.

    Linear interpolation between order statistics, as ``numpy.percentile(method="linear")``
    (Hyndman & Fan 1996, definition 7): with n values sorted, the q-th percentile is
    x[i] + (h - i) (x[i+1] - x[i]) where h = (n - 1) q / 100 and i = floor(h).

    Args:
        values: shape (k,), ascending, distinct.
        counts: shape (k,), positive integers, n = counts.sum() > 0.

    Returns:
        ``{percentile: value}``; empty when n == 0.
    """
    values = np.asarray(values, dtype=np.float64)
    cumulative = np.cumsum(np.asarray(counts, dtype=np.int64))
    n = int(cumulative[-1]) if len(cumulative) else 0
    if n == 0:
        return {}

    def order_statistic(rank: int) -> float:  # 0-based rank in the sorted sample
        return float(values[np.searchsorted(cumulative, rank, side="right")])

    out = {}
    for q in percentiles:
        h = (n - 1) * q / 100.0
        i = math.floor(h)
        low = order_statistic(i)
        high = order_statistic(min(i + 1, n - 1))
        out[q] = low + (h - i) * (high - low)
    return out



#: PSI smoothing: every bin's share is raised to at least this, so that an empty bin on
#: one side gives a large but finite term instead of infinity (docs/metrics.md).
PSI_MIN_SHARE = 1e-4


def population_stability_index(expected: np.ndarray, actual: np.ndarray) -> float:
    """PSI between two distributions given as shares over the same bins.

    PSI = sum_i (a_i - e_i) ln(a_i / e_i), natural log, after raising every share to at
    least ``PSI_MIN_SHARE`` (Siddiqi, *Credit Risk Scorecards*, 2006; Yurdakul 2018).
    Common reading: < 0.1 stable, 0.1–0.25 moderate shift, > 0.25 large shift.

    Args:
        expected: shape (k,), the reference shares (sum 1).
        actual: shape (k,), the compared shares (sum 1).
    """
    e = np.maximum(np.asarray(expected, dtype=np.float64), PSI_MIN_SHARE)
    a = np.maximum(np.asarray(actual, dtype=np.float64), PSI_MIN_SHARE)
    return float(np.sum((a - e) * np.log(a / e)))
