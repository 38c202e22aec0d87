"""The sources of one model: predictions, labels, replays. Each owns its reflection
(cached until it fails), its queries and its health; ``run`` reads its values at a time.

A new kind of source plugs in the same way: subclass ``Source``, give it a ``name``,
``_reflect`` and ``run``, and let ``refresh.ModelRefresher`` build it.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cached_property
from typing import Any, Generic, TypeVar
from zoneinfo import ZoneInfo

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from exporter.config import ModelConfig
from exporter.db import timed_connection
from exporter.durations import parse_duration
from exporter.errors import first_line
from exporter.health import SourceHealth
from exporter.monitoring_math import (
    percentiles_from_buckets,
    pooled_variance,
    ratio,
    roc_auc_bucket_error_bound,
    roc_auc_from_counts,
    round_half_up_index,
)
from exporter.predictions import queries
from exporter.predictions.queries import (
    INVALID_REASONS,
    DuplicateIds,
    LabelMaturity,
    LabelQueries,
    PredictionQueries,
    ReplayQueries,
    Windows,
    union,
)
from exporter.predictions.saved_slices import (
    ONLINE,
    PREDICTIONS,
    REPLAYS,
    Codec,
    SavedSlices,
    fingerprint,
    online_fingerprint,
    replay_fingerprint,
)
from exporter.predictions.slices import (
    CHUNK_ROWS,
    ONLINE_COUNTS,
    ONLINE_SUMS,
    TOP_SCORES,
    A,
    DuplicateRows,
    Histogram,
    OnlineBuckets,
    Pass,
    Plan,
    ReplayTotals,
    Sliced,
    SliceStore,
    TopCounts,
    boundaries,
    float_table,
    floor_to,
    slice_starts,
)
from exporter.predictions.stores import (
    NUMBER_TYPES,
    Stores,
    from_wall_clock,
    reflect_table,
    require_same_id_kind,
    shown_by,
    time_column,
    timestamp_types,
    to_wall_clock,
    written_by,
)
from exporter.snapshot import OnlineAccuracy, PredictionCounter, Reproducibility, ScoreStats
from exporter.training.storage import StateDatabase
from exporter.versions import VERSION_MAX_LENGTH

log = logging.getLogger(__name__)

#: Rows stamped less than this after the refresh time are rows written while it runs, not a
#: clock ahead of mlmon's: ``mlmon_future_predictions`` counts only the later ones.
FUTURE_TOLERANCE = timedelta(minutes=1)

Q = TypeVar("Q")
V = TypeVar("V")


#: The per-bucket columns of ``PredictionQueries.histogram`` that make a ``slices.Histogram``.
BUCKET_COLUMNS = ("n", "low", "high", "s1", "s2")


def _int(value: Any) -> int:
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


def slice_store(model: ModelConfig, combine: Callable[[Iterable[A]], A]) -> SliceStore[A] | None:
    """The store of a source's kept time slices (``slices.SliceStore``; ``combine`` merges
    their aggregates ``A``), ``None`` without ``time_slice``. While the slices fill, a
    refresh reads 1/``slice_fill_refreshes`` of the largest window's, so that a cold start
    does not read every slice's buckets at once (millions of rows at 10^7 predictions a day)."""
    width = model.slice_width()
    if width is None:
        return None
    longest = max(parse_duration(window) for window in model.windows)
    fill = max(1, math.ceil(longest / width / model.slice_fill_refreshes))
    return SliceStore(width, model.slice_audit_interval, combine, fill)


class LeftOutIds:
    """The duplicated ids a source keeping time slices leaves out of every read, and the
    ids each kept slice left out (issue 12: no full duplicate search at every refresh, only
    with no slice kept, while filling and at an audit's refresh). The
    predictions, the labels and the replays keep one each, for their own slices: the
    labels' windows end ``label_delay`` earlier, and the replays read more than the
    predictions (their slices settle ``replay_delay`` later) and audit their own slices.

    ``search`` finds the ids carried by several rows of the largest window among the ids
    of what the refresh reads and the known ones, and their rows; a kept slice that left
    out other ids than it now should is forgotten, to be read again. ``after_reads`` records
    what each kept slice left out and the slices read unprobed.
    """

    def __init__(self) -> None:
        #: The duplicated ids found at the last refresh, which every read leaves out.
        self.ids: tuple[Any, ...] = ()
        #: Whether the last search probed every id of the window (or ids are unique): only
        #: then are its ids all those of the window for a read of the windows in one pass.
        self.complete = False
        self._too_many = False  # whether the last search found more duplicated ids than it lists
        self._by_slice: dict[datetime, frozenset[Any]] = {}  # per kept slice, the ids it left out
        self._should: dict[datetime, frozenset[Any]] = {}  # per slice, what it should leave out now
        #: The slices the last refresh read whose ids the search did not probe (read again
        #: after it forgot them), and the new slices of the plan this refresh probed.
        self._unprobed: tuple[datetime, ...] = ()
        self._probed: tuple[datetime, ...] = ()
        #: A search was asked to probe every id (an audit's refresh) and none has finished
        #: since (that refresh failed after its audit): the next search probes every id.
        self._every_id_owed = False
        #: Per slice (by start), the smallest and largest id of its rows as read (``()``: no
        #: id read; ``None``: ids Python cannot order as the store does): ``_narrowed``.
        self._id_ranges: dict[datetime, tuple[Any, ...] | None] = {}
        #: The largest window's start at the last search that finished (``_narrowed``).
        self._start: datetime | None = None

    def search(
        self,
        conn: Connection,
        q: PredictionQueries,
        windows: Windows,
        store: SliceStore[Any],
        filling: bool,
        delay: timedelta,
        every_id: bool = False,
    ) -> DuplicateRows | None:
        """The rows of the ids carried by several rows of the largest of ``windows``
        (``PredictionQueries.duplicates_among``, ``duplicate_rows``; none when ids are
        unique by schema or config), which become the ``ids`` every read leaves out;
        ``None`` when the ids or their rows are too many to list (every kept slice is then
        forgotten and no id is known: the caller reads the windows in one pass). ``filling``
        and ``delay``: the store's (``SliceStore.filling``, ``ingestion_delay``). With
        ``every_id``, with no slice kept, or while filling, every id of the window is
        probed (``complete``; ``one_pass_ids`` then gives each window's duplicated ids for
        a read of the windows in one pass)."""
        duplicate_rows, ids = DuplicateRows((), ()), []
        self._every_id_owed = every_id = every_id or self._every_id_owed
        if not q.unique_ids:
            # Probe the ids of what this refresh reads (everything on a cold refresh; the new
            # rows only when narrowed: _narrowed), and of the slices the last one read
            # unprobed: one may hold a row written later than ingestion_delay, whose id the
            # audit, finding the slice as read, never probes.
            probed = store.plan(windows.starts, windows.end, delay, filling)
            self._probed = probed.new_slices
            reads = [r for p in probed.passes for r in p.reads]
            reads += [(s, s + store.width) for s in self._unprobed]
            # With no slice kept (a cold start, the limits below passed), while filling or
            # with every_id, every id is probed: one grouped pass, which finds at once more
            # duplicated ids than can be listed, and all of them, for a pass over the windows.
            probe = reads if store.slices and not filling and not every_id else None
            self.complete = probe is None
            # Without an index on the id, probing the new ids against the window reads the
            # window: numeric ids are searched in the slices their id ranges may meet instead.
            narrowed = None
            if q.numeric_ids and not q.indexed:
                narrowed = self._narrowed(conn, q, windows, store, probed, steady=bool(probe))
            within = None
            if narrowed is not None:
                probe, within = narrowed
            searched = (
                conn.execute(q.duplicates_among(windows.start, windows.end, probe, self.ids, within)).all()
                if within != []
                else []
            )
            ids = [row.id for row in searched if row.id is not None]  # NULL equals no id: never a duplicate
            rows: list[Any] = []
            # The limits are read from the module at each call: tests lower them.
            listed = len(searched) <= queries.MAX_LISTED_DUPLICATES
            self._too_many = not listed
            if ids and listed:
                points = _slice_points(windows, store.width)
                rows = list(conn.execute(q.duplicate_rows(points, windows.start, windows.end, ids, within)))
                duplicate_rows = DuplicateRows(points, tuple(tuple(row) for row in rows))
            self._every_id_owed = False
            self._start = windows.start
            if not listed or len(rows) > queries.MAX_DUPLICATE_ROWS:
                store.forget(list(store.slices))
                self.ids = ()
                return None
        else:
            self.complete, self._too_many, self._every_id_owed = True, False, False
        # Unique ids (also by a unique index found when the table is reflected again after a
        # failure, or the table created again with a key) leave nothing out: slices that left
        # out the ids known before are read again.
        self.ids = tuple(ids)
        self._should = duplicate_rows.by_slice(store.width)
        stale = [s for s in store.slices if self._by_slice.get(s, frozenset()) != self._should.get(s, frozenset())]
        store.forget(stale)
        return duplicate_rows

    def _narrowed(
        self,
        conn: Connection,
        q: PredictionQueries,
        windows: Windows,
        store: SliceStore[Any],
        probed: Plan,
        steady: bool,
    ) -> tuple[list[tuple[datetime, datetime]], list[tuple[datetime, datetime]]] | None:
        """Reads the id ranges of the slices new to ``probed`` (the refresh's plan) and,
        when ``steady``, returns the ranges of the largest of ``windows`` holding new rows,
        whose ids the search probes, and those it reads: every row of an id duplicated in
        the window lies in them (else ``None``: the search probes every id and reads the
        window anyway).

        A new duplicate has a new row: in the head (the slices not kept at the window's end),
        a slice read for the first time, one read unprobed by the last refresh, or back in
        the window when its start moved back (a refresh time stepped back). Its other
        rows are new too, or in a slice whose id range (``_id_ranges``, the smallest and
        largest id read in it) holds its id, so one that meets the id range of a new slice;
        a known duplicate's rows lie in the new slices and the slices its rows were found in
        (``_should``). Ids that grow with time (a sequence, a timestamped id) make that the
        new slices and the one or two before them; ids in no order, every slice (the
        window). A slice's range is read when the slice is new (a fill reads the ranges of
        the slices it reads), and once for a slice of the window the process has not read
        (restored slices: the first steady refresh after a restart groups the window's
        rows by slice once); a row written into a kept slice later than ``ingestion_delay``,
        or an id rewritten in place, may escape it until the audit's refresh probes every
        id, as its scores wait for that audit. One ``GROUP BY`` of the new slices' rows by
        slice."""
        width = store.width
        # The head: the reads ending at the window's end, from the first slice not kept (a
        # window's tail in the last kept slice is read with the head, as one range).
        head = [r for p in probed.passes for r in p.reads if r[1] >= windows.end]
        head = [(max([a, *(s + width for s in boundaries(a, b, width)[:-1] if s in store.slices)]), b) for a, b in head]
        # A refresh time stepped back (within the audit interval) brings back into the
        # window rows it had left: they are new to it.
        back = [(windows.start, self._start)] if self._start is not None and windows.start < self._start else []
        new = _clipped([*head, *back, *((s, s + width) for s in (*probed.new_slices, *self._unprobed))], windows)
        fresh = {s for a, b in new for s in boundaries(a, b, width)[:-1]}
        every = boundaries(windows.start, windows.end, width)[:-1]
        self._id_ranges = {s: r for s, r in self._id_ranges.items() if s + width > windows.start and s not in fresh}
        unseen = [s for s in every if s not in fresh and s not in self._id_ranges] if steady else []
        # Whole slices, the first one's rows before the window too (the range then holds
        # if the window moves back), up to the window's end.
        found: dict[datetime, tuple[Any, ...] | None] = {s: () for s in (*fresh, *unseen)}  # no row: no id
        read = union((s, min(s + width, windows.end)) for s in found)
        if read:
            points = _slice_points(windows, width)
            for row in conn.execute(q.id_ranges(points, read)):
                start = floor_to(points[row.part], width)
                found[start] = _hull(found[start], (row.low, row.high) if _orderable(row.low, row.high) else None)
        self._id_ranges.update(found)  # once read: a failed statement leaves them unseen
        if not steady:
            return None
        meeting = [
            s for s in every if s not in fresh and any(_meet(self._id_ranges[s], self._id_ranges[f]) for f in fresh)
        ]
        return union(new), union([*new, *_clipped([(s, s + width) for s in (*meeting, *self._should)], windows)])

    def one_pass_ids(self, found: DuplicateRows | None, starts: Sequence[datetime]) -> DuplicateIds | None:
        """The duplicated ids of each window starting at one of ``starts``, for a read of the
        windows in one pass, from what ``search`` ``found``: when it found more ids than it
        lists, ``DuplicateIds(None)`` (the queries then search them themselves); when it
        probed every id, the ids of its rows, or ``DuplicateIds(None)`` when they were too
        many; else ``None`` (a fill started by its own forgetting, or too many rows of few
        ids): the caller searches the windows, since a row written late into a kept slice
        may duplicate an id it did not probe."""
        if self._too_many:
            return DuplicateIds(None)
        if not self.complete:
            return None
        return DuplicateIds(None) if found is None else found.per_window(starts)

    def restorable(self, slices: Mapping[datetime, A]) -> dict[datetime, A]:
        """The kept ``slices`` (by start) that left no id out: they hold every row of their
        slice, whatever the duplicated ids known, so a new process may restore them
        (``Source._save``); it starts knowing no duplicated id, its audit's refresh probes
        every id and reads again any restored slice that should now leave one out."""
        return {start: a for start, a in slices.items() if not self._by_slice.get(start)}

    def after_reads(self, store: SliceStore[Any], plan: Plan, unique: bool) -> None:
        """After ``plan``'s reads and merge: what each kept slice left out, and (unless ids
        are ``unique``) the slices read that ``search`` did not probe, probed next time."""
        self._by_slice = {s: self._should.get(s, frozenset()) for s in store.slices}
        if not unique:
            self._unprobed = tuple(sorted(set(plan.new_slices) - set(self._probed)))


def _clipped(ranges: Iterable[tuple[datetime, datetime]], windows: Windows) -> list[tuple[datetime, datetime]]:
    """``ranges`` cut to the largest of ``windows``, empty ones left out."""
    cut = ((max(a, windows.start), min(b, windows.end)) for a, b in ranges)
    return [(a, b) for a, b in cut if a < b]


def _orderable(*ids: Any) -> bool:
    """Whether Python orders ``ids`` as a store does: numbers, not NaN (SQLite may hand back
    text out of a numeric column)."""
    return all(isinstance(i, (int, float, Decimal)) and not isinstance(i, bool) and i == i for i in ids)


def _hull(a: tuple[Any, ...] | None, b: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """The smallest id range (low, high) holding both (``()``: empty; ``None``: unordered)."""
    if a is None or b is None:
        return None
    return (min(a[0], b[0]), max(a[1], b[1])) if a and b else a or b


def _meet(a: tuple[Any, ...] | None, b: tuple[Any, ...] | None) -> bool:
    """Whether an id may lie in both id ranges (``_hull``); unordered ones may always."""
    if a is None or b is None:
        return True
    return bool(a and b) and a[0] <= b[1] and b[0] <= a[1]


#: Passes that read more parts than this are streamed (``_table``): a cold read or a fill
#: reads many slices, one row per (slice, bucket), the peak of a refresh's memory; a steady
#: refresh's passes read the heads and tails of its windows, about one part per window and
#: two for the head (a model of more than 6 windows streams them too).
STREAMED_PARTS = 8


def _streamed(read: Pass) -> bool:
    """Whether the result of ``read`` is streamed: it reads more than ``STREAMED_PARTS``
    parts (the points between its reads cut no part that is read)."""
    return sum(len(read.parts_in(start, end)) for start, end in read.reads) > STREAMED_PARTS


def _table(conn: Connection, statement: sa.Select[Any], stream: bool) -> tuple[np.ndarray, list[str]]:
    """The rows of ``statement`` as a float64 matrix, one column per result column
    (``slices.float_table``, ``CHUNK_ROWS`` rows at a time), and the columns' names.

    ``stream``: the result is streamed (``yield_per``: a server-side cursor on PostgreSQL,
    fetching ``CHUNK_ROWS`` rows at a time), so that the driver never holds the whole
    result: a cold read of every slice at 1e6 predictions a day peaked 123 MB lower
    (predictions) and 194 MB lower (labels) (docs/performance.md, *Streaming the cold
    reads*). The price, why small results are not streamed: PostgreSQL plans a cursor's
    query without parallel workers, and a cursor takes about six round trips instead of
    one. The result is closed, also when a value is no number."""
    options = {"yield_per": CHUNK_ROWS} if stream else {}
    with conn.execute(statement, execution_options=options) as result:
        return float_table(result.partitions(CHUNK_ROWS), len(result.keys())), list(result.keys())


def _slice_points(windows: Windows, width: timedelta) -> tuple[datetime, ...]:
    """Every boundary of slices of ``width`` in the largest of ``windows``, its starts and its end."""
    # Every slice boundary in the window: the starts of the slices inside it, then the
    # one starting at its last boundary (cut by the window's end).
    starts = slice_starts(windows.start, windows.end + width, width)
    return tuple(sorted({*(s for s in starts if s < windows.end), *windows.starts, windows.end}))


@dataclass(frozen=True)
class PredictionValues:
    """What one successful read of the predictions gives: the statistics of each window,
    the newest prediction's time (epoch seconds, ``None`` without rows) and the rows stamped
    ``FUTURE_TOLERANCE`` or more after the refresh time."""

    score_stats: tuple[ScoreStats, ...]
    last_prediction_timestamp: float | None
    future_predictions: int


class Source(ABC, Generic[Q, V]):
    """One configured table of a model.

    ``queries`` reflects the table and checks its columns on first use and keeps the
    result until ``forget`` (called after a failure: the table may have been altered);
    ``run`` reads the source's values ``V`` at a refresh time; ``health`` keeps its errors
    and last good values between refreshes.
    """

    #: The ``source`` label value and the config key of the source.
    name: str
    #: How the source saves its kept slices in the state database (``saved_slices``);
    #: ``None``: it saves none.
    codec: Codec[Any] | None = None

    def __init__(
        self, model: ModelConfig, key_path: str, stores: Stores, query_timeout: timedelta, staleness: timedelta
    ):
        """``key_path`` is the model's config path (``models[i]``), for error messages."""
        self.model = model
        self.key_path = f"{key_path}.{self.name}"
        self.stores = stores
        self.query_timeout = query_timeout
        self.health: SourceHealth[V] = SourceHealth(staleness)
        self._queries: Q | None = None
        self._saved: SavedSlices[Any] | None = None  # where the kept slices are saved (``_saved_slices``)
        self._restored = False  # whether a refresh tried to restore them (``_restore``)
        #: For a source keeping time slices, the duplicated ids they leave out. Each source
        #: keeps its own: the labels' windows end ``label_delay`` earlier, and each source
        #: reads and forgets its slices at its own refreshes.
        self._left_out = LeftOutIds()

    @abstractmethod
    def _reflect(self) -> Q:
        """Reflect the table and build its queries."""

    @abstractmethod
    def run(self, as_of: datetime) -> V:
        """The source's values at ``as_of`` (timezone-aware).

        Raises:
            SchemaError, sqlalchemy.exc.SQLAlchemyError, OSError: as the store does; the
            refresher classifies them (``reasons.classify_error``).
        """

    def queries(self) -> Q:
        """The source's queries, reflecting the table on first use.

        Raises:
            SchemaError: the table or its columns are missing or unusable (naming the key).
            sqlalchemy.exc.SQLAlchemyError, OSError: the store failed.
        """
        if self._queries is None:
            self._queries = self._reflect()
        return self._queries

    def forget(self) -> None:
        """Reflect again on next use."""
        self._queries = None

    @property
    def slices(self) -> SliceStore[Any] | None:
        """The kept time slices' aggregates (``slices.SliceStore``), ``None`` without: a
        source keeping them overrides this."""
        return None

    def _predictions(self) -> PredictionsSource:
        """The model's predictions source: the source itself, or the one it joins to."""
        raise NotImplementedError(f"{type(self).__name__} keeps no slices")

    def _fingerprint(self, url: sa.URL, dialect: str, width: timedelta) -> str:
        """What determines the contents of the kept slices (``saved_slices``), for ``codec``."""
        raise NotImplementedError(f"{type(self).__name__} saves no slices")

    def _saved_slices(self) -> SavedSlices[Any] | None:
        """Where the kept slices are saved, in the predictions' state database
        (``PredictionsSource.slice_state``): ``None`` without one, or without ``slices`` or
        ``codec``."""
        if self.codec is None or self.slices is None:
            return None
        predictions = self._predictions()
        if predictions.slice_state is None:
            return None
        q = predictions.queries()
        if self._saved is None:
            url = self.stores.engine(self.model.predictions.store).url
            found = self._fingerprint(url, q.dialect, self.slices.width)
            self._saved = SavedSlices(predictions.slice_state, self.model.name, found, self.codec)
        return self._saved

    def _restore(self) -> None:
        """At the first refresh that reads the kept slices (after ``SliceStore.begin``), keep
        those an earlier process saved (``_saved_slices``) that are sealed slices of this
        refresh's largest window (``SliceStore.restore``); the audit of this refresh then
        reads again those that changed in the store meanwhile. Later refreshes, nothing. A
        failure is logged at WARNING (``_state_failed``): the refresh is cold."""
        if self._restored:
            return
        self._restored = True
        saved = self._saved_slices()
        if saved is None or self.slices is None:  # the second for mypy
            return
        try:
            loaded = saved.load(self.slices.width)
        except Exception as exc:  # the state database, whatever its failure, never fails a refresh
            self._state_failed(f"reading the {saved.codec.noun}s from", exc)
            return
        kept = self.slices.restore(loaded)
        if kept:
            log.info("model %s: %d %ss restored from the state database", self.model.name, kept, saved.codec.noun)

    def _save(self) -> None:
        """Save the kept slices (``_saved_slices``) as they are after a successful refresh,
        those that left out the rows of duplicated ids aside (``LeftOutIds.restorable``: they
        depend on the ids known, which are not saved); a failure is logged at WARNING
        (``_state_failed``): a restart then reads more again."""
        saved = self._saved_slices()
        if saved is None or self.slices is None:  # the second for mypy
            return
        try:
            saved.save(self._left_out.restorable(self.slices.slices))
        except Exception as exc:  # the state database, whatever its failure, never fails a refresh
            self._state_failed(f"saving the {saved.codec.noun}s in", exc)

    def _state_failed(self, doing: str, exc: Exception) -> None:
        """Log a failure of the state database while ``doing`` (e.g. ``"saving ... in"``) at
        WARNING, with its traceback unless the database raised it (any other may be a bug,
        such as an Alembic revision unknown to this version of mlmon)."""
        log.warning(
            "model %s: %s the state database failed: %s",
            self.model.name,
            doing,
            first_line(exc),
            exc_info=not isinstance(exc, sa.exc.SQLAlchemyError),
        )

    def _connection(self, *tables: sa.Table, jit: bool = True) -> AbstractContextManager[Connection]:
        """A timed connection for the queries of one refresh, which read ``tables``
        (``db.timed_connection``: Spark SQL reads them afresh; ``jit=False``: PostgreSQL
        compiles none of them)."""
        # Every source of a model is read in the predictions' store (the config checks it):
        # labels and replays are joined to the predictions there.
        engine = self.stores.engine(self.model.predictions.store)
        return timed_connection(engine, self.query_timeout.total_seconds(), tables, jit=jit)


class PredictionsSource(Source[PredictionQueries, PredictionValues]):
    """The served predictions: window statistics, the newest and future rows, and the
    cumulative counter (fed through a timestamp watermark, not subject to staleness).
    With ``time_slice``, the kept slices' aggregates (``slices.SliceStore``), saved in the
    state database when one is given (``saved_slices``)."""

    name = "predictions"
    codec = PREDICTIONS

    def __init__(
        self,
        model: ModelConfig,
        key_path: str,
        stores: Stores,
        query_timeout: timedelta,
        staleness: timedelta,
        count_from: datetime | None = None,
        slice_state: StateDatabase | None = None,
    ):
        """``count_from``: as ``ModelRefresher``'s (the counter's first watermark);
        ``slice_state``: the state database the kept time slices are saved in after each
        successful refresh and restored from at the first (``None``: neither), the labels'
        kept online slices and the replays' slices too (``Source._saved_slices``)."""
        super().__init__(model, key_path, stores, query_timeout, staleness)
        self.counter = PredictionCounter(tuple(model.histogram_buckets))
        self._watermark: datetime | None = count_from
        self._duplicates: dict[Windows, DuplicateIds] = {}  # this refresh's, by windows (duplicate_ids)
        #: How many most frequent rounded scores a slice keeps (``slices.TopCounts``).
        self.top_scores = TOP_SCORES
        #: The state database the kept slices of every source of the model are saved in.
        self.slice_state = slice_state

    @cached_property
    def slices(self) -> SliceStore[Sliced] | None:
        """The sealed time slices' histograms, kept between refreshes (``_sliced``) with
        ``time_slice``, else ``None``."""
        store = slice_store(self.model, Sliced.merge)
        if store is not None:
            store.horizon = self.written_by
        return store

    def written_by(self, instant: datetime) -> datetime:
        """The instant before which every row read has been written by ``instant``
        (``stores.written_by``: naive timestamps across a clock set back): ``instant``
        itself once the timestamp column is known to hold instants (with a time zone, or
        epoch seconds), on which ``timezone`` has no effect."""
        time = self._queries.time if self._queries is not None else None
        if time is not None and time.kind in ("aware", "epoch"):
            return instant
        return written_by(instant, ZoneInfo(self.model.predictions.timezone))

    def _future_wall(self, as_of: datetime) -> datetime:
        """The instant whose wall-clock reading starts the future at ``as_of`` for rows
        stamped with wall-clock times (``TimeColumn.from_on``; rows holding instants start
        at ``as_of + FUTURE_TOLERANCE``): ``FUTURE_TOLERANCE`` after the latest wall-clock
        time shown by then (``stores.shown_by``: across a clock set back), added as wall
        time too (in a repeated hour's first pass a minute of instants is half a minute of
        wall time, ``to_wall_clock``)."""
        zone = ZoneInfo(self.model.predictions.timezone)
        shown = shown_by(as_of, zone)
        return max(shown + FUTURE_TOLERANCE, from_wall_clock(to_wall_clock(shown, zone) + FUTURE_TOLERANCE, zone))

    def _reflect(self) -> PredictionQueries:
        source = self.model.predictions
        engine = self.stores.engine(source.store)
        types = {
            "score": (NUMBER_TYPES, "a number (probability)"),
            "timestamp": timestamp_types(engine.dialect.name, self.key_path),
        }
        table = reflect_table(engine, source, source.columns.model_dump(), self.key_path, types)
        time_col = time_column(table, source.columns.timestamp, source, engine.dialect.name)
        return PredictionQueries(self.model, table, time_col, engine.dialect.name)

    def joinable_ids(self, id_column: str, key: str) -> Callable[[sa.Table], None]:
        """The check, for ``reflect_table``, that a table's id column (labels, replays or
        features; its config key path ``key``) can be joined to the predictions' id; a
        missing id column is left to the column checks.

        The check raises:
            SchemaError: as ``stores.require_same_id_kind``, or from reflecting the predictions.
        """

        def check(table: sa.Table) -> None:
            if id_column in table.c:
                require_same_id_kind(table, id_column, key, self.queries().table, self.model.predictions.columns.id)

        return check

    def windows(self, end: datetime) -> Windows:
        """The model's windows ending at ``end``."""
        return Windows.ending(end, [parse_duration(window) for window in self.model.windows])

    def duplicate_ids(self, conn: Connection, windows: Windows) -> DuplicateIds:
        """The duplicate ids of ``windows``: one search (``PredictionQueries.duplicate_search``),
        none when ids are unique by schema or config.

        The result is kept until the next refresh starts (``run``): the replays, and the
        labels when ``label_delay`` is 0, read the same windows and reuse it rather than
        search again, so every source of a refresh sees the ids as the predictions saw them.
        """
        q = self.queries()
        if q.unique_ids:
            return DuplicateIds.none(len(windows.starts))
        if windows in self._duplicates:
            return self._duplicates[windows]
        found = DuplicateIds.from_search(conn.execute(q.duplicate_search(windows)).all(), len(windows.starts))
        self._duplicates[windows] = found
        return found

    def _score_stats(self, conn: Connection, windows: Windows) -> tuple[ScoreStats, ...]:
        """Prediction statistics of each window from its bucket histogram (docs/metrics.md),
        merged from time slices (``_sliced``), or, with more duplicated ids than that lists,
        in one pass over all windows after a full duplicate search. The mode share is exact
        from the buckets when each holds one distinct score; else from the slices' most
        frequent scores, with its error bound, or from one more pass over the windows."""
        q = self.queries()
        n = len(windows.starts)
        decimals = self.model.mode_share_decimals
        sliced = self._sliced(conn, windows, self.slices) if self.slices is not None else None
        tops: list[TopCounts | None] = [None] * n
        if sliced is not None:
            parts, duplicated, duplicates = sliced
            histograms = [part.hist for part in parts]
            tops = [part.top for part in parts]
        else:
            duplicates = self.duplicate_ids(conn, windows)
            rows = conn.execute(q.histogram(windows, duplicates)).all()
            histograms = [
                Histogram.from_rows([(row.key, *(row._mapping[f"{c}_{i}"] for c in BUCKET_COLUMNS)) for row in rows])
                for i in range(n)
            ]
            duplicated = [sum(_int(row._mapping[f"dup_{i}"]) for row in rows) for i in range(n)]
        invalids = []
        for hist, dup in zip(histograms, duplicated, strict=True):
            invalid = dict.fromkeys(INVALID_REASONS, 0)
            for code, count in hist.excluded().items():
                invalid[INVALID_REASONS[code - 1]] += count
            invalid["duplicate_id"] += dup
            invalids.append(invalid)
        valid = [hist.valid() for hist in histograms]
        modes: list[tuple[int, int] | None] = [top.mode() if top is not None else None for top in tops]
        if any(np.any(v.low != v.high) for v in valid) and None in modes:
            counted = conn.execute(q.mode_counts(windows, duplicates, decimals)).one()
            modes = [(_int(m), _int(m)) for m in counted]
        return tuple(self._window_stats(*args) for args in zip(self.model.windows, invalids, valid, modes, strict=True))

    def _sliced(
        self, conn: Connection, windows: Windows, store: SliceStore[Sliced]
    ) -> tuple[list[Sliced], list[int], DuplicateIds] | None:
        """Each window's histogram and most frequent scores, merged from the kept sealed
        slices and the stretches that can still change (``slices``), with the valid scores
        each window excludes as ``duplicate_id`` and its duplicated ids (kept for the other
        sources, as ``duplicate_ids`` does); ``None`` when the duplicated ids or their rows
        are too many to list (the kept slices are dropped), or while the store fills (this
        refresh read some of the missing slices and keeps them): the caller then
        reads the windows in one pass.

        In order: the audit of the kept slices when due (``_audit``); then, unless ids are
        unique, the duplicated ids among the new rows' and the known ones and their rows
        (``LeftOutIds.search``): every read leaves those ids out and ``slices.DuplicateRows``
        adds their rows back per window; a kept slice that left out other ids than it now
        should is read again. Then
        the histogram of what the plan reads, and the most frequent rounded scores of its
        parts whose buckets hold several scores (the others' come from their buckets).
        """
        q = self.queries()
        delay = self.model.predictions.ingestion_delay
        n = len(windows.starts)
        self._restore()
        filling = store.filling(windows.starts, windows.end, delay)
        audited = store.audit_due(windows.end, filling)
        if audited:
            self._audit(conn, store, windows.end)
            filling = store.filling(windows.starts, windows.end, delay)  # it may have forgotten many
        # An id rewritten in place keeps every count and sum the audit compares: the
        # refresh that audits probes every id (as the labels' does).
        duplicate_rows = self._left_out.search(conn, q, windows, store, filling, delay, every_id=audited)
        if duplicate_rows is not None:
            filling = store.filling(windows.starts, windows.end, delay)  # the search may have forgotten slices
            plan = store.plan(windows.starts, windows.end, delay, filling)
            merged = store.merge(plan, self._read_parts(conn, plan))
            self._left_out.after_reads(store, plan, q.unique_ids)
        if duplicate_rows is None or not plan.windows:
            # Too many duplicated ids, or filling: the windows are read in one pass this
            # time, with the duplicated ids found when every id was probed (duplicate_ids).
            found = self._left_out.one_pass_ids(duplicate_rows, windows.starts)
            if found is not None:
                self._duplicates[windows] = found
            return None
        if q.unique_ids:
            return merged, [0] * n, DuplicateIds.none(n)
        decimals = (self.model.bucket_decimals, self.model.mode_share_decimals)
        added = [duplicate_rows.window(start, *decimals) for start in windows.starts]
        found = DuplicateIds(tuple(ids for _, _, ids in added))
        self._duplicates[windows] = found  # the replays and labels reuse it (duplicate_ids)
        parts = [Sliced.merge([part, back]) for part, (back, _, _) in zip(merged, added, strict=True)]
        return parts, [dup for _, dup, _ in added], found

    def _predictions(self) -> PredictionsSource:
        return self

    def _fingerprint(self, url: sa.URL, dialect: str, width: timedelta) -> str:
        return fingerprint(self.model, url, dialect, width, self.top_scores)

    def _read_parts(self, conn: Connection, plan: Plan) -> dict[tuple[int, int], Sliced]:
        """What each part of ``plan`` holds, by (pass, part) (a part without rows is absent):
        per pass, its histogram in one statement, then the most frequent rounded scores in a
        second one over the parts whose buckets hold several distinct scores; a part whose
        buckets each hold one score has them exactly from its buckets."""
        q = self.queries()
        decimals = self.model.mode_share_decimals
        out: dict[tuple[int, int], Sliced] = {}
        for pass_index, read in enumerate(plan.passes):
            if not read.reads:
                continue
            histograms = Histogram.by_part(
                _table(
                    conn,
                    q.sliced_histogram(read.points, read.reads, self._left_out.ids),
                    stream=_streamed(read),
                )[0]
            )
            tops: dict[int, TopCounts] = {}
            mixed = []
            for p, hist in histograms.items():
                valid = hist.valid()
                if np.all(valid.low == valid.high):
                    rounded = round_half_up_index(valid.low, decimals)
                    tops[p] = TopCounts.of_scores(rounded, valid.n, self.top_scores)
                else:
                    mixed.append(p)
            if mixed:
                ranges = [(read.points[p], read.points[p + 1]) for p in mixed]
                statement = q.sliced_mode_counts(read.points, ranges, self._left_out.ids, decimals, self.top_scores)
                counted: dict[int, list[tuple[int, int]]] = {p: [] for p in mixed}
                for row in conn.execute(statement):
                    counted[int(row.part)].append((int(row.key), int(row.n)))
                for p, pairs in counted.items():
                    keys, counts = np.array([k for k, _ in pairs]), np.array([c for _, c in pairs])
                    tops[p] = TopCounts.of(keys, counts, self.top_scores)
            out.update({(pass_index, p): Sliced(hist, tops[p]) for p, hist in histograms.items()})
        return out

    def _audit(self, conn: Connection, store: SliceStore[Sliced], as_of: datetime) -> None:
        """Compare each kept slice with the store (rows by reason, the sums of the valid
        scores' buckets, of the scores and of their squares: ``Histogram.fingerprint``;
        leaving out the known duplicated ids as the slices did) and forget those that
        differ: rows written later than ``ingestion_delay``, deleted or rewritten (a rewrite
        that keeps the buckets' sum and both float sums within 1e-9 goes unseen)."""
        q = self.queries()
        read = store.audit_started(as_of)
        points = read.points
        found: dict[datetime, tuple[dict[int, int], int, float, float]] = {}
        for row in conn.execute(q.part_counts(points, read.reads, self._left_out.ids)):
            counts, keys, total, squares = found.get(points[row.part], ({}, 0, 0.0, 0.0))
            counts[int(row.base)] = _int(row.n)
            found[points[row.part]] = (
                counts,
                keys + _int(row.keys),
                total + float(row.total or 0.0),
                squares + float(row.squares or 0.0),
            )

        def differs(start: datetime, aggregate: Sliced) -> bool:
            # Other counts by reason or bucket sum, or float sums off by more than rounding.
            counts, keys, total, squares = aggregate.hist.fingerprint(self.model.bucket_decimals)
            store_counts, store_keys, store_total, store_squares = found.get(start, ({}, 0, 0.0, 0.0))
            return (
                counts != store_counts
                or keys != store_keys
                or not math.isclose(total, store_total, rel_tol=1e-9, abs_tol=1e-12)
                or not math.isclose(squares, store_squares, rel_tol=1e-9, abs_tol=1e-12)
            )

        changed = store.audited(differs)
        if changed:
            log.info("model %s: %d kept time slices changed in the store; read again", self.model.name, len(changed))

    def _window_stats(
        self, window: str, invalid: dict[str, int], hist: Histogram, mode: tuple[int, int] | None
    ) -> ScoreStats:
        """One window's statistics from the buckets of its valid scores; ``mode``: bounds of
        its mode count (``TopCounts.mode``, equal when exact), needed when a bucket holds
        several scores."""
        if not len(hist.key):
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
        counts, lows, highs, sums = hist.n, hist.low, hist.high, hist.s1
        edges = hist.key / 10.0**self.model.bucket_decimals  # as in SQL: key / 10**k
        n = int(counts.sum())
        pure = bool(np.all(lows == highs))  # every bucket one distinct score: all exact
        if pure:
            # Round half up as the SQL of mode_counts does, and merge the buckets' counts.
            rounded = round_half_up_index(lows, self.model.mode_share_decimals)
            _, inverse = np.unique(rounded, return_inverse=True)
            exact = int(np.bincount(inverse, weights=counts).max())
            mode = (exact, exact)
        assert mode is not None, "the mode is read when a bucket holds several scores"
        return ScoreStats(
            window=window,
            predictions=n,
            invalid=invalid,
            mean=float(np.sum(counts * edges + sums) / n),
            stddev=math.sqrt(pooled_variance(counts, edges, sums, hist.s2)),
            percentiles=percentiles_from_buckets(lows, highs, counts),
            mode_share=mode[0] / n,
            bucketed=not pure,
            mode_share_error_bound=(mode[1] - mode[0]) / n if mode[1] > mode[0] else None,  # absent when exact
        )

    def run(self, as_of: datetime) -> PredictionValues:
        self._duplicates = {}  # a new refresh: rows may have been written since the last search
        windows = self.windows(as_of)
        if self.slices is not None:  # before anything can fail (SliceStore.begin)
            self.slices.begin(windows.starts, windows.end, self.model.predictions.ingestion_delay)
        q = self.queries()
        # The parts' bisecting CASE is a large expression: compiling it took PostgreSQL's
        # JIT about 4 s of a cold refresh at 1e6 rows (6.2 s without, 10.0 s with).
        with self._connection(q.table, jit=False) as conn:
            # First, so that rows written during the window queries (which may take minutes
            # on a large table) do not count as stamped in the future.
            last = q.last_timestamp(as_of, as_of + FUTURE_TOLERANCE, self._future_wall(as_of))
            newest, future, unreadable = conn.execute(last).one()
            stats = self._score_stats(conn, windows)
            # In no window, so counted over the whole table, the same for every window (docs/metrics.md).
            stats = tuple(replace(s, invalid={**s.invalid, "bad_timestamp": _int(unreadable)}) for s in stats)
            # Rows may be written up to ingestion_delay after their timestamp: count only older ones.
            horizon = self.written_by(as_of - self.model.predictions.ingestion_delay)
            if self._watermark is None:
                self._watermark = horizon  # counters start with the process: old rows are not counted
            elif horizon > self._watermark:
                row = conn.execute(q.new_predictions(self._watermark, horizon, self.model.histogram_buckets)).one()
                count, score_sum, *buckets = row
                self.counter = self.counter.add(_int(count), float(score_sum or 0.0), tuple(_int(b) for b in buckets))
                self._watermark = horizon
        self._save()
        return PredictionValues(stats, q.time.to_epoch(newest), _int(future))


class JoinedSource(Source[Q, V]):
    """A source joined to the predictions by id (labels, replays): it reads in the
    predictions' store and checks its id against theirs through ``predictions``."""

    def __init__(
        self,
        model: ModelConfig,
        key_path: str,
        stores: Stores,
        query_timeout: timedelta,
        staleness: timedelta,
        predictions: PredictionsSource,
    ):
        super().__init__(model, key_path, stores, query_timeout, staleness)
        self.predictions = predictions

    def _predictions(self) -> PredictionsSource:
        return self.predictions

    def _merged(
        self,
        conn: Connection,
        windows: Windows,
        store: SliceStore[A],
        read: Callable[[Pass, Sequence[Any]], dict[int, A]],
        audit: Callable[[], None],
        add_back: Callable[[DuplicateIds, Sequence[Any]], list[A]],
    ) -> tuple[list[A] | None, DuplicateIds | None]:
        """Each window's aggregates ``A``, merged from the kept slices of ``store`` and the
        stretches that can still change (``slices.SliceStore``, as
        ``PredictionsSource._sliced``), or ``None`` while the store fills (this refresh read
        some of the missing slices and keeps them) or when the duplicated ids or their rows
        are too many to list (the kept slices are dropped): the caller then reads the
        windows in one pass, with each window's duplicated ids when they were found (else
        ``None``: the caller searches the windows).

        In order: ``audit`` when due (it compares the kept slices with the store and
        forgets those that changed); unless ids are unique, the duplicated ids of the
        windows, found as the predictions find theirs (``LeftOutIds.search``); per pass of
        the plan, ``read(pass, exclude)``: its parts' aggregates, by part, the rows of the
        ``exclude`` ids left out; then, when ids were left out, ``add_back(duplicates,
        only)``: each window's aggregates of the predictions of the ``only`` ids, those
        whose id several rows of the window carry (``duplicates``) left out."""
        q = self.predictions.queries()
        ingestion = self.model.predictions.ingestion_delay
        filling = store.filling(windows.starts, windows.end, ingestion)
        audited = store.audit_due(windows.end, filling)
        if audited:
            audit()
            filling = store.filling(windows.starts, windows.end, ingestion)
        # An audit compares the valid predictions only: a row with any score written late
        # into a kept slice may make an id duplicated, so its refresh probes every id.
        duplicate_rows = self._left_out.search(conn, q, windows, store, filling, ingestion, every_id=audited)
        if duplicate_rows is None:
            return None, self._left_out.one_pass_ids(None, windows.starts)
        filling = store.filling(windows.starts, windows.end, ingestion)  # the search may have forgotten slices
        plan = store.plan(windows.starts, windows.end, ingestion, filling)
        parts: dict[tuple[int, int], A] = {}
        for pass_index, each in enumerate(plan.passes):
            if each.reads:
                parts.update({(pass_index, p): a for p, a in read(each, self._left_out.ids).items()})
        merged = store.merge(plan, parts)
        self._left_out.after_reads(store, plan, q.unique_ids)
        if not plan.windows:
            return None, self._left_out.one_pass_ids(duplicate_rows, windows.starts)
        if not self._left_out.ids:
            return merged, None
        back = add_back(duplicate_rows.per_window(windows.starts), self._left_out.ids)
        return [store.combine([part, added]) for part, added in zip(merged, back, strict=True)], None


class LabelsSource(JoinedSource[LabelQueries, tuple[OnlineAccuracy, ...]]):
    """The delayed labels, joined to the predictions: online accuracy per label-delayed
    window, and the serving version when the predictions have a version column."""

    name = "labels"
    _version_problem: str | None = None  # the last version-column problem logged (logged once)
    codec = ONLINE

    @cached_property
    def slices(self) -> SliceStore[OnlineBuckets] | None:
        """The online aggregates of the settled slices, kept between refreshes when labels
        mature by slice (a label timestamp and ``label_delay`` above 0) and time slices are
        on (``_sliced``), else ``None``."""
        store = slice_store(self.model, OnlineBuckets.merge) if self.model.labels_mature_by_slice() else None
        if store is not None:
            assert self.model.labels is not None
            zone, delay = ZoneInfo(self.model.labels.timezone), self.model.label_delay

            def horizon(x: datetime) -> datetime:
                # A slice is settled once its predictions and every label row recorded within
                # label_delay of its end are written, read as instants (stores.written_by;
                # label times that are instants are read as written).
                time = self._queries.time if self._queries is not None else None
                instants = time is not None and time.kind in ("aware", "epoch")
                labels = x + delay if instants else written_by(x + delay, zone)
                return min(self.predictions.written_by(x + delay), labels - delay)

            store.horizon = horizon
        return store

    def _reflect(self) -> LabelQueries:
        source = self.model.labels
        assert source is not None  # built only for a model with labels
        engine = self.stores.engine(source.store)
        types = {
            "label": ((sa.Boolean, *NUMBER_TYPES), "a number or a boolean (0/1)"),
            "timestamp": timestamp_types(engine.dialect.name, self.key_path),
        }
        ids = self.predictions.joinable_ids(source.columns.id, f"{self.key_path}.columns.id")
        table = reflect_table(engine, source, source.columns.model_dump(), self.key_path, types, ids)
        time_col = None
        if source.columns.timestamp is not None:
            time_col = time_column(table, source.columns.timestamp, source, engine.dialect.name)
        return LabelQueries(source, table, time_col)

    def _matures(self, labels: LabelQueries) -> bool:
        """Whether labels mature by slice (``LabelMaturity``): they have a timestamp and
        ``label_delay`` is above 0."""
        return labels.time is not None and self.model.label_delay > timedelta(0)

    def _online(self, conn: Connection, as_of: datetime) -> list[OnlineAccuracy]:
        """Online accuracy of each label-delayed window, ending ``label_delay`` before
        ``as_of``, all windows in one pass (``PredictionQueries.online``), with label maturity
        when the labels have a timestamp and ``label_delay`` is above 0. Where the id
        columns allow it (``PredictionQueries.joins_labels_one_to_one``), the label ids with
        several rows are searched first (``LabelQueries.repeated_ids``): every other
        prediction joins its label row one to one, and the predictions of those ids, when
        any, are read by a second statement with their label rows grouped; otherwise, or
        with more than ``MAX_LISTED_LABEL_IDS`` of them, one statement groups every id's
        label rows."""
        q, labels = self.predictions.queries(), self.queries()
        delay = self.model.label_delay
        windows = self.predictions.windows(as_of - delay)
        maturity, duplicates = None, None
        if self._matures(labels):
            points = boundaries(windows.start, windows.end, self.model.label_slice_width())
            maturity = LabelMaturity(points, delay)
            if self.slices is not None:
                merged, duplicates = self._sliced(conn, windows, as_of, maturity, self.slices)
                if merged is not None:
                    return [
                        self._accuracy(window, buckets, labels.invalid_reasons)
                        for window, buckets in zip(self.model.windows, merged, strict=True)
                    ]
        if duplicates is None:
            duplicates = self.predictions.duplicate_ids(conn, windows)
        one_to_one = q.joins_labels_one_to_one(labels)
        repeated = conn.execute(labels.repeated_ids(windows, as_of, maturity)).scalars().all() if one_to_one else ()
        if not one_to_one or len(repeated) > queries.MAX_LISTED_LABEL_IDS:  # label rows grouped
            statements = [q.online(labels, windows, duplicates, as_of, maturity)]
        else:
            statements = [q.online(labels, windows, duplicates, as_of, maturity, repeated=repeated)]
            if repeated:  # their predictions, with the label rows grouped
                statements.append(q.online(labels, windows, duplicates, as_of, maturity, repeated=repeated, apart=True))
        parts = []
        for statement in statements:
            parts.append(OnlineBuckets.by_window(*_table(conn, statement, stream=False), len(self.model.windows)))
        return [
            self._accuracy(window, OnlineBuckets.merge(of_window), labels.invalid_reasons)
            for window, *of_window in zip(self.model.windows, *parts, strict=True)
        ]

    def _sliced(
        self,
        conn: Connection,
        windows: Windows,
        as_of: datetime,
        maturity: LabelMaturity,
        store: SliceStore[OnlineBuckets],
    ) -> tuple[list[OnlineBuckets] | None, DuplicateIds | None]:
        """Each window's online aggregates, merged from the kept settled slices and the
        stretches that can still change, with ``JoinedSource._merged``'s results.
        ``windows`` end ``label_delay`` before ``as_of``: a slice is settled, and kept, once
        it ends ``ingestion_delay`` before their end, later around a clock set back
        (``slices``' horizon): its predictions are written, and every label row recorded
        within ``label_delay`` of its end too. The audit, when due, reads the kept slices'
        totals again (``_audit``); each pass reads its parts' predictions with their matured
        labels (``PredictionQueries.sliced_online``), and the predictions of the duplicated
        ids are added back by ``PredictionQueries.online`` with ``only``."""
        q, labels = self.predictions.queries(), self.queries()
        self._restore()

        def read(part_pass: Pass, exclude: Sequence[Any]) -> dict[int, OnlineBuckets]:
            statement = q.sliced_online(labels, part_pass.points, part_pass.reads, as_of, maturity, exclude=exclude)
            return OnlineBuckets.by_part(*_table(conn, statement, stream=_streamed(part_pass)))

        def add_back(duplicates: DuplicateIds, only: Sequence[Any]) -> list[OnlineBuckets]:
            statement = q.online(labels, windows, duplicates, as_of, maturity, only=only)
            return OnlineBuckets.by_window(*_table(conn, statement, stream=False), len(windows.starts))

        return self._merged(conn, windows, store, read, lambda: self._audit(conn, store, as_of, maturity), add_back)

    def _fingerprint(self, url: sa.URL, dialect: str, width: timedelta) -> str:
        return online_fingerprint(self.model, url, dialect, width)

    def _audit(
        self, conn: Connection, store: SliceStore[OnlineBuckets], as_of: datetime, maturity: LabelMaturity
    ) -> None:
        """Compare each kept slice's totals (``OnlineBuckets.totals``) with the store's and
        forget those that differ: predictions or label rows written later than
        ``ingestion_delay``, deleted or rewritten, or label rows whose arrival time is no
        instant written since (they count for every prediction of their id)."""
        q, labels = self.predictions.queries(), self.queries()
        read = store.audit_started(as_of - self.model.label_delay)
        statement = q.sliced_online(
            labels, read.points, read.reads, as_of, maturity, by_bucket=False, exclude=self._left_out.ids
        )
        found = {
            read.points[row.part]: (
                tuple(_int(row._mapping[name]) for name in ONLINE_COUNTS),
                tuple(float(row._mapping[name] or 0.0) for name in ONLINE_SUMS),
            )
            for row in conn.execute(statement)
        }
        nothing = ((0,) * len(ONLINE_COUNTS), (0.0,) * len(ONLINE_SUMS))

        def differs(start: datetime, aggregate: OnlineBuckets) -> bool:
            counts, sums = aggregate.totals()
            store_counts, store_sums = found.get(start, nothing)
            close = (math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(sums, store_sums, strict=True))
            return counts != store_counts or not all(close)

        changed = store.audited(differs)
        if changed:
            log.info("model %s: %d kept online slices changed in the store; read again", self.model.name, len(changed))

    @staticmethod
    def _accuracy(window: str, buckets: OnlineBuckets, invalid_reasons: tuple[str, ...]) -> OnlineAccuracy:
        """One window's accuracy from its online aggregates (``slices.OnlineBuckets``);
        ``invalid_reasons``: the label source's (``LabelQueries.invalid_reasons``)."""
        counts = dict(zip(ONLINE_COUNTS, (int(c) for c in buckets.counts), strict=True))
        n_pred, n_pos = counts["predictions"], counts["positives"]
        n_labeled = n_pos + counts["negatives"]
        labeled_score_sum, log_loss_sum = (float(v) for v in buckets.sums)
        mean_score = ratio(labeled_score_sum, n_labeled)
        positive_ratio = ratio(n_pos, n_labeled)
        auc = roc_auc_from_counts(buckets.positives, buckets.negatives)
        # A bucket whose labeled scores are all equal holds true ties only.
        bound = roc_auc_bucket_error_bound(buckets.positives, buckets.negatives, buckets.low == buckets.high)
        return OnlineAccuracy(
            window=window,
            predictions=n_pred,
            labeled=n_labeled,
            positives=n_pos,
            logloss=ratio(log_loss_sum, n_labeled),
            roc_auc=auc,
            roc_auc_error_bound=bound if bound else None,  # absent when the AUC is exact
            calibration_ratio=ratio(mean_score, positive_ratio),
            positive_ratio=positive_ratio,
            label_coverage=ratio(counts["with_label"], n_pred),
            extreme_scores=counts["extreme"],
            invalid_labels={reason: counts[reason] for reason in invalid_reasons},
        )

    def run(self, as_of: datetime) -> tuple[OnlineAccuracy, ...]:
        if self.slices is not None:  # before anything can fail (SliceStore.begin)
            windows = self.predictions.windows(as_of - self.model.label_delay)
            self.slices.begin(windows.starts, windows.end, self.model.predictions.ingestion_delay)
        q = self.predictions.queries()
        labels = self.queries()
        # With label maturity (_online) the maturity bounds are a bisecting CASE, as the parts
        # of time are in PredictionsSource.run: JIT compiling it took PostgreSQL 14 s of 20 at
        # 1e6 rows.
        with self._connection(q.table, labels.table, jit=not self._matures(labels)) as conn:
            online = self._online(conn, as_of)
            if q.version is not None:
                raw = conn.execute(q.serving_version(as_of - self.model.label_delay)).scalar()
        self._save()
        if q.version is None:
            return tuple(online)
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


class ReplaysSource(JoinedSource[ReplayQueries, tuple[Reproducibility, ...]]):
    """The offline replays of served predictions: reproducibility per window. With
    ``time_slice``, the replay aggregates of the settled slices (``slices.ReplayTotals``)
    are kept between refreshes (``slices``)."""

    name = "replays"
    codec = REPLAYS

    @cached_property
    def slices(self) -> SliceStore[ReplayTotals] | None:
        """The replay aggregates of the settled slices, kept between refreshes when the
        replays are on slices (``ModelConfig.replays_on_slices``), else ``None``. A slice is
        settled once its predictions were written ``replay_delay`` ago
        (``PredictionsSource.written_by``): replays have no time of their own, so one
        written later is taken in by the audit."""
        store = slice_store(self.model, ReplayTotals.merge) if self.model.replays_on_slices() else None
        if store is not None:
            delay = self.model.replay_delay
            # Every row read written replay_delay ago (around a clock set back, rows are
            # written later than their time reads: stores.written_by).
            store.horizon = lambda x: self.predictions.written_by(x - delay)
        return store

    def _reflect(self) -> ReplayQueries:
        source = self.model.replays
        assert source is not None  # built only for a model with replays
        engine = self.stores.engine(source.store)
        types: dict[str, tuple[tuple[type, ...], str]] = {"score": (NUMBER_TYPES, "a number (probability)")}
        ids = self.predictions.joinable_ids(source.columns.id, f"{self.key_path}.columns.id")
        table = reflect_table(engine, source, source.columns.model_dump(), self.key_path, types, ids)
        return ReplayQueries(source, table)

    def _fingerprint(self, url: sa.URL, dialect: str, width: timedelta) -> str:
        return replay_fingerprint(self.model, url, dialect, width)

    def _sliced(
        self, conn: Connection, windows: Windows, store: SliceStore[ReplayTotals]
    ) -> tuple[list[ReplayTotals] | None, DuplicateIds | None]:
        """Each window's replay aggregates, merged from the kept settled slices and the
        stretches that can still change, with ``JoinedSource._merged``'s results: each pass
        reads its parts' predictions joined to their replays
        (``PredictionQueries.sliced_replays``), the predictions of the duplicated ids are
        added back by ``PredictionQueries.replays`` with ``only``, and the audit, when due,
        reads every kept slice again with the same statement and forgets those whose
        aggregates changed: replays written, deleted or rewritten since the slice was read
        (a rewrite that keeps the counts and the largest error changes no number), or
        predictions written later than ``ingestion_delay`` + ``replay_delay`` after their
        slice's end."""
        q, replays = self.predictions.queries(), self.queries()
        self._restore()

        def read(part_pass: Pass, exclude: Sequence[Any]) -> dict[int, ReplayTotals]:
            return ReplayTotals.by_part(
                conn.execute(q.sliced_replays(replays, part_pass.points, part_pass.reads, exclude))
            )

        def audit() -> None:
            kept = store.audit_started(windows.end)
            found = {kept.points[p]: totals for p, totals in read(kept, self._left_out.ids).items()}
            changed = store.audited(lambda start, totals: totals != found.get(start, ReplayTotals()))
            if changed:
                log.info(
                    "model %s: %d kept replay slices changed in the store; read again", self.model.name, len(changed)
                )

        def add_back(duplicates: DuplicateIds, only: Sequence[Any]) -> list[ReplayTotals]:
            row = conn.execute(q.replays(replays, windows, duplicates, only=only)).one()
            return [ReplayTotals.of(row._mapping, f"_{i}") for i in range(len(windows.starts))]

        return self._merged(conn, windows, store, read, audit, add_back)

    def run(self, as_of: datetime) -> tuple[Reproducibility, ...]:
        windows = self.predictions.windows(as_of)
        if self.slices is not None:  # before anything can fail (SliceStore.begin)
            self.slices.begin(windows.starts, windows.end, self.model.predictions.ingestion_delay)
        q, replays = self.predictions.queries(), self.queries()
        # See PredictionQueries.replays_by_lookup; the parts' bisecting CASE, as in
        # PredictionsSource.run.
        jit = not (q.replays_by_lookup(replays) or self.slices is not None)
        with self._connection(q.table, replays.table, jit=jit) as conn:
            totals, duplicates = self._sliced(conn, windows, self.slices) if self.slices is not None else (None, None)
            if totals is None:
                if duplicates is None and self.slices is not None:
                    # Their own probe may have found ids the predictions' did not (the replays
                    # read replay_delay more of the window): the windows are searched again.
                    found = conn.execute(q.duplicate_search(windows)).all()
                    duplicates = DuplicateIds.from_search(found, len(windows.starts))
                elif duplicates is None:
                    duplicates = self.predictions.duplicate_ids(conn, windows)
                row = conn.execute(q.replays(replays, windows, duplicates)).one()
                totals = [ReplayTotals.of(row._mapping, f"_{i}") for i in range(len(windows.starts))]
        self._save()
        return tuple(
            Reproducibility(
                window=window,
                replayed=t.replayed,
                ratio=ratio(t.reproduced, t.replayed),
                abs_error_max=t.abs_error_max,
            )
            for window, t in zip(self.model.windows, totals, strict=True)
        )
