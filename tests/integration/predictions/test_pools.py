"""The refresh concurrency of `mlmon serve` and the connection pools agree (issue 13): each
store's pool holds one connection per model reading it (up to its `max_connections`), opens
no others, and a refresh waiting for one is a timeout only once its deadline has passed.
With 50 models on a pool of 5 (+ 10 overflow), overflow connections were opened and closed
all the time, resident memory grew, and refreshes counted `reason="timeout"` after waiting
30 s for a connection (docs/reliability.md)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from exporter.db import SQLITE_CACHE_KIB, PoolSize
from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.stores import Stores
from exporter.server.app import state_pool, store_pools
from tests.conftest import model_settings

AS_OF = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _fill(url: str, schema: str | None) -> None:
    engine = sa.create_engine(url)
    metadata = sa.MetaData(schema=schema)
    predictions = sa.Table(
        "predictions", metadata, sa.Column("id", sa.Integer), sa.Column("ts", sa.DateTime), sa.Column("p", sa.Double)
    )
    labels = sa.Table("labels", metadata, sa.Column("id", sa.Integer), sa.Column("y", sa.Integer))
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            predictions.insert(),
            [
                {"id": i, "ts": (AS_OF - timedelta(minutes=i % 50)).replace(tzinfo=None), "p": i / 100}
                for i in range(100)
            ],
        )
        conn.execute(labels.insert(), [{"id": i, "y": i % 2} for i in range(100)])
    engine.dispose()


def _models(settings, count: int):
    """``settings`` with ``count`` copies of its model, named m0, m1..."""
    model = settings.models[0]
    return settings.model_copy(update={"models": [model.model_copy(update={"name": f"m{i}"}) for i in range(count)]})


def test_concurrent_refreshes_of_many_models_never_open_and_close_connections(store):
    """8 models refreshed at once, 4 times: the store's pool opens at most 8 connections and
    closes none (on main: 5 pooled, 3 overflow opened and closed every round), every source
    up; a SQLite connection has a SQLITE_CACHE_KIB page cache (SQLite's default is 2 MiB)."""
    url, schema, dialect = store
    _fill(url, schema)
    settings = _models(model_settings(url, schema), 8)
    pools = store_pools(settings)
    # The deadline (worst_case_duration): 12 statements (9 for the predictions, 3 for the
    # labels) and 2 connections of 30 s each.
    assert pools == {"s": PoolSize(8, (12 + 2) * 30.0)}
    stores = Stores(settings.stores, settings.query_timeout, pools)
    opened, closed = [], []
    engine = stores.engine("s")
    sa.event.listen(engine, "connect", lambda *_: opened.append(1))
    sa.event.listen(engine, "close", lambda *_: closed.append(1))
    refreshers = [
        ModelRefresher(m, f"models[{i}]", settings.refresh_policy, stores) for i, m in enumerate(settings.models)
    ]
    snapshots = []

    def refresh(refresher: ModelRefresher, start: threading.Barrier) -> None:
        start.wait()
        snapshots.append(refresher.refresh(AS_OF))

    try:
        for _ in range(4):
            start = threading.Barrier(len(refreshers))
            threads = [threading.Thread(target=refresh, args=(r, start)) for r in refreshers]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
        closed_while_refreshing = len(closed)
        if dialect == "sqlite":
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -SQLITE_CACHE_KIB
    finally:
        stores.dispose()
    assert len(snapshots) == 4 * 8
    assert all(s.up for snap in snapshots for s in snap.sources.values())
    assert all(count == 0 for snap in snapshots for count in snap.errors.values())
    assert 1 <= len(opened) <= 8 and closed_while_refreshing == 0, (len(opened), closed_while_refreshing)


@pytest.mark.long
def test_a_refresh_waiting_for_a_connection_is_a_timeout_only_past_its_deadline(store):
    """``max_connections: 1``, a deadline of 2 s: while the test holds the one connection
    for 1 s, a refresh waits for it and succeeds without an error; held for 8 s (past both
    sources' 2 s waits, with room for a loaded machine), the refresh's wait ends at its
    deadline as ``reason="timeout"``."""
    url, schema, _ = store
    _fill(url, schema)
    settings = model_settings(url, schema, refresh_timeout="2s")
    settings = settings.model_copy(
        update={"stores": {"s": settings.stores["s"].model_copy(update={"max_connections": 1})}}
    )
    pools = store_pools(settings)
    assert pools == {"s": PoolSize(1, 2.0)}
    stores = Stores(settings.stores, settings.query_timeout, pools)
    refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
    try:
        refresher.refresh(AS_OF)  # reflects the tables
        for held in (1.0, 8.0):
            result: list = []

            def refresh(out: list = result) -> None:
                out.append(refresher.refresh(AS_OF))
                out.append(time.monotonic())  # when the refresh returned

            with stores.engine("s").connect():
                worker = threading.Thread(target=refresh)
                started = time.monotonic()
                worker.start()
                time.sleep(held)
            worker.join(timeout=30)
            snapshot, returned = result
            if held == 1.0:
                assert returned - started >= 1.0  # it waited for the connection ...
                assert all(s.up for s in snapshot.sources.values()), snapshot.sources
                assert all(count == 0 for count in snapshot.errors.values()), snapshot.errors
        assert {key: n for key, n in snapshot.errors.items() if n} == {
            ("predictions", "timeout"): 1,
            ("labels", "timeout"): 1,
        }
    finally:
        stores.dispose()


def test_pools_are_sized_by_the_models_that_use_each_database():
    """One connection per model reading a store, at most its ``max_connections`` (default
    10); the state database's users are the API's 4 threads, the training refresh and each
    model with features; a checkout waits up to the longest deadline of the refreshes."""
    models = [
        *({"name": f"a{i}", "store": "a"} for i in range(3)),
        *({"name": f"b{i}", "store": "b"} for i in range(12)),
        {"name": "c0", "store": "c"},
        {"name": "c1", "store": "c", "features": True},
        {"name": "c2", "store": "c", "features": True},
    ]
    config = {
        "refresh_interval": "10s",
        "query_timeout": "5s",
        "stores": {
            "a": {"url": "sqlite:///a.db"},
            "b": {"url": "sqlite:///b.db"},
            "c": {"url": "sqlite:///c.db", "max_connections": 2},
            "unused": {"url": "sqlite:///d.db"},
        },
        "models": [
            {
                "name": m["name"],
                "predictions": {
                    "store": m["store"],
                    "table": "predictions",
                    "columns": {"id": "id", "timestamp": "ts", "score": "p"},
                },
                "windows": ["1h"],
                **({"features": {"numeric": ["x"]}} if m.get("features") else {}),
            }
            for m in models
        ],
    }
    from exporter.config import parse_settings

    settings = parse_settings(config)
    # Deadlines by hand (worst_case_queries): 9 statements + 1 connection for predictions
    # alone, 9 + 2 statements and 2 connections with features; 5 s each, at least 10 s + 5 s.
    plain, featured = (9 + 1) * 5.0, (9 + 2 + 2) * 5.0
    assert store_pools(settings) == {
        "a": PoolSize(3, plain),
        "b": PoolSize(10, plain),
        "c": PoolSize(2, featured),
    }
    assert state_pool(settings) == PoolSize(4 + 1 + 2, featured)
