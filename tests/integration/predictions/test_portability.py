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
from exporter.predictions.queries import (
    DuplicateIds,
    LabelMaturity,
    LabelQueries,
    PredictionQueries,
    ReplayQueries,
    Windows,
)
from exporter.predictions.slices import boundaries
from exporter.predictions.stores import time_column
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


#: Timestamp column types: each dialect's ``time_column`` makes of them what it reads
#: (SQLite: date-time text for every non-number, "sqlite"; elsewhere "aware", "naive" or "epoch").
TIMESTAMP_TYPES = {
    "timestamptz": sa.DateTime(timezone=True),
    "timestamp": sa.DateTime(),
    "epoch-double": sa.Double(),
    "epoch-bigint": sa.BigInteger(),
    "text": sa.String(),  # SQLite only: text is no instant elsewhere
}


def _statements(
    dialect_name: str, timestamp: str = "timestamptz", replay_index: bool = False, zone: str = "UTC"
) -> tuple[str, dict[str, sa.Select]]:
    """(the ``TimeColumn`` kind, every pushed-down statement) of a model with predictions,
    labels and replays whose timestamps (predictions' and labels') have type
    ``TIMESTAMP_TYPES[timestamp]`` in time zone ``zone``; with ``replay_index`` the replay id
    is the replay table's primary key, which takes PostgreSQL's ``LATERAL`` lookup
    (``PredictionQueries.replays_by_lookup``)."""
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
                        "timezone": zone,
                    },
                    "labels": {
                        "store": "s",
                        "table": "l",
                        "columns": {"id": "id", "label": "y", "timestamp": "ts"},
                        "missing": "negative",
                        "timezone": zone,
                    },
                    "replays": {"store": "s", "table": "r", "columns": {"id": "id", "score": "score"}},
                }
            ],
        }
    ).models[0]
    metadata = sa.MetaData()
    ts_type = TIMESTAMP_TYPES[timestamp]
    p = sa.Table(
        "p",
        metadata,
        sa.Column("id", sa.BigInteger),
        sa.Column("ts", ts_type),
        sa.Column("score", sa.Double),
        sa.Column("v", sa.String),
        sa.Column("model_name", sa.String),
    )
    label_table = sa.Table(
        "l",
        metadata,
        sa.Column("id", sa.BigInteger),
        sa.Column("y", sa.Integer),
        sa.Column("ts", ts_type),
    )
    r = sa.Table("r", metadata, sa.Column("id", sa.BigInteger, primary_key=replay_index), sa.Column("score", sa.Double))
    time = time_column(p, "ts", model.predictions, dialect_name)
    q = PredictionQueries(model, p, time, dialect_name)
    labels = LabelQueries(model.labels, label_table, time_column(label_table, "ts", model.labels, dialect_name))
    replays = ReplayQueries(model.replays, r)
    start, end = AS_OF - timedelta(hours=1), AS_OF
    windows = Windows.ending(end, [timedelta(hours=1), timedelta(hours=24)])
    duplicates = DuplicateIds(((1,), (1, 2)))  # listed; DuplicateIds(None): searched in the query
    maturity = LabelMaturity(boundaries(windows.start, end, timedelta(minutes=5)), timedelta(hours=1))
    points = (end - timedelta(minutes=20), end - timedelta(minutes=15), end - timedelta(minutes=10), end)
    reads = ((points[0], points[2]), (points[2], points[3]))
    return time.kind, {
        "duplicate_search": q.duplicate_search(windows),
        "histogram": q.histogram(windows, duplicates),
        "mode_counts": q.mode_counts(windows, duplicates, 6),
        "last_timestamp": q.last_timestamp(end, end + timedelta(minutes=1)),
        "serving_version": q.serving_version(end),
        "new_predictions": q.new_predictions(start, end, [0.01, 0.1, 1.0]),
        "online": q.online(labels, windows, duplicates, end),
        "online_matured": q.online(labels, windows, duplicates, end, maturity),
        "replays": q.replays(replays, windows, duplicates),
        "histogram_searching_duplicates": q.histogram(windows, DuplicateIds(None)),
        # The statements of kept time slices: parts of a plan, the duplicate-id probe and
        # rows, and the rows of the duplicated ids added back per window.
        "sliced_histogram": q.sliced_histogram(points, reads, (7,)),
        "sliced_mode_counts": q.sliced_mode_counts(points, reads, (7,), 6, 128),
        "part_counts": q.part_counts(points, reads, (7,)),
        "sliced_online": q.sliced_online(labels, points, reads, end, maturity, exclude=(7,)),
        "sliced_replays": q.sliced_replays(replays, points, reads, (7,)),
        "duplicates_among": q.duplicates_among(windows.start, end, reads, (7,)),
        "duplicate_rows": q.duplicate_rows(points, windows.start, end, (7,)),
        "online_only": q.online(labels, windows, duplicates, end, maturity, only=(7,)),
        # The online accuracy as the refresh reads it: the label ids with several rows, the
        # other predictions joined to their one label row, those ids' predictions.
        "repeated_label_ids": labels.repeated_ids(windows, end, maturity),
        "online_one_to_one": q.online(labels, windows, duplicates, end, repeated=(7,)),
        "online_matured_one_to_one": q.online(labels, windows, duplicates, end, maturity, repeated=(7,)),
        "online_matured_apart": q.online(labels, windows, duplicates, end, maturity, repeated=(7,), apart=True),
        "replays_only": q.replays(replays, windows, duplicates, only=(7,)),
    }


#: (timestamp type, replay id indexed, time zone) per compiled variant
VARIANTS = [
    ("timestamptz", False, "UTC"),
    ("timestamp", True, "Europe/Oslo"),
    ("epoch-double", True, "UTC"),
    ("epoch-bigint", False, "UTC"),
    ("text", False, "UTC"),
    ("text", True, "Asia/Kathmandu"),
]


@pytest.mark.filterwarnings("ignore:Datatype DOUBLE does not support CAST on MySQL")
@pytest.mark.parametrize(
    ("dialect", "timestamp", "replay_index", "zone"),
    [
        (dialect, *variant)
        for dialect in ("postgresql", "mysql", "duckdb", "sqlite", "trino")
        for variant in VARIANTS
        if variant[0] != "text" or dialect == "sqlite"  # text is no instant elsewhere (stores.timestamp_types)
    ],
)
def test_every_query_compiles(dialect, timestamp, replay_index, zone):
    kind, statements = _statements(dialect, timestamp, replay_index, zone)
    if timestamp.startswith("epoch"):
        assert kind == "epoch"
    else:
        assert kind == ("sqlite" if dialect == "sqlite" else {"timestamptz": "aware", "timestamp": "naive"}[timestamp])
    compiled = {name: str(stmt.compile(dialect=_dialects()[dialect])) for name, stmt in statements.items()}
    for name, sql in compiled.items():
        assert sql.lstrip().upper().startswith(("SELECT", "WITH")), (name, sql[:80])
        assert re.search(r"\bln\(", sql.lower()) or "online" not in name, name  # natural log everywhere
        assert not re.search(r"\blog\(", sql.lower()), name  # LOG is base 10 on some engines
        # Rounding is grid_index / round_half_up_index (floor of a double): PostgreSQL has no round(double, int).
        assert "round(" not in sql.lower(), name
        # SQLite date-time text is normalised by strftime, and only there; outside UTC also by mlmon_wall_clock.
        assert ("strftime(" in sql.lower()) == (kind == "sqlite"), name
        assert ("mlmon_wall_clock(" in sql.lower()) == (kind == "sqlite" and zone != "UTC"), name
    # The replay id's index is used by a LATERAL lookup, on PostgreSQL only.
    assert (" LATERAL " in compiled["replays"].upper()) == (dialect == "postgresql" and replay_index)


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
