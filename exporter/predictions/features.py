"""The serving-time features of a model's predictions: a source beside those of
``sources.py`` that counts, inside the database, what training/serving skew needs
(``exporter.training.skew``) for every window and feature in one statement.

The features are columns of the prediction table, or of a table joined to it by id
(``features`` in the config, docs/configuration.md). Which rows: every prediction row
of the window that the predictions' filters keep, whatever its score (the features were
served all the same), and, when the predictions have a version column, only the rows of
the version that served the newest prediction before the refresh time: they are
compared with that version's training run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from exporter.config import ALL_COLUMNS, ModelConfig, TableSource, TrainingSettings
from exporter.durations import parse_duration
from exporter.predictions.queries import is_number, square
from exporter.predictions.sources import JoinedSource, PredictionsSource, decode_serving_version
from exporter.predictions.stores import NUMBER_TYPES, Stores, reflect_table
from exporter.reasons import SchemaError
from exporter.training.schema import OTHER, FeatureSummary, TrainingRun
from exporter.training.skew import MOMENT_BOUND, Bins, FeatureSkew, ServingCounts, bins, feature_skew

log = logging.getLogger(__name__)

#: The training run to compare with: ``(version, as_of)`` -> that version's run (``version``
#: given) or the newest run trained by ``as_of`` (``None``); ``None`` when there is none.
References = Callable[[str | None, datetime], TrainingRun | None]
#: Numbers beyond the largest double are ±inf; NaN fails at least one of the two comparisons
#: on every engine (PostgreSQL and DuckDB order it above every number).
_DOUBLE_MAX = 1.7976931348623157e308
#: Column types a categorical feature may have (compared as text).
CATEGORICAL_TYPES = (sa.String, sa.Boolean, sa.Integer)


@dataclass(frozen=True)
class Feature:
    """One configured feature: its name (the column), kind and the column read."""

    name: str
    kind: str
    column: sa.ColumnElement


@dataclass(frozen=True)
class FeatureQueries:
    """The reflected feature columns (at most ``training.max_features``, by name) and the
    FROM clause they are read from (the prediction table, or it joined to the feature
    table), and those tables; ``over_limit`` counts the configured features left out."""

    features: tuple[Feature, ...]
    source: sa.FromClause
    tables: tuple[sa.Table, ...]
    over_limit: int


@dataclass(frozen=True)
class FeatureValues:
    """What one read of the features gives: the skew of each (window, feature), window
    by window in config order then feature by name; the training version compared with
    (``None``: no training run); the features and categories not exported by the caps."""

    skews: tuple[FeatureSkew, ...]
    reference_version: str | None
    over_limit: dict[str, int]


def _as_text(column: sa.ColumnElement) -> sa.ColumnElement:
    """A categorical value as the text the training client counts (``str`` of the value):
    booleans as ``True``/``False``, integers in decimal."""
    if isinstance(column.type, sa.Boolean):
        return sa.case((column == sa.true(), "True"), (column == sa.false(), "False"), else_=None)
    if isinstance(column.type, sa.String) and not isinstance(column.type, sa.Enum):
        return column
    # An enum compared with a category that is not one of its labels raises on PostgreSQL.
    return sa.cast(column, sa.String())


def _present(dialect: str, column: sa.ColumnElement) -> sa.ColumnElement:
    """True for a usable numeric value: a finite number (not NULL, NaN, ±inf or text, nor
    past the double range: PostgreSQL's numeric holds 1e400, which it refuses to cast)."""
    value: sa.ColumnElement[Any] = sa.cast(column, sa.Double())
    bound: sa.ColumnElement[Any] = sa.literal(_DOUBLE_MAX, sa.Double())
    if dialect == "postgresql" and isinstance(column.type, sa.Numeric) and not isinstance(column.type, sa.Float):
        # Compared as numeric: the cast (or a comparison with a double) would raise for the
        # whole statement.
        value, bound = column, sa.literal(Decimal(repr(_DOUBLE_MAX)), sa.Numeric())
    conditions = [value >= -bound, value <= bound]
    number = is_number(dialect, column)
    if number is not None:
        conditions.insert(0, number)  # first: SQLite's CAST('abc' AS REAL) is 0.0
    return sa.and_(*conditions)


def _cleaned(dialect: str, feature: Feature) -> sa.ColumnElement:
    """A feature's value as it is counted: a numeric one as a double, NULL when missing
    (``_present``); a categorical one as text (``_as_text``)."""
    if feature.kind == "numeric":
        return sa.case((_present(dialect, feature.column), sa.cast(feature.column, sa.Double())))
    return _as_text(feature.column)


def _bin(dialect: str, value: sa.ColumnElement, edges: tuple[float, ...]) -> sa.ColumnElement:
    """The bin of a present ``value`` (a double) among ``edges`` (sorted, distinct upper
    edges: bins (-inf, e0], (e0, e1], ..., (e_last, +inf)): the number of edges below it.

    PostgreSQL: ``width_bucket(-value, [-e_last, ..., -e0])`` counts the thresholds ``<=``
    its operand (a binary search), i.e. the edges ``>= value``; the bin is the rest. The
    negation keeps equality on the upper edge (width_bucket's buckets include their lower
    bound) and is exact in floating point. Elsewhere: a CASE that bisects the edges, so a
    row costs log2(bins) comparisons and the statement grows by one WHEN per edge, each
    naming the value column once.
    """
    if not edges:
        return sa.literal(0)
    if dialect == "postgresql":
        thresholds: sa.ColumnElement[Any] = sa.literal([-e for e in reversed(edges)], postgresql.ARRAY(sa.Double()))
        return len(edges) - sa.func.width_bucket(-value, thresholds, type_=sa.Integer())

    def bisect(lo: int, hi: int) -> sa.ColumnElement:
        # The edges below value are at least lo and at most hi (value <= edges[hi] when hi < len).
        if lo == hi:
            return sa.literal_column(str(lo), sa.Integer())
        mid = (lo + hi) // 2
        return sa.case((value <= _exact_double(edges[mid]), bisect(lo, mid)), else_=bisect(mid + 1, hi))

    return bisect(0, len(edges))


def _exact_double(x: float) -> sa.ColumnElement:
    """The finite double ``x`` as SQL text that reads back as exactly ``x``, with no bound
    parameter: its integer mantissa cast to a double, scaled by powers of two of at most
    2^62 (each product or quotient exact, as the result is representable).

    Not parameters: SQLite prepares a statement in time quadratic in its parameters (200
    features x 200 edges took 21 s) and its default build takes at most 32,766. Not decimal
    literals: SQLite 3.40 reads some shortest round-trip decimals (``repr``) one step off,
    mostly of extreme magnitude (110 of 20,000 random bit patterns), which would move an edge."""
    mantissa, exponent = math.frexp(x)
    m, e = int(mantissa * 2**53), exponent - 53  # x = m * 2**e exactly
    while m and m % 2 == 0:
        m, e = m // 2, e + 1
    text = f"CAST({m} AS DOUBLE)"
    while e:
        step = max(-62, min(62, e))
        text = f"({text} {'*' if step > 0 else '/'} {2 ** abs(step)})"
        e -= step
    return sa.literal_column(text, sa.Double())


def _category(dialect: str, value: sa.ColumnElement, categories: tuple[str, ...]) -> sa.ColumnElement:
    """The position of a present ``value`` (text) in ``categories``, ``len(categories)`` when
    it is none of them. PostgreSQL: ``array_position`` over one array parameter (its
    protocol takes at most 65,535 parameters a statement: 150 features of 500 categories
    each, one parameter per category, failed every refresh). Elsewhere: one WHEN per category."""
    if not categories:
        return sa.literal_column("0", sa.Integer())
    if dialect == "postgresql":
        listed = sa.literal(list(categories), postgresql.ARRAY(sa.Text()))
        position = sa.func.array_position(listed, sa.cast(value, sa.Text()), type_=sa.Integer())
        return sa.func.coalesce(position - 1, len(categories))
    return sa.case(*((value == category, c) for c, category in enumerate(categories)), else_=len(categories))


class FeaturesSource(JoinedSource[FeatureQueries, FeatureValues]):
    """The serving-time features, per window, against the serving version's training run."""

    name = "features"

    def __init__(
        self,
        model: ModelConfig,
        key_path: str,
        stores: Stores,
        query_timeout: timedelta,
        staleness: timedelta,
        predictions: PredictionsSource,
        limits: TrainingSettings,
        references: References | None,
    ):
        """``limits``: the caps on features and categories; ``references``: where training
        runs are read (``None``: compare with nothing, e.g. ``check-config``)."""
        super().__init__(model, key_path, stores, query_timeout, staleness, predictions)
        self.limits = limits
        self.references = references
        self._logged: set[str] = set()

    def _reflect(self) -> FeatureQueries:
        config = self.model.features
        assert config is not None  # built only for a model with features
        predictions = self.predictions.queries()
        known = {name for name in self.model.predictions.columns.model_dump().values() if name is not None}
        known |= set(self.model.predictions.filter)
        source: sa.FromClause
        if config.table is None:
            table = source = predictions.table
        else:
            assert config.id is not None  # the config gives table and id together
            engine = self.stores.engine(self.model.predictions.store)
            where = TableSource(store=self.model.predictions.store, table=config.table, db_schema=config.db_schema)
            ids = self.predictions.joinable_ids(config.id, f"{self.key_path}.id")
            table = reflect_table(engine, where, {"id": config.id}, self.key_path, None, ids)
            source = predictions.table.outerjoin(table, predictions.id == table.c[config.id])
            known = {config.id}
        known |= set(config.exclude)
        # A misspelt exclude would silently leave its column among the features.
        problems = [
            f"{self.key_path}.exclude: column {name!r} does not exist in table {table.name!r} "
            f"(columns: {', '.join(table.c.keys())})"
            for name in config.exclude
            if name not in table.c
        ]
        features = []
        for kind, types, expected in (
            ("numeric", NUMBER_TYPES, "a number"),
            ("categorical", CATEGORICAL_TYPES, "text, a boolean or an integer"),
        ):
            names = getattr(config, kind)
            if names == ALL_COLUMNS:
                # A column the other kind declares (or, with both ``all``, a number) is not this kind's.
                other = config.categorical if kind == "numeric" else config.numeric
                taken = known | (set() if other == ALL_COLUMNS else set(other))
                names = [c.name for c in table.c if c.name not in taken and isinstance(c.type, types)]
                if kind == "categorical" and other == ALL_COLUMNS:
                    names = [n for n in names if not isinstance(table.c[n].type, NUMBER_TYPES)]
            for name in names:
                if name not in table.c:
                    problems.append(
                        f"{self.key_path}.{kind}: column {name!r} does not exist in table {table.name!r} "
                        f"(columns: {', '.join(table.c.keys())})"
                    )
                elif not isinstance(table.c[name].type, types):
                    problems.append(
                        f"{self.key_path}.{kind}: column {name!r} of table {table.name!r} has type "
                        f"{table.c[name].type}; expected {expected}"
                    )
                else:
                    features.append(Feature(name, kind, table.c[name]))
        if problems:
            raise SchemaError(*problems)
        features.sort(key=lambda f: f.name)
        cap = self.limits.max_features
        tables = (predictions.table,) if table is predictions.table else (predictions.table, table)
        return FeatureQueries(tuple(features[:cap]), source, tables, max(0, len(features) - cap))

    def _serving_version(self, conn: Connection, as_of: datetime) -> tuple[str | None, bool]:
        """(version, whether it can name a run) of the newest prediction before ``as_of``."""
        q = self.predictions.queries()
        if q.version is None:
            return None, True
        version, problem = decode_serving_version(conn.execute(q.serving_version(as_of)).scalar())
        if version is None:  # a NULL version (or no row) names no run: comparing all versions would mix them
            problem = "NULL"
        if problem is not None and problem not in self._logged:  # once, not every refresh
            log.warning("model %s: serving version is %s; feature skew is not computed", self.model.name, problem)
            self._logged.add(problem)
        return version, problem is None

    def _statement(self, features: list[tuple[Feature, Bins]], as_of: datetime, version: str | None) -> sa.Select:
        """Every window's counts of every feature in one statement: per feature, one pass
        over the longest window's rows, each row keyed by (``wkey``: the rank of the
        shortest window holding it, windows by duration; ``key``: its bin, listed category
        or -1 when missing), grouped with count, Σ(x - shift), Σ(x - shift)² and the count of
        values summed (those within ``MOMENT_BOUND``). The feature's cleaned value
        (``_cleaned``) is computed once per row in a subquery and binned by ``_bin``, so the
        statement grows by a few dozen characters per bin or category, not by the cleaning
        expression at each (17x smaller, 5x to 10x faster at 200 bins, docs/performance.md).

        Rows (``feature``, ``wkey``, ``key``, ``n``, ``s1``, ``s2``, ``m``), at most windows x (bins
        or categories + 2) per feature. A few aggregates per row and feature, grouped: far
        cheaper than one conditional aggregate per (window, bin) (9x the prediction refresh
        at 1e6 rows on PostgreSQL, docs/performance.md). Keys are computed below the GROUP
        BY, as in ``queries``: PostgreSQL does not match GROUP BY expressions with parameters.
        """
        q = self.predictions.queries()
        by_duration = sorted(self.model.windows, key=parse_duration)
        conditions = [q.time.between(as_of - parse_duration(by_duration[-1]), as_of), *q.filters]
        if version is not None:
            assert q.version is not None  # a version is read only from a version column
            # Compared in the form serving_version reads it: bytes on SQLite and for binary
            # columns (PostgreSQL casts bytea to hex text, which never equals the version).
            if q.dialect == "sqlite" or isinstance(q.version.type, sa.LargeBinary):
                blob = sa.cast(q.version, sa.LargeBinary())
                conditions.append(blob == sa.literal(version.encode(), sa.LargeBinary()))
            else:
                column = q.version if isinstance(q.version.type, sa.String) else sa.cast(q.version, sa.String())
                conditions.append(column == version)
        # Windows end at as_of, so they are nested: the shortest holding a row ranks it.
        shorter = [(q.time.between(as_of - parse_duration(w), as_of), rank) for rank, w in enumerate(by_duration[:-1])]
        last = sa.literal(len(by_duration) - 1)
        wkey = sa.case(*shorter, else_=last) if shorter else last  # a CASE needs a WHEN
        parts = []
        for f, (feature, plan) in enumerate(features):
            # The cleaned value once per row, in a subquery: the bin key, the moments and
            # the missing test read its column instead of repeating the expression.
            # Kept apart on SQLite, which would paste the expressions back at every use (4x
            # the program at 200 bins).
            select = q.unflattened(
                sa.select(wkey.label("wkey"), _cleaned(q.dialect, feature).label("value"))
                .select_from(self.queries().source)
                .where(*conditions)
            )
            cleaned = select.subquery(f"cleaned{f}")
            value = cleaned.c.value
            shifted: sa.ColumnElement[Any]
            if feature.kind == "numeric":
                key = sa.case((value.is_(None), -1), else_=_bin(q.dialect, value, plan.edges))
                # Only values within MOMENT_BOUND are summed: their squares cannot overflow.
                bounded = sa.func.abs(value) <= sa.literal(MOMENT_BOUND, sa.Double())
                shifted = sa.case((bounded, value - sa.literal(plan.shift, sa.Double())))
            else:
                key = sa.case((value.is_(None), -1), else_=_category(q.dialect, value, plan.categories))
                shifted = sa.null()
            parts.append(
                sa.select(
                    sa.literal(f).label("feature"),
                    cleaned.c.wkey,
                    key.label("key"),
                    sa.cast(shifted, sa.Double()).label("x"),
                ).select_from(cleaned)
            )
        keyed = sa.union_all(*parts).subquery("keyed")
        return sa.select(
            keyed.c.feature,
            keyed.c.wkey,
            keyed.c.key,
            sa.func.count().label("n"),
            sa.func.sum(keyed.c.x).label("s1"),
            sa.func.sum(square(keyed.c.x)).label("s2"),
            sa.func.count(keyed.c.x).label("m"),
        ).group_by(keyed.c.feature, keyed.c.wkey, keyed.c.key)

    def run(self, as_of: datetime) -> FeatureValues:
        queries = self.queries()
        with self._connection(*queries.tables) as conn:
            version, nameable = self._serving_version(conn, as_of)
            run = None
            if self.references is not None and nameable:
                run = self.references(version, as_of)
            summaries: dict[str, FeatureSummary] = {} if run is None else {f.name: f for f in run.features}
            planned = [(f, bins(summaries.get(f.name), f.kind, self.limits.max_categories)) for f in queries.features]
            groups = (
                conn.execute(self._statement(planned, as_of, version if nameable else None)).all() if planned else []
            )
        by_duration = sorted(self.model.windows, key=parse_duration)
        by_feature: dict[int, list[Any]] = {}
        for g in groups:
            by_feature.setdefault(int(g.feature), []).append(g)
        counts = {
            (window, feature.name): _counts(
                [g for g in by_feature.get(f, []) if g.wkey <= by_duration.index(window)], feature.kind, plan
            )
            for window in self.model.windows
            for f, (feature, plan) in enumerate(planned)
        }
        skews = []
        over = {"feature": queries.over_limit, "category": 0}
        for window in self.model.windows:
            for feature, plan in planned:
                summary = summaries.get(feature.name)
                skews.append(
                    feature_skew(window, feature.name, feature.kind, summary, plan, counts[window, feature.name])
                )
        for feature, plan in planned:
            summary = summaries.get(feature.name)
            if feature.kind == "categorical" and summary is not None and summary.kind == "categorical":
                listed = len([c for c in summary.categories if c != OTHER])
                over["category"] += max(0, listed - len(plan.categories))
        return FeatureValues(tuple(skews), None if run is None else run.version, over)


def _counts(groups: list[Any], kind: str, plan: Bins) -> ServingCounts:
    """A feature's ``ServingCounts`` in one window from its rows of ``FeaturesSource._statement``
    (those of the windows it holds)."""
    per_key: dict[int, int] = {}
    for g in groups:
        per_key[int(g.key)] = per_key.get(int(g.key), 0) + int(g.n)
    rows, missing = sum(per_key.values()), per_key.get(-1, 0)
    if kind == "categorical":
        listed = tuple(per_key.get(c, 0) for c in range(len(plan.categories)))
        return ServingCounts(rows, missing, category_counts=listed, unlisted=per_key.get(len(plan.categories), 0))
    return ServingCounts(
        rows,
        missing,
        shifted_sum=math.fsum(float(g.s1) for g in groups if g.s1 is not None),
        shifted_squares=math.fsum(float(g.s2) for g in groups if g.s2 is not None),
        moment_rows=sum(int(g.m) for g in groups),
        bin_counts=tuple(per_key.get(b, 0) for b in range(len(plan.edges) + 1)),
    )
