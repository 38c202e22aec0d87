"""The Prometheus collector: turns the latest snapshots into metric families.

``METRICS`` is the single list of what mlmon exposes; docs/metrics.md documents the
same names and a test keeps the two in sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from exporter import __version__
from exporter.snapshot import ModelSnapshot, SnapshotStore


@dataclass(frozen=True)
class MetricSpec:
    """Name (as exposed, counters with ``_total``), type, label names and help of one metric."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str

    def family(self) -> Metric:
        """An empty metric family of this spec."""
        cls = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily, "histogram": HistogramMetricFamily}[self.type]
        return cls(self.name, self.help, labels=list(self.labels))


def _spec(name: str, type_: str, labels: str, help_: str) -> MetricSpec:
    return MetricSpec(name, type_, tuple(labels.split()), help_)


WINDOWED = "model window"
METRICS = {
    spec.name: spec
    for spec in [
        _spec("mlmon_build_info", "gauge", "version", "mlmon build information; always 1."),
        # prediction statistics, per window [now - window, now)
        _spec("mlmon_window_predictions", "gauge", WINDOWED, "Valid predictions in the window."),
        _spec("mlmon_invalid_predictions", "gauge", WINDOWED + " reason", "Predictions in the window excluded from the math, by reason."),
        _spec("mlmon_prediction_score_mean", "gauge", WINDOWED, "Mean predicted score in the window."),
        _spec("mlmon_prediction_score_stddev", "gauge", WINDOWED, "Population standard deviation of the predicted score in the window."),
        _spec("mlmon_prediction_score_percentile", "gauge", WINDOWED + " percentile", "Percentile of the predicted score in the window (linear interpolation)."),
        _spec("mlmon_prediction_mode_share_ratio", "gauge", WINDOWED, "Share of the window's predictions equal to the most frequent (rounded) score."),
        _spec("mlmon_predictions_total", "counter", "model", "Valid predictions seen since the exporter started."),
        _spec("mlmon_prediction_score", "histogram", "model", "Predicted scores seen since the exporter started."),
        _spec("mlmon_prediction_last_timestamp_seconds", "gauge", "model", "Time of the newest prediction."),
        # online accuracy, per label-delayed window
        _spec("mlmon_online_predictions", "gauge", WINDOWED, "Valid predictions in the label-delayed window."),
        _spec("mlmon_online_labeled_predictions", "gauge", WINDOWED, "Predictions of the label-delayed window with a usable label."),
        _spec("mlmon_online_logloss", "gauge", WINDOWED, "Log loss (natural log) of the labeled predictions of the label-delayed window."),
        _spec("mlmon_online_roc_auc", "gauge", WINDOWED, "ROC AUC of the labeled predictions of the label-delayed window; absent with one class."),
        _spec("mlmon_online_roc_auc_error_bound", "gauge", WINDOWED, "Largest possible error of mlmon_online_roc_auc when computed from score buckets."),
        _spec("mlmon_online_positive_labels", "gauge", WINDOWED, "Labeled predictions of the label-delayed window whose label is 1."),
        _spec("mlmon_online_positive_ratio", "gauge", WINDOWED, "Share of positive labels among labeled predictions."),
        _spec("mlmon_online_calibration_ratio", "gauge", WINDOWED, "Mean predicted score / observed positive ratio of labeled predictions."),
        _spec("mlmon_online_label_coverage_ratio", "gauge", WINDOWED, "Share of the label-delayed window's predictions that have a usable label row."),
        _spec("mlmon_online_extreme_score_predictions", "gauge", WINDOWED, "Labeled predictions with a score of exactly 0 or 1 (log loss clipped)."),
        _spec("mlmon_online_invalid_labels", "gauge", WINDOWED + " reason", "Predictions of the label-delayed window whose labels are unusable, by reason."),
        # reproducibility
        _spec("mlmon_replay_predictions", "gauge", WINDOWED, "(Valid prediction, replay row) pairs of the window."),
        _spec("mlmon_replay_reproducibility_ratio", "gauge", WINDOWED, "Share of replayed predictions reproduced within tolerance."),
        _spec("mlmon_replay_abs_error_max", "gauge", WINDOWED, "Largest |served - replayed| score in the window."),
        # exporter health
        _spec("mlmon_source_up", "gauge", "model source", "1 if the last refresh of the source succeeded, else 0."),
        _spec("mlmon_refresh_duration_seconds", "gauge", "model", "Duration of the model's last refresh."),
        _spec("mlmon_refresh_last_success_timestamp_seconds", "gauge", "model", "Time of the model's last refresh in which every source succeeded."),
        _spec("mlmon_refresh_errors_total", "counter", "model source reason", "Failed source refreshes, by reason."),
    ]
}


def _emit(families: dict[str, Metric], name: str, labels: list[str], value: float | None) -> None:
    # An undefined number is absent, never exported as NaN: NaN would pass for a value.
    if value is not None and not math.isnan(value):
        families[name].add_metric(labels, value)


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
    buckets = [(repr(float(b)), c) for b, c in zip(counter.bounds, cumulative)] + [("+Inf", counter.total)]
    families["mlmon_prediction_score"].add_metric([m], buckets, counter.score_sum)
    _emit(families, "mlmon_prediction_last_timestamp_seconds", [m], snap.last_prediction_timestamp)

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


class MlmonCollector:
    """A custom collector over a ``SnapshotStore``: a scrape only reads the snapshots."""

    def __init__(self, store: SnapshotStore):
        self._store = store

    def describe(self) -> Iterator[Metric]:
        """Every family mlmon can expose (lets the registry detect name clashes)."""
        return (spec.family() for spec in METRICS.values())

    def collect(self) -> Iterator[Metric]:
        """The non-empty families of the current snapshots."""
        families = {name: spec.family() for name, spec in METRICS.items()}
        families["mlmon_build_info"].add_metric([__version__], 1.0)
        models = self._store.models  # one reference: a refresh may swap the mapping meanwhile
        for name in sorted(models):
            _model_samples(families, models[name])
        return (family for family in families.values() if family.samples)


def build_registry(store: SnapshotStore) -> CollectorRegistry:
    """The registry served on ``/metrics`` and printed by ``mlmon once``: mlmon's metrics
    plus the standard process, platform and garbage-collector metrics."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(MlmonCollector(store))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition (format 0.0.4) of ``registry``."""
    return generate_latest(registry)
