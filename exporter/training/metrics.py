"""Training metrics of each model from its stored runs: the newest version, its
baselines (previous version, about 30 days before), the version history and the feature
breakdown with each feature's PSI against the previous version."""

from __future__ import annotations

import logging
import math
import threading
from datetime import datetime, timedelta

import numpy as np
import sqlalchemy as sa
from pydantic import ValidationError

from exporter.config import RefreshPolicy, TrainingSettings
from exporter.errors import error_lines, first_line
from exporter.health import SourceHealth
from exporter.monitoring_math import population_stability_index, ratio
from exporter.reasons import classify_error
from exporter.snapshot import ChangeRatios, FeatureSeries, TrainingSnapshot, TrainingState
from exporter.training.schema import OTHER, FeatureSummary
from exporter.training.storage import StateDatabase, StoredRun, load_histories

log = logging.getLogger(__name__)
#: The reference's deciles are the edges of the numeric PSI bins.
DECILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def _cdf(feature: FeatureSummary, x: np.ndarray) -> np.ndarray:
    """The share of non-missing values <= x: exact (a step function) from ``value_shares``
    when given, else by linear interpolation through the feature's (min, 0),
    (percentile value, q / 100) ..., (max, 1) points."""
    if feature.value_shares is not None:
        values = np.array([v for v, _ in feature.value_shares])
        cumulative = np.concatenate([[0.0], np.cumsum([share for _, share in feature.value_shares])])
        return np.minimum(cumulative[np.searchsorted(values, x, side="right")], 1.0)
    points = [(feature.min, 0.0)] + [(v, int(q) / 100) for q, v in feature.percentiles.items()] + [(feature.max, 1.0)]
    points.sort()
    values = np.array([v for v, _ in points])
    shares = np.array([s for _, s in points])
    # Tied values (a stuck feature) keep the largest share: the CDF is right-continuous.
    unique, last = np.unique(values[::-1], return_index=True)
    return _interp(np.asarray(x, dtype=np.float64), unique, shares[::-1][last])


def _interp(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """``np.interp(x, xp, fp, left=0.0, right=1.0)`` (``xp`` strictly increasing), also
    where two points of ``xp`` are closer than the smallest normal float (2.2e-308):
    np.interp's slope (fp[j+1] - fp[j]) / (xp[j+1] - xp[j]) then overflows, and the result
    is inf or NaN. Here the fraction (x - xp[j]) / (xp[j+1] - xp[j]), at most 1, is divided
    directly (exact for subnormals), halving both terms where the gap itself overflows
    (points beyond +-9e307)."""
    if len(xp) < 2:
        return np.interp(x, xp, fp, left=0.0, right=1.0)
    j = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, len(xp) - 2)
    low, high = xp[j], xp[j + 1]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        fraction = (x - low) / (high - low)
        halved = (x / 2 - low / 2) / (high / 2 - low / 2)
        fraction = np.clip(np.where(np.isfinite(high - low), fraction, halved), 0.0, 1.0)
    out = fp[j] + fraction * (fp[j + 1] - fp[j])
    return np.where(x < xp[0], 0.0, np.where(x > xp[-1], 1.0, out))


def numeric_edges(reference: FeatureSummary, current: FeatureSummary) -> np.ndarray:
    """The upper edges of the numeric PSI bins (each bin is (previous edge, edge], plus an
    open bin above the last): every distinct value either side lists when both give
    ``value_shares`` (one bin per value, exact); the reference's distinct values when only
    it gives them; else the reference's deciles (ties merged). No edge without values."""
    if not reference.present:
        return np.array([])
    if reference.value_shares is not None:
        values = [v for v, _ in reference.value_shares]
        if current.present and current.value_shares is not None:
            values += [v for v, _ in current.value_shares]
        return np.unique(values)
    return np.unique([reference.percentiles[str(q)] for q in DECILES if str(q) in reference.percentiles])


def numeric_shares(feature: FeatureSummary, edges: np.ndarray) -> np.ndarray:
    """Shares of all the feature's rows, shape (len(edges) + 2,): one per bin
    (-inf, edges[0]], (edges[0], edges[1]], ..., (edges[-1], +inf), then the missing share;
    read from the summary's CDF (``_cdf``)."""
    if not feature.present:  # every value missing (min may still be given, max not)
        return np.array([0.0] * (len(edges) + 1) + [feature.missing_ratio])
    cdf = np.concatenate([[0.0], _cdf(feature, edges), [1.0]])
    return np.append(np.diff(cdf) * (1.0 - feature.missing_ratio), feature.missing_ratio)


def _category_shares(reference: FeatureSummary, current: FeatureSummary) -> tuple[np.ndarray, np.ndarray]:
    """(expected, actual) shares of all rows over the categorical PSI bins: every category
    either side lists, one bin for all other categories, one for missing values.

    A side with an ``__other__`` share does not say how it splits over the categories only
    the other side lists; that split is chosen to give the smallest PSI any pair of
    distributions consistent with both summaries has on these bins (a lower bound of the
    true PSI; docs/metrics.md). Consistent means: the shares the summaries give, a
    category a summary does not list holds at most the smallest share it lists (they are
    its top k) and at most its ``__other__`` share, and a summary without ``__other__``
    lists every category it has.

    Without the floor, PSI = sum f(a, e) with f(a, e) = (a - e) ln(a / e) is jointly
    convex, and its derivatives depend on a / e alone, so at the optimum (KKT) every
    unlisted share has the same ratio to the other side's share as the two "other
    category" bins have to each other, up to its cap: x_c = min(t r_c, cap), y_c =
    min(c_c / t, cap) with t = (current rest) / (reference rest), found by bisection. When
    no such t leaves both rests positive, both rests are 0 and each side's unknown shares
    fill its ``__other__`` share in proportion to the other side's.
    """
    ref_present, cur_present = 1.0 - reference.missing_ratio, 1.0 - current.missing_ratio
    ref = {c: s * ref_present for c, s in reference.categories.items() if c != OTHER}
    cur = {c: s * cur_present for c, s in current.categories.items() if c != OTHER}
    # The other side's unknown share of a category: at most its __other__ share (0 when it
    # lists every category) and at most its smallest listed share.
    ref_other = reference.categories.get(OTHER, 0.0) * ref_present
    cur_other = current.categories.get(OTHER, 0.0) * cur_present
    ref_cap = min([ref_other, *ref.values()])
    cur_cap = min([cur_other, *cur.values()])
    only_ref = sorted(set(ref) - set(cur))  # current share x_c unknown
    only_cur = sorted(set(cur) - set(ref))  # reference share y_c unknown
    ref_known = np.array([ref[k] for k in only_ref])
    cur_known = np.array([cur[k] for k in only_cur])

    def rests(t: float) -> tuple[np.ndarray, np.ndarray, float, float]:
        x, y = np.minimum(t * ref_known, cur_cap), np.minimum(cur_known / t, ref_cap)
        return x, y, cur_other - float(x.sum()), ref_other - float(y.sum())

    low, high = -700.0, 700.0  # bisection on ln t, within float range
    while (only_ref or only_cur) and high - low > 1e-12:
        middle = (low + high) / 2
        _, _, cur_rest, ref_rest = rests(math.exp(middle))
        too_small = cur_rest > 0 and (ref_rest <= 0 or cur_rest > math.exp(middle) * ref_rest)
        low, high = (middle, high) if too_small else (low, middle)
    x, y, cur_rest, ref_rest = rests(math.exp(low))
    if not (cur_rest > 1e-12 and ref_rest > 1e-12):
        x, cur_rest = _fill(ref_known, cur_cap, cur_other)
        y, ref_rest = _fill(cur_known, ref_cap, ref_other)
    both = sorted(set(ref) & set(cur))
    expected = [ref[k] for k in both] + list(ref_known) + list(y) + [max(0.0, ref_rest), reference.missing_ratio]
    actual = [cur[k] for k in both] + list(x) + list(cur_known) + [max(0.0, cur_rest), current.missing_ratio]
    return np.array(expected), np.array(actual)


def _fill(weights: np.ndarray, cap: float, total: float) -> tuple[np.ndarray, float]:
    """Shares min(s * weights, cap) summing to ``total`` (the largest such s, by bisection
    on ln s), and what is left of ``total`` when the caps do not let them reach it."""
    if len(weights) == 0 or cap <= 0.0:
        return np.zeros(len(weights)), total
    low, high = -700.0, 700.0
    for _ in range(100):  # 1400 / 2**100: far below float precision
        middle = (low + high) / 2
        fits = float(np.minimum(math.exp(middle) * weights, cap).sum()) <= total
        low, high = (middle, high) if fits else (low, middle)
    shares = np.minimum(math.exp(low) * weights, cap)
    return shares, max(0.0, total - float(shares.sum()))


def feature_psi(reference: FeatureSummary, current: FeatureSummary) -> float | None:
    """PSI of one feature between two versions (``None`` when the kinds differ or either
    side has no rows).

    Numeric features: bins from ``numeric_edges`` with an open top bin, both sides'
    shares read from their CDFs (``_cdf``: exact with ``value_shares``, else interpolated
    through the percentiles). Categorical features: ``_category_shares``, a lower bound
    when an ``__other__`` share hides categories the other side lists. Missing values
    form one more bin on both sides. Never raises for valid summaries.
    """
    if reference.kind != current.kind or reference.count == 0 or current.count == 0:
        return None
    if reference.kind == "numeric":
        edges = numeric_edges(reference, current)
        expected, actual = numeric_shares(reference, edges), numeric_shares(current, edges)
    else:
        expected, actual = _category_shares(reference, current)
    return population_stability_index(expected, actual)


def training_snapshot(
    model: str, recent: list[StoredRun], month_ago: StoredRun | None, limits: TrainingSettings
) -> TrainingSnapshot:
    """Build a model's snapshot from its newest runs (newest first, the first two with
    bodies) and its 30-day baseline, its features capped by ``limits``."""
    newest = recent[0]
    baselines = {"previous_version": recent[1]} if len(recent) > 1 else {}
    if month_ago is not None:
        baselines["30d"] = month_ago
    changes = {
        name: ChangeRatios(
            ratio(newest.training_rows, run.training_rows),
            ratio(newest.validation_logloss, run.validation_logloss),
            ratio(newest.validation_roc_auc, run.validation_roc_auc),
        )
        for name, run in baselines.items()
    }
    features = sorted(newest.run.features if newest.run else (), key=lambda f: f.name)
    previous = {f.name: f for f in recent[1].run.features} if len(recent) > 1 and recent[1].run is not None else {}
    over = {"feature": max(0, len(features) - limits.max_features), "category": 0}
    series = []
    for feature in features[: limits.max_features]:
        categories = sorted(feature.categories.items(), key=lambda item: (-item[1], item[0]))
        over["category"] += max(0, len(categories) - limits.max_categories)
        psi = feature_psi(previous[feature.name], feature) if feature.name in previous else None
        series.append(
            FeatureSeries(
                feature.name, feature.missing_ratio, feature.mean, tuple(categories[: limits.max_categories]), psi
            )
        )
    return TrainingSnapshot(model, newest, tuple(recent), changes, tuple(series), over)


def load_training_snapshots(
    engine: sa.Engine, limits: TrainingSettings, as_of: datetime
) -> tuple[dict[str, TrainingSnapshot], dict[str, Exception]]:
    """Every model's training snapshot from the runs trained at or before ``as_of``: the
    newest ``limits.history_versions`` versions, features capped by ``limits``.

    Returns:
        (snapshot by model, the exception by model whose runs could not be read or turned
        into a snapshot): a failure in one model's data leaves the others' snapshots intact.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the state database failed.
    """
    histories, failures = load_histories(engine, limits.history_versions, as_of)
    snapshots = {}
    for model, history in histories.items():
        try:
            snapshots[model] = training_snapshot(model, history.recent, history.month_ago, limits)
        except Exception as exc:  # a bug guard per model: its data must not stop the others
            failures[model] = exc
    return snapshots, failures


def _describe(exc: Exception) -> str:
    """One line naming what is wrong: the key paths of a stored body that no longer
    validates, else the exception's type and first line."""
    if isinstance(exc, ValidationError):
        return "stored run invalid: " + "; ".join(error_lines(exc.errors(include_url=False)))
    return f"{type(exc).__name__}: {first_line(exc)}"


class TrainingRefresher:
    """Reads every model's training snapshot from the state database on each refresh.

    Like a failing source, a failing state database keeps its last snapshots, here for
    ``training.staleness`` (``mlmon_state_up`` 0, error counted; ``exporter.health``), then
    drops them. A model whose runs cannot be turned into metrics has none (its failed
    refreshes counted per model, the error logged once until it changes); the others are
    exported. ``stalled`` may be called from another thread while ``refresh`` hangs.
    """

    name = "training runs"

    def __init__(self, state: StateDatabase, training: TrainingSettings, policy: RefreshPolicy):
        self.state = state
        self.training = training
        self.policy = policy
        self._health: SourceHealth[dict[str, TrainingSnapshot]] = SourceHealth(training.staleness)
        self._model_errors: dict[str, int] = {}
        self._logged: dict[str, str] = {}  # model -> the error last logged for it
        self._lock = threading.Lock()

    def deadline(self) -> timedelta:
        """How long a refresh may run before it is reported stalled (``RefreshPolicy.deadline``:
        reading the runs is a few queries, so no more work than one query timeout)."""
        return self.policy.deadline()

    def refresh(self, now: datetime) -> TrainingState:
        """The training state at ``now`` (timezone-aware). Never raises."""
        with self._lock:
            self._health.started()
        try:
            snapshots, failures = load_training_snapshots(self.state.ready(), self.training, now)
        except Exception as exc:  # failures are data, as for the prediction stores
            self.state.failed()
            log.warning("state database: reading training runs failed: %s", first_line(exc))
            with self._lock:
                self._health.failed(classify_error(exc))
                return self._state(now, up=False)
        with self._lock:
            self._count_model_failures(snapshots, failures)
            self._health.succeeded(now.timestamp(), snapshots)
            return self._state(now, up=True)

    def _count_model_failures(self, snapshots: dict[str, TrainingSnapshot], failures: dict[str, Exception]) -> None:
        # Every model with runs has its counter, 0 before any failure (so that rate() sees
        # the first one); a model whose runs were all deleted has none.
        self._model_errors = {m: self._model_errors.get(m, 0) for m in sorted(snapshots.keys() | failures.keys())}
        for model, exc in failures.items():
            self._model_errors[model] = self._model_errors.get(model, 0) + 1
            message = _describe(exc)
            if self._logged.get(model) != message:  # once, not every interval
                log.warning(
                    "model %s: its training runs give no metrics (delete or replace the bad run): %s", model, message
                )
                self._logged[model] = message
        for model in set(self._logged) - set(failures):
            log.info("model %s: training metrics are back", model)
            del self._logged[model]

    def stalled(self, now: datetime) -> TrainingState:
        """The state to publish while a refresh is still running past its deadline: one
        ``timeout`` counted per refresh (``SourceHealth.stalled``)."""
        with self._lock:
            self._health.stalled()
            return self._state(now, up=False)

    def _state(self, now: datetime, up: bool) -> TrainingState:
        fresh = self._health.fresh(now.timestamp()) or {}
        return TrainingState(fresh, up, dict(self._health.errors), dict(self._model_errors))
