"""Training/serving skew: a model's serving-time features in a window against the training
summary of the version that served them (docs/metrics.md, "Training/serving skew").

The training summary fixes what the database counts (``bins``): its own frozen numeric
bin edges and its largest categories; the database returns the counts
(``ServingCounts``, ``exporter.predictions.features``) and ``feature_skew`` turns them
into the exported numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from exporter.monitoring_math import population_stability_index, ratio
from exporter.training.metrics import numeric_edges, numeric_shares
from exporter.training.schema import OTHER, FeatureSummary

#: Largest |value| a numeric feature's mean and standard deviation are summed over: squares
#: of larger values (1e154 and up) overflow float64, which PostgreSQL raises as an error
#: and SQLite turns into inf. A window holding a larger value keeps its bins, missing share
#: and PSI, and has no mean, standard deviation or standardized mean difference.
MOMENT_BOUND = 1e100


@dataclass(frozen=True)
class Bins:
    """What the database counts for one feature, fixed by its training summary.

    ``edges``: the upper edges of the numeric bins (-inf, e0], (e0, e1], ..., (e_last, +inf)
    (``training.metrics.numeric_edges``: the training deciles, or its distinct values when
    it gave ``value_shares``); empty for a categorical feature or without a summary.
    ``categories``: the training summary's largest categories (at most ``max_categories``,
    by share then name); every other non-missing value is counted as not listed.
    ``shift``: subtracted from numeric values before they are summed (the training mean
    when within ``MOMENT_BOUND``, else 0), so that the variance of values far from 0 keeps
    its precision.
    """

    edges: tuple[float, ...] = ()
    categories: tuple[str, ...] = ()
    shift: float = 0.0


def bins(reference: FeatureSummary | None, kind: str, max_categories: int) -> Bins:
    """The bins of a feature declared ``kind`` given its training summary (``None``: the
    serving version has no training run or it does not list the feature). A summary of
    the other kind gives no bins: the feature is then compared with nothing."""
    if reference is None or reference.kind != kind or not reference.present:
        return Bins()
    if kind == "numeric":
        return Bins(
            edges=tuple(float(e) for e in numeric_edges(reference, reference)),
            shift=float(reference.mean) if reference.mean is not None and abs(reference.mean) <= MOMENT_BOUND else 0.0,
        )
    listed = sorted(((c, s) for c, s in reference.categories.items() if c != OTHER), key=lambda cs: (-cs[1], cs[0]))
    return Bins(categories=tuple(c for c, _ in listed[:max_categories]))


@dataclass(frozen=True)
class ServingCounts:
    """One feature's aggregates over one window's rows, as the database returns them.

    ``rows``: every row; ``missing``: NULL, NaN, ±inf, or not a number in a numeric
    column (text on SQLite), NULL in a categorical one. Numeric: ``shifted_sum`` and
    ``shifted_squares`` of (value - ``Bins.shift``) over the ``moment_rows`` present values
    within ``MOMENT_BOUND``, ``bin_counts`` per bin of ``Bins.edges`` (len(edges) + 1). Categorical:
    ``category_counts`` per ``Bins.categories``, ``unlisted`` the other present values.
    """

    rows: int
    missing: int
    shifted_sum: float = 0.0
    shifted_squares: float = 0.0
    moment_rows: int = 0
    bin_counts: tuple[int, ...] = ()
    category_counts: tuple[int, ...] = ()
    unlisted: int = 0

    @property
    def present(self) -> int:
        """Rows with a usable value."""
        return self.rows - self.missing


@dataclass(frozen=True)
class FeatureSkew:
    """One feature in one window: serving values and their skew against training.

    ``None`` is undefined (not exported): no rows, no usable value, or no training summary
    to compare with. ``categories`` maps the training's largest categories and
    ``__other__`` (every other present value) to their share of the window's present
    values; ``unseen_ratio`` is the share of present values in categories the training
    never had, defined only when the training summary lists all its categories (no
    ``__other__`` share), since otherwise an unlisted value may be one of its tail.
    """

    window: str
    feature: str
    rows: int
    missing_ratio: float | None
    mean: float | None
    stddev: float | None
    categories: tuple[tuple[str, float], ...]
    unseen_ratio: float | None
    psi: float | None
    standardized_mean_difference: float | None
    missing_ratio_delta: float | None


def standardized_mean_difference(
    serving_mean: float, serving_stddev: float, training_mean: float, training_stddev: float
) -> float | None:
    """(serving mean - training mean) / sqrt((serving var + training var) / 2): Cohen's d
    with the two variances averaged, the usual "standardized difference" of two groups
    (Austin, *Statistics in Medicine* 28, 2009, eq. 1; Yang & Dalton, SAS SGF 335-2012).

    Unlike a ratio of means it is defined for features centred on 0 and reads the same
    whatever the unit: 0.5 is half a standard deviation. ``None`` when both standard
    deviations are 0 and the means differ (two different constants), or when the
    difference of the means overflows; 0 when they are equal.
    """
    # hypot: squares of a stored stddev past 1e154 would overflow (the API accepts any float).
    pooled = math.hypot(serving_stddev, training_stddev) / math.sqrt(2)
    difference = serving_mean - training_mean
    if pooled == 0.0:
        return 0.0 if difference == 0.0 else None
    smd = difference / pooled
    return smd if math.isfinite(smd) else None


def _expected_categories(reference: FeatureSummary, listed: tuple[str, ...]) -> np.ndarray:
    """The training shares of all rows over [listed..., everything else, missing]."""
    present = 1.0 - reference.missing_ratio
    shares = [reference.categories[c] * present for c in listed]
    return np.array([*shares, max(0.0, present - math.fsum(shares)), reference.missing_ratio])


def feature_skew(
    window: str, feature: str, kind: str, reference: FeatureSummary | None, plan: Bins, counts: ServingCounts
) -> FeatureSkew:
    """The serving numbers of ``counts`` and their skew against ``reference`` (the feature's
    training summary, ``None`` when there is none), counted on ``plan`` (``bins``).

    PSI (``monitoring_math.population_stability_index``) is over the bins of ``plan``
    plus one bin for missing values, expected shares read from the training summary
    (numeric: ``training.metrics.numeric_shares``, its CDF at the frozen edges;
    categorical: each listed category's share, the rest, missing), actual shares counted
    over all the window's rows. Never raises for counts the database returned.
    """
    present = counts.present
    missing_ratio = ratio(counts.missing, counts.rows)
    mean = stddev = None
    if kind == "numeric" and present and counts.moment_rows == present:  # else a value past MOMENT_BOUND
        offset = counts.shifted_sum / present
        mean = plan.shift + offset
        # Population variance from shifted moments; rounding may leave it a hair below 0.
        stddev = math.sqrt(max(0.0, counts.shifted_squares / present - offset * offset))
    categories: tuple[tuple[str, float], ...] = ()
    unseen = None
    if kind == "categorical" and present and plan.categories:
        categories = tuple((c, n / present) for c, n in zip(plan.categories, counts.category_counts, strict=True))
        categories += ((OTHER, counts.unlisted / present),)
        # Bins exist only from a summary of this kind; it lists every category when it
        # has no __other__ share, and all of them are counted when none was capped.
        assert reference is not None
        listed = [c for c in reference.categories if c != OTHER]
        if reference.categories.get(OTHER, 0.0) == 0.0 and len(plan.categories) == len(listed):
            unseen = counts.unlisted / present
    comparable = reference is not None and reference.kind == kind and counts.rows > 0
    psi = smd = delta = None
    if comparable:
        assert reference is not None  # for mypy: comparable says so
        delta = counts.missing / counts.rows - reference.missing_ratio
        if reference.present:
            actual = np.array([*counts.bin_counts, *counts.category_counts, counts.missing], dtype=np.float64)
            if kind == "numeric":
                expected = numeric_shares(reference, np.array(plan.edges))
            else:
                actual = np.insert(actual, len(counts.category_counts), counts.unlisted)
                expected = _expected_categories(reference, plan.categories)
            psi = population_stability_index(expected, actual / counts.rows)
            if mean is not None and stddev is not None and reference.mean is not None:
                smd = standardized_mean_difference(mean, stddev, reference.mean, reference.stddev or 0.0)
    return FeatureSkew(
        window=window,
        feature=feature,
        rows=counts.rows,
        missing_ratio=missing_ratio,
        mean=mean,
        stddev=stddev,
        categories=categories,
        unseen_ratio=unseen,
        psi=psi,
        standardized_mean_difference=smd,
        missing_ratio_delta=delta,
    )
