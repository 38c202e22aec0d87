"""Attacks on the time-slice refresh (issue 12): a refresher refreshed repeatedly must give
what a fresh one computes at the same time, beyond what docs/metrics.md "Time slices"
allows (rows written later than ``ingestion_delay``, deletes before the next audit)."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from exporter.predictions import queries
from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.stores import Stores
from exporter.training.storage import StateDatabase
from tests.integration.predictions.test_time_slices import START, Log, _refresher, _same, _settings


def _warm_equals_cold(warm, settings, stores, as_of):
    got = warm.refresh(as_of)
    assert all(s.up for s in got.sources.values()), got.sources
    cold = _refresher(settings, stores).refresh(as_of)
    for w, c in zip(got.score_stats, cold.score_stats, strict=True):
        _same(w, c)
    return got


def test_table_recreated_with_a_primary_key(store):
    """A table of duplicated ids, dropped and created again with a primary key on the id
    (deduplicated): the kept slices left the formerly duplicated id out, and with unique
    ids nothing adds its row back."""
    url, schema, dialect = store
    settings = _settings(url, schema, unique=False)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect)
    rows = [(START - timedelta(minutes=m), 0.25 + m / 1000) for m in range(1, 59)]
    ids = list(range(len(rows)))
    ids[40] = ids[10]  # id 10 twice, 30 minutes apart
    log.insert(rows, ids)
    warm = _refresher(settings, stores)
    _warm_equals_cold(warm, settings, stores, START)
    log.table.drop(log.engine)
    got = warm.refresh(START + timedelta(seconds=30))
    assert not got.sources["predictions"].up
    table = sa.Table(
        "predictions",
        sa.MetaData(schema=schema),
        sa.Column("k", sa.BigInteger),
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("ts", sa.DateTime),
        sa.Column("p", sa.Double),
    )
    table.create(log.engine)
    with log.engine.begin() as conn:
        conn.execute(
            table.insert(),
            [{"k": k, "id": i, "ts": ts.replace(tzinfo=None), "p": p} for k, (i, ts, p) in log.rows.items() if k != 40],
        )
    _warm_equals_cold(warm, settings, stores, START + timedelta(minutes=1))
    stores.dispose()
    log.engine.dispose()


def test_audit_sees_a_rewrite_that_keeps_the_sum(store):
    """Two scores of a sealed slice rewritten (0.1 and 0.5 to 0.3 and 0.3: same count, same
    sum): after the next audit the kept slice must equal the store."""
    url, schema, dialect = store
    settings = _settings(url, schema)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect)
    base = START - timedelta(minutes=30)
    log.insert(
        [(base, 0.1), (base + timedelta(seconds=1), 0.5)] + [(START - timedelta(minutes=m), 0.7) for m in range(1, 50)]
    )
    warm = _refresher(settings, stores)
    _warm_equals_cold(warm, settings, stores, START)
    with log.engine.begin() as conn:
        conn.execute(log.table.update().where(log.table.c.k.in_([0, 1])).values(p=0.3))
    # Past the audit interval (20 min), with the rewritten slice still in the 1h window.
    for minutes in (10, 21, 22):
        warm.refresh(START + timedelta(minutes=minutes))
    _warm_equals_cold(warm, settings, stores, START + timedelta(minutes=23))
    stores.dispose()
    log.engine.dispose()


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("unique", [True, False])
@pytest.mark.long
def test_as_of_jumps(store, seed, unique):
    """as_of jumping back and forth by up to 4 hours, on and off slice boundaries (all rows
    written up front: none late). With duplicate ids, a slice kept while past the window's
    end (as_of went back) missed the ids that rows read meanwhile shared with it: 145
    predictions warm against 143 cold in the 1h window (seed 3) before slices past the
    sealed end were forgotten."""
    url, schema, dialect = store
    rng = np.random.default_rng(seed)
    settings = _settings(url, schema, unique=unique)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect)
    span = 5 * 3600
    rows = [
        (START - timedelta(seconds=float(s)), float(np.round(rng.random(), 3))) for s in rng.uniform(-span, span, 1500)
    ]
    ids = None
    if not unique:
        ids = [int(i) for i in rng.integers(0, 1200, len(rows))]
    log.insert(rows, ids)
    warm = _refresher(settings, stores)
    for _ in range(25):
        roll = rng.random()
        if roll < 0.3:
            as_of = START + timedelta(minutes=2 * int(rng.integers(-120, 0)), seconds=-7)  # on a slice boundary
        elif roll < 0.5:
            as_of = START + timedelta(minutes=2 * int(rng.integers(-120, 0)))  # 7 s after one
        else:
            as_of = START - timedelta(seconds=float(rng.uniform(0, span - 3600)))
        _warm_equals_cold(warm, settings, stores, as_of)
    stores.dispose()
    log.engine.dispose()


@pytest.mark.long
def test_audit_sees_a_score_moved_to_another_bucket_in_a_large_slice(store):
    """One score of a sealed slice of 50,000 rows rewritten from 0.9 to 0.90002: the sum of
    the slice's scores (45,000) moves by 2e-5, below the audit's relative tolerance of the
    sum (1e-9), but the score is in another bucket (``bucket_decimals`` 5)."""
    url, schema, dialect = store
    settings = _settings(url, schema)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect)
    base = START - timedelta(minutes=30)
    log.insert([(base + timedelta(milliseconds=j), 0.9) for j in range(50_000)])
    warm = _refresher(settings, stores)
    _warm_equals_cold(warm, settings, stores, START)
    with log.engine.begin() as conn:
        conn.execute(log.table.update().where(log.table.c.k == 7).values(p=0.90002))
    for minutes in (10, 21):
        warm.refresh(START + timedelta(minutes=minutes))
    got = _warm_equals_cold(warm, settings, stores, START + timedelta(minutes=22))
    assert got.score_stats[1].percentiles[99] == pytest.approx(0.9)
    assert got.score_stats[1].mean == pytest.approx((0.9 * 49_999 + 0.90002) / 50_000, rel=1e-12)
    stores.dispose()
    log.engine.dispose()


@pytest.mark.parametrize("seed", [5, 6])
@pytest.mark.long
def test_statement_failures_mid_refresh(tmp_path, monkeypatch, seed):
    """A statement failing at a random point of some refreshes (as a lock that lets
    ``query_timeout`` fire would), with rows and duplicated ids arriving: every refresh
    that succeeds equals a cold one."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    rng = np.random.default_rng(seed)
    settings = _settings(url, None, unique=False)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, None, "sqlite")
    history = [
        (START - timedelta(seconds=float(s)), float(np.round(rng.random(), 3))) for s in rng.uniform(0, 4000, 400)
    ]
    log.insert(history, [int(i) for i in rng.integers(0, 350, len(history))])
    warm = _refresher(settings, stores)
    real = sa.engine.Connection.execute
    state = {"left": None}

    def failing(self, *args, **kwargs):
        if state["left"] is not None:
            state["left"] -= 1
            if state["left"] < 0:
                state["left"] = None
                raise sa.exc.OperationalError("SELECT", {}, Exception("canceling statement due to statement timeout"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(sa.engine.Connection, "execute", failing)
    as_of = START
    for _ in range(30):
        as_of += timedelta(seconds=float(rng.uniform(10, 200)))
        count = int(rng.integers(0, 20))
        new = [
            (as_of - timedelta(seconds=float(s)), float(np.round(rng.random(), 3))) for s in rng.uniform(0, 170, count)
        ]
        log.insert(new, [int(i) for i in rng.integers(0, 400, count)])
        if rng.random() < 0.4:
            state["left"] = int(rng.integers(0, 6))
            warm.refresh(as_of)
            state["left"] = None
            continue
        _warm_equals_cold(warm, settings, stores, as_of)
    stores.dispose()
    log.engine.dispose()


@pytest.mark.long
@pytest.mark.parametrize("fill", [1, 3], ids=["read-at-once", "filling"])
def test_many_duplicated_ids_around_the_limit(tmp_path, fill):
    """1,001 duplicated ids (full reads, no slices kept), then 999 (slices again), then
    1,001; the slices read at the first refresh, or filling over 3 refreshes (a cold start
    probes every id: the listing overflows at once, nothing is kept)."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    settings = _settings(url, None, unique=False)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, None, "sqlite")
    rows = [(START - timedelta(seconds=1 + j * 3590 / 6000), float(np.round((j % 997) / 997, 4))) for j in range(6000)]
    ids = [j % 4999 for j in range(6000)]  # ids 0..1000 twice: 1,001 duplicated
    log.insert(rows, ids)
    warm = _refresher(_settings(url, None, unique=False, slice_fill_refreshes=fill), stores)
    _warm_equals_cold(warm, settings, stores, START)
    assert not warm.predictions.slices.slices  # read in full, nothing kept
    # A minute later the ids of the oldest rows (from about 920 on) have left the 1h window.
    for seconds in (60, 130, 200, 260, 400):
        _warm_equals_cold(warm, settings, stores, START + timedelta(seconds=seconds))
    assert warm.predictions.slices.slices
    log.insert([(START + timedelta(seconds=300 + j), 0.5) for j in range(3)], [5000, 5000, 5001])
    log.insert([(START + timedelta(seconds=310), 0.5)], [5001])
    for seconds in (500, 700):
        _warm_equals_cold(warm, settings, stores, START + timedelta(seconds=seconds))
    stores.dispose()
    log.engine.dispose()


@pytest.mark.parametrize("store", ["postgresql", "duckdb"], indirect=True)
def test_nan_ids_are_one_id(store, monkeypatch):
    """A floating id column where two rows have a NaN id: the engine's GROUP BY makes them
    one duplicated id, as the full read counts them (``duplicate_id``); no NaN equals
    another in Python, so the added-back rows counted them as valid predictions."""
    url, schema, _ = store
    settings = _settings(url, schema, unique=False)
    engine = sa.create_engine(url)
    table = sa.Table(
        "predictions",
        sa.MetaData(schema=schema),
        sa.Column("id", sa.Double),
        sa.Column("ts", sa.DateTime),
        sa.Column("p", sa.Double),
    )
    table.create(engine)
    rows = [(float("nan"), 5), (float("nan"), 10), (7.0, 6), (7.0, 11), (8.0, 12)]
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            [{"id": i, "ts": (START - timedelta(minutes=m)).replace(tzinfo=None), "p": 0.25} for i, m in rows],
        )
    stores = Stores(settings.stores, settings.query_timeout)
    warm = _refresher(settings, stores)
    _warm_equals_cold(warm, settings, stores, START)
    got = _warm_equals_cold(warm, settings, stores, START + timedelta(minutes=3)).score_stats[1]
    monkeypatch.setattr(queries, "MAX_LISTED_DUPLICATES", 0)  # the full read: one pass, GROUP BY id
    full = _refresher(settings, stores).refresh(START + timedelta(minutes=3)).score_stats[1]
    assert (got.predictions, got.invalid) == (full.predictions, full.invalid)
    assert (got.predictions, got.invalid["duplicate_id"]) == (1, 4)
    stores.dispose()
    engine.dispose()


def _every_20s(log: Log) -> None:
    """A row every 20 s in the 70 minutes before START, ids growing with the time."""
    log.insert([(START - timedelta(seconds=20 * k), 0.5) for k in range(210, 0, -1)])


def _id_at(log: Log, instant) -> int:
    return next(i for i, ts, _ in log.rows.values() if ts == instant)


def test_a_small_windows_tail_read_with_the_head_leaves_its_slice_searched(store):
    """Ids not declared unique and growing with the time, searched in the slices whose id
    ranges meet the new rows' (``LeftOutIds._narrowed``): a 5m window starting in the last
    kept slice has its tail read with the head, as one range. That slice is no new one: a
    new row carrying the id of a row in it, before the window's start, is a duplicate of the
    1h window (review finding: its range was taken from the tail alone, and the row missed)."""
    url, schema, dialect = store
    settings = _settings(url, schema, unique=False, windows=["5m", "1h"])
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect)
    _every_20s(log)
    warm = _refresher(settings, stores)
    _warm_equals_cold(warm, settings, stores, START)
    # 11:54:40, in the kept slice [11:54, 11:56), before the 5m window's start at 11:55:30.
    old = _id_at(log, START - timedelta(minutes=5, seconds=20))
    log.insert([(START + timedelta(seconds=20), 0.75)], [old])  # in the head
    got = _warm_equals_cold(warm, settings, stores, START + timedelta(seconds=30))
    assert [s.invalid.get("duplicate_id", 0) for s in got.score_stats] == [0, 2]
    stores.dispose()


def test_a_failed_id_range_read_leaves_the_slices_to_read_again(tmp_path):
    """After a restart the first steady refresh reads the id ranges of the restored slices;
    when that statement fails (a timeout) the refresh fails, and the next one reads them
    again (review finding: they were left as holding no id, and a new row carrying the id of
    a row 30 minutes back was never found duplicated)."""
    url, state_url = f"sqlite:///{tmp_path}/store.sqlite", f"sqlite:///{tmp_path}/state.sqlite"
    settings = _settings(url, None, unique=False)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, None, "sqlite")
    _every_20s(log)

    def serving(state: StateDatabase) -> ModelRefresher:
        model = settings.models[0]
        return ModelRefresher(model, "models[0]", settings.refresh_policy, stores, state=state, save_slices=True)

    _warm_equals_cold(serving(StateDatabase(state_url)), settings, stores, START)
    restarted = serving(StateDatabase(state_url))
    _warm_equals_cold(restarted, settings, stores, START + timedelta(seconds=30))  # restores, audits
    failing = [True]

    def fail_once(conn, cursor, statement, params, *_):
        if failing[0] and "min(part_rows.id) AS low" in statement:  # the id ranges, not a histogram
            failing[0] = False
            raise sa.exc.OperationalError(statement, params, Exception("statement timeout"))

    sa.event.listen(stores.engine("s"), "before_cursor_execute", fail_once)
    assert not restarted.refresh(START + timedelta(seconds=60)).sources["predictions"].up
    sa.event.remove(stores.engine("s"), "before_cursor_execute", fail_once)
    assert not failing[0]
    log.insert([(START + timedelta(seconds=70), 0.75)], [_id_at(log, START - timedelta(minutes=30))])
    got = _warm_equals_cold(restarted, settings, stores, START + timedelta(seconds=90))
    assert [s.invalid.get("duplicate_id", 0) for s in got.score_stats] == [0, 2]
    stores.dispose()


@pytest.mark.parametrize(
    ("times", "back_to", "row"),
    [
        # Back across a slice boundary: the window's new tail is in the slice before.
        ((0, 16, 17), timedelta(minutes=15, seconds=30), timedelta(minutes=44, seconds=10)),
        # Back within one slice ([11:16, 11:18)), which stays the window's tail.
        ((0, 16.5, 17), timedelta(minutes=16, seconds=10), timedelta(minutes=43, seconds=40)),
        # Back over whole slices: [11:16, 11:18), forgotten once the window left it, is read
        # and probed as a new slice (this guards ``SliceStore.begin``, not the step back).
        ((0, 16, 21), timedelta(minutes=15, seconds=30), timedelta(minutes=42, seconds=50)),
    ],
    ids=["across-a-boundary", "within-the-tail", "whole-slices"],
)
def test_a_clock_stepped_back_searches_the_rows_back_in_the_window(store, times, back_to, row):
    """The refresh time stepped back within the audit interval (no audit is forced): the
    window's start moves back and rows it had left come back into its tail (whole slices
    coming back are not kept: they are read, and probed, as new ones). A row come back
    carrying the id of a kept slice's row is a duplicate again (review finding: only the
    new rows were probed, and the duplicate was found only once the time caught up)."""
    url, schema, dialect = store
    settings = _settings(url, schema, unique=False)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect)
    _every_20s(log)
    # Out of the 1h window at the refreshes just before the step back, back in it after;
    # the other row, 11:30:07, in a kept slice.
    log.insert([(START - row, 0.75)], [_id_at(log, START - timedelta(minutes=30))])
    warm = _refresher(settings, stores)
    for minutes in times:
        _warm_equals_cold(warm, settings, stores, START + timedelta(minutes=minutes))
    got = _warm_equals_cold(warm, settings, stores, START + back_to)
    assert [s.invalid.get("duplicate_id", 0) for s in got.score_stats] == [0, 2]
    stores.dispose()
