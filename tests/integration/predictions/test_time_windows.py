"""Window edges and timestamp kinds: half-open [start, end) whatever the column stores."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from exporter.config import parse_settings
from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.stores import Stores

AS_OF = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)  # windows: [11:00, 12:00) UTC


def _snapshot(url, column_type, values, schema=None, timezone_name="UTC"):
    engine = sa.create_engine(url)
    metadata = sa.MetaData(schema=schema)
    table = sa.Table(
        "predictions", metadata, sa.Column("id", sa.Integer), sa.Column("ts", column_type), sa.Column("p", sa.Double)
    )
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "ts": v, "p": 0.5} for i, v in enumerate(values)])
    engine.dispose()
    source = {"store": "s", "table": "predictions", "columns": {"id": "id", "timestamp": "ts", "score": "p"}}
    source.update({"schema": schema} if schema else {})
    settings = parse_settings(
        {
            "stores": {"s": {"url": url}},
            "models": [{"name": "m", "predictions": {**source, "timezone": timezone_name}, "windows": ["1h"]}],
        }
    )
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        return ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores).refresh(AS_OF)
    finally:
        stores.dispose()


def test_sqlite_text_in_any_format_respects_both_edges(tmp_path):
    url = f"sqlite:///{tmp_path}/s.sqlite"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE predictions (id INTEGER, ts DATETIME, p FLOAT)"))
        rows = [
            "2026-03-01 11:00:00",  # start, no fraction: in
            "2026-03-01T11:30:00",  # ISO 'T': in
            "2026-03-01 11:45:00.123456",  # microseconds: in, the newest
            "2026-03-01 13:40:00+02:00",  # offset, 11:40 UTC: in
            "2026-03-01 12:00:00",  # end: out
            "2026-03-01 10:59:59.999",  # before start: out
            "2026-03-01T12:30:00Z",  # after end: out
        ]
        for i, text in enumerate(rows):
            conn.execute(sa.text("INSERT INTO predictions VALUES (:i, :ts, 0.5)"), {"i": i, "ts": text})
    engine.dispose()
    settings = parse_settings(
        {
            "stores": {"s": {"url": url}},
            "models": [
                {
                    "name": "m",
                    "predictions": {
                        "store": "s",
                        "table": "predictions",
                        "columns": {"id": "id", "timestamp": "ts", "score": "p"},
                    },
                    "windows": ["1h"],
                }
            ],
        }
    )
    stores = Stores(settings.stores, settings.query_timeout)
    snap = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores).refresh(AS_OF)
    stores.dispose()
    assert snap.score_stats[0].predictions == 4
    assert snap.last_prediction_timestamp == pytest.approx(
        datetime(2026, 3, 1, 11, 45, 0, 123000, tzinfo=UTC).timestamp()
    )


def test_epoch_seconds_column(tmp_path):
    edges = [AS_OF.timestamp() - 3600, AS_OF.timestamp() - 1, AS_OF.timestamp(), AS_OF.timestamp() - 3600.001]
    snap = _snapshot(f"sqlite:///{tmp_path}/s.sqlite", sa.Double, edges)
    assert snap.score_stats[0].predictions == 2
    assert snap.last_prediction_timestamp == AS_OF.timestamp() - 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_naive_column_in_a_configured_time_zone(backend, tmp_path, request):
    paris = ZoneInfo("Europe/Paris")  # UTC+1 on 2026-03-01: [11:00, 12:00) UTC is [12:00, 13:00) in Paris
    local = [datetime(2026, 3, 1, h, m) for h, m in [(12, 0), (12, 59), (13, 0), (11, 59)]]
    url, schema = f"sqlite:///{tmp_path}/s.sqlite", None
    if backend == "postgresql":
        url, schema = request.getfixturevalue("postgres_schema")
    snap = _snapshot(url, sa.DateTime(timezone=False), local, schema, "Europe/Paris")
    assert snap.score_stats[0].predictions == 2
    newest = datetime(2026, 3, 1, 12, 59, tzinfo=paris)
    assert snap.last_prediction_timestamp == pytest.approx(newest.timestamp())


@pytest.mark.parametrize("key", ["primary key", "unique index", "none"])
def test_unique_ids_found_in_the_schema(tmp_path, key):
    from exporter.predictions.refresh import ModelRefresher

    url = f"sqlite:///{tmp_path}/s.sqlite"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE TABLE predictions (id INTEGER{' PRIMARY KEY' if key == 'primary key' else ''}, ts DATETIME, p FLOAT)"
            )
        )
        if key == "unique index":
            conn.execute(sa.text("CREATE UNIQUE INDEX ux_id ON predictions (id)"))
    engine.dispose()
    settings = parse_settings(
        {
            "stores": {"s": {"url": url}},
            "models": [
                {
                    "name": "m",
                    "predictions": {
                        "store": "s",
                        "table": "predictions",
                        "columns": {"id": "id", "timestamp": "ts", "score": "p"},
                    },
                }
            ],
        }
    )
    stores = Stores(settings.stores, settings.query_timeout)
    refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
    refresher.check_schema()
    assert refresher.predictions.queries().unique_ids is (key != "none")  # no duplicate search when unique
    stores.dispose()
