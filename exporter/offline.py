"""Training metrics of each model from its stored runs: the newest version, its
baselines (previous version, about 30 days before), the version history and the feature
breakdown with each feature's PSI against the previous version."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Mapping

import numpy as np
import sqlalchemy as sa
from pydantic import ValidationError

from exporter.config import Settings
from exporter.errors import error_lines, first_line
from exporter.monitoring_math import population_stability_index
from exporter.refresh import ERROR_REASONS, classify_error
from exporter.snapshot import TrainingState
from exporter.state import StateDatabase, StoredRun, load_histories
from exporter.training import OTHER, FeatureSummary

log = logging.getLogger(__name__)
#: The reference's deciles are the edges of the numeric PSI bins.
DECILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


@dataclass(frozen=True)
class TrainingSnapshot:
    """One model's training metrics. ``history`` is newest first (at most the configured
    number of versions); ``baselines`` maps ``previous_version`` and ``30d`` to their run
    when it exists; ``feature_psi`` holds the features whose PSI against the previous
    version is defined."""

    model: str
    newest: StoredRun
    baselines: Mapping[str, StoredRun]
    history: tuple[StoredRun, ...]
    features: tuple[FeatureSummary, ...]
    feature_psi: Mapping[str, float]

    def validation_logloss(self, version: str | None) -> float | None:
        """Offline log loss of ``version`` (``None``: the newest), if it is in the history."""
        if version is None:
            return self.newest.validation_logloss
        return next((run.validation_logloss for run in self.history if run.version == version), None)


def _cdf(feature: FeatureSummary, x: np.ndarray) -> np.ndarray:
    """The share of non-missing values <= x, by linear interpolation through the
    feature's (min, 0), (percentile value, q / 100) ..., (max, 1) points."""
    points = [(feature.min, 0.0)] + [(v, int(q) / 100) for q, v in feature.percentiles.items()] + [(feature.max, 1.0)]
    points.sort()
    values = np.array([v for v, _ in points])
    shares = np.array([s for _, s in points])
    # Tied values (a stuck feature) keep the largest share: the CDF is right-continuous.
    unique, last = np.unique(values[::-1], return_index=True)
    return np.interp(x, unique, shares[::-1][last], left=0.0, right=1.0)


def _numeric_shares(feature: FeatureSummary, edges: np.ndarray) -> np.ndarray:
    present = 1.0 - feature.missing_ratio
    if feature.min is None:  # every value missing
        return np.array([0.0] * (len(edges) + 1) + [feature.missing_ratio])
    cdf = np.concatenate([[0.0], _cdf(feature, edges), [1.0]])
    return np.append(np.diff(cdf) * present, feature.missing_ratio)


def _category_bins(reference: FeatureSummary, current: FeatureSummary) -> list[str]:
    """The categories that get a bin of their own; the rest go to ``__other__``.

    A category known on one side only may hide in the other side's ``__other__`` share,
    so it gets its own bin only when the other side lists all its categories (no
    ``__other__`` share): there its absence is a true 0.
    """
    def complete(f: FeatureSummary) -> bool:
        return f.categories.get(OTHER, 0.0) == 0.0

    bins = set(reference.categories) & set(current.categories)
    bins |= {c for c in reference.categories if complete(current)}
    bins |= {c for c in current.categories if complete(reference)}
    return sorted(bins - {OTHER})


def _categorical_shares(feature: FeatureSummary, bins: list[str]) -> np.ndarray:
    present = 1.0 - feature.missing_ratio
    shares = [feature.categories.get(c, 0.0) for c in bins]
    other = max(0.0, 1.0 - sum(shares))  # __other__ plus the categories folded into it
    return np.array([share * present for share in shares] + [other * present, feature.missing_ratio])


def feature_psi(reference: FeatureSummary, current: FeatureSummary) -> float | None:
    """PSI of one feature between two versions (``None`` when the kinds differ or the
    reference has no rows).

    Bins are frozen on the reference: numeric features use its deciles as edges, with
    open outer bins, both sides' shares read from their percentile-interpolated CDFs;
    categorical features use the categories both top-k lists know (see ``_category_bins``)
    and ``__other__`` for the rest. Missing values form one more bin on both sides.
    """
    if reference.kind != current.kind or reference.count == 0 or current.count == 0:
        return None
    if reference.kind == "numeric":
        if reference.min is None:
            edges = np.array([])
        else:
            edges = np.unique([reference.percentiles[str(q)] for q in DECILES if str(q) in reference.percentiles])
        expected, actual = _numeric_shares(reference, edges), _numeric_shares(current, edges)
    else:
        bins = _category_bins(reference, current)
        expected, actual = _categorical_shares(reference, bins), _categorical_shares(current, bins)
    return population_stability_index(expected, actual)


def training_snapshot(model: str, recent: list[StoredRun], month_ago: StoredRun | None) -> TrainingSnapshot:
    """Build a model's snapshot from its newest runs (newest first, the first two with
    bodies) and its 30-day baseline."""
    newest = recent[0]
    baselines = {"previous_version": recent[1]} if len(recent) > 1 else {}
    if month_ago is not None:
        baselines["30d"] = month_ago
    features = tuple(newest.run.features) if newest.run else ()
    psi = {}
    if len(recent) > 1 and recent[1].run is not None:
        previous = {f.name: f for f in recent[1].run.features}
        for feature in features:
            value = feature_psi(previous[feature.name], feature) if feature.name in previous else None
            if value is not None:
                psi[feature.name] = value
    return TrainingSnapshot(model, newest, baselines, tuple(recent), features, psi)


def load_training_snapshots(
    engine: sa.Engine, versions: int, as_of: datetime
) -> tuple[dict[str, TrainingSnapshot], dict[str, Exception]]:
    """Every model's training snapshot from the runs trained at or before ``as_of``.

    Returns:
        (snapshot by model, the exception by model whose runs could not be read or turned
        into a snapshot): a failure in one model's data leaves the others' snapshots intact.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the state database failed.
    """
    histories, failures = load_histories(engine, versions, as_of)
    snapshots = {}
    for model, history in histories.items():
        try:
            snapshots[model] = training_snapshot(model, history.recent, history.month_ago)
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
    ``training.staleness`` (``mlmon_state_up`` 0, error counted), then drops them.
    A model whose runs cannot be turned into metrics has none (its failed refreshes
    counted per model, the error logged once until it changes); the others are exported.
    ``stalled`` may be called from another thread while ``refresh`` hangs.
    """

    def __init__(self, state: StateDatabase, settings: Settings):
        self.state = state
        self.settings = settings
        self._errors = dict.fromkeys(ERROR_REASONS, 0)
        self._model_errors: dict[str, int] = {}
        self._logged: dict[str, str] = {}  # model -> the error last logged for it
        self._last_good: tuple[float, dict[str, TrainingSnapshot]] | None = None
        self._stall_counted = False  # stalled() counted the running refresh's timeout
        self._lock = threading.Lock()

    def refresh(self, now: datetime) -> TrainingState:
        """The training state at ``now`` (timezone-aware). Never raises."""
        with self._lock:
            self._stall_counted = False
        try:
            snapshots, failures = load_training_snapshots(
                self.state.ready(), self.settings.training.history_versions, now
            )
        except Exception as exc:  # failures are data, as for the prediction stores
            self.state.failed()
            log.warning("state database: reading training runs failed: %s", first_line(exc))
            return self._failed(now, classify_error(exc))
        with self._lock:
            self._count_model_failures(snapshots, failures)
            self._last_good = (now.timestamp(), snapshots)
            return TrainingState(snapshots, True, dict(self._errors), dict(self._model_errors))

    def _count_model_failures(self, snapshots: dict[str, TrainingSnapshot], failures: dict[str, Exception]) -> None:
        # Every model with runs has its counter, 0 before any failure (so that rate() sees
        # the first one); a model whose runs were all deleted has none.
        self._model_errors = {m: self._model_errors.get(m, 0) for m in sorted(snapshots.keys() | failures.keys())}
        for model, exc in failures.items():
            self._model_errors[model] = self._model_errors.get(model, 0) + 1
            message = _describe(exc)
            if self._logged.get(model) != message:  # once, not every interval
                log.warning("model %s: its training runs give no metrics (delete or replace the bad run): %s", model, message)
                self._logged[model] = message
        for model in set(self._logged) - set(failures):
            log.info("model %s: training metrics are back", model)
            del self._logged[model]

    def stalled(self, now: datetime) -> TrainingState:
        """The state to publish while a refresh is still running past its deadline: one
        ``timeout`` counted per refresh, however often it is reported stalled, and not
        another error when it then fails."""
        return self._failed(now, "timeout")

    def _failed(self, now: datetime, reason: str) -> TrainingState:
        with self._lock:
            if not self._stall_counted:
                self._errors[reason] += 1
            self._stall_counted = self._stall_counted or reason == "timeout"
            fresh = {}
            staleness = self.settings.training.staleness.total_seconds()
            if self._last_good and now.timestamp() - self._last_good[0] <= staleness:
                fresh = self._last_good[1]
            return TrainingState(fresh, False, dict(self._errors), dict(self._model_errors))
