"""The pushed-down SQL, as SQLAlchemy Core statements.

Each statement returns a handful of aggregate rows (per score bucket, or one row), never raw predictions, so the exporter's memory does not grow
with the number of rows in a window. All windows are half-open ``[start, end)``; the
windows of one source share their end (``Windows``), so each statement reads the largest
once (the online statement that groups matured labels per prediction twice:
``matured_labels``) and tells the
others apart with ``CASE WHEN timestamp >= start_i`` inside its aggregates, one column per
window suffixed ``_i``.

Dialect differences handled here: scores are cast to double precision
(float64) before any arithmetic; NaN is detected per dialect (PostgreSQL, DuckDB and Spark SQL
store it and order it above every number; SQLite and MySQL cannot store it); the
natural logarithm is ``ln`` on every engine (``exporter.predictions.stores`` supplies it to SQLite
builds without math functions); SQL ``round`` is never used (PostgreSQL has no
``round(double precision, int)``): bucket keys are ``grid_index`` and rounding half up is
``round_half_up_index``, both ``floor`` of doubles, exact on decimal grids; grouping keys
are computed in a subquery because PostgreSQL does not match GROUP BY expressions that hold parameters.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

import sqlalchemy as sa

from exporter.config import LabelSource, ModelConfig, PredictionSource, ReplaySource
from exporter.monitoring_math import LOGLOSS_EPS
from exporter.predictions.stores import TimeColumn, filter_condition
from exporter.versions import VERSION_MAX_LENGTH

#: Why a prediction row was excluded from the math, in order of precedence; in SQL each
#: reason is its position + 1 (integers group faster than text), 0 meaning valid.
INVALID_REASONS = ("null_score", "non_numeric_score", "nan_score", "out_of_range", "duplicate_id", "bad_timestamp")
#: The SQL code of each reason of ``INVALID_REASONS``.
REASON_CODE = {reason: i + 1 for i, reason in enumerate(INVALID_REASONS)}
#: Rows whose timestamp is no instant are in no window: ``bad_timestamp`` counts them over
#: the whole table (``PredictionQueries.last_timestamp``), never in a window's histogram.
OK = 0
#: Why a valid prediction's labels leave it out of accuracy (``mlmon_online_invalid_labels``),
#: each prediction counted under one: labels 0 and 1, only values other than 0/1, only
#: label rows whose arrival time is written but no instant (``LabelQueries.per_id``; a
#: reason only with a label timestamp column: ``LabelQueries.invalid_reasons``).
INVALID_LABEL_REASONS = ("conflicting", "invalid_value", "bad_timestamp")


#: The most duplicate ids a source's search lists for its queries to reuse; beyond it each
#: query searches them itself (``PredictionQueries.duplicate_search``).
MAX_LISTED_DUPLICATES = 1000
#: The most label ids with several label rows the labels list (``LabelQueries.repeated_ids``)
#: to read their predictions apart; beyond it every id's label rows are grouped.
MAX_LISTED_LABEL_IDS = 1000
#: The most rows of duplicated ids a refresh on time slices reads to add back per window
#: (``PredictionQueries.duplicate_rows``); beyond it the refresh reads the windows in full.
MAX_DUPLICATE_ROWS = 100_000


@dataclass(frozen=True)
class LabelMaturity:
    """Labels that mature by time slice (docs/metrics.md, *Label maturity*): a prediction
    stamped in slice ``s``, ``[points[s], points[s + 1])``, counts the label rows recorded in
    ``[points[s], points[s + 1] + delay)``. ``points``: the slice boundaries (UTC,
    ascending) from the slice holding the largest window's start to the first at or after
    its end; ``delay``: ``label_delay``, above 0."""

    points: tuple[datetime, ...]
    delay: timedelta

    def recorded(self, reads: Sequence[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
        """The arrival times of the label rows that can mature for predictions stamped in
        the ``reads`` ranges: from the start of the slice holding a range's start to
        ``delay`` after the end of the slice holding its end."""
        points = self.points
        return [
            (points[max(0, bisect_right(points, start) - 1)], points[bisect_left(points, end)] + self.delay)
            for start, end in union(reads)
        ]


@dataclass(frozen=True)
class Windows:
    """Nested half-open windows sharing their end: window ``i`` is ``[starts[i], end)``,
    in the order of the model's ``windows``; the largest starts at ``start``."""

    starts: tuple[datetime, ...]
    end: datetime

    @classmethod
    def ending(cls, end: datetime, durations: list[timedelta]) -> Windows:
        """The windows of ``durations`` (each > 0) ending at ``end``."""
        return cls(tuple(end - duration for duration in durations), end)

    @property
    def start(self) -> datetime:
        return min(self.starts)


@dataclass(frozen=True)
class DuplicateIds:
    """The ids carried by several rows, found once per source and refresh and reused by
    its queries: ``per_window[i]`` lists those of window ``i`` (empty lists, without a
    search, when ids are unique: ``PredictionQueries.unique_ids``); ``None`` when there are
    more than ``MAX_LISTED_DUPLICATES`` (each query then searches them itself)."""

    per_window: tuple[tuple[Any, ...], ...] | None

    @classmethod
    def none(cls, windows: int) -> DuplicateIds:
        """No duplicate id in any of ``windows`` windows."""
        return cls(tuple(() for _ in range(windows)))

    @classmethod
    def from_search(cls, rows: Sequence[sa.Row[Any]], windows: int) -> DuplicateIds:
        """From the rows of ``PredictionQueries.duplicate_search`` over ``windows`` windows.
        A NULL id is never a duplicate (it equals no id in a join)."""
        if len(rows) > MAX_LISTED_DUPLICATES:
            return cls(None)
        return cls(
            tuple(tuple(row.id for row in rows if row.id is not None and row[1 + i] > 1) for i in range(windows))
        )


def union(ranges: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """The union of ``[start, end)`` ranges as disjoint ranges, ascending, empty ones left
    out: adjacent and overlapping ranges become one."""
    out: list[tuple[datetime, datetime]] = []
    for start, end in sorted(r for r in ranges if r[0] < r[1]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


#: The most ``UNION ALL`` branches ``PredictionQueries._parts`` reads its ranges in on
#: PostgreSQL (``grouped``): a steady refresh reads a head and one tail per window, one
#: branch each; an audit or a fill may read up to one range per slice.
MAX_UNION_BRANCHES = 16


def grouped(ranges: Sequence[tuple[datetime, datetime]], most: int) -> list[list[tuple[datetime, datetime]]]:
    """The disjoint ascending ``ranges`` in at most ``most`` (>= 1) groups of consecutive
    ones, cut at the widest gaps between them: each group's span then holds as little
    else as such a grouping can."""
    if len(ranges) <= most:
        return [[r] for r in ranges]
    gaps = sorted(range(1, len(ranges)), key=lambda k: ranges[k][0] - ranges[k - 1][1], reverse=True)
    cuts = [0, *sorted(gaps[: most - 1]), len(ranges)]
    return [list(ranges[a:b]) for a, b in pairwise(cuts)]


def _double(value: float) -> sa.ColumnElement:
    return sa.literal(float(value), sa.Double())


#: Below this magnitude a square is summed as 0: PostgreSQL raises "value out of range:
#: underflow" when x * x rounds to 0 for a non-zero x (|x| < about 1.5e-162), which took a
#: source down for one score or feature value of 1e-200. Each such row then adds at most
#: 1e-300 less to a sum of squares.
SQUARE_FLOOR = 1e-150


def square(value: sa.ColumnElement) -> sa.ColumnElement:
    """``value * value`` (a double), 0 when ``|value| < SQUARE_FLOOR``, on every dialect."""
    return sa.case((sa.func.abs(value) < _double(SQUARE_FLOOR), _double(0.0)), else_=value * value)


def _count_if(condition: sa.ColumnElement) -> sa.ColumnElement:
    return sa.func.sum(sa.case((condition, 1), else_=0))


def is_nan(dialect: str, value: sa.ColumnElement) -> sa.ColumnElement | None:
    """A predicate true for NaN where the dialect has one, else ``None``.

    PostgreSQL, DuckDB and Spark SQL (dialect ``hive``, PyHive's) order NaN above every
    number, so it must be named to be told apart from out-of-range values; elsewhere a NaN
    fails every comparison and the range checks below (written as ``NOT (0 <= score <= 1)``)
    count it as out of range.
    """
    if dialect == "postgresql":
        return value == sa.cast(sa.literal("NaN"), sa.Double())
    if dialect in ("duckdb", "hive"):
        return sa.func.isnan(value)
    if dialect == "trino":
        return sa.func.is_nan(value)
    return None


def is_number(dialect: str, column: sa.ColumnElement) -> sa.ColumnElement | None:
    """A predicate true when ``column`` (the stored value, not a cast of it) holds a number,
    on a dialect whose numeric columns may hold other values; else ``None``.

    SQLite stores what it is given: text that does not read as a number (``''``, which
    the sqlite3 shell's ``.import`` writes for an empty CSV field, or ``'abc'``) and blobs
    stay as they are in a REAL or INTEGER column, and ``CAST('' AS REAL)`` is 0.0, so a
    cast alone would pass them for the number 0. Typed engines (PostgreSQL, DuckDB, MySQL,
    Trino) refuse such values in a numeric column.
    """
    if dialect == "sqlite":
        return sa.func.typeof(column).in_(["integer", "real"])
    return None


def _valid_probability(dialect: str, score: sa.ColumnElement, number: sa.ColumnElement | None) -> sa.ColumnElement:
    """``score`` (cast to double) is a probability; ``number``: ``is_number`` of the stored value."""
    conditions = [score.is_not(None), score >= 0.0, score <= 1.0]
    if number is not None:
        conditions.append(number)
    nan = is_nan(dialect, score)
    if nan is not None:
        conditions.append(sa.not_(nan))
    return sa.and_(*conditions)


def _labeled(
    labels: LabelQueries, agg: sa.FromClause, j: int, counted: sa.ColumnElement[bool] | None
) -> tuple[sa.ColumnElement, sa.ColumnElement[bool], dict[str, sa.ColumnElement[bool]]]:
    """For a prediction row outer-joined to its label aggregate ``agg`` (``LabelQueries.per_id``
    or ``PredictionQueries.matured_labels``, or its one label row in the same columns:
    ``per_id`` ungrouped, ``LabelQueries.maturity_bounds``; range ``j`` of it), counted where ``counted``
    holds (``None``: always): (its label ``y``, 0 or 1, NULL when not counted or unlabeled;
    whether it has a usable label row; per reason of ``labels.invalid_reasons`` whether its
    labels leave it out for that reason). A prediction whose label rows all have an arrival
    time that is no instant is left out as one whose labels are all invalid values are."""
    low, high, count = agg.c[f"low_{j}"], agg.c[f"high_{j}"], agg.c[f"n_{j}"]
    scope = [counted] if counted is not None else []
    has_label = sa.and_(low.is_not(None), low == high)
    invalid = {
        "conflicting": sa.and_(*scope, low != high),
        "invalid_value": sa.and_(*scope, count > 0, low.is_(None)),
    }
    no_label_row = sa.or_(agg.c.id.is_(None), count == 0)
    if labels.time is not None:
        # Rows of unknown arrival time are in every window's range, and a label row.
        bad = agg.c.bad_timestamp > 0
        invalid["bad_timestamp"] = sa.and_(*scope, count == 0, bad)
        no_label_row = sa.or_(agg.c.id.is_(None), sa.and_(count == 0, sa.not_(bad)))
    whens = [(sa.not_(counted), None)] if counted is not None else []
    y = sa.case(
        *whens,
        (has_label, low),
        (no_label_row, 0 if labels.source.missing == "negative" else None),
        else_=None,
    )
    return y, sa.and_(*scope, has_label), invalid


def _accuracy_columns(
    keyed: sa.FromClause, labels: LabelQueries, counted: sa.ColumnElement[bool] | None, suffix: str
) -> list[sa.ColumnElement]:
    """The online accuracy aggregates (``PredictionQueries.online``'s columns, each named with
    ``suffix``) of the rows of ``keyed`` (``score``, and ``y``, ``has_label`` and a flag
    per invalid-label reason, each with ``suffix``; from ``_labeled``) counted where
    ``counted`` holds (``None``: every row).
    Log-loss term: -ln(clip(p)) for y = 1, -ln(1 - clip(p)) for y = 0, with clip to
    [1e-15, 1 - 1e-15] (docs/metrics.md)."""
    score, label = keyed.c.score, keyed.c[f"y{suffix}"]
    p = sa.case(
        (score < LOGLOSS_EPS, _double(LOGLOSS_EPS)),
        (score > 1.0 - LOGLOSS_EPS, _double(1.0 - LOGLOSS_EPS)),
        else_=score,
    )
    log_loss_term = sa.case((label == 1, -sa.func.ln(p)), (label == 0, -sa.func.ln(_double(1.0) - p)), else_=None)
    labeled = label.is_not(None)
    labeled_score = sa.case((labeled, score), else_=None)
    return [
        (_count_if(counted) if counted is not None else sa.func.count()).label(f"predictions{suffix}"),
        _count_if(keyed.c[f"has_label{suffix}"]).label(f"with_label{suffix}"),
        _count_if(label == 1).label(f"positives{suffix}"),
        _count_if(label == 0).label(f"negatives{suffix}"),
        sa.func.min(labeled_score).label(f"low{suffix}"),
        sa.func.max(labeled_score).label(f"high{suffix}"),
        sa.func.sum(labeled_score).label(f"labeled_score_sum{suffix}"),
        sa.func.sum(log_loss_term).label(f"log_loss_sum{suffix}"),
        _count_if(sa.and_(labeled, sa.or_(score == 0.0, score == 1.0))).label(f"extreme{suffix}"),
        *[_count_if(keyed.c[f"{r}{suffix}"]).label(f"{r}{suffix}") for r in labels.invalid_reasons],
    ]


def as_stored(column: sa.ColumnElement, dialect: str) -> sa.ColumnElement:
    """``column`` read and bound as the driver reads and binds its values, without
    SQLAlchemy's processing for its declared type, on SQLite: for ids read out of the store
    and sent back in a later statement. A SQLite column holds any value whatever its declared
    type, and a type that is no SQLite type (``STRING``, ``UUID``, ``NUMERIC``) has NUMERIC
    affinity, which SQLAlchemy reads as a number: a text id failed to read or bind, an
    integer id above 2**53 came back rounded and matched no row. Elsewhere ``column``
    itself: those drivers read the declared type natively."""
    return sa.type_coerce(column, sa.types.NullType()) if dialect == "sqlite" else column


def _only(column: sa.ColumnElement, ids: Sequence[Any] | None) -> list[sa.ColumnElement[bool]]:
    """The condition keeping only the rows whose ``column`` is one of ``ids`` (none when ``None``)."""
    if ids is None:
        return []
    values = list(ids)
    if len(values) == 1:
        # IN of one value is an equality to PostgreSQL, which then infers the value on the
        # other side of the join on ids and drops the join's condition: the join, left with
        # none to hash, becomes a nested loop scanning its inner table once per outer row.
        values *= 2
    return [column.in_(values)]


def grid_index(value: sa.ColumnElement, scale: int) -> sa.ColumnElement:
    """The index m of the decimal grid cell ``[fl(m / scale), fl((m + 1) / scale))``
    holding ``value`` (a double in [0, 1]), as a double; fl(m / scale) is the float64
    nearest to the decimal m / scale.

    ``monitoring_math.grid_index`` gives the same in numpy and proves it: nearest =
    floor(value * scale + 0.5) is m or m + 1, and the second exactly when nearest / scale
    (IEEE division, correctly rounded on every engine) lies above the value. A score with
    at most log10(scale) decimals is thus the lower edge of its own cell, which
    ``floor(value * scale)`` misses (0.29 * 100 = 28.999999999999996 in float64).
    """
    s = _double(scale)
    nearest: sa.ColumnElement[float] = sa.func.floor(value * s + _double(0.5), type_=sa.Double())
    return nearest - sa.case((nearest / s > value, _double(1.0)), else_=_double(0.0))


def round_half_up_index(value: sa.ColumnElement, decimals: int) -> sa.ColumnElement:
    """``value`` rounded half up to ``decimals`` decimals, times 10**decimals, as a double;
    half is the decimal midpoint as stored (``monitoring_math.round_half_up_index``)."""
    cell = grid_index(value, 2 * 10**decimals)
    return sa.func.floor((cell + _double(1.0)) / _double(2.0), type_=sa.Double())


def bisected(
    time: TimeColumn,
    points: Sequence[datetime],
    leaf: Callable[[int], sa.ColumnElement],
    within: Sequence[tuple[datetime, datetime]] | None = None,
) -> sa.ColumnElement:
    """``leaf(k)``, ``k`` how many of the ascending ``points`` a row's ``time`` is at or
    after, by bisection: log2 of their number comparisons a row. ``time.expr`` should be
    computed once a row (a subquery column), as it is used at every level.

    ``within``: disjoint ``[start, end)`` ranges the rows are read in (through
    ``TimeColumn.between`` over them), when known. A row read in ``[a, b)`` is then at or
    after every point up to ``a`` and before every point from ``b`` on (``bind`` never
    reverses the order of instants, though it may map two to one value), so only the
    starts and the points inside a range are compared, and of those only the ones that
    change the count: a steady refresh reads minutes, and its statement compares a few
    points rather than every slice boundary of the window (building the full trees was a
    fifth of a steady refresh's time at 1e6, docs/performance.md). A NULL time gets
    ``leaf(0)``; a row read outside the ranges (a label row whose time is no instant) gets
    some leaf, which its reader must not use."""
    inner = list(points)
    if within is None:
        tests = [(p, k + 1) for k, p in enumerate(inner)]
    else:
        starts = {a for a, _ in within}
        compared = sorted(starts | {p for p in inner if any(a < p < b for a, b in within)})
        tests = []
        for p in compared:
            count = bisect_right(inner, p)
            if count > (tests[-1][1] if tests else 0):  # else both branches give one leaf
                tests.append((p, count))

    def bisect(lo: int, hi: int) -> sa.ColumnElement:
        # The row is at or after tests[j] for j < lo and before it for j >= hi: at or
        # after as many points as tests[lo - 1] counts.
        if lo == hi:
            return leaf(tests[lo - 1][1] if lo else 0)
        mid = (lo + hi) // 2
        return sa.case((time.at_or_after(tests[mid][0]), bisect(mid + 1, hi)), else_=bisect(lo, mid))

    return bisect(0, len(tests))


def _recorded_before(recorded: Sequence[tuple[datetime, datetime]], as_of: datetime) -> list[tuple[datetime, datetime]]:
    """The ``recorded`` ranges cut at ``as_of``, disjoint and ascending: the arrival times
    of the label rows read (``LabelQueries._read``)."""
    return [(a, min(b, as_of)) for a, b in union(recorded) if a < as_of]


def _unique_by_schema(table: sa.Table, column: str) -> bool:
    """Whether a primary key, unique constraint or unique index makes ``column`` unique."""
    keys = [list(table.primary_key.columns.keys())]
    keys += [list(c.columns.keys()) for c in table.constraints if isinstance(c, sa.UniqueConstraint)]
    keys += [list(i.columns.keys()) for i in table.indexes if i.unique]
    return [column] in keys


def _indexed_by(table: sa.Table, column: str) -> bool:
    """Whether the primary key, a unique constraint or an index starts with ``column``, so
    that looking up one value of it reads a few pages rather than the table (not a partial
    index, nor one of a kind no equality lookup uses; an index under another collation than
    the column's is not seen by reflection and counts: docs/scaling.md)."""
    keys = [list(table.primary_key.columns.keys())]
    keys += [list(c.columns.keys()) for c in table.constraints if isinstance(c, sa.UniqueConstraint)]
    leading = [key[0] for key in keys if key]
    leading += [
        i.expressions[0].name
        for i in table.indexes
        if i.expressions
        and isinstance(i.expressions[0], sa.Column)
        # A partial index, or one that serves no equality lookup (PostgreSQL's BRIN, GIN...),
        # would leave each lookup a scan: then not an index for looking ids up.
        and not i.dialect_kwargs.get("postgresql_where")
        and (i.dialect_kwargs.get("postgresql_using") or "btree") in ("btree", "hash")
    ]
    return column in leading


def _same_type(a: sa.ColumnElement, b: sa.ColumnElement, dialect: str) -> bool:
    """Whether two reflected columns have the same type: the same SQLAlchemy type class and
    the same type name as ``dialect`` writes it (``NUMERIC(20, 0)`` is not ``NUMERIC(10, 0)``).
    A type SQLAlchemy does not know (``NullType``: an untyped SQLite column, a PostgreSQL
    extension's type) is the same as none: it has no name to compare."""
    if type(a.type) is not type(b.type) or isinstance(a.type, sa.types.NullType):
        return False
    compiler = sa.make_url(f"{dialect}://").get_dialect()()
    first, second = (column.type.compile(dialect=compiler) for column in (a, b))
    return first == second


class PredictionQueries:
    """Statements over one model's prediction table (and the label and replay tables
    joined to it, which must live in the same store)."""

    def __init__(self, model: ModelConfig, table: sa.Table, time: TimeColumn, dialect: str):
        """``table`` is the reflected prediction table; its primary key or a unique
        constraint on the id column (or ``predictions.unique_ids``) spares the duplicate search."""
        source: PredictionSource = model.predictions
        self.model = model
        self.table = table
        self.time = time
        self.dialect = dialect
        self.id = table.c[source.columns.id]
        #: The id as the duplicate ids are read out of the store and bound back (``as_stored``).
        self.listed_id = as_stored(self.id, dialect)
        self.score: sa.ColumnElement[float] = sa.cast(table.c[source.columns.score], sa.Double())
        self.score_is_number = is_number(dialect, table.c[source.columns.score])
        self.indexed = _indexed_by(table, source.columns.id)
        #: Ids of a numeric type: their smallest and largest per slice (``id_ranges``)
        #: narrow a steady duplicate search (``LeftOutIds``), as Python orders them as the
        #: store does (text under a collation it may not).
        self.numeric_ids = isinstance(self.id.type, (sa.Integer, sa.Numeric))
        self.filters = [filter_condition(table.c[name], value, dialect) for name, value in source.filter.items()]
        self.version = None if source.columns.version is None else table.c[source.columns.version]
        self.unique_ids = source.unique_ids or _unique_by_schema(table, source.columns.id)

    def _in_window(self, start: datetime, end: datetime, narrowed: bool = True) -> sa.ColumnElement:
        return sa.and_(self.time.between(start, end, narrowed), *self.filters)

    def duplicate_search(self, windows: Windows) -> sa.Select:
        """The ids carried by several rows of the largest of ``windows``, at most
        ``MAX_LISTED_DUPLICATES + 1`` of them, each with one column ``n_i`` per window: its
        rows in window ``i`` (``DuplicateIds.from_search`` reads it). Any score counts: a
        duplicate id excludes every row that carries it (``rows``).

        One ``GROUP BY id`` over the largest window per source and refresh, whose few ids
        every query of the source then reuses, rather than one per query and window.
        """
        return (
            sa.select(
                self.listed_id.label("id"),
                *[_count_if(self.time.at_or_after(start)).label(f"n_{i}") for i, start in enumerate(windows.starts)],
            )
            .where(self._in_window(windows.start, windows.end), self.id.is_not(None))  # NULL is no duplicate
            .group_by(self.id)
            .having(sa.func.count() > 1)
            .limit(MAX_LISTED_DUPLICATES + 1)
        )

    def duplicates_among(
        self,
        start: datetime,
        end: datetime,
        probe: Sequence[tuple[datetime, datetime]] | None,
        known: Sequence[Any],
        within: Sequence[tuple[datetime, datetime]] | None = None,
    ) -> sa.Select:
        """The ids carried by several rows of ``[start, end)``, at most
        ``MAX_LISTED_DUPLICATES + 1``, among the ids of the rows stamped in the ``probe``
        ranges and the ``known`` ids (``probe`` ``None``: among all). A new duplicate has a
        row that is new, and a known one may have stopped being one: so a refresh that keeps
        time slices probes only its new rows' ids against the window (with an index on the
        id, lookups: on PostgreSQL a LATERAL count per distinct probed id, whose planner
        hashes a semi-join over the window; elsewhere a semi-join) instead of grouping the
        whole window by id
        (``LeftOutIds.search`` groups every id with no slice kept, while filling and at an
        audit's refresh). With ``within`` (ranges of the window holding every row of the
        probed ids: ``LeftOutIds._narrowed``), the semi-join reads those ranges only.
        """
        conditions = [self._in_window(start, end), self.id.is_not(None)]  # NULL is no duplicate
        if probe is not None:
            in_probe = sa.or_(sa.false(), *(self.time.between(a, b) for a, b in union(probe)))
            if within is not None:
                # The known ids' rows lie in the ranges read. One semi-join of the rows read
                # with the probed ids, outside the ranges' UNION ALL branches (inside, each
                # branch read the probe again), no OR beside it (PostgreSQL then tests a
                # subplan per row, quadratic once the probe outgrows work_mem).
                in_within = sa.or_(sa.false(), *(self.time.between(a, b) for a, b in union(within)))
                known_within = sa.and_(in_within, self.listed_id.in_(list(known)))
                probed_ids = sa.select(self.listed_id).where(
                    sa.or_(in_probe, known_within) if known else in_probe, *self.filters, self.id.is_not(None)
                )
                rows, _ = self._parts((), within, self.listed_id.label("id"), where=[self.id.is_not(None)])
                return (
                    sa.select(rows.c.id)
                    .where(rows.c.id.in_(probed_ids))
                    .group_by(rows.c.id)
                    .having(sa.func.count() > 1)
                    .limit(MAX_LISTED_DUPLICATES + 1)
                )
            # The known ids inside the subquery, not OR-ed beside it: one semi-join, which an
            # index on the id turns into lookups (an OR of two made PostgreSQL read the
            # window); bounded by the window, else without an id index it reads all history.
            known_in_window = sa.and_(self.time.between(start, end), self.listed_id.in_(list(known)))
            probed = sa.or_(in_probe, known_in_window) if known else in_probe
            if self.dialect == "postgresql" and self.indexed:
                # PostgreSQL hashes the probed ids and reads the whole window for the
                # semi-join below, whatever the index (docs/performance.md, *With duplicate
                # ids*): each probed id's rows are looked up in the index instead, linear in
                # the rows probed. OFFSET 0 keeps the lookup from being flattened into a join.
                ids = sa.select(self.listed_id.label("id")).where(probed, *self.filters, self.id.is_not(None))
                distinct = ids.distinct().subquery("probed")
                carried = (
                    sa.select(sa.func.count().label("n"))
                    .where(self.id == distinct.c.id, self._in_window(start, end))
                    .offset(0)
                    .lateral("carried")
                )
                return (
                    sa.select(distinct.c.id)
                    .select_from(distinct.join(carried, sa.true()))
                    .where(carried.c.n > 1)
                    .limit(MAX_LISTED_DUPLICATES + 1)
                )
            conditions.append(self.id.in_(sa.select(self.id).where(probed, *self.filters).correlate(None)))
        return (
            sa.select(self.listed_id.label("id"))
            .where(*conditions)
            .group_by(self.id)
            .having(sa.func.count() > 1)
            .limit(MAX_LISTED_DUPLICATES + 1)
        )

    def id_ranges(self, points: Sequence[datetime], reads: Sequence[tuple[datetime, datetime]]) -> sa.Select:
        """Per part ``[points[p], points[p + 1])`` (``part``: ``p``, as ``_parts``) of the
        ``reads`` ranges holding an id that is not NULL, its smallest and largest id
        (``low``, ``high``; ``numeric_ids`` only: PostgreSQL has no ``min`` of ``uuid``)."""
        rows, part = self._parts(points, reads, self.listed_id.label("id"), where=[self.id.is_not(None)])
        return sa.select(
            part.label("part"), sa.func.min(rows.c.id).label("low"), sa.func.max(rows.c.id).label("high")
        ).group_by(part)

    def duplicate_rows(
        self,
        points: Sequence[datetime],
        start: datetime,
        end: datetime,
        ids: Sequence[Any],
        within: Sequence[tuple[datetime, datetime]] | None = None,
    ) -> sa.Select:
        """Every row of ``[start, end)`` (only those stamped in the ``within`` ranges of it,
        when given) whose id is one of ``ids``, as (``part``, ``id``,
        ``base``, ``score``), at most ``MAX_DUPLICATE_ROWS + 1``; parts as ``_parts``. Each
        id is given as one of the ids the store holds equal to it, the same for all of them
        (a case-insensitive collation holds 'a' and 'A' equal), so that Python counts an
        id's rows as the store's ``GROUP BY`` does; ``first_value``, not ``min``, which
        PostgreSQL lacks for ``uuid`` and ``bytea``."""
        columns = (self.listed_id.label("id"), self._base().label("base"), self.score.label("score"))
        rows, part = self._parts(points, [(start, end)] if within is None else within, *columns, where=self._only(ids))
        # A plain Function, not sa.func's registry: the trino dialect, when installed,
        # registers a first_value class of its own that SQLAlchemy cannot cache statements of.
        same = sa.sql.functions.Function("first_value", rows.c.id, type_=rows.c.id.type).over(partition_by=rows.c.id)
        return sa.select(part.label("part"), same.label("id"), rows.c.base, rows.c.score).limit(MAX_DUPLICATE_ROWS + 1)

    def _duplicated(
        self, windows: Windows, duplicates: DuplicateIds, only: Sequence[Any] | None = None
    ) -> tuple[sa.FromClause, list[sa.ColumnElement]]:
        """The rows' source and, per window, a predicate true when the row's id is carried by
        several rows of that window (NULL or false otherwise: use it in ``CASE WHEN``), for
        the rows of the ``only`` ids when given (an id's count is its own rows')."""
        if duplicates.per_window is not None:
            return self.table, [self.listed_id.in_(ids) if ids else sa.false() for ids in duplicates.per_window]
        # Too many to list: every query searches them itself, as one grouped subquery.
        found = (
            sa.select(
                self.id.label("id"),
                *[_count_if(self.time.at_or_after(start)).label(f"n_{i}") for i, start in enumerate(windows.starts)],
            )
            .where(self._in_window(windows.start, windows.end), *self._only(only))
            .group_by(self.id)
            .having(sa.func.count() > 1)
            .subquery("dup")
        )
        source = self.table.outerjoin(found, self.id == found.c.id)
        return source, [found.c[f"n_{i}"] > 1 for i in range(len(windows.starts))]

    def _base(self) -> sa.ColumnElement[int]:
        """``OK``, or the code of the reason the row's score is excluded (position in
        ``INVALID_REASONS`` + 1), duplicates aside."""
        code = REASON_CODE
        whens: list[tuple[sa.ColumnElement[bool], int]] = [(self.score.is_(None), code["null_score"])]
        if self.score_is_number is not None:
            whens.append((sa.not_(self.score_is_number), code["non_numeric_score"]))
        nan = is_nan(self.dialect, self.score)
        if nan is not None:
            whens.append((nan, code["nan_score"]))
        whens.append((sa.not_(sa.and_(self.score >= 0.0, self.score <= 1.0)), code["out_of_range"]))
        return sa.case(*whens, else_=OK)

    def _parts(
        self,
        points: Sequence[datetime],
        reads: Sequence[tuple[datetime, datetime]],
        *columns: sa.ColumnElement,
        where: Sequence[sa.ColumnElement[bool]] = (),
    ) -> tuple[sa.Subquery, sa.ColumnElement[int]]:
        """The rows stamped in one of the ``reads`` ranges (and meeting ``where``), with
        ``columns``, and the index ``p`` of the part ``[points[p], points[p + 1])`` each lies
        in, found by bisecting the points (log2 of their number comparisons a row). On
        SQLite the time is computed once a row in the subquery (``unflattened``). The
        ``reads`` are joined where they touch (``union``): the audit and the most frequent
        scores read up to one range per slice (1,440), and SQLite refuses expressions over
        1,000 deep ("Expression tree is too large").

        On PostgreSQL the ranges are read in ``UNION ALL`` branches, each bounded by an
        index range of its own whatever the planner's estimates: one range a branch, or
        beyond ``MAX_UNION_BRANCHES`` ranges, consecutive ones (``grouped``), bounded by
        the first's start and the last's end and filtered to them. As one disjunction, on
        a table never analyzed PostgreSQL expected 2 rows and scanned the ``(model, time)``
        index on the model alone, filtering every row of the model (30 s at 10^7 rows for
        three stretches of minutes, docs/performance.md *Stale planner statistics at
        1e7*). Engines that scan columns (DuckDB, Spark) read the disjunction in one scan."""
        ranges = union(reads)

        def rows_in(group: Sequence[tuple[datetime, datetime]]) -> sa.Select:
            within = sa.or_(*(self.time.between(start, end) for start, end in group))
            if len(group) > 1 and self.dialect == "postgresql":
                within = sa.and_(self.time.between(group[0][0], group[-1][1]), within)
            return sa.select(self.time.expr.label("t"), *columns).where(within, *self.filters, *where)

        rows: sa.Select | sa.CompoundSelect
        if self.dialect == "postgresql" and len(ranges) > 1:
            rows = sa.union_all(*(rows_in(group) for group in grouped(ranges, MAX_UNION_BRANCHES)))
        else:
            rows = self.unflattened(rows_in(ranges))
        subquery = rows.subquery("part_rows")
        part = bisected(
            replace(self.time, expr=subquery.c.t),
            points[1:-1],
            lambda k: sa.literal_column(str(k), sa.Integer()),
            within=ranges,
        )
        return subquery, part

    def _not_in(self, ids: Sequence[Any]) -> list[sa.ColumnElement[bool]]:
        """The condition leaving out the rows of ``ids`` (none when empty); a NULL id is
        never left out (it is no duplicate)."""
        return [sa.or_(self.id.is_(None), self.listed_id.not_in(list(ids)))] if ids else []

    def _only(self, ids: Sequence[Any] | None) -> list[sa.ColumnElement[bool]]:
        """The condition keeping only the rows of ``ids`` (none when ``None``)."""
        return _only(self.listed_id, ids)

    def _scored_parts(
        self, points: Sequence[datetime], reads: Sequence[tuple[datetime, datetime]], exclude: Sequence[Any]
    ) -> tuple[sa.Subquery, sa.ColumnElement[int]]:
        """``_parts`` with each row's ``score`` and ``base`` (``_base``), the rows of the
        ``exclude`` ids left out: what the three sliced statements read."""
        columns = (self.score.label("score"), self._base().label("base"))
        return self._parts(points, reads, *columns, where=self._not_in(exclude))

    def sliced_histogram(
        self, points: Sequence[datetime], reads: Sequence[tuple[datetime, datetime]], exclude: Sequence[Any] = ()
    ) -> sa.Select:
        """The histogram of ``histogram`` per part of time, in one pass over the ``reads``
        ranges, leaving out every row whose id is in ``exclude`` (the duplicated ids, which
        the caller adds back per window: ``duplicate_rows``): rows (``part``, ``key``,
        ``n``, ``low``, ``high``, ``s1``, ``s2``), ``key`` the bucket of a valid score or
        minus the reason code of an excluded one, in no order (``slices.Histogram.from_rows``
        reads them). Parts as ``_parts``."""
        rows, part = self._scored_parts(points, reads, exclude)
        keyed = sa.select(
            part.label("part"),
            sa.case((rows.c.base == OK, self._key(rows.c.score)), else_=-rows.c.base).label("key"),
            rows.c.score,
        ).subquery("keyed")
        valid = keyed.c.key >= 0
        deviation = keyed.c.score - keyed.c.key / _double(10**self.model.bucket_decimals)

        def of_valid(value: sa.ColumnElement) -> sa.ColumnElement:
            return sa.case((valid, value), else_=None)

        return sa.select(
            keyed.c.part,
            keyed.c.key,
            sa.func.count().label("n"),
            sa.func.min(of_valid(keyed.c.score)).label("low"),
            sa.func.max(of_valid(keyed.c.score)).label("high"),
            sa.func.sum(of_valid(deviation)).label("s1"),
            sa.func.sum(of_valid(square(deviation))).label("s2"),
        ).group_by(keyed.c.part, keyed.c.key)

    def sliced_mode_counts(
        self,
        points: Sequence[datetime],
        reads: Sequence[tuple[datetime, datetime]],
        exclude: Sequence[Any],
        decimals: int,
        top: int,
    ) -> sa.Select:
        """The ``top + 1`` most frequent valid scores of each part, rounded half up to
        ``decimals`` (``round_half_up_index``), rows of the ``exclude`` ids left out: rows
        (``part``, ``key``, ``n``), ranked by count then key (``slices.TopCounts`` reads
        them); one pass over the ``reads`` ranges, parts as ``_parts``."""
        rows, part = self._scored_parts(points, reads, exclude)
        rounded = (
            sa.select(part.label("part"), round_half_up_index(rows.c.score, decimals).label("key"))
            .select_from(rows)
            .where(rows.c.base == OK)
            .subquery("rounded")
        )
        count = sa.func.count()
        rank = sa.func.row_number().over(partition_by=rounded.c.part, order_by=(count.desc(), rounded.c.key))
        ranked = (
            sa.select(rounded.c.part, rounded.c.key, count.label("n"), rank.label("rank"))
            .group_by(rounded.c.part, rounded.c.key)
            .subquery("ranked")
        )
        return sa.select(ranked.c.part, ranked.c.key, ranked.c.n).where(ranked.c.rank <= top + 1)

    def part_counts(
        self, points: Sequence[datetime], reads: Sequence[tuple[datetime, datetime]], exclude: Sequence[Any] = ()
    ) -> sa.Select:
        """Rows (``part``, ``base``, ``n``, ``keys``, ``total``, ``squares``): the rows of each
        part by ``OK`` or the code of the reason they are excluded, and over the valid scores
        the sum of their buckets (an exact integer), of the scores and of their squares, in the
        ``reads`` ranges, rows of the ``exclude`` ids left out as ``sliced_histogram`` does:
        the audit of kept slices (``slices.SliceStore.audited``), a hash aggregate into a
        few groups per part rather than one per bucket."""
        rows, part = self._scored_parts(points, reads, exclude)
        counted = sa.select(part.label("part"), rows.c.base, rows.c.score).subquery("counted")
        valid = sa.case((counted.c.base == OK, counted.c.score), else_=None)
        key = sa.case((counted.c.base == OK, sa.cast(self._key(counted.c.score), sa.BigInteger)), else_=None)
        return sa.select(
            counted.c.part,
            counted.c.base,
            sa.func.count().label("n"),
            sa.func.sum(key).label("keys"),
            sa.func.sum(valid).label("total"),
            sa.func.sum(square(valid)).label("squares"),
        ).group_by(counted.c.part, counted.c.base)

    def rows(self, windows: Windows, duplicates: DuplicateIds) -> sa.Subquery:
        """The predictions of the largest window as (id, score, base, ``reason_i`` per window):
        ``base`` is ``OK`` or why the score is excluded, ``reason_i`` the row's reason in
        window ``i`` (NULL outside it): ``base``, or ``duplicate_id`` for a valid score whose
        id several rows of the window carry (``INVALID_REASONS`` gives the precedence)."""
        base = self._base()
        source, duplicated = self._duplicated(windows, duplicates)
        reasons = [
            sa.case(
                (sa.not_(self.time.at_or_after(start)), None),
                (sa.and_(base == OK, dup), REASON_CODE["duplicate_id"]),
                else_=base,
            ).label(f"reason_{i}")
            for i, (start, dup) in enumerate(zip(windows.starts, duplicated, strict=True))
        ]
        rows = (
            sa.select(self.id.label("id"), self.score.label("score"), base.label("base"), *reasons)
            .select_from(source)
            .where(self._in_window(windows.start, windows.end))
        )
        return self.unflattened(rows).subquery("window_rows")  # not a CTE: PostgreSQL would materialize it

    def valid_rows(
        self,
        windows: Windows,
        duplicates: DuplicateIds,
        with_time: bool = False,
        only: Sequence[Any] | None = None,
        exclude: Sequence[Any] = (),
        before_materialized: bool = False,
    ) -> sa.Subquery:
        """The valid predictions of the largest window (of the ``only`` ids, when given),
        leaving out those of the ``exclude`` ids, as (id, score, ``in_i`` per window, and with
        ``with_time`` their time column as stored, ``t``, and as windows compare it, ``at``):
        ``in_i`` is 1 when the row counts in window ``i`` (in it, its id carried by no other
        row of it), else 0. Filtered by plain predicates on the score rather than by
        reason: PostgreSQL estimates those well, and a wrong estimate makes it sort the
        window instead of hashing it.

        ``before_materialized`` (SQLite): the rows are the outer side of a join to rows SQLite
        materialises (the label rows with their time, ``LabelQueries._timed``), which it
        indexes only when it expects many outer rows. They are then read as before the
        stored dates' range and ``unflattened``: with either, SQLite expected few and
        scanned every label row once per prediction (5 s instead of 0.6 s for 8,400
        predictions and 3,600 label rows, the demo's)."""
        source, duplicated = self._duplicated(windows, duplicates, only)
        flags = [
            sa.case((sa.and_(self.time.at_or_after(start), dup), 0), (self.time.at_or_after(start), 1), else_=0).label(
                f"in_{i}"
            )
            for i, (start, dup) in enumerate(zip(windows.starts, duplicated, strict=True))
        ]
        time = [self.time.stored.label("t"), self.time.expr.label("at")] if with_time else []
        rows = (
            sa.select(self.id.label("id"), self.score.label("score"), *time, *flags)
            .select_from(source)
            .where(
                self._in_window(windows.start, windows.end, narrowed=not before_materialized),
                _valid_probability(self.dialect, self.score, self.score_is_number),
                *self._only(only),
                *self._not_in(exclude),
            )
        )
        return (rows if before_materialized else self.unflattened(rows)).subquery("valid_rows")

    def _labels_materialized(self, labels: LabelQueries) -> bool:
        """Whether SQLite reads ``labels`` from a subquery it materialises (their time as
        SQLite text, computed once a row: ``LabelQueries._timed``), which it indexes for a
        join only when it expects many predictions to join (``valid_rows``)."""
        return self.dialect == "sqlite" and labels.time is not None and labels.time.kind == "sqlite"

    def unflattened(self, rows: sa.Select) -> sa.Select:
        """``rows``, which a statement reads as a subquery, kept from being flattened into it
        on SQLite by a LIMIT (``_parts``, ``rows``, ``valid_rows``, the probe, the features'
        cleaned values): flattened, each use of a column is its expression again, and the
        time, reasons and window flags, read by every aggregate, each normalised the row's
        date-time text once more (a refresh of the load test's models spent most of its time
        there: docs/performance.md, *SQLite: each row's date-time text read once*)."""
        return rows.limit(-1) if self.dialect == "sqlite" else rows

    def joins_labels_one_to_one(self, labels: LabelQueries) -> bool:
        """Whether ``online`` may join each prediction to its one label row
        (``repeated``): only where the label ids listed from the label table
        (``LabelQueries.repeated_ids``, grouped by the label column's equality, then sent
        back as values) compare with the predictions' ids as the join compares the two
        columns, and the three statements see one snapshot. So: on PostgreSQL, SQLite and
        DuckDB (``db.timed_connection``: one snapshot per source; Spark SQL has none), both
        id columns of the same type (``_same_type``): an integer; on PostgreSQL and DuckDB
        also a decimal or a uuid; on PostgreSQL also a ``text``/``varchar`` without a
        collation of its own. Else the label rows are grouped per id: ``char(n)`` ids come
        back padded, ``real`` ones are bound as doubles, a case-insensitive collation groups
        ids that the other column tells apart, SQLite and DuckDB do not reflect collations,
        and SQLite's ``NUMERIC`` (also any type name it does not know, such as ``UUID``)
        is read as a float by SQLAlchemy (ids above 2^53 come back changed, text fails)."""
        if self.dialect not in ("postgresql", "sqlite", "duckdb") or not _same_type(self.id, labels.id, self.dialect):
            return False
        kind = self.id.type
        if isinstance(kind, sa.Integer):
            return True
        if self.dialect == "sqlite":
            return False
        if isinstance(kind, sa.Uuid) or (isinstance(kind, sa.Numeric) and not isinstance(kind, sa.Float)):
            return True
        plain_text = type(kind) in (sa.String, sa.Text, sa.VARCHAR, sa.TEXT)
        collated = (
            getattr(kind, "collation", None) is not None or getattr(labels.id.type, "collation", None) is not None
        )
        return self.dialect == "postgresql" and plain_text and not collated

    def _key(self, score: sa.ColumnElement) -> sa.ColumnElement:
        return grid_index(score, 10**self.model.bucket_decimals)

    def histogram(self, windows: Windows, duplicates: DuplicateIds) -> sa.Select:
        """Every window in one pass over the largest, grouped by one key: the bucket
        ``grid_index(score, 10**k)`` for a valid score, ``-code`` of the reason for an
        excluded score; in no order. Per window ``i``: ``n_i`` (rows counted under that key:
        valid for a bucket, excluded for that reason otherwise), ``dup_i`` (valid scores
        excluded as ``duplicate_id``), and over the valid ones ``low_i``, ``high_i``,
        ``s1_i``, ``s2_i`` (min, max, sum and sum of squares of the score minus the bucket's
        lower edge ``key / 10**k``).

        One grouping key, not (reason, bucket): PostgreSQL then aggregates in a hash table
        instead of sorting the window. A score lies in [edge, edge + 10**-k), so its
        deviation from the edge is exact (Sterbenz: score <= 2 edge unless edge = 0), 0
        for a score with at most k decimals, and its square loses no precision when the
        variance is pooled (``monitoring_math.pooled_variance``).
        """
        rows = self.rows(windows, duplicates)
        scale = _double(10**self.model.bucket_decimals)
        reasons = [rows.c[f"reason_{i}"] for i in range(len(windows.starts))]
        keyed = sa.select(
            sa.case((rows.c.base == OK, self._key(rows.c.score)), else_=-rows.c.base).label("key"),
            rows.c.base,
            rows.c.score,
            *reasons,
        ).subquery("keyed")
        # Only valid rows: an excluded score (1e200, NaN) would overflow or poison the sums.
        deviation = keyed.c.score - keyed.c.key / scale
        columns = []
        for i in range(len(windows.starts)):
            reason = keyed.c[f"reason_{i}"]
            valid = reason == OK

            def of_valid(value: sa.ColumnElement, valid: sa.ColumnElement = valid) -> sa.ColumnElement:
                return sa.case((valid, value), else_=None)

            columns += [
                _count_if(reason == keyed.c.base).label(f"n_{i}"),
                _count_if(sa.and_(keyed.c.base == OK, reason != OK)).label(f"dup_{i}"),
                sa.func.min(of_valid(keyed.c.score)).label(f"low_{i}"),
                sa.func.max(of_valid(keyed.c.score)).label(f"high_{i}"),
                sa.func.sum(of_valid(deviation)).label(f"s1_{i}"),
                sa.func.sum(of_valid(square(deviation))).label(f"s2_{i}"),
            ]
        return sa.select(keyed.c.key, *columns).group_by(keyed.c.key)

    def mode_counts(self, windows: Windows, duplicates: DuplicateIds, decimals: int) -> sa.Select:
        """One row, one column ``mode_i`` per window: the count of its most frequent valid
        score, rounded half up to ``decimals`` (``round_half_up_index``); one pass over the
        largest window."""
        rows = self.rows(windows, duplicates)
        n = len(windows.starts)
        rounded = (
            sa.select(
                round_half_up_index(rows.c.score, decimals).label("key"), *[rows.c[f"reason_{i}"] for i in range(n)]
            )
            .where(rows.c.base == OK)
            .subquery("rounded")
        )
        counts = (
            sa.select(*[_count_if(rounded.c[f"reason_{i}"] == OK).label(f"n_{i}") for i in range(n)])
            .group_by(rounded.c.key)
            .subquery("counts")
        )
        return sa.select(*[sa.func.max(counts.c[f"n_{i}"]).label(f"mode_{i}") for i in range(n)])

    def last_timestamp(self, end: datetime, future_from: datetime, future_wall: datetime | None = None) -> sa.Select:
        """One row (``newest``, ``future``, ``unreadable``): the newest prediction time before
        ``end``, in the column's own representation (``TimeColumn.to_epoch`` converts it), the
        number of rows stamped at or after ``future_from`` (a writer's clock ahead of mlmon's,
        or wrong timestamps; wall-clock times at or after ``future_wall``'s reading, by
        default the same: ``TimeColumn.from_on``), and the number of rows whose timestamp is no instant (NULL, or
        unreadable text on SQLite: ``TimeColumn.unreadable``), which are in no window.

        Scalar subqueries in one round trip rather than one scan with conditional
        aggregates, so that each can use an index on the timestamp; on SQLite, whose
        normalised date-time text no index serves, one scan normalising each row's text once.
        """
        if self.dialect == "sqlite":
            return self._last_timestamp_in_one_scan(end, future_from, future_wall or future_from)
        ts = self.time.expr
        newest = sa.select(sa.func.max(ts)).where(self.time.between(None, end), *self.filters).scalar_subquery()
        future = (
            sa.select(sa.func.count())
            .select_from(self.table)
            .where(self.time.from_on(future_from, future_wall or future_from), *self.filters)
        ).scalar_subquery()
        unreadable = (
            sa.select(sa.func.count()).select_from(self.table).where(self.time.unreadable(), *self.filters)
        ).scalar_subquery()
        return sa.select(newest.label("newest"), future.label("future"), unreadable.label("unreadable"))

    def _last_timestamp_in_one_scan(self, end: datetime, future_from: datetime, future_wall: datetime) -> sa.Select:
        """``last_timestamp`` as one scan of the model's rows, each row's time computed once
        (in a subquery that ``unflattened`` keeps apart) and read by conditional aggregates."""
        time = self.time
        columns = [time.expr.label("t"), time.stored.label("s")]
        if time.instants is not None:
            columns.append(sa.case((time.instants, 1), else_=0).label("o"))
        rows = self.unflattened(sa.select(*columns).where(*self.filters)).subquery("stamped")
        instants = None if time.instants is None else rows.c.o == 1
        at = replace(time, expr=rows.c.t, stored=rows.c.s, instants=instants)
        return sa.select(
            sa.func.max(sa.case((at.between(None, end), at.expr), else_=None)).label("newest"),
            _count_if(at.from_on(future_from, future_wall)).label("future"),
            _count_if(at.unreadable()).label("unreadable"),
        ).select_from(rows)

    def serving_version(self, end: datetime) -> sa.Select:
        """One row: the model version of the newest prediction before ``end`` (needs the
        ``version`` column), cut after ``VERSION_MAX_LENGTH + 1`` characters (a longer one
        can name no training run), as text, or
        as bytes when the column is binary or the store is SQLite.

        On SQLite the value is read as bytes, because its driver raises on text that is not
        UTF-8; the cut then counts bytes, which changes nothing for a version that can name
        a run (ASCII). Other types (numbers) are cast to text.
        """
        ts = self.time.expr
        assert self.version is not None, "serving_version needs the predictions' version column"
        version: sa.ColumnElement[Any] = self.version
        if self.dialect == "sqlite":
            version = sa.cast(version, sa.LargeBinary())
        elif not isinstance(version.type, sa.String | sa.LargeBinary):
            version = sa.cast(version, sa.String())
        cut = sa.func.array_slice if self.dialect == "duckdb" else sa.func.substr  # DuckDB's substr takes no BLOB
        value = cut(version, 1, VERSION_MAX_LENGTH + 1, type_=version.type)
        return sa.select(value).where(self.time.between(None, end), *self.filters).order_by(ts.desc()).limit(1)

    def new_predictions(self, start: datetime, end: datetime, buckets: list[float]) -> sa.Select:
        """One row for the counters: (count, sum of scores, cumulative count per bucket bound)
        of predictions with a valid score and a timestamp in ``[start, end)``."""
        valid = _valid_probability(self.dialect, self.score, self.score_is_number)
        return sa.select(
            sa.func.count(),
            sa.func.sum(self.score),
            *[_count_if(self.score <= bound) for bound in buckets],
        ).where(self._in_window(start, end), valid)

    def online(
        self,
        labels: LabelQueries,
        windows: Windows,
        duplicates: DuplicateIds,
        as_of: datetime,
        maturity: LabelMaturity | None = None,
        only: Sequence[Any] | None = None,
        repeated: Sequence[Any] | None = None,
        apart: bool = False,
    ) -> sa.Select:
        """Online accuracy aggregates of every window's valid predictions joined to their
        labels, in one pass over the largest window (two when matured labels are grouped per
        prediction), grouped by bucket
        ``grid_index(score, 10**k)``, in no order (an ORDER BY would make PostgreSQL sort the
        window rather than hash it).

        Columns: ``key`` and per window ``i``: ``predictions_i``, ``with_label_i`` (a usable
        label row), ``positives_i``, ``negatives_i``, ``low_i``/``high_i`` (smallest and
        largest labeled score of the bucket: equal means its pairs are true ties),
        ``labeled_score_sum_i``, ``log_loss_sum_i``, ``extreme_i`` (labeled at exactly 0 or
        1), and one count per reason of ``labels.invalid_reasons`` (``INVALID_LABEL_REASONS``):
        ``conflicting_i``, ``invalid_value_i``, ``bad_timestamp_i``.
        With ``maturity`` (a label timestamp and ``label_delay`` above 0), a prediction's
        labels are those matured for it (``matured_labels``), the same in every window;
        without, the labels of window ``i`` are those recorded in ``[start_i, as_of)``
        (``LabelQueries.per_id``), or every label row without a label timestamp.
        A prediction whose label rows all have an arrival time
        that is no instant is left out as one whose labels are all invalid values are
        (neither labeled nor, with ``missing: negative``, a 0).
        Log-loss term: -ln(clip(p)) for y = 1, -ln(1 - clip(p)) for y = 0, with
        clip to [1e-15, 1 - 1e-15] (docs/metrics.md).
        With ``only``, the predictions of those ids alone: what kept online slices leave out
        (``LabelsSource._sliced``).

        ``repeated``: the ids carried by several of the label rows read
        (``LabelQueries.repeated_ids``; only where ``joins_labels_one_to_one``). Their predictions are left out, and every other
        prediction joins its label row itself, at most one, which with ``maturity`` must
        mature for it (or have an arrival time that is no instant); with ``apart``, their
        predictions alone, with label rows grouped. Without ``repeated``, the label rows are
        grouped per id, or with ``maturity`` per prediction (``matured_labels``, a second
        pass over the window), before the join; ``repeated=()`` (no id listed) joins every
        prediction one to one. The same aggregates either way, up to the order of the sums;
        at 10^7 rows the one-to-one join takes 0.47x the time with maturity, 0.72x without
        (docs/performance.md, *Label maturity*).
        """
        assert only is None or repeated is None, "only: prediction ids; repeated: label ids"
        keep = only  # the ids whose predictions are read (None: all)
        exclude: Sequence[Any] = ()
        if repeated is not None:
            listed = list(repeated)
            if apart:
                keep = listed
            elif repeated:
                exclude = listed
        one_to_one = repeated is not None and not apart
        materialized = self._labels_materialized(labels)
        if maturity is not None:
            rows = self.valid_rows(
                windows, duplicates, with_time=True, only=keep, exclude=exclude, before_materialized=materialized
            )
            if one_to_one:
                agg = labels.maturity_bounds(maturity, labels.read_ranges(windows, as_of, maturity), as_of, self.time)
                # A row whose arrival time is no instant is in every slice's range (and counted
                # as such); any other, only in the slices it matures for.
                matures = sa.or_(agg.c.bad == 1, sa.and_(rows.c.at >= agg.c.opens, rows.c.at < agg.c.closes))
                source = rows.outerjoin(agg, sa.and_(rows.c.id == agg.c.id, matures))
            else:
                agg = self.matured_labels(labels, [(windows.start, windows.end)], as_of, maturity, keep)
                source = rows.outerjoin(agg, sa.and_(rows.c.id == agg.c.id, rows.c.t == agg.c.t))
        else:
            rows = self.valid_rows(windows, duplicates, only=keep, exclude=exclude, before_materialized=materialized)
            agg = labels.per_id(windows, as_of, grouped=not one_to_one, only=keep)
            source = rows.outerjoin(agg, rows.c.id == agg.c.id)
        per_window = maturity is None and labels.time is not None
        windowed: list[sa.ColumnElement] = []
        for i in range(len(windows.starts)):
            j = i if per_window else 0  # otherwise every window sees the same labels of a prediction
            counted = rows.c[f"in_{i}"] == 1
            y, has_label, invalid = _labeled(labels, agg, j, counted)
            windowed += [
                rows.c[f"in_{i}"],
                y.label(f"y_{i}"),
                has_label.label(f"has_label_{i}"),
                *[invalid[reason].label(f"{reason}_{i}") for reason in labels.invalid_reasons],
            ]
        keyed = (
            sa.select(self._key(rows.c.score).label("key"), rows.c.score, *windowed)
            .select_from(source)
            .subquery("keyed")
        )
        columns = [
            column
            for i in range(len(windows.starts))
            for column in _accuracy_columns(keyed, labels, keyed.c[f"in_{i}"] == 1, f"_{i}")
        ]
        return sa.select(keyed.c.key, *columns).group_by(keyed.c.key)

    def sliced_online(
        self,
        labels: LabelQueries,
        points: Sequence[datetime],
        reads: Sequence[tuple[datetime, datetime]],
        as_of: datetime,
        maturity: LabelMaturity,
        by_bucket: bool = True,
        exclude: Sequence[Any] = (),
    ) -> sa.Select:
        """The aggregates of ``online`` per part of time (``_parts``: part ``p`` is
        ``[points[p], points[p + 1])``), in one pass over the ``reads`` ranges, with matured
        labels, leaving out every prediction whose id is in ``exclude`` (the duplicated ids,
        which ``online`` with ``only`` adds back per window, as ``sliced_histogram`` does):
        rows (``part``, ``key``, then ``online``'s columns without the window suffix), in no
        order; without ``by_bucket``, one row per part with the counts and sums only (no
        ``key``, ``low``, ``high``): the audit of kept slices, a few groups rather than one per
        bucket. Each prediction counts the label rows matured for its slice of
        ``maturity.points`` (``matured_labels``), whatever part it is read in, so the parts of
        a slice add up to what ``online`` gives for it."""
        columns = (self.id.label("id"), self.score.label("score"), self.time.stored.label("ts"))
        valid = _valid_probability(self.dialect, self.score, self.score_is_number)
        rows, part = self._parts(points, reads, *columns, where=[valid, *self._not_in(exclude)])
        agg = self.matured_labels(labels, reads, as_of, maturity)
        source = rows.outerjoin(agg, sa.and_(rows.c.id == agg.c.id, rows.c.ts == agg.c.t))
        y, has_label, invalid = _labeled(labels, agg, 0, None)
        keyed = (
            sa.select(
                part.label("part"),
                self._key(rows.c.score).label("key"),
                rows.c.score,
                y.label("y"),
                has_label.label("has_label"),
                *[invalid[reason].label(reason) for reason in labels.invalid_reasons],
            )
            .select_from(source)
            .subquery("keyed")
        )
        aggregates = _accuracy_columns(keyed, labels, None, "")
        if not by_bucket:
            totals = [c for c in aggregates if c.name not in ("low", "high")]
            return sa.select(keyed.c.part, *totals).group_by(keyed.c.part)
        return sa.select(keyed.c.part, keyed.c.key, *aggregates).group_by(keyed.c.part, keyed.c.key)

    def matured_labels(
        self,
        labels: LabelQueries,
        reads: Sequence[tuple[datetime, datetime]],
        as_of: datetime,
        maturity: LabelMaturity,
        only: Sequence[Any] | None = None,
    ) -> sa.Subquery:
        """Per prediction stamped in one of the ``reads`` ranges (of the ``only`` ids, when
        given) that has label rows (its id
        and its time as stored, ``t``), as ``LabelQueries.per_id`` gives them per id
        (``n_0``, ``low_0``, ``high_0``, ``bad_timestamp``), but counting only the label rows
        that mature for it (``LabelMaturity``), plus those whose arrival time is no instant.
        Each label row carries the bounds of the prediction times it matures for
        (``LabelQueries.maturity_bounds``), so the predictions are compared with them as
        stored, with no arithmetic per row. Only the label rows that can mature for the
        ``reads`` are read: recorded from the start of the slice holding a range's start to
        ``delay`` after the end of the slice holding its end (and before ``as_of``)."""
        label_rows = labels.maturity_bounds(maturity, maturity.recorded(reads), as_of, self.time, only)
        matures = sa.and_(
            label_rows.c.bad == 0, self.time.expr >= label_rows.c.opens, self.time.expr < label_rows.c.closes
        )
        value = sa.case((matures, label_rows.c.value), else_=None)
        # As valid_rows' before_materialized: read as the whole history, or SQLite scans the
        # materialised label rows once per prediction.
        narrowed = not self._labels_materialized(labels)
        in_reads = sa.or_(*(self.time.between(start, end, narrowed) for start, end in union(reads)))
        return (
            sa.select(
                self.id.label("id"),
                self.time.stored.label("t"),
                _count_if(matures).label("n_0"),
                sa.func.min(value).label("low_0"),
                sa.func.max(value).label("high_0"),
                _count_if(label_rows.c.bad == 1).label("bad_timestamp"),
            )
            .select_from(self.table.join(label_rows, label_rows.c.id == self.id))
            .where(in_reads, *self.filters, *self._only(only))
            .group_by(self.id, self.time.stored)
            .subquery("matured_labels")
        )

    def replays_by_lookup(self, replays: ReplayQueries) -> bool:
        """Whether ``replays`` looks each window row's replays up by index (PostgreSQL, with
        an index on the replay id of the very type of the predictions' id): a nested loop by
        construction, whose cost under ``enable_nestloop = off`` exceeds ``jit_above_cost``;
        the caller turns JIT off, as compiling would take longer than the lookups.

        Ids of different types (``double precision`` or ``numeric`` predictions, ``bigint``
        replays) are compared after PostgreSQL casts the replay id, which no index on it
        serves: each window row would then scan the replay table (quadratic; 44.7 s at 3,000
        window rows by 200,000 replays), so those take the hash join.
        """
        return self.dialect == "postgresql" and replays.indexed and _same_type(self.id, replays.id, self.dialect)

    def _replayed(
        self, replays: ReplayQueries, rows: sa.Subquery
    ) -> tuple[sa.FromClause, sa.ColumnElement[bool], sa.ColumnElement[bool], sa.ColumnElement[float]]:
        """``rows`` (valid predictions with ``id`` and ``score``) joined to their replay
        rows, and per pair: whether the replay is a valid probability, whether it
        reproduces the served score (``|a - b| <= atol + rtol * max(|a|, |b|)``, false for
        an invalid replay) and ``|a - b|``."""
        online = rows.c.score
        offline: sa.ColumnElement[float]
        if self.replays_by_lookup(replays):
            # Each window row looks its replays up in the index: linear in the window's rows,
            # whereas the hash join the refresh transaction's planner settings leave
            # (db.timed_connection) would read the whole replay table. OFFSET 0 keeps
            # PostgreSQL from flattening the lookup back into a join it would plan by statistics.
            lookup = sa.select(replays.score.label("score")).where(replays.id == rows.c.id).offset(0).lateral("replay")
            source, offline = rows.join(lookup, sa.true()), lookup.c.score
        else:
            source, offline = rows.join(replays.table, rows.c.id == replays.id), replays.score
        tolerance = self.model.replay_tolerance
        # NULL, NaN, ±inf, outside [0, 1] or not a number: never reproduced
        valid = _valid_probability(self.dialect, offline, is_number(self.dialect, replays.column))
        diff = sa.func.abs(online - offline)
        larger = sa.case((sa.func.abs(online) >= sa.func.abs(offline), sa.func.abs(online)), else_=sa.func.abs(offline))
        # rtol x a tiny score may round to 0, which PostgreSQL raises as underflow: below
        # SQUARE_FLOOR the relative tolerance is taken as 0 (the product is never formed).
        relative: sa.ColumnElement[float] = _double(0.0)
        if tolerance.rtol > 0:
            smallest = SQUARE_FLOOR / tolerance.rtol  # larger below this: rtol x larger < SQUARE_FLOOR
            relative = sa.case((larger < _double(smallest), _double(0.0)), else_=_double(tolerance.rtol) * larger)
        within = sa.and_(valid, diff <= _double(tolerance.atol) + relative)
        return source, valid, within, diff

    def replays(
        self,
        replays: ReplayQueries,
        windows: Windows,
        duplicates: DuplicateIds,
        only: Sequence[Any] | None = None,
    ) -> sa.Select:
        """One row, per window ``i``: ``replayed_i`` (its (valid prediction, replay row)
        pairs), ``reproduced_i`` and ``abs_error_max_i`` (max |online - offline|), in one pass
        over the largest window. Reproduced means ``|a - b| <= atol + rtol * max(|a|, |b|)``;
        a replay that is not a valid probability (NULL, NaN, infinite, outside [0, 1], text
        or a blob in SQLite) never is and is left out of the max. With ``only``, the
        predictions of those ids alone: what kept replay slices leave out
        (``ReplaysSource``)."""
        rows = self.valid_rows(windows, duplicates, only=only)
        source, valid, within, diff = self._replayed(replays, rows)
        columns = []
        for i in range(len(windows.starts)):
            counted = rows.c[f"in_{i}"] == 1
            columns += [
                _count_if(counted).label(f"replayed_{i}"),
                _count_if(sa.and_(counted, within)).label(f"reproduced_{i}"),
                sa.func.max(sa.case((sa.and_(counted, valid), diff), else_=None)).label(f"abs_error_max_{i}"),
            ]
        return sa.select(*columns).select_from(source)

    def sliced_replays(
        self,
        replays: ReplayQueries,
        points: Sequence[datetime],
        reads: Sequence[tuple[datetime, datetime]],
        exclude: Sequence[Any] = (),
    ) -> sa.Select:
        """The aggregates of ``replays`` per part of time (``_parts``: part ``p`` is
        ``[points[p], points[p + 1])``), in one pass over the ``reads`` ranges, leaving out
        every prediction whose id is in ``exclude`` (the duplicated ids, which ``replays``
        with ``only`` adds back per window): rows (``part``, ``replayed``, ``reproduced``,
        ``abs_error_max``), one per part holding a replayed prediction, in no order
        (``slices.ReplayTotals.by_part`` reads them)."""
        valid_score = _valid_probability(self.dialect, self.score, self.score_is_number)
        columns = (self.id.label("id"), self.score.label("score"))
        rows, part = self._parts(points, reads, *columns, where=[valid_score, *self._not_in(exclude)])
        source, valid, within, diff = self._replayed(replays, rows)
        paired = (
            sa.select(
                part.label("part"),
                sa.case((within, 1), else_=0).label("reproduced"),
                sa.case((valid, diff), else_=None).label("diff"),
            )
            .select_from(source)
            .subquery("paired")
        )
        return sa.select(
            paired.c.part,
            sa.func.count().label("replayed"),
            sa.func.sum(paired.c.reproduced).label("reproduced"),
            sa.func.max(paired.c.diff).label("abs_error_max"),
        ).group_by(paired.c.part)


class LabelQueries:
    """The label table: label rows of prediction ids (usually one per id, some with several:
    relabels, conflicts), with labels that arrived before ``as_of``."""

    def __init__(self, source: LabelSource, table: sa.Table, time: TimeColumn | None):
        """``table`` is the reflected label table, ``time`` its timestamp column (``None``:
        every label row counts)."""
        self.source = source
        self.table = table
        self.time = time
        self.id = table.c[source.columns.id]
        #: The reasons of ``INVALID_LABEL_REASONS`` that apply: ``bad_timestamp`` needs a timestamp.
        self.invalid_reasons = INVALID_LABEL_REASONS if time is not None else INVALID_LABEL_REASONS[:-1]
        label = table.c[source.columns.label]
        if isinstance(label.type, sa.Boolean):
            # Compared with true/false rather than cast to an integer (PostgreSQL refuses
            # boolean = integer): SQLite's CAST('yes' AS INTEGER) is 0, and a BOOLEAN column
            # there may hold any text.
            self.valid_value = sa.case((label == sa.true(), 1), (label == sa.false(), 0), else_=None)
        else:
            self.valid_value = sa.case((sa.or_(label == 0, label == 1), label), else_=None)

    def per_id(
        self, windows: Windows, as_of: datetime, grouped: bool = True, only: Sequence[Any] | None = None
    ) -> sa.Subquery:
        """(id, then per range ``j``: ``n_j`` label rows, ``low_j`` and ``high_j`` the smallest
        and largest valid label, NULL when every label row of that id is invalid; with a
        label timestamp, ``bad_timestamp``: the id's rows whose arrival time is written but
        no instant) per labeled id (of the ``only`` ids, when given); without ``grouped``,
        the same columns per label row (``n_j`` 0 or 1, ``low_j = high_j`` its valid label),
        which equal the grouped ones where the id has no other label row among those read
        (``repeated_ids``).

        With a label timestamp, range ``j`` holds the labels recorded in
        ``[windows.starts[j], as_of)``: a label is recorded after its prediction, so the window
        start bounds the scan to recent labels. A row whose time is no instant
        (``TimeColumn.written_unreadable``: text that is no date-time, ``±infinity``) is
        read in the same pass and in no range; a NULL time is a label not yet arrived, not
        read. Without a timestamp, every label row is read, and there is one range,
        ``j = 0``, whatever ``starts``.
        """
        source, ident, valid_value, time = self._timed()

        def count_if(condition: sa.ColumnElement[bool]) -> sa.ColumnElement:
            return _count_if(condition) if grouped else sa.case((condition, 1), else_=0)

        def low(value: sa.ColumnElement) -> sa.ColumnElement:
            return sa.func.min(value) if grouped else value

        def high(value: sa.ColumnElement) -> sa.ColumnElement:
            return sa.func.max(value) if grouped else value

        columns = []
        if time is None:
            ranges: list[sa.ColumnElement[bool] | None] = [None]
        else:
            # between, not at_or_after: the unreadable rows read too would pass >= (infinity).
            ranges = [time.between(start, as_of) for start in windows.starts]
            columns.append(count_if(time.written_unreadable()).label("bad_timestamp"))
        for j, in_range in enumerate(ranges):
            value = valid_value if in_range is None else sa.case((in_range, valid_value), else_=None)
            if in_range is not None:
                count = count_if(in_range)
            else:
                count = sa.func.count() if grouped else sa.literal(1)
            columns += [count.label(f"n_{j}"), low(value).label(f"low_{j}"), high(value).label(f"high_{j}")]
        read = self._read(time, self.read_ranges(windows, as_of, None), as_of)
        rows = sa.select(ident.label("id"), *columns).select_from(source).where(*read, *_only(ident, only))
        return (rows.group_by(ident) if grouped else rows).subquery("labels_per_id")

    @staticmethod
    def read_ranges(
        windows: Windows, as_of: datetime, maturity: LabelMaturity | None
    ) -> list[tuple[datetime, datetime]]:
        """The arrival times of the label rows ``PredictionQueries.online`` reads for
        ``windows`` at ``as_of`` (before ``as_of``): with ``maturity``, those that can mature
        for the windows' predictions (``LabelMaturity.recorded``); else from the largest
        window's start on (``per_id``)."""
        if maturity is not None:
            return maturity.recorded([(windows.start, windows.end)])
        return [(windows.start, as_of)]

    def _read(
        self, time: TimeColumn | None, recorded: Sequence[tuple[datetime, datetime]], as_of: datetime
    ) -> list[sa.ColumnElement[bool]]:
        """The condition on the label rows a statement reads: those recorded before ``as_of``
        in one of the ``recorded`` ranges, and those whose arrival time is written but no
        instant (in every range, and counted as such); every row without a label timestamp."""
        if time is None:
            return []
        ranges = [time.between(a, b) for a, b in _recorded_before(recorded, as_of)]
        return [sa.or_(*ranges, time.written_unreadable())]

    def repeated_ids(self, windows: Windows, as_of: datetime, maturity: LabelMaturity | None) -> sa.Select:
        """The ids carried by several of the label rows that ``PredictionQueries.online``
        reads for ``windows`` at ``as_of`` with ``maturity`` (``per_id``'s, or
        ``maturity_bounds``'), at most ``MAX_LISTED_LABEL_IDS + 1`` of them, as one column
        ``id``; a NULL id joins no prediction and is left out. Every other id's predictions
        join at most one label row, so ``online`` joins them to the rows themselves
        (``repeated``) rather than to an aggregate per id or per prediction: one ``GROUP BY
        id`` over the label rows instead of one over the join (docs/performance.md, *Label
        maturity*)."""
        source, ident, _, time = self._timed()
        recorded = self.read_ranges(windows, as_of, maturity)
        return (
            sa.select(ident.label("id"))
            .select_from(source)
            .where(*self._read(time, recorded, as_of), ident.is_not(None))  # as per_id and maturity_bounds
            .group_by(ident)
            .having(sa.func.count() > 1)
            .limit(MAX_LISTED_LABEL_IDS + 1)
        )

    def maturity_bounds(
        self,
        maturity: LabelMaturity,
        recorded: Sequence[tuple[datetime, datetime]],
        as_of: datetime,
        predicted: TimeColumn,
        only: Sequence[Any] | None = None,
    ) -> sa.Subquery:
        """The label rows (of the ``only`` ids, when given) recorded before ``as_of`` in one of the
        ``recorded`` ranges, and those whose arrival time is written but no instant, as (id,
        ``value``: the label if valid, else NULL; ``opens`` and ``closes``: the prediction
        times, bound for the predictions' time column ``predicted``, in ``[opens, closes)``
        of which the row matures; ``bad``:
        1 for a time that is no instant, else 0; and the columns ``per_id`` gives an id,
        ``n_0``, ``low_0``, ``high_0``, ``bad_timestamp``, as this row alone gives them to a
        prediction it matures for, or to any when ``bad``). A row recorded at ``r`` matures for the
        predictions of slice ``s`` when ``points[s] <= r < points[s + 1] + delay``: from the
        first slice whose delayed end lies after ``r`` to the slice holding ``r``. Needs a
        label timestamp."""
        source, ident, valid_value, time = self._timed()
        assert time is not None, "labels mature by their arrival time"
        points = maturity.points
        unreadable = time.written_unreadable()
        rows = (
            sa.select(
                ident.label("id"),
                valid_value.label("value"),
                time.expr.label("t"),
                sa.case((unreadable, 1), else_=0).label("bad"),
            )
            .select_from(source)
            .where(*self._read(time, recorded, as_of), *_only(ident, only))
            .subquery("label_times")
        )
        at = replace(time, expr=rows.c.t)

        # Epoch seconds as doubles: typed as an integer column, PostgreSQL would round a
        # slice edge with a fraction of a second (time_slice: 1500ms) to a whole second.
        kind = sa.Double() if predicted.kind == "epoch" else predicted.expr.type

        def bound(k: int) -> sa.ColumnElement:
            return sa.literal(predicted.bind(points[k]), kind)

        # opens: points[s] of the first such slice s; closes: points[s + 1] of the slice s
        # holding r. A row too late for every slice opens at the last point, after every
        # prediction of the windows.
        # A row whose time is no instant (bad) matures for every prediction, whatever these.
        within = _recorded_before(recorded, as_of)
        opens = bisected(at, [end + maturity.delay for end in points[1:]], bound, within)
        closes = bisected(at, points[1:-1], lambda k: bound(k + 1), within)
        matured = sa.case((rows.c.bad == 0, rows.c.value), else_=None)
        return sa.select(
            rows.c.id,
            rows.c.value,
            opens.label("opens"),
            closes.label("closes"),
            rows.c.bad,
            (1 - rows.c.bad).label("n_0"),
            matured.label("low_0"),
            matured.label("high_0"),
            rows.c.bad.label("bad_timestamp"),
        ).subquery("label_bounds")

    def _timed(self) -> tuple[sa.FromClause, sa.ColumnElement[Any], sa.ColumnElement[Any], TimeColumn | None]:
        """(source, id, valid value, time) to read the label rows from. SQLite evaluates an
        expression once per use, and its date-time text costs a strftime (and a Python call
        outside UTC) each time: there the time is computed once a row in a subquery, which
        LIMIT keeps SQLite from flattening into the statement that reads it."""
        time = self.time
        if time is None or time.kind != "sqlite":
            return self.table, self.id, self.valid_value, time
        rows = (
            sa.select(
                self.id.label("id"), self.valid_value.label("value"), time.expr.label("t"), time.stored.label("s")
            )
            .limit(-1)
            .subquery("label_rows")
        )
        return rows, rows.c.id, rows.c.value, replace(time, expr=rows.c.t, stored=rows.c.s)


class ReplayQueries:
    """The replay table: offline re-computations of served scores, joined by id.

    ``indexed``: the id column leads the primary key, a unique constraint or an index, so
    that PostgreSQL looks the window's ids up in it (``PredictionQueries._replayed``).
    """

    def __init__(self, source: ReplaySource, table: sa.Table):
        self.table = table
        self.id = table.c[source.columns.id]
        self.column = table.c[source.columns.score]
        self.score: sa.ColumnElement[float] = sa.cast(self.column, sa.Double())
        self.indexed = _indexed_by(table, source.columns.id)
