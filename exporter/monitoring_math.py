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


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or ``None`` (undefined, not exported) when either is
    missing, the denominator is 0 or the quotient is not a finite float (1e308 / 1e-308
    overflows to inf: a change ratio of +Inf would pass for a value)."""
    if numerator is None or not denominator:
        return None
    try:
        quotient = numerator / denominator
    except OverflowError:  # int / int beyond the float range
        return None
    return quotient if math.isfinite(quotient) else None


def grid_index(values: np.ndarray, scale: int) -> np.ndarray:
    """Index of the decimal grid cell holding each value: the largest integer m with
    fl(m / scale) <= value, where fl(m / scale) is the float64 nearest to the decimal m / scale.

    Cell m is ``[fl(m / scale), fl((m + 1) / scale))``, so a value written with at most
    log10(scale) decimals (stored as the float64 nearest to it, as every engine's parser
    and ``m / scale`` in IEEE arithmetic give) is the lower edge of its own cell, alone
    among such values; ``floor(value * scale)`` is not, since in float64 0.29 * 100 =
    28.999999999999996. ``queries.grid_index`` computes the same in SQL.

    Why one correction step suffices: for 0 <= value <= 1 and scale <= 2e12 the rounding
    errors of ``value * scale + 0.5`` stay below 0.5, so r = floor(value * scale + 0.5)
    is the true index m or m + 1, and r = m + 1 exactly when fl(r / scale) > value (IEEE
    division is correctly rounded, so fl(r / scale) is that cell's edge).

    Args:
        values: shape (n,), floats in [0, 1].
        scale: a power of ten, or twice one (``round_half_up_index``), at most 2e12.

    Returns:
        shape (n,), the indices as floats (integral values).
    """
    values = np.asarray(values, dtype=np.float64)
    nearest = np.floor(values * float(scale) + 0.5)
    return nearest - (nearest / float(scale) > values)


def round_half_up_index(values: np.ndarray, decimals: int) -> np.ndarray:
    """Each value rounded half up to ``decimals`` decimals, times 10**decimals.

    Half is the decimal midpoint as stored (the float64 nearest to it): 0.285 rounds to
    0.29 at 2 decimals, although the float64 0.285 is slightly below the real 0.285 and
    ``floor(0.285 * 100 + 0.5)`` gives 28. The midpoints are the edges of the grid of step
    1 / (2 10**decimals): cells 2m - 1 and 2m round to m. ``queries.round_half_up_index``
    computes the same in SQL.

    Returns:
        shape (n,), floats with integral values.
    """
    return np.floor((grid_index(values, 2 * 10**decimals) + 1.0) / 2.0)


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


def roc_auc_bucket_error_bound(positives: np.ndarray, negatives: np.ndarray, pure: np.ndarray) -> float | None:
    """Largest possible |AUC(buckets) - AUC(exact scores)| when scores were bucketed.

    Pairs in different buckets are ordered exactly by their buckets, and pairs in a pure
    bucket (one distinct score) are true ties; a positive/negative pair inside an impure
    bucket counts ½ but its true contribution is 0, ½ or 1, so the error is at most
    sum over impure b of 0.5 pos_b neg_b / (P N).

    Args:
        pure: shape (k,), booleans: bucket b holds a single distinct labeled score.

    Returns:
        The bound in [0, 0.5] (0: the AUC is exact), or ``None`` when a class is absent.
    """
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    impure = ~np.asarray(pure, dtype=bool)
    return float(0.5 * np.sum(pos[impure] * neg[impure]) / (n_pos * n_neg))


def percentiles_from_buckets(
    lows: np.ndarray, highs: np.ndarray, counts: np.ndarray, percentiles=PERCENTILES
) -> dict[int, float]:
    """Percentiles of a sample given as ascending buckets (smallest value, largest value, count).

    Linear interpolation between order statistics, as ``numpy.percentile(method="linear")``
    (Hyndman & Fan 1996, definition 7): with n values sorted, the q-th percentile is
    x[i] + (h - i) (x[i+1] - x[i]) where h = (n - 1) q / 100 and i = floor(h), in numpy's
    order of float operations. Inside a
    bucket holding several distinct values, its order statistics are taken evenly spaced
    from its smallest to its largest value; a bucket of one distinct value (low == high)
    is exact, so the result equals numpy's whenever every bucket is, and is otherwise off
    by at most the largest high - low of an impure bucket (< 10**-k): each estimated order
    statistic lies in its bucket's [low, high], as the true one does, and interpolating
    between two of them does not add to the larger of their errors.

    Args:
        lows, highs, counts: shape (k,), buckets in ascending order, counts > 0.

    Returns:
        ``{percentile: value}``; empty when the sample is empty.
    """
    lows = np.asarray(lows, dtype=np.float64)
    highs = np.asarray(highs, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1]) if len(cumulative) else 0
    if n == 0:
        return {}

    def order_statistic(rank: int) -> float:  # 0-based rank in the sorted sample
        b = int(np.searchsorted(cumulative, rank, side="right"))
        within, size = rank - (cumulative[b] - counts[b]), counts[b]
        if size == 1:
            return float(lows[b])
        return float(lows[b] + (highs[b] - lows[b]) * within / (size - 1))

    out = {}
    for q in percentiles:
        h = (n - 1) * (q / 100.0)  # numpy's rounding order, so that exact buckets give numpy's very floats
        i = math.floor(h)
        low = order_statistic(i)
        high = order_statistic(min(i + 1, n - 1))
        t = h - i
        # numpy's lerp: from the nearer end, so that a weight of 1 gives ``high`` itself
        out[q] = low + (high - low) * t if t < 0.5 else high - (high - low) * (1.0 - t)
    return out


def pooled_variance(counts: np.ndarray, offsets: np.ndarray, sums: np.ndarray, squares: np.ndarray) -> float:
    """Population variance of a sample summarized per bucket, combined without loss of precision.

    Bucket b holds ``counts[b]`` values x with ``sums[b]`` = sum(x - offsets[b]) and
    ``squares[b]`` = sum((x - offsets[b])^2), the offset being near its values (its lower
    edge). Its mean is o + S1/n and its sum of squared deviations M2 = S2 - S1^2/n; the
    buckets combine as M2 = sum M2_b + sum n_b (mean_b - mean)^2 (Chan, Golub & LeVeque,
    "Updating formulae and a pairwise algorithm for computing sample variances", 1979).

    Returns:
        M2 / n (population variance, >= 0).
    """
    n_b = np.asarray(counts, dtype=np.float64)
    s1 = np.asarray(sums, dtype=np.float64)
    s2 = np.asarray(squares, dtype=np.float64)
    means = np.asarray(offsets, dtype=np.float64) + s1 / n_b
    n = n_b.sum()
    mean = np.sum(n_b * means) / n
    within = np.maximum(s2 - s1 * s1 / n_b, 0.0)  # >= 0 in exact arithmetic
    return float((within.sum() + np.sum(n_b * (means - mean) ** 2)) / n)


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
