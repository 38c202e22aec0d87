"""The pushed-down queries are portable SQLAlchemy Core: they compile for PostgreSQL,
MySQL, DuckDB, SQLite and a distributed engine (Trino), and give the same numbers on the
three local engines."""

from __future__ import annotations

import dataclasses
import math
import re
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

from exporter.config import parse_settings
from exporter.predictions.queries import LabelQueries, PredictionQueries, ReplayQueries
from exporter.predictions.stores import TimeColumn
from tests.integration.predictions.test_refresh_metrics import AS_OF, load, make_data, refresh


def _dialects():
    import duckdb_sqlalchemy
    from trino.sqlalchemy.dialect import TrinoDialect

    return {
        "postgresql": postgresql.dialect(),
        "mysql": mysql.dialect(),
        "duckdb": duckdb_sqlalchemy.Dialect(),
        "sqlite": sqlite.dialect(),
        "trino": TrinoDialect(),
    }


def _statements(dialect_name: str) -> dict[str, sa.Select]:
    model = parse_settings(
        {
            "stores": {"s": {"url": "sqlite://"}},
            "models": [
                {
                    "name": "ctr",
                    "predictions": {
                        "store": "s",
                        "table": "p",
                        "columns": {"id": "id", "timestamp": "ts", "score": "score", "version": "v"},
                        "filter": {"model_name": "ctr"},
                    },
                    "labels": {
                        "store": "s",
                        "table": "l",
                        "columns": {"id": "id", "label": "y", "timestamp": "ts"},
                        "missing": "negative",
                    },
                    "replays": {"store": "s", "table": "r", "columns": {"id": "id", "score": "score"}},
                }
            ],
        }
    ).models[0]
    metadata = sa.MetaData()
    p = sa.Table(
        "p",
        metadata,
        sa.Column("id", sa.BigInteger),
        sa.Column("ts", sa.DateTime(timezone=True)),
        sa.Column("score", sa.Double),
        sa.Column("v", sa.String),
        sa.Column("model_name", sa.String),
    )
    label_table = sa.Table(
        "l",
        metadata,
        sa.Column("id", sa.BigInteger),
        sa.Column("y", sa.Integer),
        sa.Column("ts", sa.DateTime(timezone=True)),
    )
    r = sa.Table("r", metadata, sa.Column("id", sa.BigInteger), sa.Column("score", sa.Double))
    q = PredictionQueries(model, p, TimeColumn(p.c.ts, "aware", "UTC"), dialect_name)
    labels = LabelQueries(model.labels, label_table, TimeColumn(label_table.c.ts, "aware", "UTC"))
    replays = ReplayQueries(model.replays, r)
    start, end = AS_OF - timedelta(hours=1), AS_OF
    return {
        "histogram": q.histogram(start, end),
        "mode_count": q.mode_count(start, end, 6),
        "last_timestamp": q.last_timestamp(end, end + timedelta(minutes=1)),
        "serving_version": q.serving_version(end),
        "new_predictions": q.new_predictions(start, end, [0.01, 0.1, 1.0]),
        "online": q.online(labels, start, end, end),
        "replays": q.replays(replays, start, end),
    }


@pytest.mark.filterwarnings("ignore:Datatype DOUBLE does not support CAST on MySQL")
@pytest.mark.parametrize("dialect", ["postgresql", "mysql", "duckdb", "sqlite", "trino"])
def test_every_query_compiles(dialect):
    compiled = {name: str(stmt.compile(dialect=_dialects()[dialect])) for name, stmt in _statements(dialect).items()}
    for name, sql in compiled.items():
        assert sql.lstrip().upper().startswith(("SELECT", "WITH")), (name, sql[:80])
        assert re.search(r"\bln\(", sql.lower()) or name != "online", name  # natural log everywhere
        assert not re.search(r"\blog\(", sql.lower()), name  # LOG is base 10 on some engines
        assert "round(" not in sql.lower(), name  # rounding is floor(x + 0.5): PostgreSQL has no round(double, int)


def _close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if dataclasses.is_dataclass(a):
        return all(_close(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b


def test_the_three_local_engines_agree(tmp_path, postgres_schema):
    data = make_data(9, stores_nan=False)  # NULL scores: SQLite cannot store NaN
    pg_url, schema = postgres_schema
    stores = {
        "sqlite": (f"sqlite:///{tmp_path}/s.sqlite", None),
        "duckdb": (f"duckdb:///{tmp_path}/s.duckdb", None),
        "postgresql": (pg_url, schema),
    }
    snapshots = {}
    for name, (url, store_schema) in stores.items():
        load(sa.create_engine(url), store_schema, data, aware=False)
        snapshots[name] = refresh(url, store_schema, missing="negative")
    base = snapshots["postgresql"]
    for name, snap in snapshots.items():
        for part in ("score_stats", "online", "replays"):
            assert all(_close(a, b) for a, b in zip(getattr(snap, part), getattr(base, part), strict=False)), (
                name,
                part,
            )
        assert snap.counter == base.counter, name
