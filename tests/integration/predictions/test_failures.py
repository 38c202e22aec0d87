"""Failures are data: a failing source flips mlmon_source_up to 0, counts the error by
reason, keeps its last values for the staleness period, then drops them; nothing raises."""

from __future__ import annotations

import math
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from exporter.config import parse_settings
from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.stores import Stores
from exporter.reasons import classify_error
from tests.conftest import model_settings, stalled_on_a_lock, statements_by_source, table_locked, waiting_on_a_lock

AS_OF = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _nonzero(errors):
    return {key: count for key, count in errors.items() if count}


def _fill(engine, schema=None):
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
                {"id": i, "ts": (AS_OF - timedelta(minutes=i)).replace(tzinfo=None), "p": (i % 10) / 10}
                for i in range(1, 200)
            ],
        )
        conn.execute(labels.insert(), [{"id": i, "y": i % 2} for i in range(1, 200)])


def _settings(url, schema=None, **top):
    return model_settings(url, schema, **{"refresh_interval": "60s", **top})


def test_failed_source_keeps_values_for_the_staleness_then_drops_them(tmp_path):
    url = f"sqlite:///{tmp_path}/s.sqlite"
    engine = sa.create_engine(url)
    _fill(engine)
    settings = _settings(url, staleness="5m")
    stores = Stores(settings.stores, settings.query_timeout)
    refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)

    first = refresher.refresh(AS_OF)
    assert (
        first.sources["labels"].up and first.online[0].labeled == 60
    )  # ids 1..60: minutes before as_of, start inclusive

    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE labels RENAME TO labels_old"))
    failing = refresher.refresh(AS_OF + timedelta(minutes=4))
    assert not failing.sources["labels"].up and failing.sources["predictions"].up
    assert _nonzero(failing.errors) == {("labels", "schema"): 1}
    assert failing.online == first.online  # kept within the staleness period
    assert failing.last_success == first.last_success

    stale = refresher.refresh(AS_OF + timedelta(minutes=6))
    assert stale.online == ()  # dropped: Prometheus marks the series stale
    assert _nonzero(stale.errors) == {("labels", "schema"): 2}
    assert stale.score_stats  # the healthy source is unaffected

    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE labels_old RENAME TO labels"))
    recovered = refresher.refresh(AS_OF + timedelta(minutes=7))
    assert recovered.sources["labels"].up and recovered.online
    assert recovered.last_success == (AS_OF + timedelta(minutes=7)).timestamp()
    stores.dispose()


def test_unreachable_store_is_counted_as_connection_error(caplog):
    settings = _settings("postgresql+psycopg://mlmon:s3cr3t-pw@127.0.0.1:1/none")
    stores = Stores(settings.stores, settings.query_timeout)
    snap = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores).refresh(AS_OF)
    assert {name: s.up for name, s in snap.sources.items()} == {"predictions": False, "labels": False}
    assert _nonzero(snap.errors) == {("predictions", "connection"): 1, ("labels", "connection"): 1}
    assert snap.score_stats == () and snap.last_success is None
    assert "connection" in caplog.text and "s3cr3t-pw" not in caplog.text
    stores.dispose()


def test_postgres_query_slower_than_its_timeout_is_cancelled(postgres_schema, postgres_engine):
    url, schema = postgres_schema
    _fill(postgres_engine, schema)
    settings = _settings(url, schema, query_timeout="1s")
    stores = Stores(settings.stores, settings.query_timeout)
    refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
    refresher.check_schema()

    with table_locked(postgres_engine, schema, "labels"):
        started = time.monotonic()
        snap = refresher.refresh(AS_OF)
        elapsed = time.monotonic() - started
        # cancelled on the server: while the lock is still held, nothing waits on this test's tables
        # (not all of mlmon's sessions on the server: other test runs may share it)
        waiting = waiting_on_a_lock(postgres_engine, schema)
    assert _nonzero(snap.errors) == {("labels", "timeout"): 1}
    assert snap.sources["predictions"].up and not snap.sources["labels"].up
    assert elapsed < 10
    assert not waiting
    stores.dispose()


def test_a_source_reads_one_snapshot(tmp_path, postgres_engine):
    from exporter.db import create_store_engine, timed_connection

    sqlite = create_store_engine(f"sqlite:///{tmp_path}/s.sqlite")
    with timed_connection(sqlite, 5) as conn:
        assert conn.connection.driver_connection.in_transaction
    names = ("statement_timeout", "work_mem", "enable_nestloop", "cursor_tuple_fraction", "jit")

    def shown(conn):
        return {name: conn.exec_driver_sql(f"SHOW {name}").scalar() for name in names}

    with postgres_engine.connect() as conn:
        defaults = shown(conn)
    with timed_connection(postgres_engine, 5) as conn:
        assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "repeatable read"
        assert conn.exec_driver_sql("SHOW transaction_read_only").scalar() == "on"
        settings = {"statement_timeout": "5s", "work_mem": "64MB", "enable_nestloop": "off"}
        assert shown(conn) == {**settings, "cursor_tuple_fraction": "1", "jit": defaults["jit"]}
    with timed_connection(postgres_engine, 2.5, jit=False) as conn:
        assert shown(conn) == {**settings, "statement_timeout": "2500ms", "cursor_tuple_fraction": "1", "jit": "off"}
    with postgres_engine.connect() as conn:  # the pooled connection is back to the default
        assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "read committed"
        assert shown(conn) == defaults
    sqlite.dispose()


def test_a_server_that_accepts_but_never_answers_is_a_connection_error():
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts (the kernel completes the handshake), never says a word
    port = silent.getsockname()[1]
    settings = _settings(f"postgresql+psycopg://u@127.0.0.1:{port}/db", query_timeout="1s")
    stores = Stores(settings.stores, settings.query_timeout)
    started = time.monotonic()
    snap = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores).refresh(AS_OF)
    assert time.monotonic() - started < 10
    assert _nonzero(snap.errors) == {("predictions", "connection"): 1, ("labels", "connection"): 1}
    stores.dispose()
    silent.close()


def test_loop_reports_a_hung_refresh_as_stalled_and_keeps_serving(tmp_path):
    import asyncio

    from exporter.server.loop import RefreshLoop
    from exporter.snapshot import SnapshotStore
    from exporter.training.storage import StateDatabase

    url = f"sqlite:///{tmp_path}/s.sqlite"
    _fill(sa.create_engine(url))
    # A 5 s deadline, not 1 s: on two busy cores the first refresh, which must succeed,
    # took over a second in CI and was reported stalled in predictions.
    settings = _settings(url, refresh_interval="1s", refresh_timeout="5s", staleness="1s")
    store = SnapshotStore([m.name for m in settings.models])
    stores = Stores(settings.stores, settings.query_timeout)
    loop = RefreshLoop(settings, store, stores, StateDatabase(settings.state.resolved_url()))
    release = threading.Event()
    refresher = loop.refreshers[0]
    real_labels = refresher.sources["labels"].run
    calls = []

    def hang_on_second_call(as_of):  # the first refresh succeeds, the second hangs
        calls.append(as_of)
        if len(calls) > 1:
            release.wait(60)
        return real_labels(as_of)

    refresher.sources["labels"].run = hang_on_second_call

    async def scenario():
        loop.start()
        try:
            deadline = time.monotonic() + 45
            while not _timeouts(store.models.get("ctr")):
                assert time.monotonic() < deadline, "no stalled snapshot published"
                await asyncio.sleep(0.1)
            return store.models["ctr"]
        finally:
            release.set()
            await loop.stop()

    stalled = asyncio.run(scenario())
    stores.dispose()
    # predictions succeeded in the hung refresh: up; labels, where it hangs, down
    assert {name: s.up for name, s in stalled.sources.items()} == {"predictions": True, "labels": False}
    assert stalled.errors[("labels", "timeout")] == 1 and stalled.errors[("predictions", "timeout")] == 0


def _timeouts(snapshot) -> int:
    return 0 if snapshot is None else sum(n for (_, reason), n in snapshot.errors.items() if reason == "timeout")


def test_counter_catches_up_after_a_failed_refresh(tmp_path):
    url = f"sqlite:///{tmp_path}/s.sqlite"
    engine = sa.create_engine(url)
    _fill(engine)  # predictions 1..199 minutes before AS_OF, scores (i % 10) / 10
    settings = _settings(url)
    stores = Stores(settings.stores, settings.query_timeout)
    refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
    refresher.refresh(AS_OF - timedelta(minutes=100))  # starts the watermark
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE predictions RENAME TO moved"))
    failed = refresher.refresh(AS_OF - timedelta(minutes=50))
    assert not failed.sources["predictions"].up and failed.counter.total == 0
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE moved RENAME TO predictions"))
    caught_up = refresher.refresh(AS_OF - timedelta(minutes=20)).counter
    # rows i = 20..100 minutes before AS_OF, start inclusive, end exclusive: i in (20, 100]
    assert caught_up.total == 80
    assert caught_up.score_sum == pytest.approx(sum((i % 10) / 10 for i in range(21, 101)))
    again = refresher.refresh(AS_OF).counter
    assert again.total == 100  # and the next refresh adds only i in (0, 20]
    stores.dispose()


def test_a_restarted_process_counts_only_new_rows(tmp_path):
    """A new process starts its counters at 0 from its first refresh: rows counted by the
    previous process are not counted again (Prometheus sees a counter reset). Rows that
    arrive while no process runs are not in the counter, but they are in the windows,
    which are read from the table at every refresh."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    _fill(sa.create_engine(url))  # predictions 1..199 minutes before AS_OF
    settings = _settings(url)
    first = Stores(settings.stores, settings.query_timeout)
    before = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, first)
    before.refresh(AS_OF - timedelta(minutes=60))
    assert before.refresh(AS_OF - timedelta(minutes=30)).counter.total == 30  # i in (30, 60]
    first.dispose()

    second = Stores(settings.stores, settings.query_timeout)  # the restart: a new refresher, no shared state
    after = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, second)
    restarted = after.refresh(AS_OF - timedelta(minutes=20))
    assert restarted.counter.total == 0  # i in (20, 30] arrived during the restart
    assert restarted.score_stats[0].predictions == 60  # the 1h window: i in (20, 80], those rows included
    assert after.refresh(AS_OF).counter.total == 20  # only i in (0, 20]: nothing counted twice
    second.dispose()


def test_hostile_strings_in_a_filtered_text_column(tmp_path):
    url = f"sqlite:///{tmp_path}/s.sqlite"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE predictions (id INTEGER, ts TIMESTAMP, p FLOAT, model_name TEXT)"))
        ts = (AS_OF - timedelta(minutes=5)).replace(tzinfo=None)
        rows = [
            {"i": 1, "ts": ts, "p": 0.1, "m": "ctr"},
            {"i": 2, "ts": ts, "p": 0.2, "m": "x" * 1_000_000},  # a 1 MB string
            {"i": 3, "ts": ts, "p": 0.3, "m": "caf\udce9"},  # not valid UTF-8 once encoded with surrogates
        ]
        for row in rows:
            value = row["m"].encode("utf-8", "surrogateescape") if "\udce9" in row["m"] else row["m"]
            conn.execute(sa.text("INSERT INTO predictions VALUES (:i, :ts, :p, :m)"), {**row, "m": value})
    engine.dispose()
    settings = parse_settings(
        {
            "stores": {"s": {"url": url}},
            "models": [
                {
                    "name": "ctr",
                    "predictions": {
                        "store": "s",
                        "table": "predictions",
                        "columns": {"id": "id", "timestamp": "ts", "score": "p"},
                        "filter": {"model_name": "ctr"},
                    },
                    "windows": ["1h"],
                }
            ],
        }
    )
    stores = Stores(settings.stores, settings.query_timeout)
    snap = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores).refresh(AS_OF)
    stores.dispose()
    assert snap.sources["predictions"].up, snap.errors
    assert snap.score_stats[0].predictions == 1  # the filter compares in the database; odd rows are just other models


def test_ids_beyond_2_to_the_53_join_exactly(tmp_path):
    """Ids above 2**53 (which a float64 cannot tell apart) are joined in the database, never
    through floats: each label meets its own prediction only."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    engine = sa.create_engine(url)
    big = 2**60
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE predictions (id INTEGER, ts TIMESTAMP, p FLOAT)"))
        conn.execute(sa.text("CREATE TABLE labels (id INTEGER, y INTEGER)"))
        ts = (AS_OF - timedelta(minutes=5)).replace(tzinfo=None)
        for i in range(4):  # big + 0 .. big + 3 are one float64 value
            conn.execute(
                sa.text("INSERT INTO predictions VALUES (:i, :ts, :p)"), {"i": big + i, "ts": ts, "p": 0.1 * (i + 1)}
            )
        conn.execute(sa.text("INSERT INTO labels VALUES (:i, 1)"), {"i": big + 3})
    engine.dispose()
    settings = _settings(url)
    stores = Stores(settings.stores, settings.query_timeout)
    snap = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores).refresh(AS_OF)
    stores.dispose()
    online = snap.online[0]
    assert snap.score_stats[0].predictions == 4 and snap.score_stats[0].invalid["duplicate_id"] == 0
    assert online.labeled == 1 and online.positives == 1 and online.label_coverage == 0.25
    assert online.logloss == pytest.approx(-math.log(0.4))


def test_no_pooled_connection_free_in_time_is_a_timeout(tmp_path):
    """Many models on one store share its pool; a refresh that gets no connection in time
    (the store saturated) counts as ``reason="timeout"``, logged in one line."""
    engine = sa.create_engine(f"sqlite:///{tmp_path}/s.sqlite", pool_size=1, max_overflow=0, pool_timeout=0.1)
    with engine.connect():
        with pytest.raises(sa.exc.TimeoutError) as waited:
            engine.connect()
    engine.dispose()
    assert classify_error(waited.value) == "timeout"


def _with_replays(engine, settings, schema=None, **model_changes):
    """``settings`` (of ``_settings``) with a replay table (every prediction replayed
    exactly) and source added to its model, and ``model_changes`` applied to it."""
    from exporter.config import ReplaySource

    metadata = sa.MetaData(schema=schema)
    replays = sa.Table("replays", metadata, sa.Column("id", sa.Integer), sa.Column("p", sa.Double))
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(replays.insert(), [{"id": i, "p": (i % 10) / 10} for i in range(1, 200)])
    source = ReplaySource.model_validate(
        {
            "store": "s",
            "table": "replays",
            "columns": {"id": "id", "score": "p"},
            **({"schema": schema} if schema else {}),
        }
    )
    model = settings.models[0].model_copy(update={"replays": source, **model_changes})
    return settings.model_copy(update={"models": [model]})


def _every_statement(tmp_path, slice_fill_refreshes: int):
    """(engine, settings) of a model whose refresh can run every statement: buckets holding
    several scores, a version column, labels (id 7 with two label rows) and replays, windows
    1h, 2h, 3h on 5-minute time slices audited every minute."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    engine = sa.create_engine(url)
    _fill(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO labels (id, y) VALUES (7, 1)"))  # a label id with two rows
        conn.execute(sa.text("ALTER TABLE predictions ADD COLUMN v TEXT DEFAULT 'v1'"))
        conn.execute(sa.text("UPDATE predictions SET p = p + 0.01 * (id % 3)"))  # several scores per 0.1 bucket
    settings = _settings(url)
    predictions = settings.models[0].predictions
    versioned = predictions.model_copy(update={"columns": predictions.columns.model_copy(update={"version": "v"})})
    settings = _with_replays(
        engine,
        settings,
        windows=["1h", "2h", "3h"],
        bucket_decimals=1,
        predictions=versioned,
        time_slice=timedelta(minutes=5),
        slice_fill_refreshes=slice_fill_refreshes,
        slice_audit_interval=timedelta(minutes=1),
    )
    return engine, settings


def test_worst_case_queries_counts_an_audit_that_starts_a_fill(tmp_path):
    """An audit that finds more kept slices changed (4) than a refresh reads (3 of the 3h
    window's 36) starts a fill: newest, audit, the id ranges of the slices read, every id
    probed and the duplicated ones' rows, the fill's pass (histogram, most frequent scores),
    the windows in one pass with the ids found (histogram, mode counts), counter: 10; + 4
    (labels: the label ids with several rows, the other predictions, those ids'
    predictions; serving version); the replays, on their own slices, within their bound
    (``_ran_at_most``)."""

    engine, settings = _every_statement(tmp_path, slice_fill_refreshes=12)
    stores = Stores(settings.stores, settings.query_timeout)
    refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
    slices = refresher.predictions.slices
    as_of = AS_OF + timedelta(seconds=150)
    for k in range(14):  # filled 3 slices a refresh, a second apart: no audit due yet
        refresher.refresh(as_of - timedelta(seconds=60 - k))
    assert slices.filled and len(slices.slices) == 35
    insert = sa.text("INSERT INTO predictions (id, ts, p) VALUES (:id, :ts, :p)")
    with engine.begin() as conn:
        # Written late into 4 kept slices; the newest carries id 7 again (a duplicate in a
        # slice the fill reads: its rows are listed).
        for ident, minutes in ((7, 30), (601, 60), (602, 90), (603, 120)):
            late = (AS_OF - timedelta(minutes=minutes, seconds=-10)).replace(tzinfo=None)
            conn.execute(insert, {"id": ident, "ts": late, "p": 0.63})
    by_source = statements_by_source(refresher, stores)
    snap = refresher.refresh(as_of)
    assert all(s.up for s in snap.sources.values()) and not slices.filled
    _ran_at_most(by_source, settings.models[0])
    stores.dispose()


def test_worst_case_queries_counts_a_search_that_starts_a_fill(tmp_path):
    """An audit finds a row written late into a kept slice (read again: its buckets hold
    several scores now), and rows just written carry the ids of rows in 4 other kept
    slices, which must now leave them out: read again too, more than a refresh reads, so
    it fills. The refresh that audits probes every id, so the windows' pass uses the ids
    found: newest, audit, id ranges, duplicated ids and their rows, the fill's pass (histogram,
    most frequent scores), the windows in one pass (histogram, mode counts), counter: 10; + 4
    (labels in three statements, serving version); the replays within their bound
    (``_ran_at_most``). Its
    numbers are those of one pass (without an audit the search probes only what it reads,
    and the windows' pass searches them in full: test_online_slices.py)."""

    engine, settings = _every_statement(tmp_path, slice_fill_refreshes=12)
    stores = Stores(settings.stores, settings.query_timeout)
    refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
    slices = refresher.predictions.slices
    as_of = AS_OF + timedelta(seconds=150)
    for k in range(14):  # filled 3 slices a refresh, a second apart: no audit due yet
        refresher.refresh(as_of - timedelta(seconds=60 - k))
    assert slices.filled and len(slices.slices) == 35
    insert = sa.text("INSERT INTO predictions (id, ts, p) VALUES (:id, :ts, :p)")
    with engine.begin() as conn:
        late = (AS_OF - timedelta(minutes=20, seconds=-10)).replace(tzinfo=None)
        conn.execute(insert, {"id": 500, "ts": late, "p": 0.63})
        for ident in (30, 60, 90, 120):  # stamped in the minute before: the ids of 4 kept slices
            conn.execute(insert, {"id": ident, "ts": (AS_OF + timedelta(seconds=100)).replace(tzinfo=None), "p": 0.2})
    by_source = statements_by_source(refresher, stores)
    snap = refresher.refresh(as_of)
    assert all(s.up for s in snap.sources.values()) and not slices.filled
    _ran_at_most(by_source, settings.models[0])
    cold_settings = settings.model_copy(update={"models": [settings.models[0].model_copy(update={"time_slice": None})]})
    cold = ModelRefresher(cold_settings.models[0], "models[0]", cold_settings.refresh_policy, stores).refresh(as_of)
    assert snap.score_stats == cold.score_stats and snap.online == cold.online and snap.replays == cold.replays
    stores.dispose()


def test_a_stalled_refresh_reports_each_source_by_what_happened_to_it(postgres_schema, postgres_engine):
    """A refresh past its deadline, in labels (a held lock): predictions, which it just
    refreshed, up with their new values; labels down with one timeout however often it is
    reported stalled, and not a second one when the query is then cancelled; replays, not
    reached yet, as after the previous refresh. Before, every source went down and each
    counted a timeout per report."""
    url, schema = postgres_schema
    _fill(postgres_engine, schema)
    settings = _with_replays(postgres_engine, _settings(url, schema, query_timeout="3s"), schema)
    stores = Stores(settings.stores, settings.query_timeout)
    refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
    assert all(s.up for s in refresher.refresh(AS_OF).sources.values())
    later = AS_OF + timedelta(minutes=1)
    with stalled_on_a_lock(
        postgres_engine, schema, "labels", lambda: refresher.refresh(later), "the labels query"
    ) as result:
        first = refresher.stalled(later + timedelta(seconds=1))
        second = refresher.stalled(later + timedelta(seconds=2))
    for stalled in (first, second):
        assert stalled.sources["predictions"].up and stalled.sources["predictions"].last_success == later.timestamp()
        assert not stalled.sources["labels"].up and stalled.sources["labels"].last_success == AS_OF.timestamp()
        assert stalled.sources["replays"].up and stalled.sources["replays"].last_success == AS_OF.timestamp()
        assert (
            stalled.score_stats[0].predictions == 59
        )  # this refresh's: ids 1..59 in [later - 1h, later), not the 60 before
    assert _nonzero(second.errors) == {("labels", "timeout"): 1}
    ended = result["result"]  # cancelled at query_timeout, counted once, replays refreshed after it
    assert _nonzero(ended.errors) == {("labels", "timeout"): 1}
    assert {name: s.up for name, s in ended.sources.items()} == {"predictions": True, "labels": False, "replays": True}
    stores.dispose()


def test_worst_case_queries_is_what_a_refresh_runs(tmp_path):
    """The default deadline counts the statements a refresh runs: counted here on a refresh
    that runs every one: buckets holding several scores, a version column, an audit of the
    kept time slices that finds a row written late into the slice holding the 1h window's
    start (read again whole, and the window's tail in it by a second pass), a duplicated id."""
    from exporter.predictions.refresh import worst_case_queries

    # every slice kept at the first refresh: filled at the second
    engine, settings = _every_statement(tmp_path, slice_fill_refreshes=1)
    stores = Stores(settings.stores, settings.query_timeout)
    refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
    as_of = AS_OF + timedelta(seconds=150)  # AS_OF is on a slice boundary; the windows' starts are not
    refresher.refresh(as_of - timedelta(minutes=1))  # reflection, the counter's watermark, kept slices
    insert = sa.text("INSERT INTO predictions (id, ts, p) VALUES (:id, :ts, :p)")
    with engine.begin() as conn:
        late = as_of - timedelta(hours=1) + timedelta(seconds=10)
        conn.execute(insert, {"id": 500, "ts": late.replace(tzinfo=None), "p": 0.63})
        conn.execute(sa.text("INSERT INTO replays (id, p) VALUES (500, 0.63)"))  # the replays' audit finds it too
        conn.execute(insert, {"id": 7, "ts": (AS_OF + timedelta(minutes=1)).replace(tzinfo=None), "p": 0.7})
    by_source = statements_by_source(refresher, stores)
    snap = refresher.refresh(as_of)
    assert all(s.up for s in snap.sources.values()) and all(s.bucketed for s in snap.score_stats)
    assert snap.score_stats[0].invalid["duplicate_id"] == 2
    # 10 (predictions: newest, audit, the id ranges of the slices read, duplicated ids, their
    # rows, histogram and most frequent scores of each of two passes, counter; as many when
    # the audit starts a fill: above) + 3 + 1 (labels: the label ids with several rows, the
    # other predictions, id 7's; serving version: they reuse the predictions' duplicate ids,
    # no label delay) + 7 (replays on their slices: audit, id ranges, duplicated ids, their
    # rows, two passes, those ids' rows added back), whatever the windows
    counts = {name: len(run) for name, run in by_source.items()}
    assert counts == {"predictions": 10, "labels": 4, "replays": 7}
    assert sum(counts.values()) == worst_case_queries(settings.models[0]) == 21
    stores.dispose()


def _ran_at_most(by_source: dict[str, list[str]], model) -> None:
    """The predictions ran their most statements (10), the labels theirs (4, with the
    serving version), the replays (on slices) at most theirs: ``worst_case_queries``."""
    from exporter.predictions.refresh import worst_case_queries

    counts = {name: len(run) for name, run in by_source.items()}
    assert counts["predictions"] == 10 and counts["labels"] == 4
    assert counts["replays"] <= worst_case_queries(model) - 14 == 7


def test_the_default_deadline_fits_the_work_and_check_config_warns_when_a_set_one_cannot(tmp_path):
    """The issue's numbers: refresh_interval 2s, query_timeout 3s (the old default deadline
    5 s), three sources over two windows: 13 queries (the labels' online accuracy in up to
    three) and 3 connections, up to 48 s."""
    from typer.testing import CliRunner

    from exporter.cli import app

    url = f"sqlite:///{tmp_path}/s.sqlite"
    engine = sa.create_engine(url)
    _fill(engine)
    settings = _with_replays(engine, _settings(url, refresh_interval="2s", query_timeout="3s"), windows=["1h", "24h"])
    stores = Stores(settings.stores, settings.query_timeout)
    assert ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores).deadline() == timedelta(
        seconds=(9 + 3 + 1 + 3) * 3
    )
    quick = settings.model_copy(
        update={"query_timeout": timedelta(milliseconds=100), "refresh_interval": timedelta(seconds=60)}
    )
    assert ModelRefresher(quick.models[0], "models[0]", quick.refresh_policy, stores).deadline() == timedelta(
        seconds=60.1
    )  # never below interval + timeout
    fixed = settings.model_copy(update={"refresh_timeout": timedelta(seconds=5)})
    assert ModelRefresher(fixed.models[0], "models[0]", fixed.refresh_policy, stores).deadline() == timedelta(seconds=5)
    stores.dispose()

    config = tmp_path / "mlmon.yml"
    source = {"store": "s", "columns": {"id": "id", "score": "p"}}
    model = (
        "models:\n  - name: ctr\n    windows: [1h, 24h]\n"
        "    predictions: {store: s, table: predictions, columns: {id: id, timestamp: ts, score: p}}\n"
        "    labels: {store: s, table: labels, columns: {id: id, label: y}}\n"
        f"    replays: {{store: s, table: replays, columns: {source['columns']}}}\n"
    ).replace("'", "")
    common = f"stores: {{s: {{url: '{url}'}}}}\nrefresh_interval: 2s\nquery_timeout: 3s\n" + model
    config.write_text(common + "refresh_timeout: 5s\n")
    result = CliRunner().invoke(app, ["check-config", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert (
        # the default label_delay (1h): the labels search their own duplicate ids, 14 queries
        "warning: refresh_timeout: 5 s is shorter than the 51 s a refresh of models[0] ('ctr') may take"
        in result.stderr
    )
    config.write_text(common)
    result = CliRunner().invoke(app, ["check-config", "--config", str(config)])
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output


@pytest.mark.parametrize("work_seconds, waited", [(1.0, True), (30.0, False)])
def test_stop_waits_for_a_running_refresh_so_that_its_connection_closes(tmp_path, work_seconds, waited):
    """A SQLite store in WAL mode keeps its -wal and -shm files while any connection stays
    open: a refresh still in its thread at shutdown held one past ``stores.dispose()`` (the
    demo's files left behind after Ctrl-C). ``stop`` waits for it, up to its grace."""
    import asyncio

    from exporter.server.loop import RefreshLoop
    from exporter.snapshot import SnapshotStore
    from exporter.training.storage import StateDatabase

    path = tmp_path / "s.sqlite"
    engine = sa.create_engine(f"sqlite:///{path}")
    _fill(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    engine.dispose()
    settings = _settings(f"sqlite:///{path}")
    store = SnapshotStore([m.name for m in settings.models])
    stores = Stores(settings.stores, settings.query_timeout)
    loop = RefreshLoop(settings, store, stores, StateDatabase(settings.state.resolved_url()))
    refresher = loop.refreshers[0]
    real_labels = refresher.sources["labels"].run
    inside, release = threading.Event(), threading.Event()

    def slow_labels(as_of):  # a long refresh: a connection of the store open all along
        with stores.engine("s").connect() as conn:
            conn.exec_driver_sql("SELECT count(*) FROM labels").scalar()
            inside.set()
            release.wait(work_seconds)
        return real_labels(as_of)

    refresher.sources["labels"].run = slow_labels

    async def scenario() -> float:
        loop.start()
        while not inside.is_set():
            await asyncio.sleep(0.05)
        started = time.monotonic()
        await loop.stop(grace=3.0)
        return time.monotonic() - started

    took = asyncio.run(scenario())
    stores.dispose()
    try:
        assert (took < 2.9) is waited, took  # a refresh that outlasts the grace is not waited for longer
        assert (path.with_name("s.sqlite-wal").exists()) is not waited
        if waited:
            assert not path.with_name("s.sqlite-shm").exists()
    finally:
        release.set()
