"""One model's refresh: run its sources at a given time and build its snapshot.

Failures are data: a failing source flips ``mlmon_source_up`` to 0, counts
the error by reason, keeps its last values for the staleness period, then drops them
(``exporter.health``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from exporter.config import ModelConfig, RefreshPolicy, Settings, TrainingSettings
from exporter.durations import parse_duration
from exporter.errors import first_line
from exporter.health import SourceStatus
from exporter.predictions.features import FeaturesSource, References
from exporter.predictions.sources import (
    FUTURE_TOLERANCE,
    LabelsSource,
    PredictionsSource,
    ReplaysSource,
    Source,
)
from exporter.predictions.stores import INSTANT_RANGE, Stores
from exporter.reasons import SchemaError, classify_error
from exporter.snapshot import ModelSnapshot
from exporter.training.schema import TrainingRun
from exporter.training.storage import StateDatabase, load_run

log = logging.getLogger(__name__)


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
        # Kept replay slices settle ingestion_delay + replay_delay earlier, within the window
        # (ModelConfig.replays_on_slices).
        reach = max(reach, longest + label_delay, model.predictions.ingestion_delay)
    return INSTANT_RANGE[0] + reach, INSTANT_RANGE[1] - FUTURE_TOLERANCE


def worst_case_queries(model: ModelConfig) -> int:
    """The most statements one refresh of ``model`` runs, each bounded by ``query_timeout``
    (reflection, on the first refresh and after a failure, not counted).

    Each source reads all its windows in one pass per query. Predictions
    (``PredictionsSource.run``), at most 9, one more on time slices without ``unique_ids``
    in each variant below (the id ranges of the slices read, for numeric ids without an
    index: ``LeftOutIds._narrowed``): the newest timestamp; the audit of kept time slices
    (when due); unless ids are unique by schema or config (which the config alone cannot
    tell), the duplicated ids (of every id when the audit ran) and their rows; per pass of
    the plan (two when a window's tail lies in a slice read this time:
    ``slices.Plan``) the sliced histogram and, when buckets hold several scores, their most
    frequent scores; the new rows of the counter (9). When the duplicated ids or their rows
    are too many to list, the one-pass histogram and the mode counts replace the passes,
    after a full duplicate search when the search probed only the new rows and listed its
    ids (8). While the slices fill (a cold start, after an outage, an audit that found many
    slices changed), one pass reads the missing slices to keep, and the one-pass histogram
    and mode counts make the windows, with the duplicated ids found when every id was
    probed (9 with an audit), after a full duplicate search when the search probed only
    what it reads and its forgetting started the fill (9 without an audit:
    ``LeftOutIds.one_pass_ids``). Labels: the online accuracy in up to three statements
    (the label ids with several rows, the other predictions, those ids' predictions:
    ``LabelsSource._online``), a duplicate search when ``label_delay`` shifts
    their windows (``PredictionsSource.duplicate_ids``; without a shift they reuse the
    predictions'), and the serving version when the predictions have a version column;
    with kept online slices (time slices on, labels that mature by slice), instead of the
    first two, 5 with ``unique_ids``: the audit and two passes of the plan, or the audit, a
    filling pass and the windows in one pass (three statements) (``LabelsSource._sliced``);
    8 without: the audit, the id ranges, the duplicated ids and their rows, then two
    passes and the rows of those ids added back per window (7), or a filling pass and the
    windows in one pass (8);
    replays: the replays (a search too if the predictions failed before theirs, a refresh
    with fewer statements); on slices (``ModelConfig.replays_on_slices``), as the labels
    on kept online slices, 3 with ``unique_ids`` and 7 without (``ReplaysSource._sliced``:
    their slices settle ``replay_delay`` later than the predictions', so they find the
    duplicated ids among what they read themselves); features: the serving version (with a version column), its
    training run, and one statement for every window and feature.
    """
    version = model.predictions.columns.version is not None
    unique = model.predictions.unique_ids
    count = 9 + (model.slice_width() is not None and not unique)
    if model.labels is not None:
        kept = model.slice_width() is not None and model.labels_mature_by_slice()
        sliced = 5 if unique else 8
        count += (sliced if kept else 3 + (model.label_delay > timedelta(0))) + version
    if model.replays is not None:
        count += (3 if unique else 7) if model.replays_on_slices() else 1
    if model.features is not None:
        count += 2 + version
    return count


def worst_case_duration(model: ModelConfig, query_timeout: timedelta) -> timedelta:
    """The longest a refresh of ``model`` takes without any query timing out:
    ``worst_case_queries`` statements and one connection per source, each up to
    ``query_timeout`` (waiting for a free pooled connection not counted)."""
    connections = len(model.sources()) + (model.features is not None)
    return (worst_case_queries(model) + connections) * query_timeout


def refresh_deadline(model: ModelConfig, policy: RefreshPolicy) -> timedelta:
    """How long a refresh of ``model`` may run before it is reported stalled:
    ``refresh_timeout``, or the longest a refresh that works may take, at least one refresh
    interval plus one query timeout (``RefreshPolicy.deadline``, ``worst_case_duration``)."""
    return policy.deadline(worst_case_duration(model, policy.query_timeout))


def training_references(state: StateDatabase, model: str) -> References:
    """Where the features source of ``model`` reads the training run it is compared with
    (``training.storage.load_run``); a failure makes the state database migrate again on
    next use, as for the training refresh.

    The returned callable raises:
        sqlalchemy.exc.SQLAlchemyError, pydantic.ValidationError: as ``load_run``.
    """

    def read(version: str | None, as_of: datetime) -> TrainingRun | None:
        try:
            return load_run(state.ready(), model, version, as_of)
        except sa.exc.SQLAlchemyError:
            state.failed()
            raise

    return read


class ModelRefresher:
    """Refreshes one model: one ``refresh`` at a time per instance; ``stalled`` may be
    called from another thread meanwhile.

    ``sources`` maps each configured source's name to its ``sources.Source``, in refresh
    order (predictions first: the others join to it); each keeps its reflection and health
    between refreshes, the predictions source also the prediction counter.
    """

    def __init__(
        self,
        model: ModelConfig,
        key_path: str,
        policy: RefreshPolicy,
        stores: Stores,
        count_from: datetime | None = None,
        training: TrainingSettings | None = None,
        state: StateDatabase | None = None,
        save_slices: bool = False,
    ):
        """``key_path`` is the model's config path (``models[i]``), named by schema errors.
        ``count_from``: the counters (``mlmon_predictions_total``, the score histogram) count
        predictions stamped from then on; ``None`` (``serve``, ``once``): from the first
        refresh's horizon, i.e. they start at 0 with the process. ``training``: the caps on
        feature and category series (default ``TrainingSettings()``); ``state``: the state
        database whose training runs the features are compared with (``None``: with none);
        ``save_slices``: the predictions' kept time slices, the labels' kept online slices
        and the replays' kept slices are saved in ``state`` (none without one) and restored from it at the first
        refresh; only ``mlmon serve`` sets it: ``once`` and ``backfill`` compute from
        scratch and write nothing there."""
        self.model = model
        self.policy = policy
        args = (model, key_path, stores, policy.query_timeout, policy.staleness)
        slice_state = state if save_slices else None
        self.predictions = PredictionsSource(*args, count_from=count_from, slice_state=slice_state)
        self.sources: dict[str, Source[Any, Any]] = {"predictions": self.predictions}
        if model.labels is not None:
            self.sources["labels"] = LabelsSource(*args, self.predictions)
        if model.replays is not None:
            self.sources["replays"] = ReplaysSource(*args, self.predictions)
        if model.features is not None:
            references = None if state is None else training_references(state, model.name)
            limits = training or TrainingSettings()
            self.sources["features"] = FeaturesSource(*args, self.predictions, limits, references)
        self._last_success: float | None = None
        # The running refresh, for stalled(): the sources it has finished (as they ended),
        # the one it is in; and the previous refresh's sources, for those it has not reached yet.
        self._done: dict[str, SourceStatus] = {}
        self._current: str | None = None
        self._previous: dict[str, SourceStatus] = {}
        self._started = time.perf_counter()
        # Guards the bookkeeping above and the sources' health against stalled(), called by
        # the loop while a refresh hangs in its worker thread.
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """How logs name this refresh."""
        return f"model {self.model.name}"

    def check_schema(self) -> None:
        """Reflect every configured table and check its columns (``mlmon check-config``).

        Raises:
            SchemaError: with every problem of every source at once (one each).
            sqlalchemy.exc.SQLAlchemyError, OSError: as the sources do.
        """
        problems = []
        for source in self.sources.values():
            try:
                source.queries()
            except SchemaError as exc:
                problems.extend(exc.problems)
        if problems:
            # Once each: the id checks of labels and replays reflect the predictions again.
            raise SchemaError(*dict.fromkeys(problems))

    def refresh(self, as_of: datetime) -> ModelSnapshot:
        """Run every source of the model at ``as_of`` (timezone-aware) and return its snapshot.

        Never raises for a source failure: the failure is counted and reflected in
        ``sources``. Statistics and replays use ``[as_of - window, as_of)``, online accuracy
        ``[as_of - label_delay - window, as_of - label_delay)``.
        """
        now = as_of.timestamp()
        with self._lock:
            self._started = time.perf_counter()
            self._done = {}
            for source in self.sources.values():
                source.health.started()
        for name, source in self.sources.items():
            with self._lock:
                self._current = name
            try:
                values = source.run(as_of)
            except Exception as exc:  # failures are data: counted, never raised into the loop
                reason = classify_error(exc)
                source.forget()  # the table may have been renamed or altered: reflect it again
                if reason == "internal":
                    log.exception("model %s: refreshing %s failed", self.model.name, name)
                else:
                    log.warning(
                        "model %s: refreshing %s failed (%s): %s", self.model.name, name, reason, first_line(exc)
                    )
                with self._lock:
                    self._done[name] = source.health.failed(reason)
            else:
                with self._lock:
                    self._done[name] = source.health.succeeded(now, values)
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
        counted (``SourceHealth.stalled``), a source it has not reached yet as after the
        previous refresh. Safe to call from another thread than the one running ``refresh``."""
        with self._lock:
            sources = {}
            for name, source in self.sources.items():
                if name in self._done:
                    sources[name] = self._done[name]
                elif name == self._current:
                    sources[name] = source.health.stalled()
                else:
                    sources[name] = self._previous.get(name, source.health.down())
            return self._snapshot(now.timestamp(), sources)

    def deadline(self) -> timedelta:
        """How long a refresh may run before it is reported stalled (``refresh_deadline``)."""
        return refresh_deadline(self.model, self.policy)

    def _snapshot(self, now: float, sources: dict[str, SourceStatus]) -> ModelSnapshot:
        predictions = self.predictions.health.fresh(now)
        labels = self.sources.get("labels")
        replays = self.sources.get("replays")
        features_source = self.sources.get("features")
        features = features_source.health.fresh(now) if features_source else None
        return ModelSnapshot(
            model=self.model.name,
            sources=sources,
            counter=self.predictions.counter,
            score_stats=predictions.score_stats if predictions else (),
            last_prediction_timestamp=predictions.last_prediction_timestamp if predictions else None,
            future_predictions=predictions.future_predictions if predictions else None,
            online=(labels.health.fresh(now) if labels else None) or (),
            replays=(replays.health.fresh(now) if replays else None) or (),
            features=features.skews if features else (),
            feature_reference_version=features.reference_version if features else None,
            feature_over_limit=features.over_limit if features else {},
            errors={
                (name, reason): count
                for name, source in self.sources.items()
                for reason, count in source.health.errors.items()
            },
            refresh_duration=time.perf_counter() - self._started,
            last_success=self._last_success,
        )


def model_refreshers(
    models: Sequence[ModelConfig],
    policy: RefreshPolicy,
    stores: Stores,
    count_from: datetime | None = None,
    training: TrainingSettings | None = None,
    state: StateDatabase | None = None,
    save_slices: bool = False,
) -> list[ModelRefresher]:
    """One ``ModelRefresher`` per configured model, in config order, each naming its config
    path ``models[i]`` in schema errors; ``count_from``, ``training``, ``state`` and
    ``save_slices`` as ``ModelRefresher`` takes them."""
    return [
        ModelRefresher(model, f"models[{i}]", policy, stores, count_from, training, state, save_slices)
        for i, model in enumerate(models)
    ]
