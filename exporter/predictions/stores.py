"""SQL stores: engines per configured store, table reflection and time binding.

Identifiers come only from the config and reach SQL through SQLAlchemy's reflected
``Table`` objects, which quote them; no SQL string is ever formatted.
"""

from __future__ import annotations

import math
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from exporter.config import Store, TableSource
from exporter.db import PoolSize, create_store_engine, require_existing_sqlite_file
from exporter.reasons import SchemaError, sqlstate

_MICROSECOND = timedelta(microseconds=1)
#: How far the date SQLite text starts with may lie from its wall-clock time: ``TimeColumn._stored_dates``.
_STORED_DATE_MARGIN = timedelta(days=2)


def _transition_after(zone: ZoneInfo, instant: datetime, within: timedelta) -> datetime:
    """The first instant after ``instant`` at which ``zone`` changes its UTC offset, known
    to lie at most ``within`` (plus a second) after it; found by bisection on whole
    seconds, where the tz database puts every transition."""
    low = math.floor(instant.timestamp())
    high = low + math.ceil(within.total_seconds()) + 1
    offset = datetime.fromtimestamp(low, zone).utcoffset()
    while high - low > 1:  # invariant: the offset at low is the old one, at high the new one
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, zone).utcoffset() == offset:
            low = middle
        else:
            high = middle
    return datetime.fromtimestamp(high, UTC)


def _offset(zone: ZoneInfo, wall: datetime) -> timedelta:
    """``zone``'s UTC offset at the wall time of ``wall`` (its ``fold`` picks the reading;
    a tzinfo is ignored)."""
    offset = zone.utcoffset(wall)
    assert offset is not None  # a ZoneInfo has an offset at every time
    return offset


def to_wall_clock(instant: datetime, zone: ZoneInfo) -> datetime:
    """The naive wall-clock time of ``zone`` that a window edge at ``instant`` (timezone-aware)
    is compared with, to the microsecond (rounded up).

    A non-decreasing map, so that consecutive windows ``[a, b)``, ``[b, c)`` become
    consecutive wall-clock intervals and count every row once: the plain conversion
    jumps back an hour when clocks fall back, which made windows in that hour empty.

    - Outside transitions: the usual local time.
    - Clocks set back by ``d`` at instant ``T`` (wall times ``[W, W + d)`` occur twice,
      once in ``[T - d, T)`` and again in ``[T, T + d)``): the two passes, ``2d`` of real
      time, map linearly onto the ``d`` of repeated wall time, ``T - d + x`` to ``W + x/2``.
      A window there covers half its length of wall time, which holds rows of both passes.
    - Clocks set forward at ``T`` (wall times ``[W, W + d)`` never occur): ``T`` itself
      maps to ``W``, every later instant to its usual local time, so that a row stamped
      in the gap counts as written at ``T``.

    ``from_wall_clock`` is its inverse (docs/metrics.md, "Timestamps and time zones").
    """
    local = instant.astimezone(zone)
    wall = local.replace(tzinfo=None, fold=0)
    early, late = _offset(zone, wall), _offset(zone, wall.replace(fold=1))
    if early > late:  # a repeated wall time: instant is within d of the transition
        d = early - late
        first = (wall - early).replace(tzinfo=UTC)  # its first pass, before T
        t = _transition_after(zone, first, d)
        elapsed = (instant - (t - d)) // _MICROSECOND
        return (t + late).replace(tzinfo=None) + (elapsed + 1) // 2 * _MICROSECOND  # half, rounded up
    before = (instant - _MICROSECOND).astimezone(zone)
    if _offset(zone, before) < _offset(zone, local):  # instant is the transition at the end of a gap
        return before.replace(tzinfo=None) + _MICROSECOND
    return wall


#: The farthest ahead ``written_by`` looks for a clock set back (the tz database's largest
#: set-backs are a day, e.g. Pacific/Kwajalein's date line moves).
_LONGEST_SETBACK = timedelta(days=2)


def _setbacks(zone: ZoneInfo, start: datetime, end: datetime) -> Iterator[tuple[datetime, timedelta]]:
    """The instants in ``[start, end)`` at which ``zone`` sets its clocks back, each with the
    size ``d`` of the set-back: found in steps of 15 minutes, then bisected to the second
    (two changes within one step would be missed)."""
    step, t = timedelta(minutes=15), start

    def offset(at: datetime) -> timedelta:
        found = at.astimezone(zone).utcoffset()
        assert found is not None  # an aware datetime in a ZoneInfo always has one
        return found

    before = offset(t)
    while t < end:
        nxt = min(t + step, end)
        new = offset(nxt)
        if new != before:
            if new < before:
                yield _transition_after(zone, t, nxt - t), before - new
            before = new
        t = nxt


def written_by(instant: datetime, zone: ZoneInfo) -> datetime:
    """The latest instant ``h`` such that every row stamped with the wall-clock time of
    ``zone`` by a writer whose clock is right, and read as an instant before ``h``
    (``from_wall_clock``), has been written by ``instant``: ``from_wall_clock`` of the
    smallest wall-clock time the zone shows from ``instant`` on. ``instant`` itself
    outside set-backs; when clocks go back by ``d`` at ``T``, rows read in ``[T - d, T + d)``
    are written until ``(read + T + d) / 2``: ``h`` stays at ``T - d`` until ``T``, then
    rises at twice the real pace to ``T + d``. Non-decreasing in ``instant``."""
    if zone.key == "UTC":
        return instant
    instant = instant.astimezone(UTC)
    lowest = instant.astimezone(zone).replace(tzinfo=None)
    # Within INSTANT_RANGE: a refresh time may come within a minute of its ends
    # (refresh.as_of_range), where instant ± _LONGEST_SETBACK is no datetime.
    ahead = min(instant, INSTANT_RANGE[1] - _LONGEST_SETBACK) + _LONGEST_SETBACK
    for change, _ in _setbacks(zone, instant, ahead):
        # From the change on, the wall clock shows the change's instant in the new offset.
        lowest = min(lowest, change.astimezone(zone).replace(tzinfo=None, fold=0))
    floor = max(instant, INSTANT_RANGE[0] + _LONGEST_SETBACK) - _LONGEST_SETBACK
    return max(floor, min(instant, from_wall_clock(lowest, zone)))


def shown_by(instant: datetime, zone: ZoneInfo) -> datetime:
    """The instant (as ``from_wall_clock`` reads it) of the latest wall-clock time of
    ``zone`` shown at or before ``instant``: every row stamped by a writer whose clock is
    right by ``instant`` reads at most that. ``instant`` itself outside set-backs; when
    clocks go back by ``d`` at ``T``, the repeated wall times' first pass reads up to ``d``
    later than it was (``to_wall_clock``), and from ``T`` to ``T + d`` the wall clock shows
    times it already showed, the latest of which reads as ``T + d``. The mirror of
    ``written_by``; non-decreasing in ``instant``."""
    if zone.key == "UTC":
        return instant
    instant = instant.astimezone(UTC)
    latest = max(instant, from_wall_clock(instant.astimezone(zone).replace(tzinfo=None), zone))
    since = max(instant, INSTANT_RANGE[0] + _LONGEST_SETBACK) - _LONGEST_SETBACK
    for change, d in _setbacks(zone, since, instant + _MICROSECOND):
        # Until change + d the wall clock shows times it showed before the change, up to
        # the first reading of change + d.
        latest = max(latest, change + d)
    # Within INSTANT_RANGE: a refresh time may come within a minute of its end
    # (refresh.as_of_range), where a set-back's T + d is no instant a column may bind.
    return max(instant, min(latest, INSTANT_RANGE[1] - _LONGEST_SETBACK))


def from_wall_clock(wall: datetime, zone: ZoneInfo) -> datetime:
    """The instant (UTC) a naive wall-clock time of ``zone`` stands for: the inverse of
    ``to_wall_clock``. A repeated wall time ``W + x`` (clocks set back by ``d`` at ``T``)
    is ``T - d + 2x``, between its two possible readings; a wall time in a gap (clocks set
    forward at ``T``) is ``T``. Elsewhere the only reading.
    """
    early, late = _offset(zone, wall.replace(fold=0)), _offset(zone, wall.replace(fold=1))
    if early == late:
        return (wall - early).replace(tzinfo=UTC, fold=0)
    if early > late:  # repeated
        d = early - late
        t = _transition_after(zone, (wall - early).replace(tzinfo=UTC), d)
        return t - d + 2 * (wall.replace(fold=0) - (t + late).replace(tzinfo=None))
    # in a gap: fold 0 reads it with the offset before the transition (the later instant)
    return _transition_after(zone, (wall - late).replace(tzinfo=UTC), late - early)


#: SQLite keeps date-times as text in whatever format the writer chose (``T`` or space,
#: with or without seconds and fraction, ``Z`` or a ``±HH:MM`` offset or none); comparing
#: that text with a bound would be wrong at the window edges, so both sides are normalised
#: by SQLite's own strftime (which reads fractions to the millisecond and converts text
#: with an offset to UTC), padded to microseconds like the bounds.
_SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%f"
#: The instants a timestamp may stand for, ``[first, end)``: years 1 to 9999 but their first
#: and last day, so that every such instant, in any time zone (offsets are under 24 hours)
#: and as any driver converts it to its session's zone, is a Python ``datetime``. Outside:
#: PostgreSQL's and DuckDB's ``±infinity``, year 0 and BC dates, years past 9999, and the
#: sentinels 0001-01-01 and 9999-12-31; NaN, ±infinity and text in a numeric column.
INSTANT_RANGE = (datetime(1, 1, 2, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC))
#: The same range as written dates of SQLite text (``_sqlite_timestamp``), inclusive.
_SQLITE_DATE_RANGE = ("0001-01-02", "9999-12-30")


def _sqlite_text(wall: datetime) -> str:
    """A naive date-time in the fixed-width text of ``_sqlite_timestamp``: one format for
    every value, so that text order is time order."""
    return wall.isoformat(sep=" ", timespec="microseconds")


def _sqlite_wall_clock(utc_text: str | None, zone: str) -> str | None:
    """SQL function ``mlmon_wall_clock(text, zone)``: UTC text as SQLite's strftime writes it
    -> ``to_wall_clock`` in ``zone``, as ``_sqlite_text`` (``None`` when it is no date-time
    Python can represent, such as year 0)."""
    if utc_text is None:
        return None
    try:
        instant = datetime.fromisoformat(utc_text).replace(tzinfo=UTC)
        return _sqlite_text(to_wall_clock(instant, ZoneInfo(zone)))
    except (TypeError, ValueError, OverflowError):
        return None


def _sqlite_functions(dbapi_connection, _record) -> None:
    dbapi_connection.create_function("mlmon_wall_clock", 2, _sqlite_wall_clock, deterministic=True)


def _sqlite_timestamp(column: sa.ColumnElement, zone: str) -> tuple[sa.ColumnElement, sa.ColumnElement | None]:
    """The SQLite expression of ``TimeColumn`` kind ``"sqlite"``: a date-time text column as
    naive wall-clock text of ``zone`` (``%Y-%m-%d %H:%M:%S.ffffff``), NULL when unreadable;
    and, outside UTC, the predicate true for text with an offset (``TimeColumn.instants``).

    Readable: text that SQLite's date functions read (else strftime gives NULL) and that
    starts with a real calendar date ``YYYY-MM-DD``, checked by a round trip through
    ``date`` (SQLite itself would read ``2024-02-30`` as March 1, hour 24 as the next day,
    ``now`` as the current time and a bare number as a Julian day). Text with an offset
    denotes an instant: outside UTC it is mapped to the zone's wall clock by
    ``mlmon_wall_clock``, so that both kinds of row compare with the same bounds.

    Every call of a function costs per row and SQLite evaluates the expression once per
    use: strftime is called once, and windows compare with BETWEEN (``TimeColumn.between``).
    """
    normalised = sa.func.strftime(_SQLITE_TIME_FORMAT, column, type_=sa.String)
    date = sa.func.substr(column, 1, 10)
    hour = sa.func.substr(column, 12, 2)
    readable = sa.and_(
        sa.func.date(date, "+0 days") == date,  # the modifier makes SQLite normalise the date
        date.between(*_SQLITE_DATE_RANGE),  # INSTANT_RANGE, as written
        # The date alone, or one separator and an hour 00-23 (SQLite reads any run of
        # spaces, tabs and Ts, and hour 24 as the next day).
        sa.or_(
            sa.func.length(column) == 10,
            sa.and_(sa.func.substr(column, 11, 1).in_(["T", " "]), hour.between("00", "23")),
        ),
    )
    wall = normalised.concat("000")  # microseconds, as the bounds
    has_offset = None
    if zone != "UTC":
        text = sa.func.rtrim(column)
        has_offset = sa.or_(
            sa.func.upper(sa.func.substr(text, -1)) == "Z",
            sa.and_(sa.func.substr(text, -6, 1).in_(["+", "-"]), sa.func.substr(text, -3, 1) == ":"),
        )
        wall = sa.case((has_offset, sa.func.mlmon_wall_clock(normalised, zone, type_=sa.String)), else_=wall)
    return sa.case((readable, wall), else_=None), has_offset


@dataclass(frozen=True)
class TimeColumn:
    """How to compare a timestamp column with UTC instants.

    ``kind`` is ``"aware"`` (timestamp with time zone), ``"naive"`` (timestamp without time
    zone, wall-clock time of ``zone``), ``"sqlite"`` (SQLite date-time text, normalised by
    ``_sqlite_timestamp``; text without an offset is wall-clock time of ``zone``) or
    ``"epoch"`` (numeric seconds since 1970-01-01 UTC). ``expr`` is the SQL expression that
    windows compare with ``bind(instant)``; wall-clock times go through ``to_wall_clock``
    and ``from_wall_clock``, which keep windows consistent across daylight-saving changes.
    ``stored`` is the column itself (``expr`` but for SQLite text, which ``expr`` normalises;
    there under the ``BINARY`` collation: ``time_column``).
    ``text_bounds``: wall-clock bounds are bound as the fixed-width text of ``_sqlite_text``,
    which the engine casts to its timestamp type (Spark SQL through PyHive, whose driver
    writes a bound datetime with ``strftime('%Y')``: year 1 of ``INSTANT_RANGE`` as
    ``'1-01-02'``, which Spark refuses to cast).
    ``instants``: for SQLite text outside UTC, the predicate true for rows whose text carries
    an offset (instants, mapped to wall-clock text by ``to_wall_clock``); else ``None``.
    """

    expr: sa.ColumnElement
    kind: str
    zone: str
    stored: sa.ColumnElement
    text_bounds: bool = False
    instants: sa.ColumnElement | None = None

    def bind(self, instant: datetime):
        """The value to compare ``expr`` with for a timezone-aware ``instant``."""
        if self.kind == "epoch":
            return instant.timestamp()
        if self.kind == "aware":
            return instant
        naive = to_wall_clock(instant, ZoneInfo(self.zone))
        return _sqlite_text(naive) if self.kind == "sqlite" or self.text_bounds else naive

    def between(self, start: datetime | None, end: datetime | None, narrowed: bool = True) -> sa.ColumnElement:
        """A predicate true for rows whose timestamp is an instant in ``[start, end)``;
        ``None`` leaves that side open (an unreadable timestamp is in no range). SQLite text
        is first ``narrowed`` by its stored dates (``_stored_dates``) unless told not to."""
        if self.kind == "sqlite" and start is not None and end is not None:
            # BETWEEN evaluates the expression once; every value has the same fixed-width
            # text, so < end is <= the text one microsecond earlier.
            last = _sqlite_text(to_wall_clock(end, ZoneInfo(self.zone)) - _MICROSECOND)
            exact = self.expr.between(self.bind(start), last)
            return sa.and_(self._stored_dates(start, end), exact) if narrowed else exact
        # An open side is bounded by INSTANT_RANGE (SQLite text: NULL outside it already):
        # ±infinity sorts outside every date-time, NaN outside every number, and SQLite
        # text in a numeric column above them.
        bounded = self.kind != "sqlite"
        conditions = []
        if start is not None or bounded:
            conditions.append(self.expr >= self.bind(INSTANT_RANGE[0] if start is None else start))
        if end is not None or bounded:
            conditions.append(self.expr < self.bind(INSTANT_RANGE[1] if end is None else end))
        return sa.and_(*conditions)

    def _stored_dates(self, start: datetime, end: datetime) -> sa.ColumnElement:
        """For SQLite text: a predicate on the text as stored that every row in ``[start,
        end)`` passes, which an index on the column serves as a range (the normalised
        ``expr`` is opaque to SQLite's planner: every statement read the model's whole
        history). Readable text starts with its date (``_sqlite_timestamp``), which lies
        within a day and a half of its wall-clock time in ``zone``: an offset written in
        the text is at most 14:59 (SQLite reads no larger one), a zone's at most about 16
        hours; two days of margin on each side. Only the prediction table's reads gain:
        the label statements read every label row anyway, since a row whose arrival time is
        no instant counts in every range (``LabelQueries._read``)."""
        zone = ZoneInfo(self.zone)
        try:
            low = (to_wall_clock(start, zone) - _STORED_DATE_MARGIN).date().isoformat()
        except OverflowError:  # within the margin of year 1: from the smallest text on
            low = ""
        try:
            high = (to_wall_clock(end, zone) + _STORED_DATE_MARGIN + timedelta(days=1)).date().isoformat()
        except OverflowError:  # within the margin of year 9999: ":" sorts after every digit
            high = ":"
        return sa.and_(self.stored >= low, self.stored < high)

    def from_on(self, instant: datetime, wall: datetime) -> sa.ColumnElement:
        """A predicate true for rows stamped at or after ``instant`` when the row holds an
        instant (a time zone, epoch seconds, SQLite text with an offset), and at or after
        ``wall`` when it holds a wall-clock time of ``zone`` (naive): the two differ when a
        writer's wall clock has shown times later than ``instant`` reads (``shown_by``)."""
        if self.kind in ("aware", "epoch"):
            return self.between(instant, None)
        if self.instants is None:
            return self.between(wall, None)
        return sa.case((self.instants, self.between(instant, None)), else_=self.between(wall, None))

    def at_or_after(self, start: datetime) -> sa.ColumnElement:
        """A predicate true for rows stamped at or after ``start``, for use among rows
        already in a ``between`` range (it tells the windows of a range apart; alone it
        would count unreadable timestamps on some dialects)."""
        return self.expr >= self.bind(start)

    def unreadable(self) -> sa.ColumnElement:
        """A predicate true (never NULL) for rows whose timestamp is no instant: NULL,
        unreadable text on SQLite, and any value outside ``INSTANT_RANGE`` (``±infinity`` of
        a date-time column; NaN, ±infinity and text for epoch seconds)."""
        if self.kind == "sqlite":
            return self.expr.is_(None)
        # NOT (a AND b) rather than two comparisons: NaN fails both on engines that do not order it.
        in_range = self.between(None, None)
        return sa.or_(self.expr.is_(None), sa.not_(in_range))

    def written_unreadable(self) -> sa.ColumnElement:
        """A predicate true (never NULL) for rows whose timestamp is written but no instant:
        ``unreadable`` but for NULL as stored (a label row whose arrival time is NULL is a
        placeholder for a label to come; SQLite stores a written NaN as NULL)."""
        return sa.and_(self.stored.is_not(None), self.unreadable())

    def to_epoch(self, value) -> float | None:
        """Seconds since the epoch of a value of ``expr`` read back (``None`` stays ``None``);
        ``between`` keeps every other value out of what is read, so this never raises."""
        if value is None:
            return None
        if self.kind == "epoch":
            return float(value)
        if self.kind == "sqlite":
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            value = from_wall_clock(value, ZoneInfo(self.zone))
        return value.timestamp()


def time_column(table: sa.Table, name: str, source: TableSource, dialect: str) -> TimeColumn:
    """Classify a reflected timestamp column that ``reflect_table`` accepted with
    ``timestamp_types`` (the one place that says which types are accepted, and how an error
    names the others).

    On SQLite a text column (or one declared DATE or DATETIME, which SQLite stores as
    text too) holds ISO-8601 text; a number column holds seconds since the epoch
    everywhere, a date-time column an instant (with time zone) or a wall-clock time of
    ``source.timezone`` (without).
    """
    column = table.c[name]
    if isinstance(column.type, NUMBER_TYPES):
        return TimeColumn(column, "epoch", source.timezone, column)
    if dialect == "sqlite":
        expr, instants = _sqlite_timestamp(column, source.timezone)
        # Stored text is compared as text, whatever the declared type, and as bytes: a
        # collation the column declares may be one only its writer's connections define,
        # which SQLite needs at every use of the column but as a function's argument (an
        # index under another collation than BINARY then serves no range of _stored_dates;
        # the rows read are the same).
        stored = sa.collate(sa.type_coerce(column, sa.String()), "BINARY")
        return TimeColumn(expr, "sqlite", source.timezone, stored, instants=instants)
    aware = isinstance(column.type, sa.DateTime) and column.type.timezone  # else a DateTime without time zone
    return TimeColumn(column, "aware" if aware else "naive", source.timezone, column, text_bounds=dialect == "hive")


NUMBER_TYPES = (sa.Integer, sa.Numeric, sa.Float)


def timestamp_types(dialect: str, source_path: str) -> tuple[tuple[type, ...], str]:
    """The column types a timestamp column may have on ``dialect``, and how an error calls
    them (``reflect_table``'s ``types``; ``source_path`` is the source's config key, such as
    ``models[0].predictions``); ``time_column`` classifies an accepted column."""
    expected = "a timestamp or a number of seconds since the epoch"
    if dialect == "sqlite":
        return (sa.DateTime, sa.Date, sa.String, *NUMBER_TYPES), f"{expected}, or ISO-8601 text"
    return (sa.DateTime, *NUMBER_TYPES), (
        f"{expected} ({dialect} cannot compare text as instants: change the column's type, "
        f"or point {source_path}.table at a view that casts it)"
    )


def _type_problem(table: sa.Table, name: str, types: tuple[type, ...], expected: str, key_path: str) -> str | None:
    column_type = table.c[name].type
    if isinstance(column_type, types):
        return None
    return f"{key_path}: column {name!r} of table {table.name!r} has type {column_type}; expected {expected}"


def _standard_type(_inspector, _table, column_info: dict) -> None:
    """``column_reflect`` listener: a column a dialect reflects as a ``TypeDecorator`` gets the
    standard type it decorates. PyHive (Spark SQL's ``hive://``) reflects ``timestamp`` as
    ``HiveTimestamp`` over ``TIMESTAMP`` (and ``decimal`` likewise), which no type check here
    knows and whose bind processor refuses every value ("Writing to Hive not supported"), so
    a window edge could not be compared with it; its driver already returns datetimes and
    decimals."""
    column_type = sa.types.to_instance(column_info["type"])
    if isinstance(column_type, sa.TypeDecorator):
        column_info["type"] = column_type.impl_instance


def reflect_table(
    engine: Engine,
    source: TableSource,
    columns: dict[str, str | None],
    key_path: str,
    types: dict[str, tuple[tuple[type, ...], str]] | None = None,
    check: Callable[[sa.Table], None] | None = None,
) -> sa.Table:
    """Reflect a configured table and check every configured column: that it exists and,
    for the fields in ``types``, that its type fits. The table returned may be the one
    reflected earlier for another source of the same kind, when nothing of it differs
    (``_shared``: models over one table then share their compiled statements).

    Args:
        columns: logical field -> column name (``None`` for unset optional fields).
        key_path: the config path of the source, for error messages.
        types: logical field -> (accepted SQLAlchemy types, what an error calls them).
        check: a further check of the reflected table (e.g. the id kind), run even when
            the column checks found problems, so that all show in one run; the problems
            of the ``SchemaError`` it raises join the others.

    Raises:
        SchemaError: the table is missing, or every missing column, wrong column type and
            unknown filter column at once, one problem each (each names its config key).
        sqlalchemy.exc.OperationalError: the store cannot be reached.
    """
    metadata = sa.MetaData()
    try:
        table = sa.Table(
            source.table,
            metadata,
            schema=source.db_schema,
            autoload_with=engine,
            listeners=[("column_reflect", _standard_type)],
        )
    except (sa.exc.NoSuchTableError, sa.exc.DBAPIError) as exc:
        # PyHive cannot tell Spark's "table not found" (SQLSTATE 42P01) from other errors of DESCRIBE.
        if isinstance(exc, sa.exc.DBAPIError) and sqlstate(exc.orig) != "42P01":
            raise
        where = f"{source.db_schema}.{source.table}" if source.db_schema else source.table
        raise SchemaError(f"{key_path}.table: table {where!r} does not exist in store {source.store!r}") from None
    problems: list[str | None] = []  # None: a column whose type fits (_type_problem)
    for field, name in columns.items():
        if name is None:
            continue
        if name not in table.c:
            problems.append(
                f"{key_path}.columns.{field}: column {name!r} does not exist in table {source.table!r} "
                f"(columns: {', '.join(table.c.keys())})"
            )
        elif types and field in types:
            problems.append(_type_problem(table, name, *types[field], f"{key_path}.columns.{field}"))
    for name, value in getattr(source, "filter", {}).items():
        if name not in table.c:
            problems.append(
                f"{key_path}.filter.{name}: column {name!r} does not exist in table {source.table!r} "
                f"(columns: {', '.join(table.c.keys())})"
            )
            continue
        try:
            check_filter_value(table, name, value, f"{key_path}.filter.{name}", engine.dialect.name)
        except SchemaError as exc:
            problems.extend(exc.problems)
    if check is not None:
        try:
            check(table)
        except SchemaError as exc:
            problems.extend(exc.problems)
    found = [p for p in problems if p is not None]
    if found:
        raise SchemaError(*found)
    return _shared(engine, source, table)


#: Per engine, the tables reflected so far, by kind of source, DDL and column types (``_shared``).
_REFLECTED: weakref.WeakKeyDictionary[Engine, dict[tuple[str, ...], sa.Table]] = weakref.WeakKeyDictionary()
_REFLECTED_LOCK = threading.Lock()  # sources reflect in their refresh threads


def _shared(engine: Engine, source: TableSource, table: sa.Table) -> sa.Table:
    """The ``sa.Table`` reflected earlier from ``engine`` for a source of the kind of
    ``source`` (predictions, labels, replays, a features table) with the same DDL as
    ``table`` (columns, types, constraints and indexes as the dialect renders them) and the
    same reflected column types (``repr``: a dialect may render two types alike, and a
    PostgreSQL enum's DDL is its name, not its labels), else ``table``.

    SQLAlchemy's compiled-statement cache (500 statements per engine, pruned back to 500
    once it holds 750) keys on the Table object, so each model reflecting its own copy of a
    shared table filled the cache with statements of its own, about 0.9 MB each: 260 MB for
    30 models; a process of 100 models peaked at 788 MB, and at 298 MB once they shared
    (docs/performance.md, *Many models in one process*).
    Equal DDL compiles to equal SQL, so sharing the object changes no statement; a table
    altered since differs in its DDL or types and is kept apart. A table whose DDL the
    dialect cannot render (a column of a type SQLAlchemy does not know) is not shared.
    Sources of different kinds never share: one model's statements join its predictions to
    its labels or replays, which may be the same table, and SQLAlchemy would take one
    object twice for one FROM (or correlate a subquery to it) where two objects read the
    table twice, as they must.
    """
    try:
        key = (
            type(source).__name__,
            str(sa.schema.CreateTable(table).compile(dialect=engine.dialect)),
            *sorted(str(sa.schema.CreateIndex(index).compile(dialect=engine.dialect)) for index in table.indexes),
            *(f"{column.name} {column.type!r}" for column in table.c),
        )
    except Exception:  # any dialect's DDL compiler: sharing only saves memory, reflection must not fail
        return table
    with _REFLECTED_LOCK:
        return _REFLECTED.setdefault(engine, {}).setdefault(key, table)


def type_kind(column_type: sa.types.TypeEngine) -> str | None:
    """The kind of values a reflected column type holds, as far as ``=`` is concerned:
    ``"boolean"``, ``"number"`` (integers, decimals and floats compare with each other on
    every dialect), ``"text"``, ``"uuid"``, ``"binary"``, ``"datetime"``, ``"date"`` or
    ``"time"``; ``None`` for a type SQLAlchemy does not know (e.g. a SQLite column declared
    without a type, or an extension's type), whose comparisons mlmon cannot predict.

    The reflected type of a SQLite column follows SQLite's affinity rules (INT -> integer,
    CHAR/CLOB/TEXT -> text, REAL/FLOA/DOUB -> float, otherwise numeric).
    """
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (sa.Boolean, "boolean"),
        ((sa.Integer, sa.Numeric, sa.Float), "number"),
        (sa.String, "text"),  # VARCHAR, TEXT, CHAR, enums
        (sa.Uuid, "uuid"),
        ((sa.LargeBinary, sa.BINARY, sa.VARBINARY), "binary"),
        (sa.DateTime, "datetime"),
        (sa.Date, "date"),
        (sa.Time, "time"),
    ]
    return next((kind for types, kind in kinds if isinstance(column_type, types)), None)


def require_same_id_kind(table: sa.Table, name: str, key_path: str, predictions: sa.Table, predictions_id: str) -> None:
    """Check that an id column joined to the predictions' id holds the same kind of values.

    Ids of different kinds compare differently on every dialect: PostgreSQL refuses
    ``bigint = text`` at every refresh, SQLite and DuckDB convert the text to a number (so
    '02' matches 2), and comparing as text would not. mlmon refuses them all alike
    (docs/configuration.md); a type SQLAlchemy does not know is not checked.

    Raises:
        SchemaError: the kinds differ; names ``key_path`` and both columns' types.
    """
    column_type, predictions_type = table.c[name].type, predictions.c[predictions_id].type
    kind, predictions_kind = type_kind(column_type), type_kind(predictions_type)
    if kind is not None and predictions_kind is not None and kind != predictions_kind:
        raise SchemaError(
            f"{key_path}: column {name!r} of table {table.name!r} has type {column_type} ({kind}), but the predictions' "
            f"id column {predictions_id!r} of table {predictions.name!r} has type {predictions_type} ({predictions_kind}); "
            "ids are joined with '=', which needs both of one kind: change one column's type, or read one table "
            "through a view that casts its id"
        )


#: Per column kind: the Python types a filter value of that column may have, and how to write one.
_FILTER_VALUES = {
    "text": ((str,), "text: write the value in quotes exactly as stored"),
    "number": ((int, float), "numbers: write the number without quotes"),
    "boolean": ((bool,), "booleans: write true or false"),
    "uuid": ((str,), "uuids: write the uuid in quotes"),
}


def _signed(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _unsigned(bits: int) -> tuple[int, int]:
    return 0, 2**bits - 1


#: The integers an integer column type holds, by the name of its SQLAlchemy type class or of
#: the nearest base class named here (generic types, and DuckDB's extension types); ``None``:
#: any (DuckDB's VARINT).
_INTEGER_RANGES: dict[str, tuple[int, int] | None] = {
    "SmallInteger": _signed(16),
    "Integer": _signed(32),
    "BigInteger": _signed(64),
    "TinyInteger": _signed(8),
    "HugeInteger": _signed(128),
    "UTinyInteger": _unsigned(8),
    "UInt8": _unsigned(8),
    "USmallInteger": _unsigned(16),
    "UInt16": _unsigned(16),
    "UInteger": _unsigned(32),
    "UInt32": _unsigned(32),
    "UBigInteger": _unsigned(64),
    "UInt64": _unsigned(64),
    "UHugeInteger": _unsigned(128),
    "VarInt": None,
}


def integer_range(column_type: sa.types.TypeEngine, dialect: str) -> tuple[int, int] | None:
    """The integers a filter on a number column of ``column_type`` can compare with, as
    (lowest, highest), or ``None`` for any.

    On SQLite every number column holds 64-bit signed integers whatever its declared type,
    and its driver binds no larger ones (OverflowError). Elsewhere an integer column holds
    its type's range (``smallint`` 16 bits, ``integer`` 32, ``bigint`` 64, signed; DuckDB's
    unsigned and 128-bit types theirs), and PostgreSQL casts the value to it (an error out
    of range); an integer compared with a decimal or float column is bound as a 64-bit
    integer (PostgreSQL: ``bigint out of range``).
    """
    if dialect == "sqlite" or not isinstance(column_type, sa.Integer):
        return _signed(64)
    names = (cls.__name__ for cls in type(column_type).__mro__)
    return next(_INTEGER_RANGES[name] for name in names if name in _INTEGER_RANGES)


def _number_text(value: float) -> str:
    """A number as an error message shows it: an integer of many digits by its size."""
    text = str(value)
    return f"{text[:12]}... ({len(text.lstrip('-'))} digits)" if len(text) > 40 else text


def check_filter_value(table: sa.Table, name: str, value: str | float | bool, key_path: str, dialect: str) -> None:
    """Check that a ``filter`` value (as YAML read it) can equal values of its column on
    ``dialect`` (its engine's name).

    YAML reads unquoted ``NO``/``yes``/``off`` as booleans and ``1.10`` as the number 1.1;
    compared with a text column, such a value matches no row on SQLite and fails every
    refresh on PostgreSQL. The rule (docs/configuration.md): text columns take strings,
    number columns take numbers (integer columns: integers in the range of
    ``integer_range``), boolean columns take booleans, uuid columns take a uuid as text;
    a column of another kind (date-time, binary) cannot be filtered on; a type SQLAlchemy
    does not know is not checked, except that a SQLite column declared without a type
    takes text only (``filter_condition`` compares it as text: it may hold the integer 3,
    the text '3' or the text '1.10' side by side, and a number or boolean as YAML read it
    would silently miss some). PostgreSQL text holds no NUL character (psycopg refuses to
    send one).

    Raises:
        SchemaError: the value does not fit; names ``key_path``, the value read and the column type.
    """
    column_type = table.c[name].type
    kind = type_kind(column_type)
    if kind is None:
        if _untyped_sqlite(table.c[name], dialect) and not isinstance(value, str):
            raise SchemaError(
                f"{key_path}: YAML read {_yaml_read(value, kind)}, but column {name!r} of table {table.name!r} "
                "has no declared type, so SQLite keeps each value as it was written (the integer 3, the text "
                "'3' and the text '1.10' alike) and mlmon compares them as text: write the value in quotes, "
                "as sqlite3 shows it"
            )
        return
    where = f"column {name!r} of table {table.name!r} has type {column_type}"
    if kind not in _FILTER_VALUES:
        raise SchemaError(f"{key_path}: {where} ({kind}); filters compare text, number, boolean or uuid columns only")
    types, advice = _FILTER_VALUES[kind]
    fits = isinstance(value, types) and (kind == "boolean" or not isinstance(value, bool))
    if fits and kind == "number" and isinstance(column_type, sa.Integer) and not isinstance(value, int):
        fits, advice = False, "integers: write an integer"
    if fits and kind == "number" and isinstance(value, int):
        bounds = integer_range(column_type, dialect)
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            where += f" on {dialect}"
            advice = f"integers from {bounds[0]} to {bounds[1]}"
            if not isinstance(column_type, sa.Integer):
                advice = f"numbers; an integer is compared with it as a 64-bit one, from {bounds[0]} to {bounds[1]}: "
                advice += "write a larger number as a float (1.0e+20)"
            fits = False
    if fits and kind == "text" and dialect == "postgresql" and isinstance(value, str) and "\0" in value:
        raise SchemaError(
            f"{key_path}: YAML read the text {value!r}, but {where} on postgresql, whose text cannot hold a NUL character"
        )
    labels = getattr(column_type, "enums", None)  # a PostgreSQL or MySQL enum's labels, as reflected
    if fits and kind == "text" and labels and value not in labels:
        # PostgreSQL refuses a value outside the enum ("invalid input value for enum") at
        # every refresh; elsewhere it would match no row.
        fits, advice = False, f"only its labels {', '.join(map(repr, labels))}: write one of them in quotes"
    if fits and kind == "uuid" and isinstance(value, str):
        try:
            uuid.UUID(value)
        except ValueError:
            fits, advice = False, "uuids, which this text is not"
    if not fits:
        raise SchemaError(f"{key_path}: YAML read {_yaml_read(value, kind)}, but {where}, which holds {advice}")


def _untyped_sqlite(column: sa.ColumnElement, dialect: str) -> bool:
    """Whether ``column`` is a SQLite column declared without a type (``CREATE TABLE t (a)``),
    which keeps each value in the storage class it was written in."""
    return dialect == "sqlite" and isinstance(column.type, sa.types.NullType)


def filter_condition(column: sa.ColumnElement, value: str | float | bool, dialect: str) -> sa.ColumnElement[bool]:
    """The condition of one ``filter`` entry: ``column = value``, except on a SQLite column
    declared without a type (``check_filter_value`` has made ``value`` text there), where
    the values that read as ``value`` match, whatever their storage class: ``CAST(column AS
    TEXT) = value``, behind ``column IN`` the forms that can (the text, the integer and the
    real it parses as, the blob of its bytes) so that an index on the column still serves."""
    if not _untyped_sqlite(column, dialect):
        return column == value
    text = str(value)
    forms: list[object] = [text, text.encode()]
    for parse in (int, float):
        try:
            number = parse(text)
        except ValueError:
            continue
        if not isinstance(number, int) or -(2**63) <= number < 2**63:  # SQLite binds 64-bit integers only
            forms.append(number)
    return sa.and_(column.in_(forms), sa.cast(column, sa.Text) == text)


def _yaml_read(value: str | float | bool, kind: str | None) -> str:
    """What YAML read for a filter value, as an error names it; for a boolean, or a number
    against a text column, also how YAML came to read it."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()} (YAML reads unquoted yes/no/on/off/true/false as booleans)"
    if isinstance(value, str):
        return f"the text {value!r}"
    read = f"the number {_number_text(value)}"
    if kind == "text":
        read += " (YAML reads unquoted digits as a number: 1.10 becomes 1.1, 007 becomes 7)"
    return read


class Stores:
    """The engines of the configured stores (``stores`` of the config, by name), created
    lazily, disposed together; each connection's statements end after ``query_timeout``.
    ``pools`` sizes the pool of each store it names (``db.PoolSize``; ``server.app.store_pools``
    for ``mlmon serve``), the others get SQLAlchemy's default pool (one thread at a time)."""

    def __init__(
        self, stores: Mapping[str, Store], query_timeout: timedelta, pools: Mapping[str, PoolSize] | None = None
    ):
        self._stores = stores
        self._query_timeout = query_timeout.total_seconds()
        self._pools = pools or {}
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()

    def engine(self, name: str) -> Engine:
        """The engine of store ``name`` (created on first use).

        Raises:
            OSError: ``url_file`` cannot be read, or a SQLite file does not exist.
            SchemaError: ``url_file`` does not hold a SQLAlchemy URL (naming the key).
            sqlalchemy.exc.NoSuchModuleError: missing driver.
        """
        with self._lock:
            if name not in self._engines:
                store = self._stores[name]
                try:
                    url = store.resolved_url()
                except ValueError as exc:  # a url_file rewritten since the config was loaded
                    raise SchemaError(f"stores.{name}.{exc}") from None  # "url_file: not a SQLAlchemy URL ..."
                require_existing_sqlite_file(url)  # monitored stores are read, never created
                engine = create_store_engine(url, self._query_timeout, self._pools.get(name))
                if engine.dialect.name == "sqlite":  # time columns of a zone other than UTC call it
                    sa.event.listen(engine, "connect", _sqlite_functions)
                self._engines[name] = engine
            return self._engines[name]

    def dispose(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)
