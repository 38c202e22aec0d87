"""Immutable results of a refresh. The collector reads these and nothing else, so a
scrape never touches a database."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from exporter.health import SourceStatus

if TYPE_CHECKING:  # types only: the snapshots import nothing that computes them
    from exporter.training.skew import FeatureSkew
    from exporter.training.storage import StoredRun

#: Why the training API refuses a valid run (``mlmon_training_runs_refused_total``).
REFUSAL_REASONS = ("max_models",)


@dataclass(frozen=True)
class ScoreStats:
    """Prediction statistics of one window ``[as_of - window, as_of)``.

    ``None`` values are undefined (no valid prediction) and are not exported.
    ``bucketed`` is true when a bucket of the grid (``queries.grid_index``) held several distinct
    scores: percentiles are then within one bucket of the exact ones, and the mode share
    was counted by its own query, exactly, or from time slices' most frequent values
    (``slices.TopCounts``), exported with ``mode_share_error_bound`` when not exact.
    """

    window: str
    predictions: int
    invalid: Mapping[str, int]
    mean: float | None
    stddev: float | None
    percentiles: Mapping[int, float]
    mode_share: float | None
    bucketed: bool
    mode_share_error_bound: float | None = None


@dataclass(frozen=True)
class OnlineAccuracy:
    """Online accuracy of the label-delayed window ``[as_of - delay - window, as_of - delay)``."""

    window: str
    predictions: int
    labeled: int
    positives: int
    logloss: float | None
    roc_auc: float | None
    roc_auc_error_bound: float | None
    """Set only when the AUC is not exact (a bucket held both classes at different scores)."""
    calibration_ratio: float | None
    positive_ratio: float | None
    label_coverage: float | None
    extreme_scores: int
    invalid_labels: Mapping[str, int]
    serving_version: str | None = None
    """Model version of the newest prediction before the window end, when the prediction
    store has a version column."""


@dataclass(frozen=True)
class Reproducibility:
    """Replays of the window's valid predictions."""

    window: str
    replayed: int
    ratio: float | None
    abs_error_max: float | None


@dataclass(frozen=True)
class PredictionCounter:
    """Cumulative counts since the process started, fed through a timestamp watermark."""

    bounds: tuple[float, ...]
    total: int = 0
    score_sum: float = 0.0
    cumulative_buckets: tuple[int, ...] = ()

    def add(self, count: int, score_sum: float, cumulative_buckets: tuple[int, ...]) -> PredictionCounter:
        """A new counter with ``count`` more predictions; ``cumulative_buckets[i]`` counts scores <= ``bounds[i]``."""
        old = self.cumulative_buckets or (0,) * len(self.bounds)
        return PredictionCounter(
            self.bounds,
            self.total + count,
            self.score_sum + score_sum,
            tuple(a + b for a, b in zip(old, cumulative_buckets, strict=False)),
        )


@dataclass(frozen=True)
class ModelSnapshot:
    """Everything exported for one model after one refresh.

    Per-source values are those of the last success while it is younger than the
    staleness period, else empty.
    """

    model: str
    sources: Mapping[str, SourceStatus]
    counter: PredictionCounter
    score_stats: tuple[ScoreStats, ...] = ()
    last_prediction_timestamp: float | None = None
    future_predictions: int | None = None
    """Prediction rows stamped ``sources.FUTURE_TOLERANCE`` or more after the refresh time."""
    online: tuple[OnlineAccuracy, ...] = ()
    replays: tuple[Reproducibility, ...] = ()
    features: tuple[FeatureSkew, ...] = ()
    """Serving features and their training/serving skew, per window and feature."""
    feature_reference_version: str | None = None
    """The training version the features were compared with (``None``: none)."""
    feature_over_limit: Mapping[str, int] = field(default_factory=dict)
    """Features and categories left out by ``training.max_features`` / ``max_categories``."""
    errors: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """(source, reason) -> cumulative count."""
    refresh_duration: float | None = None
    last_success: float | None = None


@dataclass(frozen=True)
class ChangeRatios:
    """The newest run's value / a baseline run's value (``monitoring_math.ratio``: ``None``
    when either is missing or the baseline is 0)."""

    training_rows: float | None
    offline_logloss: float | None
    offline_roc_auc: float | None


@dataclass(frozen=True)
class FeatureSeries:
    """The exported series of one feature of the newest run: its missing share, mean
    (numeric features), its largest category shares (at most ``training.max_categories``,
    largest first, ties by name) and its PSI against the previous version (``None``:
    undefined or no previous version)."""

    name: str
    missing_ratio: float
    mean: float | None
    categories: tuple[tuple[str, float], ...]
    psi: float | None


@dataclass(frozen=True)
class TrainingSnapshot:
    """One model's training metrics. ``history`` is newest first (at most the configured
    number of versions); ``change_ratios`` maps ``previous_version`` and ``30d`` to the
    newest run's ratios against that run when it exists; ``features`` holds at most
    ``training.max_features`` features (by name), and ``over_limit`` counts the ``feature``
    and ``category`` series left out by the caps, so that label cardinality is bounded
    whatever a training run holds."""

    model: str
    newest: StoredRun
    history: tuple[StoredRun, ...]
    change_ratios: Mapping[str, ChangeRatios]
    features: tuple[FeatureSeries, ...]
    over_limit: Mapping[str, int]

    def validation_logloss(self, version: str | None) -> float | None:
        """Offline log loss of ``version`` (``None``: the newest), if it is in the history."""
        if version is None:
            return self.newest.validation_logloss
        return next((run.validation_logloss for run in self.history if run.version == version), None)


@dataclass(frozen=True)
class TrainingState:
    """Training snapshots by model, whether the
    last read of the state database succeeded, its error counts by reason, and by model
    the refreshes in which that model's runs gave no snapshot."""

    models: Mapping[str, TrainingSnapshot] = field(default_factory=dict)
    up: bool | None = None
    errors: Mapping[str, int] = field(default_factory=dict)
    model_errors: Mapping[str, int] = field(default_factory=dict)


class SnapshotStore:
    """The latest snapshot of every model; a whole mapping is swapped at once, so a reader
    never sees a half-written model."""

    def __init__(self, model_names: list[str]):
        self._expected = frozenset(model_names)
        self._models: Mapping[str, ModelSnapshot] = MappingProxyType({})
        self._training = TrainingState()
        self._refused: Mapping[str, int] = MappingProxyType(dict.fromkeys(REFUSAL_REASONS, 0))
        self._auth_refused: Mapping[str, int] = MappingProxyType({})
        self._lock = threading.Lock()
        self._version = 0

    @property
    def version(self) -> int:
        """Grows by one with every put: tells a cache that the exposition changed."""
        return self._version

    def put_training(self, state: TrainingState) -> None:
        """Replace the training snapshots of every model at once."""
        with self._lock:
            self._training = state
            self._version += 1

    @property
    def training(self) -> TrainingState:
        """The latest training snapshots and the state database's health."""
        return self._training

    def count_refusal(self, reason: str) -> None:
        """Count one training run the API refused for ``reason`` (e.g. ``max_models``)."""
        with self._lock:
            self._refused = MappingProxyType({**self._refused, reason: self._refused.get(reason, 0) + 1})
            self._version += 1

    @property
    def refused(self) -> Mapping[str, int]:
        """Training runs the API refused since the process started, by reason."""
        return self._refused

    def count_auth_refusals(self, reasons: tuple[str, ...]) -> None:
        """Start counting basic-auth refusals (``server.web_config.BasicAuth``), each of
        ``reasons`` at 0; without basic auth there are none and nothing is exported."""
        with self._lock:
            self._auth_refused = MappingProxyType(dict.fromkeys(reasons, 0))
            self._version += 1

    def count_auth_refusal(self, reason: str) -> None:
        """Count one request basic auth refused for ``reason``."""
        with self._lock:
            self._auth_refused = MappingProxyType({**self._auth_refused, reason: self._auth_refused.get(reason, 0) + 1})
            self._version += 1

    @property
    def auth_refused(self) -> Mapping[str, int]:
        """Requests basic auth refused since the process started, by reason (empty without basic auth)."""
        return self._auth_refused

    def put(self, snapshot: ModelSnapshot) -> None:
        """Replace the model's snapshot."""
        with self._lock:
            self._models = MappingProxyType({**self._models, snapshot.model: snapshot})
            self._version += 1

    @property
    def models(self) -> Mapping[str, ModelSnapshot]:
        """Model name -> latest snapshot; a read-only mapping that later puts do not change."""
        return self._models

    @property
    def ready(self) -> bool:
        """True once every configured model has completed a refresh (successful or not)."""
        return self._expected <= self._models.keys()
