"""One model's refresh: run its pushed-down queries at a given time and build its snapshot.

Failures are data: a failing source flips ``mlmon_source_up`` to 0, counts
the error by reason, keeps its last values for the staleness period, then drops them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta

import numpy as np
import sqlalchemy as sa

from exporter.config import ModelConfig, Settings
from exporter.db import timed_connection
from exporter.durations import parse_duration
from exporter.errors import first_line
from exporter.monitoring_math import (
    percentiles_from_buckets,
    pooled_variance,
    ratio,
    roc_auc_bucket_error_bound,
    roc_auc_from_counts,
    round_half_up_index,
)
from exporter.predictions.queries import INVALID_REASONS, LabelQueries, PredictionQueries, ReplayQueries
from exporter.predictions.stores import (
    INSTANT_RANGE,
    NUMBER_TYPES,
    Stores,
    reflect_table,
    require_same_id_kind,
    time_column,
    timestamp_types,
)
from exporter.reasons import ERROR_REASONS, SchemaError, classify_error
from exporter.snapshot import (
    ModelSnapshot,
    OnlineAccuracy,
    PredictionCounter,
    Reproducibility,
    ScoreStats,
    SourceStatus,
)
from exporter.versions import VERSION_MAX_LENGTH

log = logging.getLogger(__name__)

#: Rows stamped less than this after the refresh time are rows written while it runs, not a
#: clock ahead of mlmon's: ``mlmon_future_predictions`` counts only the later ones.
FUTURE_TOLERANCE = timedelta(minutes=1)


def _int(value) -> int:
    return int(value or 0)


def decode_serving_version(raw: str | bytes | None) -> tuple[str | None, str | None]:
    """(version, problem) from the value read by ``PredictionQueries.serving_version``.

    ``problem`` is ``None`` or why the value cannot be a training run's version: longer
    than ``VERSION_MAX_LENGTH`` characters (bytes when read as bytes), or bytes that are not UTF-8.
    Such a version is kept in a form no stored run can have (its first
    ``VERSION_MAX_LENGTH + 1`` characters, or ``\\xff`` escapes: run versions are at most
    that long and hold no backslash), so that it matches no run rather than falling back
    to the newest one; it is never exposed as a label value.
    """
    if raw is None:
        return None, None
    problem = f"longer than {VERSION_MAX_LENGTH} characters" if len(raw) > VERSION_MAX_LENGTH else None
    if isinstance(raw, str):
        return raw, problem
    try:
        return bytes(raw).decode("utf-8"), problem
    except UnicodeDecodeError:  # the cut may split a character: the length is the reason then
        return bytes(raw).decode("utf-8", "backslashreplace"), problem or "not UTF-8"


def as_of_range(settings: Settings) -> tuple[datetime, datetime]:
    """The refresh times every model of ``settings`` can be computed at, ``[first, last]``
    (UTC): those whose every window start (``label_delay`` earlier for online accuracy), the
    counter's horizon (``ingestion_delay`` earlier) and the future rows' bound
    (``FUTURE_TOLERANCE`` later) are instants of ``stores.INSTANT_RANGE``, which every
    time zone's wall clock and every driver can represent.
    """
    reach = timedelta(0)
    for model in settings.models:
        longest = max(parse_duration(window) for window in model.windows)
        label_delay = model.label_delay if model.labels is not None else timedelta(0)
        reach = max(reach, longest + label_delay, model.predictions.ingestion_delay)
    return INSTANT_RANGE[0] + reach, INSTANT_RANGE[1] - FUTURE_TOLERANCE


def worst_case_queries(model: ModelConfig) -> int:
    """The most statements one refresh of ``model`` runs, each bounded by ``query_timeout``
    (reflection, on the first refresh and after a failure, not counted).

    Predictions: the newest timestamp, per window its histogram and (when a bucket holds
    several scores) its mode count, and the new rows of the counter; labels: per window
    the online accuracy, and the serving version when the predictions have a version
    column; replays: one per window.
    """
    windows = len(model.windows)
    count = 2 + 2 * windows
    if model.labels is not None:
        count += windows + (model.predictions.columns.version is not None)
    if model.replays is not None:
        count += windows
    return count


def worst_case_duration(model: ModelConfig, settings: Settings) -> timedelta:
    """The longest a refresh of ``model`` takes without any query timing out:
    ``worst_case_queries`` statements and one connection per source, each up to
    ``query_timeout`` (waiting for a free pooled connection not counted)."""
    return (worst_case_queries(model) + len(model.sources())) * settings.query_timeout


class ModelRefresher:
    """Refreshes one model: one ``refresh`` at a time per instance; ``stalled`` may be
    called from another thread meanwhile.

    Holds the state that lives between refreshes: reflected tables, the prediction
    counter and its watermark, the last good values of each source, error counts.
    """

    def __init__(self, model: ModelConfig, settings: Settings, stores: Stores):
        self.model = model
        self.settings = settings
        self.stores = stores
        self._prediction_queries: PredictionQueries | None = None
        self._label_queries: LabelQueries | None = None
        self._replay_queries: ReplayQueries | None = None
        self._watermark: datetime | None = None
        self._counter = PredictionCounter(tuple(model.histogram_buckets))
        # Every (source, reason) starts at 0, so that increase() sees the first error.
        self._errors = {(source, reason): 0 for source in model.sources() for reason in ERROR_REASONS}
        self._last_good: dict[str, tuple[float, object]] = {}
        self._last_success: float | None = None
        # The running refresh, for stalled(): the sources it has finished (as they ended),
        # the one it is in, those stalled() counted a timeout for; and the previous
        # refresh's sources, for those it has not reached yet.
        self._done: dict[str, SourceStatus] = {}
        self._current: str | None = None
        self._counted: set[str] = set()
        self._previous: dict[str, SourceStatus] = {}
        self._version_problem: str | None = None
        self._started = time.perf_counter()
        # Guards the bookkeeping above against stalled(), called by the loop while a
        # refresh hangs in its worker thread.
        self._lock = threading.Lock()

    # -- reflection, cached until a source fails -------------------------------------------

    def _key_path(self, source: str) -> str:
        index = [m.name for m in self.settings.models].index(self.model.name)
        return f"models[{index}].{source}"

    def _predictions(self) -> PredictionQueries:
        if self._prediction_queries is None:
            source = self.model.predictions
            engine = self.stores.engine(source.store)
            path = self._key_path("predictions")
            types = {
                "score": (NUMBER_TYPES, "a number (probability)"),
                "timestamp": timestamp_types(engine.dialect.name, path),
            }
            table = reflect_table(engine, source, source.columns.model_dump(), path, types)
            time_col = time_column(table, source.columns.timestamp, source, engine.dialect.name)
            self._prediction_queries = PredictionQueries(self.model, table, time_col, engine.dialect.name)
        return self._prediction_queries

    def _labels(self) -> LabelQueries:
        if self._label_queries is None:
            source = self.model.labels
            engine = self.stores.engine(source.store)
            path = self._key_path("labels")
            types = {
                "label": ((sa.Boolean, *NUMBER_TYPES), "a number or a boolean (0/1)"),
                "timestamp": timestamp_types(engine.dialect.name, path),
            }
            table = reflect_table(
                engine, source, source.columns.model_dump(), path, types, self._joinable_ids(source.columns.id, path)
            )
            time_col = None
            if source.columns.timestamp is not None:
                time_col = time_column(table, source.columns.timestamp, source, engine.dialect.name)
            self._label_queries = LabelQueries(source, table, time_col)
        return self._label_queries

    def _replays(self) -> ReplayQueries:
        if self._replay_queries is None:
            source = self.model.replays
            engine = self.stores.engine(source.store)
            path = self._key_path("replays")
            types = {"score": (NUMBER_TYPES, "a number (probability)")}
            table = reflect_table(
                engine, source, source.columns.model_dump(), path, types, self._joinable_ids(source.columns.id, path)
            )
            self._replay_queries = ReplayQueries(source, table)
        return self._replay_queries

    def _joinable_ids(self, id_column: str, path: str) -> Callable[[sa.Table], None]:
        """The check, for ``reflect_table``, that a table's id column (labels or replays, at
        config path ``path``) can be joined to the predictions' id; a missing id column is
        left to the column checks.

        The check raises:
            SchemaError: as ``stores.require_same_id_kind``, or from reflecting the predictions.
        """

        def check(table: sa.Table) -> None:
            if id_column in table.c:
                predictions = self._predictions()
                require_same_id_kind(
                    table, id_column, f"{path}.columns.id", predictions.table, self.model.predictions.columns.id
                )

        return check

    def check_schema(self) -> None:
        """Reflect every configured table and check its columns (``mlmon check-config``).

        Raises:
            SchemaError: with every problem of every source at once (one each).
            sqlalchemy.exc.SQLAlchemyError, OSError: as the sources do.
        """
        sources = {"predictions": self._predictions, "labels": self._labels, "replays": self._replays}
        problems = []
        for name in self.model.sources():
            try:
                sources[name]()
            except SchemaError as exc:
                problems.extend(exc.problems)
        if problems:
            # Once each: the id checks of labels and replays reflect the predictions again.
            raise SchemaError(*dict.fromkeys(problems))

    # -- the queries ---------------------------------------------------------------------

    def _connection(self):
        engine = self.stores.engine(self.model.predictions.store)
        return timed_connection(engine, self.settings.query_timeout.total_seconds())

    def _score_stats(self, conn, window: str, start: datetime, end: datetime) -> ScoreStats:
        """Prediction statistics of ``[start, end)`` from its bucket histogram (docs/metrics.md)."""
        q = self._prediction_queries
        invalid = dict.fromkeys(INVALID_REASONS, 0)
        buckets = []
        for row in conn.execute(q.histogram(start, end)):
            if row.key >= 0:
                buckets.append(row)
            else:  # an excluded row's key is minus its reason code
                invalid[INVALID_REASONS[-int(row.key) - 1]] += _int(row.n)
        if not buckets:
            return ScoreStats(
                window=window,
                predictions=0,
                invalid=invalid,
                mean=None,
                stddev=None,
                percentiles={},
                mode_share=None,
                bucketed=False,
            )
        buckets.sort(key=lambda b: b.key)
        counts = np.array([_int(b.n) for b in buckets])
        lows = np.array([float(b.low) for b in buckets])
        highs = np.array([float(b.high) for b in buckets])
        edges = np.array([float(b.key) for b in buckets]) / 10.0**self.model.bucket_decimals  # as in SQL: key / 10**k
        sums = np.array([float(b.s1) for b in buckets])
        n = int(counts.sum())
        pure = bool(np.all(lows == highs))  # every bucket one distinct score: all exact
        if pure:
            # Round half up as the SQL of mode_count does, and merge the buckets' counts.
            rounded = round_half_up_index(lows, self.model.mode_share_decimals)
            _, inverse = np.unique(rounded, return_inverse=True)
            mode = int(np.bincount(inverse, weights=counts).max())
        else:
            mode = _int(conn.execute(q.mode_count(start, end, self.model.mode_share_decimals)).scalar())
        return ScoreStats(
            window=window,
            predictions=n,
            invalid=invalid,
            mean=float(np.sum(counts * edges + sums) / n),
            stddev=math.sqrt(pooled_variance(counts, edges, sums, np.array([float(b.s2) for b in buckets]))),
            percentiles=percentiles_from_buckets(lows, highs, counts),
            mode_share=mode / n,
            bucketed=not pure,
        )

    def _refresh_predictions(self, as_of: datetime) -> tuple[tuple[ScoreStats, ...], float | None, int]:
        q = self._predictions()
        with self._connection() as conn:
            # First, so that rows written during the window queries (which may take minutes
            # on a large table) do not count as stamped in the future.
            newest, future, unreadable = conn.execute(q.last_timestamp(as_of, as_of + FUTURE_TOLERANCE)).one()
            stats = tuple(
                self._score_stats(conn, window, as_of - parse_duration(window), as_of) for window in self.model.windows
            )
            # In no window, so counted over the whole table, the same for every window (docs/metrics.md).
            stats = tuple(replace(s, invalid={**s.invalid, "bad_timestamp": _int(unreadable)}) for s in stats)
            # Rows may be written up to ingestion_delay after their timestamp: count only older ones.
            horizon = as_of - self.model.predictions.ingestion_delay
            if self._watermark is None:
                self._watermark = horizon  # counters start with the process: old rows are not counted
            elif horizon > self._watermark:
                row = conn.execute(q.new_predictions(self._watermark, horizon, self.model.histogram_buckets)).one()
                count, score_sum, *buckets = row
                self._counter = self._counter.add(_int(count), float(score_sum or 0.0), tuple(_int(b) for b in buckets))
                self._watermark = horizon
        return stats, q.time.to_epoch(newest), _int(future)

    def _online(self, conn, window: str, as_of: datetime) -> OnlineAccuracy:
        """Online accuracy of the label-delayed window ending ``label_delay`` before ``as_of``."""
        q, labels = self._prediction_queries, self._label_queries
        end = as_of - self.model.label_delay
        start = end - parse_duration(window)
        rows = sorted(conn.execute(q.online(labels, start, end, as_of)).all(), key=lambda row: row.key)

        def total(column: str) -> int:
            return sum(_int(row._mapping[column]) for row in rows)

        def float_total(column: str) -> float:
            return math.fsum(float(row._mapping[column] or 0.0) for row in rows)

        positives = np.array([_int(row.positives) for row in rows])
        negatives = np.array([_int(row.negatives) for row in rows])
        n_pred, n_pos = total("predictions"), int(positives.sum())
        n_labeled = n_pos + int(negatives.sum())
        mean_score = ratio(float_total("labeled_score_sum"), n_labeled)
        positive_ratio = ratio(n_pos, n_labeled)
        auc = roc_auc_from_counts(positives, negatives)
        # A bucket whose labeled scores are all equal holds true ties only.
        pure = np.array([row.low is None or row.low == row.high for row in rows], dtype=bool)
        bound = roc_auc_bucket_error_bound(positives, negatives, pure)
        return OnlineAccuracy(
            window=window,
            predictions=n_pred,
            labeled=n_labeled,
            positives=n_pos,
            logloss=ratio(float_total("log_loss_sum"), n_labeled),
            roc_auc=auc,
            roc_auc_error_bound=bound if bound else None,  # absent when the AUC is exact
            calibration_ratio=ratio(mean_score, positive_ratio),
            positive_ratio=positive_ratio,
            label_coverage=ratio(total("with_label"), n_pred),
            extreme_scores=total("extreme"),
            invalid_labels={"conflicting": total("conflicting"), "invalid_value": total("invalid")},
        )

    def _refresh_labels(self, as_of: datetime) -> tuple[OnlineAccuracy, ...]:
        q = self._predictions()
        self._labels()
        with self._connection() as conn:
            online = [self._online(conn, window, as_of) for window in self.model.windows]
            if q.version is None:
                return tuple(online)
            raw = conn.execute(q.serving_version(as_of - self.model.label_delay)).scalar()
        version, problem = decode_serving_version(raw)
        if problem != self._version_problem:  # reported once, not at every refresh
            if problem is not None:
                log.warning(
                    "model %s: serving version in column %r is %s; mlmon_online_logloss_vs_offline_ratio is absent",
                    self.model.name,
                    self.model.predictions.columns.version,
                    problem,
                )
            self._version_problem = problem
        return tuple(replace(o, serving_version=version) for o in online)

    def _refresh_replays(self, as_of: datetime) -> tuple[Reproducibility, ...]:
        q, replays = self._predictions(), self._replays()
        out = []
        with self._connection() as conn:
            if q.replays_by_lookup(replays):  # see PredictionQueries.replays_by_lookup
                conn.execute(sa.select(sa.func.set_config("jit", "off", True)))
            for window in self.model.windows:
                n, reproduced, abs_error_max = conn.execute(
                    q.replays(replays, as_of - parse_duration(window), as_of)
                ).one()
                n = _int(n)
                out.append(
                    Reproducibility(
                        window=window,
                        replayed=n,
                        ratio=ratio(_int(reproduced), n),
                        abs_error_max=None if abs_error_max is None else float(abs_error_max),
                    )
                )
        return tuple(out)

    # -- one refresh -----------------------------------------------------------------------

    def refresh(self, as_of: datetime) -> ModelSnapshot:
        """Run every source of the model at ``as_of`` (timezone-aware) and return its snapshot.

        Never raises for a source failure: the failure is counted and reflected in
        ``sources``. Statistics and replays use ``[as_of - window, as_of)``, online accuracy
        ``[as_of - label_delay - window, as_of - label_delay)``.
        """
        now = as_of.timestamp()
        refreshers = {"predictions": self._refresh_predictions}
        if self.model.labels is not None:
            refreshers["labels"] = self._refresh_labels
        if self.model.replays is not None:
            refreshers["replays"] = self._refresh_replays
        with self._lock:
            self._started = time.perf_counter()
            self._done, self._counted = {}, set()
        for name, run in refreshers.items():
            with self._lock:
                self._current = name
            try:
                values = run(as_of)
            except Exception as exc:  # failures are data: counted, never raised into the loop
                reason = classify_error(exc)
                self._forget_reflection(name)
                if reason == "internal":
                    log.exception("model %s: refreshing %s failed", self.model.name, name)
                else:
                    log.warning(
                        "model %s: refreshing %s failed (%s): %s", self.model.name, name, reason, first_line(exc)
                    )
                with self._lock:
                    if name not in self._counted:  # stalled() counted this failure already
                        self._errors[(name, reason)] += 1
                    self._done[name] = self._down(name)
            else:
                with self._lock:
                    self._last_good[name] = (now, values)
                    self._done[name] = SourceStatus(True, now)
        with self._lock:
            sources, self._current = dict(self._done), None
            self._previous = sources
            if all(s.up for s in sources.values()):
                self._last_success = now
            return self._snapshot(now, sources)

    def stalled(self, now: datetime) -> ModelSnapshot:
        """The snapshot to publish while a refresh is still running past its deadline,
        staleness applied at ``now``; each source as what happened to it: a source the
        refresh finished as it ended, the source it is in down with one ``timeout``
        counted (once per refresh, however often it is reported stalled, and not again
        when it then fails), a source it has not reached yet as after the previous refresh.
        Safe to call from another thread than the one running ``refresh``."""
        with self._lock:
            sources = {}
            for name in self.model.sources():
                if name in self._done:
                    sources[name] = self._done[name]
                elif name == self._current:
                    if name not in self._counted:
                        self._errors[(name, "timeout")] += 1
                        self._counted.add(name)
                    sources[name] = self._down(name)
                else:
                    sources[name] = self._previous.get(name, self._down(name))
            return self._snapshot(now.timestamp(), sources)

    def deadline(self) -> timedelta:
        """How long a refresh may run before it is reported stalled: ``refresh_timeout``,
        or the longest a refresh that works may take, at least one refresh interval plus
        one query timeout: ``worst_case_queries`` statements and a connection per source,
        each up to ``query_timeout``."""
        if self.settings.refresh_timeout is not None:
            return self.settings.refresh_timeout
        work = worst_case_duration(self.model, self.settings)
        return max(self.settings.refresh_interval + self.settings.query_timeout, work)

    def _down(self, source: str) -> SourceStatus:
        previous = self._last_good.get(source)
        return SourceStatus(False, previous[0] if previous else None)

    def _snapshot(self, now: float, sources: dict[str, SourceStatus]) -> ModelSnapshot:
        # Values of a source older than the staleness period are dropped, not repeated.
        fresh = {
            name: values
            for name, (when, values) in self._last_good.items()
            if now - when <= self.settings.staleness_period.total_seconds()
        }
        stats, last_prediction, future = fresh.get("predictions", ((), None, None))
        return ModelSnapshot(
            model=self.model.name,
            sources=sources,
            counter=self._counter,
            score_stats=stats,
            last_prediction_timestamp=last_prediction,
            future_predictions=future,
            online=fresh.get("labels", ()),
            replays=fresh.get("replays", ()),
            errors=dict(self._errors),
            refresh_duration=time.perf_counter() - self._started,
            last_success=self._last_success,
        )

    def _forget_reflection(self, source: str) -> None:
        # A failed source may have been renamed or altered: reflect it again next time.
        if source == "predictions":
            self._prediction_queries = None
        elif source == "labels":
            self._label_queries = None
        else:
            self._replay_queries = None
