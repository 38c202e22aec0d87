"""The serving-time features of a model's predictions: a source beside those of
``sources.py`` that counts, inside the database, what training/serving skew needs
(``exporter.training.skew``) for every window in one pass over the longest one.

The features are columns of the prediction table, or of a table joined to it by id
(``features`` in the config, docs/configuration.md). Which rows: every prediction row
of the window that the predictions' filters keep, whatever its score (the features were
served all the same), and, when the predictions have a version column, only the rows of
the version that served the newest prediction before the refresh time: they are
compared with that version's training run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from exporter.config import ALL_COLUMNS, ModelConfig, TableSource, TrainingSettings
from exporter.durations import parse_duration
from exporter.predictions.queries import is_number
from exporter.predictions.sources import JoinedSource, PredictionsSource, decode_serving_version
from exporter.predictions.stores import NUMBER_TYPES, Stores, reflect_table
from exporter.reasons import SchemaError
from exporter.training.schema import OTHER, FeatureSummary, TrainingRun
from exporter.training.skew import Bins, FeatureSkew, ServingCounts, bins, feature_skew

log = logging.getLogger(__name__)

#: The training run to compare with: ``(version, as_of)`` -> that version's run (``version``
#: given) or the newest run trained by ``as_of`` (``None``); ``None`` when there is none.
References = Callable[[str | None, datetime], TrainingRun | None]
#: The most aggregate columns one statement computes: PostgreSQL allows 1664 per SELECT, and
#: features beyond the budget go to a further pass over the same rows.
COLUMN_BUDGET = 1000
#: Numbers beyond the largest double are ±inf; NaN fails both comparisons on every engine
#: (PostgreSQL and DuckDB order it above every number).
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
    table); ``over_limit`` counts the configured features left out."""

    features: tuple[Feature, ...]
    source: sa.FromClause
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
    if isinstance(column.type, sa.String):
        return column
    return sa.cast(column, sa.String())


def _present(dialect: str, column: sa.ColumnElement) -> sa.ColumnElement:
    """True for a usable numeric value: a finite number (not NULL, NaN, ±inf or text)."""
    value: sa.ColumnElement[float] = sa.cast(column, sa.Double())
    conditions = [value >= -_DOUBLE_MAX, value <= _DOUBLE_MAX]
    number = is_number(dialect, column)
    if number is not None:
        conditions.insert(0, number)  # first: SQLite's CAST('abc' AS REAL) is 0.0
    return sa.and_(*conditions)


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
            ids = self.predictions.joinable_ids(config.id, self.key_path)
            table = reflect_table(engine, where, {"id": config.id}, self.key_path, None, ids)
            source = predictions.table.outerjoin(table, predictions.id == table.c[config.id])
            known = {config.id}
        known |= set(config.exclude)
        problems, features = [], []
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
        return FeatureQueries(tuple(features[:cap]), source, max(0, len(features) - cap))

    def _serving_version(self, conn: Connection, as_of: datetime) -> tuple[str | None, bool]:
        """(version, whether it can name a run) of the newest prediction before ``as_of``."""
        q = self.predictions.queries()
        if q.version is None:
            return None, True
        version, problem = decode_serving_version(conn.execute(q.serving_version(as_of)).scalar())
        if problem is not None and problem not in self._logged:  # once, not every refresh
            log.warning("model %s: serving version is %s; feature skew is not computed", self.model.name, problem)
            self._logged.add(problem)
        return version, problem is None

    def _statement(
        self, features: list[tuple[Feature, Bins]], as_of: datetime, version: str | None
    ) -> tuple[sa.Select, list[str]]:
        """One pass over the longest window's rows, every window's aggregates as conditional
        counts and sums (column names in the returned order).

        Each row's window flags, usable numeric values and category texts are computed once
        in a subquery that the aggregates read: SQLite evaluates an expression at every use,
        and its timestamp expression (``stores.TimeColumn``) is costly. ``OFFSET 0`` keeps
        SQLite from flattening it back into the aggregates (its flattening rule 14).
        """
        q = self.predictions.queries()
        longest = max(parse_duration(w) for w in self.model.windows)
        conditions = [q.time.between(as_of - longest, as_of), *q.filters]
        if version is not None:
            assert q.version is not None  # a version is read only from a version column
            column = q.version if isinstance(q.version.type, sa.String) else sa.cast(q.version, sa.String())
            conditions.append(column == version)
        flags = [
            sa.case((q.time.between(as_of - parse_duration(window), as_of), 1), else_=0).label(f"w{w}")
            for w, window in enumerate(self.model.windows)
        ]
        values = []
        for f, (feature, _) in enumerate(features):
            if feature.kind == "numeric":
                present = _present(q.dialect, feature.column)
                values.append(sa.case((present, sa.cast(feature.column, sa.Double()))).label(f"v{f}"))
            else:
                values.append(_as_text(feature.column).label(f"v{f}"))
        rows = (
            sa.select(*flags, *values)
            .select_from(self.queries().source)
            .where(*conditions)
            .offset(0)
            .subquery("feature_rows")
        )
        columns: list[sa.ColumnElement] = []
        for w in range(len(self.model.windows)):
            inside = rows.c[f"w{w}"] == 1
            columns.append(sa.func.count(sa.case((inside, 1))).label(f"w{w}_rows"))
            for f, (feature, plan) in enumerate(features):
                prefix, value = f"w{w}_f{f}", rows.c[f"v{f}"]
                # NULL is a missing value: count() skips it, and every comparison with it fails.
                columns.append(sa.func.count(sa.case((inside, value))).label(f"{prefix}_present"))
                if feature.kind == "numeric":
                    shifted = value - sa.literal(plan.shift, sa.Double())
                    columns += [
                        sa.func.sum(sa.case((inside, shifted))).label(f"{prefix}_sum"),
                        sa.func.sum(sa.case((inside, shifted * shifted))).label(f"{prefix}_squares"),
                    ]
                    columns += [
                        sa.func.count(sa.case((sa.and_(inside, value <= sa.literal(edge, sa.Double())), 1))).label(
                            f"{prefix}_le{e}"
                        )
                        for e, edge in enumerate(plan.edges)
                    ]
                else:
                    columns += [
                        sa.func.count(sa.case((sa.and_(inside, value == category), 1))).label(f"{prefix}_c{c}")
                        for c, category in enumerate(plan.categories)
                    ]
        return sa.select(*columns), [c.name for c in columns]

    def _chunks(self, planned: list[tuple[Feature, Bins]]) -> list[list[tuple[Feature, Bins]]]:
        """The features split into passes of at most ``COLUMN_BUDGET`` aggregates."""
        windows = len(self.model.windows)
        chunks: list[list[tuple[Feature, Bins]]] = [[]]
        used = windows
        for feature, plan in planned:
            cost = windows * (3 + len(plan.edges) + len(plan.categories))
            if chunks[-1] and used + cost > COLUMN_BUDGET:
                chunks.append([])
                used = windows
            chunks[-1].append((feature, plan))
            used += cost
        return chunks

    def run(self, as_of: datetime) -> FeatureValues:
        queries = self.queries()
        with self._connection() as conn:
            version, nameable = self._serving_version(conn, as_of)
            run = None
            if self.references is not None and nameable:
                run = self.references(version, as_of)
            summaries: dict[str, FeatureSummary] = {} if run is None else {f.name: f for f in run.features}
            planned = [(f, bins(summaries.get(f.name), f.kind, self.limits.max_categories)) for f in queries.features]
            counts: dict[tuple[int, str], ServingCounts] = {}
            for chunk in self._chunks(planned):
                statement, names = self._statement(chunk, as_of, version if nameable else None)
                row: dict[str, Any] = dict(zip(names, conn.execute(statement).one(), strict=True))
                for w in range(len(self.model.windows)):
                    rows = int(row[f"w{w}_rows"] or 0)
                    for f, (feature, plan) in enumerate(chunk):
                        counts[w, feature.name] = _counts(row, f"w{w}_f{f}", rows, feature.kind, plan)
        skews = []
        over = {"feature": queries.over_limit, "category": 0}
        for w, window in enumerate(self.model.windows):
            for feature, plan in planned:
                summary = summaries.get(feature.name)
                skews.append(feature_skew(window, feature.name, feature.kind, summary, plan, counts[w, feature.name]))
        for feature, plan in planned:
            summary = summaries.get(feature.name)
            if summary is not None and summary.kind == "categorical":
                listed = len([c for c in summary.categories if c != OTHER])
                over["category"] += max(0, listed - len(plan.categories))
        return FeatureValues(tuple(skews), None if run is None else run.version, over)


def _counts(row: dict[str, Any], prefix: str, rows: int, kind: str, plan: Bins) -> ServingCounts:
    """A feature's ``ServingCounts`` from the columns of ``FeaturesSource._statement``."""
    present = int(row[f"{prefix}_present"] or 0)
    if kind == "categorical":
        listed = tuple(int(row[f"{prefix}_c{c}"] or 0) for c in range(len(plan.categories)))
        return ServingCounts(rows, rows - present, category_counts=listed, unlisted=present - sum(listed))
    cumulative = [int(row[f"{prefix}_le{e}"] or 0) for e in range(len(plan.edges))] + [present]
    per_bin = tuple(b - a for a, b in zip([0, *cumulative], cumulative, strict=False))
    return ServingCounts(
        rows,
        rows - present,
        shifted_sum=float(row[f"{prefix}_sum"] or 0.0),
        shifted_squares=float(row[f"{prefix}_squares"] or 0.0),
        bin_counts=per_bin,
    )
