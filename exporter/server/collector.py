"""The Prometheus collector: turns the latest snapshots into metric families.

``METRICS`` is the single list of what mlmon exposes; docs/metrics.md documents the
same names and a test keeps the two in sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from exporter import __version__
from exporter.monitoring_math import ratio
from exporter.snapshot import ModelSnapshot, SnapshotStore, TrainingSnapshot


@dataclass(frozen=True)
class MetricSpec:
    """Name (as exposed, counters with ``_total``), type, label names and help of one metric;
    ``history`` is False for series about the exporter process rather than the data (its
    build, durations, error counts), which backfilled history leaves out."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str
    history: bool = True

    def family(self) -> Metric:
        """An empty metric family of this spec."""
        cls = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily, "histogram": HistogramMetricFamily}[
            self.type
        ]
        return cls(self.name, self.help, labels=list(self.labels))


def _spec(name: str, type_: str, labels: str, help_: str, history: bool = True) -> MetricSpec:
    return MetricSpec(name, type_, tuple(labels.split()), help_, history)


WINDOWED = "model window"
METRICS = {
    spec.name: spec
    for spec in [
        _spec("mlmon_build_info", "gauge", "version", "mlmon build information; always 1.", history=False),
        # prediction statistics, per window [now - window, now)
        _spec("mlmon_window_predictions", "gauge", WINDOWED, "Valid predictions in the window."),
        _spec(
            "mlmon_invalid_predictions",
            "gauge",
            WINDOWED + " reason",
            "Predictions in the window excluded from the math, by reason.",
        ),
        _spec("mlmon_prediction_score_mean", "gauge", WINDOWED, "Mean predicted score in the window."),
        _spec(
            "mlmon_prediction_score_stddev",
            "gauge",
            WINDOWED,
            "Population standard deviation of the predicted score in the window.",
        ),
        _spec(
            "mlmon_prediction_score_percentile",
            "gauge",
            WINDOWED + " percentile",
            "Percentile of the predicted score in the window (linear interpolation).",
        ),
        _spec(
            "mlmon_prediction_mode_share_ratio",
            "gauge",
            WINDOWED,
            "Share of the window's predictions equal to the most frequent (rounded) score.",
        ),
        _spec(
            "mlmon_prediction_mode_share_error_bound",
            "gauge",
            WINDOWED,
            "Largest possible error of mlmon_prediction_mode_share_ratio when merged from time slices.",
        ),
        _spec("mlmon_predictions_total", "counter", "model", "Valid predictions seen since the exporter started."),
        _spec("mlmon_prediction_score", "histogram", "model", "Predicted scores seen since the exporter started."),
        _spec(
            "mlmon_prediction_last_timestamp_seconds",
            "gauge",
            "model",
            "Time of the newest prediction before the refresh time.",
        ),
        _spec(
            "mlmon_future_predictions",
            "gauge",
            "model",
            "Predictions stamped a minute or more after the refresh time (clock skew); in no window until their time comes.",
        ),
        # online accuracy, per label-delayed window
        _spec("mlmon_online_predictions", "gauge", WINDOWED, "Valid predictions in the label-delayed window."),
        _spec(
            "mlmon_online_labeled_predictions",
            "gauge",
            WINDOWED,
            "Predictions of the label-delayed window with a usable label.",
        ),
        _spec(
            "mlmon_online_logloss",
            "gauge",
            WINDOWED,
            "Log loss (natural log) of the labeled predictions of the label-delayed window.",
        ),
        _spec(
            "mlmon_online_roc_auc",
            "gauge",
            WINDOWED,
            "ROC AUC of the labeled predictions of the label-delayed window; absent with one class.",
        ),
        _spec(
            "mlmon_online_roc_auc_error_bound",
            "gauge",
            WINDOWED,
            "Largest possible error of mlmon_online_roc_auc when computed from score buckets.",
        ),
        _spec(
            "mlmon_online_positive_labels",
            "gauge",
            WINDOWED,
            "Labeled predictions of the label-delayed window whose label is 1.",
        ),
        _spec("mlmon_online_positive_ratio", "gauge", WINDOWED, "Share of positive labels among labeled predictions."),
        _spec(
            "mlmon_online_calibration_ratio",
            "gauge",
            WINDOWED,
            "Mean predicted score / observed positive ratio of labeled predictions.",
        ),
        _spec(
            "mlmon_online_label_coverage_ratio",
            "gauge",
            WINDOWED,
            "Share of the label-delayed window's predictions that have a usable label row.",
        ),
        _spec(
            "mlmon_online_extreme_score_predictions",
            "gauge",
            WINDOWED,
            "Labeled predictions with a score of exactly 0 or 1 (log loss clipped).",
        ),
        _spec(
            "mlmon_online_invalid_labels",
            "gauge",
            WINDOWED + " reason",
            "Predictions of the label-delayed window whose labels are unusable, by reason.",
        ),
        # reproducibility
        _spec("mlmon_replay_predictions", "gauge", WINDOWED, "(Valid prediction, replay row) pairs of the window."),
        _spec(
            "mlmon_replay_reproducibility_ratio",
            "gauge",
            WINDOWED,
            "Share of replayed predictions reproduced within tolerance.",
        ),
        _spec("mlmon_replay_abs_error_max", "gauge", WINDOWED, "Largest |served - replayed| score in the window."),
        _spec(
            "mlmon_online_logloss_vs_offline_ratio",
            "gauge",
            WINDOWED,
            "Online log loss / offline (validation) log loss of the serving version, else of the newest version.",
        ),
        # training/serving feature skew, per window, against the serving version's training run
        _spec(
            "mlmon_serving_feature_rows",
            "gauge",
            WINDOWED,
            "Prediction rows of the window whose features are compared (those of the serving version).",
        ),
        _spec(
            "mlmon_serving_feature_missing_ratio",
            "gauge",
            WINDOWED + " feature",
            "Share of the window's rows whose feature value is missing (NULL, NaN, infinite or not a number).",
        ),
        _spec("mlmon_serving_feature_mean", "gauge", WINDOWED + " feature", "Mean of a numeric feature in the window."),
        _spec(
            "mlmon_serving_feature_stddev",
            "gauge",
            WINDOWED + " feature",
            "Population standard deviation of a numeric feature in the window.",
        ),
        _spec(
            "mlmon_serving_feature_category_share_ratio",
            "gauge",
            WINDOWED + " feature category",
            "Share of a training category (or __other__) among a categorical feature's non-missing values in the window.",
        ),
        _spec(
            "mlmon_serving_feature_unseen_ratio",
            "gauge",
            WINDOWED + " feature",
            "Share of a categorical feature's non-missing values in categories the training data never had.",
        ),
        _spec(
            "mlmon_feature_skew_psi",
            "gauge",
            WINDOWED + " feature",
            "PSI of a feature between the serving version's training data and the window, on the training bins.",
        ),
        _spec(
            "mlmon_feature_skew_standardized_mean_difference",
            "gauge",
            WINDOWED + " feature",
            "(Serving mean - training mean) / sqrt of the two variances' average, for a numeric feature.",
        ),
        _spec(
            "mlmon_feature_skew_missing_ratio_delta",
            "gauge",
            WINDOWED + " feature",
            "A feature's missing share in the window minus its missing share in training.",
        ),
        _spec(
            "mlmon_feature_skew_reference_info",
            "gauge",
            "model version",
            "The training version the serving features are compared with; always 1.",
        ),
        _spec(
            "mlmon_serving_feature_series_over_limit",
            "gauge",
            "model kind",
            "Features or categories not exposed at serving because of training.max_features / max_categories.",
        ),
        # training runs, from the state database
        _spec("mlmon_model_info", "gauge", "model version", "The newest trained version of the model; always 1."),
        _spec("mlmon_model_trained_timestamp_seconds", "gauge", "model", "Training time of the newest version."),
        _spec("mlmon_training_rows", "gauge", "model", "Training rows of the newest version."),
        _spec("mlmon_validation_rows", "gauge", "model", "Validation rows of the newest version."),
        _spec("mlmon_offline_logloss", "gauge", "model", "Validation log loss of the newest version."),
        _spec("mlmon_offline_roc_auc", "gauge", "model", "Validation ROC AUC of the newest version."),
        _spec(
            "mlmon_training_rows_change_ratio",
            "gauge",
            "model baseline",
            "Training rows of the newest version / of the baseline version.",
        ),
        _spec(
            "mlmon_offline_logloss_change_ratio",
            "gauge",
            "model baseline",
            "Validation log loss of the newest version / of the baseline version.",
        ),
        _spec(
            "mlmon_offline_roc_auc_change_ratio",
            "gauge",
            "model baseline",
            "Validation ROC AUC of the newest version / of the baseline version.",
        ),
        _spec(
            "mlmon_version_trained_timestamp_seconds",
            "gauge",
            "model version",
            "Training time of each recent version (orders the versions).",
        ),
        _spec("mlmon_version_training_rows", "gauge", "model version", "Training rows of each recent version."),
        _spec("mlmon_version_offline_logloss", "gauge", "model version", "Validation log loss of each recent version."),
        _spec("mlmon_version_offline_roc_auc", "gauge", "model version", "Validation ROC AUC of each recent version."),
        _spec(
            "mlmon_training_feature_missing_ratio",
            "gauge",
            "model feature",
            "Share of missing values of a feature in the newest version's training data.",
        ),
        _spec(
            "mlmon_training_feature_mean",
            "gauge",
            "model feature",
            "Mean of a numeric feature in the newest version's training data.",
        ),
        _spec(
            "mlmon_training_feature_category_share_ratio",
            "gauge",
            "model feature category",
            "Share of a category among a categorical feature's non-missing values (newest version).",
        ),
        _spec(
            "mlmon_training_feature_psi",
            "gauge",
            "model feature",
            "PSI of a feature between the newest and the previous version's training data.",
        ),
        _spec(
            "mlmon_training_series_over_limit",
            "gauge",
            "model kind",
            "Features or categories of the newest version not exposed because of training.max_features / max_categories.",
        ),
        _spec(
            "mlmon_alert_threshold",
            "gauge",
            "model threshold",
            "Alert threshold of the model, from the config; read by the shipped alert rules.",
        ),
        # exporter health
        _spec("mlmon_source_up", "gauge", "model source", "1 if the last refresh of the source succeeded, else 0."),
        _spec(
            "mlmon_refresh_duration_seconds", "gauge", "model", "Duration of the model's last refresh.", history=False
        ),
        _spec(
            "mlmon_refresh_last_success_timestamp_seconds",
            "gauge",
            "model",
            "Time of the model's last refresh in which every source succeeded.",
        ),
        _spec(
            "mlmon_refresh_errors_total",
            "counter",
            "model source reason",
            "Failed source refreshes, by reason.",
            history=False,
        ),
        _spec("mlmon_state_up", "gauge", "", "1 if the last read of the state database succeeded, else 0."),
        _spec(
            "mlmon_state_errors_total",
            "counter",
            "reason",
            "Failed reads of the state database, by reason.",
            history=False,
        ),
        _spec(
            "mlmon_training_errors_total",
            "counter",
            "model",
            "Training refreshes in which the model's stored runs gave no metrics.",
            history=False,
        ),
        _spec(
            "mlmon_training_runs_refused_total",
            "counter",
            "reason",
            "Training runs the API refused although valid, by reason.",
            history=False,
        ),
        _spec(
            "mlmon_basic_auth_refusals_total",
            "counter",
            "reason",
            "Requests basic auth refused (401 or 429), by reason.",
            history=False,
        ),
    ]
}


def _emit(families: dict[str, Metric], name: str, labels: list[str], value: float | None) -> None:
    # An undefined number is absent, never exported as NaN: NaN would pass for a value.
    if value is not None and not math.isnan(value):
        family = families[name]
        assert isinstance(family, GaugeMetricFamily | CounterMetricFamily), name  # one value per sample
        family.add_metric(labels, value)


def _model_samples(families: dict[str, Metric], snap: ModelSnapshot) -> None:
    m = snap.model
    for source, status in snap.sources.items():
        _emit(families, "mlmon_source_up", [m, source], 1.0 if status.up else 0.0)
    for (source, reason), count in snap.errors.items():
        _emit(families, "mlmon_refresh_errors_total", [m, source, reason], count)
    _emit(families, "mlmon_refresh_duration_seconds", [m], snap.refresh_duration)
    _emit(families, "mlmon_refresh_last_success_timestamp_seconds", [m], snap.last_success)

    counter = snap.counter
    _emit(families, "mlmon_predictions_total", [m], counter.total)
    cumulative = counter.cumulative_buckets or (0,) * len(counter.bounds)
    buckets = [(repr(float(b)), c) for b, c in zip(counter.bounds, cumulative, strict=False)] + [
        ("+Inf", counter.total)
    ]
    histogram = families["mlmon_prediction_score"]
    assert isinstance(histogram, HistogramMetricFamily)
    histogram.add_metric([m], buckets, counter.score_sum)
    _emit(families, "mlmon_prediction_last_timestamp_seconds", [m], snap.last_prediction_timestamp)
    _emit(families, "mlmon_future_predictions", [m], snap.future_predictions)

    for s in snap.score_stats:
        w = [m, s.window]
        _emit(families, "mlmon_window_predictions", w, s.predictions)
        for reason, count in s.invalid.items():
            _emit(families, "mlmon_invalid_predictions", w + [reason], count)
        _emit(families, "mlmon_prediction_score_mean", w, s.mean)
        _emit(families, "mlmon_prediction_score_stddev", w, s.stddev)
        for q, value in s.percentiles.items():
            _emit(families, "mlmon_prediction_score_percentile", w + [str(q)], value)
        _emit(families, "mlmon_prediction_mode_share_ratio", w, s.mode_share)
        _emit(families, "mlmon_prediction_mode_share_error_bound", w, s.mode_share_error_bound)

    for o in snap.online:
        w = [m, o.window]
        _emit(families, "mlmon_online_predictions", w, o.predictions)
        _emit(families, "mlmon_online_labeled_predictions", w, o.labeled)
        _emit(families, "mlmon_online_logloss", w, o.logloss)
        _emit(families, "mlmon_online_roc_auc", w, o.roc_auc)
        _emit(families, "mlmon_online_roc_auc_error_bound", w, o.roc_auc_error_bound)
        _emit(families, "mlmon_online_positive_labels", w, o.positives)
        _emit(families, "mlmon_online_positive_ratio", w, o.positive_ratio)
        _emit(families, "mlmon_online_calibration_ratio", w, o.calibration_ratio)
        _emit(families, "mlmon_online_label_coverage_ratio", w, o.label_coverage)
        _emit(families, "mlmon_online_extreme_score_predictions", w, o.extreme_scores)
        for reason, count in o.invalid_labels.items():
            _emit(families, "mlmon_online_invalid_labels", w + [reason], count)

    for r in snap.replays:
        w = [m, r.window]
        _emit(families, "mlmon_replay_predictions", w, r.replayed)
        _emit(families, "mlmon_replay_reproducibility_ratio", w, r.ratio)
        _emit(families, "mlmon_replay_abs_error_max", w, r.abs_error_max)


def _feature_samples(families: dict[str, Metric], snap: ModelSnapshot) -> None:
    m = snap.model
    rows = {f.window: f.rows for f in snap.features}
    for window, count in rows.items():
        _emit(families, "mlmon_serving_feature_rows", [m, window], count)
    for f in snap.features:
        labels = [m, f.window, f.feature]
        _emit(families, "mlmon_serving_feature_missing_ratio", labels, f.missing_ratio)
        _emit(families, "mlmon_serving_feature_mean", labels, f.mean)
        _emit(families, "mlmon_serving_feature_stddev", labels, f.stddev)
        for category, share in f.categories:
            _emit(families, "mlmon_serving_feature_category_share_ratio", labels + [category], share)
        _emit(families, "mlmon_serving_feature_unseen_ratio", labels, f.unseen_ratio)
        _emit(families, "mlmon_feature_skew_psi", labels, f.psi)
        _emit(families, "mlmon_feature_skew_standardized_mean_difference", labels, f.standardized_mean_difference)
        _emit(families, "mlmon_feature_skew_missing_ratio_delta", labels, f.missing_ratio_delta)
    if snap.feature_reference_version is not None:
        _emit(families, "mlmon_feature_skew_reference_info", [m, snap.feature_reference_version], 1.0)
    for kind, count in snap.feature_over_limit.items():
        _emit(families, "mlmon_serving_feature_series_over_limit", [m, kind], count)


def _training_samples(families: dict[str, Metric], snap: TrainingSnapshot) -> None:
    m, newest = snap.model, snap.newest
    _emit(families, "mlmon_model_info", [m, newest.version], 1.0)
    _emit(families, "mlmon_model_trained_timestamp_seconds", [m], newest.trained_at.timestamp())
    _emit(families, "mlmon_training_rows", [m], newest.training_rows)
    _emit(families, "mlmon_validation_rows", [m], newest.validation_rows)
    _emit(families, "mlmon_offline_logloss", [m], newest.validation_logloss)
    _emit(families, "mlmon_offline_roc_auc", [m], newest.validation_roc_auc)
    for baseline, change in snap.change_ratios.items():
        labels = [m, baseline]
        _emit(families, "mlmon_training_rows_change_ratio", labels, change.training_rows)
        _emit(families, "mlmon_offline_logloss_change_ratio", labels, change.offline_logloss)
        _emit(families, "mlmon_offline_roc_auc_change_ratio", labels, change.offline_roc_auc)
    for run in snap.history:
        labels = [m, run.version]
        _emit(families, "mlmon_version_trained_timestamp_seconds", labels, run.trained_at.timestamp())
        _emit(families, "mlmon_version_training_rows", labels, run.training_rows)
        _emit(families, "mlmon_version_offline_logloss", labels, run.validation_logloss)
        _emit(families, "mlmon_version_offline_roc_auc", labels, run.validation_roc_auc)
    for feature in snap.features:
        labels = [m, feature.name]
        _emit(families, "mlmon_training_feature_missing_ratio", labels, feature.missing_ratio)
        _emit(families, "mlmon_training_feature_mean", labels, feature.mean)
        for category, share in feature.categories:
            _emit(families, "mlmon_training_feature_category_share_ratio", labels + [category], share)
        _emit(families, "mlmon_training_feature_psi", labels, feature.psi)
    for kind, count in snap.over_limit.items():
        _emit(families, "mlmon_training_series_over_limit", [m, kind], count)


def _offline_comparison(families: dict[str, Metric], snap: ModelSnapshot, training: TrainingSnapshot | None) -> None:
    if training is None:
        return
    for o in snap.online:
        offline = training.validation_logloss(o.serving_version)
        _emit(families, "mlmon_online_logloss_vs_offline_ratio", [snap.model, o.window], ratio(o.logloss, offline))


#: A model's effective alert thresholds by name (``config.Settings.thresholds``).
Thresholds = Callable[[str], Mapping[str, float]]


class MlmonCollector:
    """A custom collector over a ``SnapshotStore``: a scrape only reads the snapshots;
    the alert thresholds come from ``thresholds``."""

    def __init__(self, store: SnapshotStore, thresholds: Thresholds):
        self._store = store
        self._thresholds = thresholds

    def describe(self) -> Iterator[Metric]:
        """Every family mlmon can expose (lets the registry detect name clashes)."""
        return (spec.family() for spec in METRICS.values())

    def collect(self) -> Iterator[Metric]:
        """The non-empty families of the current snapshots."""
        families = {name: spec.family() for name, spec in METRICS.items()}
        _emit(families, "mlmon_build_info", [__version__], 1.0)
        models = self._store.models  # one reference: a refresh may swap the mapping meanwhile
        training = self._store.training
        for name in sorted(models):
            _model_samples(families, models[name])
            _feature_samples(families, models[name])
            _offline_comparison(families, models[name], training.models.get(name))
        for name in sorted(training.models):
            _training_samples(families, training.models[name])
        for name in sorted(set(models) | set(training.models)):
            for threshold, value in self._thresholds(name).items():
                _emit(families, "mlmon_alert_threshold", [name, threshold], value)
        if training.up is not None:
            _emit(families, "mlmon_state_up", [], 1.0 if training.up else 0.0)
        for reason, count in training.errors.items():
            _emit(families, "mlmon_state_errors_total", [reason], count)
        for name, count in sorted(training.model_errors.items()):
            _emit(families, "mlmon_training_errors_total", [name], count)
        for reason, count in self._store.refused.items():
            _emit(families, "mlmon_training_runs_refused_total", [reason], count)
        for reason, count in self._store.auth_refused.items():
            _emit(families, "mlmon_basic_auth_refusals_total", [reason], count)
        return (family for family in families.values() if family.samples)


def build_registry(store: SnapshotStore, thresholds: Thresholds) -> CollectorRegistry:
    """The registry served on ``/metrics`` and printed by ``mlmon once``: mlmon's metrics
    plus the standard process, platform and garbage-collector metrics."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(MlmonCollector(store, thresholds))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition (format 0.0.4) of ``registry``."""
    return generate_latest(registry)
