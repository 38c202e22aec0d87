"""Time slices (issue 12): a refresher that keeps sealed slices between refreshes gives the
prediction statistics a fresh refresher computes from scratch at the same time, after
random sequences of refreshes at unaligned times, rows written within
``ingestion_delay`` of their timestamp, invalid scores, rows written later than that and
deleted rows (taken in by the next audit), on SQLite, PostgreSQL and DuckDB, and across a
daylight-saving change of naive timestamps; and both equal pandas and numpy on the rows."""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import sqlalchemy as sa

from exporter.monitoring_math import PERCENTILES
from exporter.predictions import queries
from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.slices import EPOCH, TopCounts, ceil_to, floor_to, slice_starts
from exporter.predictions.sources import PredictionsSource
from exporter.predictions.stores import Stores, to_wall_clock
from exporter.snapshot import ScoreStats
from exporter.training.storage import StateDatabase
from tests.conftest import AuditClock, model_settings

START = datetime(2026, 5, 4, 12, 0, 7, tzinfo=UTC)
SLICE = timedelta(minutes=2)
DELAY = timedelta(minutes=3)
AUDIT = timedelta(minutes=20)


def _settings(url: str, schema: str | None, zone: str = "UTC", unique: bool = True, **model):
    return model_settings(
        url,
        schema,
        labels=False,
        predictions={"unique_ids": unique, "ingestion_delay": "3m", "timezone": zone},
        # Every slice read at the first refresh (slice_fill_refreshes 1): these tests compare
        # refreshes on kept slices with such cold refreshes (the filling has its own test).
        model={
            "windows": ["7m", "1h"],
            "time_slice": "2m",
            "slice_audit_interval": "20m",
            "slice_fill_refreshes": 1,
            **model,
        },
    )


def _refresher(settings, stores: Stores) -> ModelRefresher:
    return ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)


class Log:
    """The prediction table and a copy of its rows by row key ``k``: (id, UTC instant,
    score as written); ``id`` is the key unless a row reuses another's id, or has none."""

    def __init__(self, url: str, schema: str | None, dialect: str, zone: str = "UTC"):
        self.engine = sa.create_engine(url)
        self.dialect, self.zone = dialect, zone
        self.table = sa.Table(
            "predictions",
            sa.MetaData(schema=schema),
            sa.Column("k", sa.BigInteger),
            sa.Column("id", sa.BigInteger),
            sa.Column("ts", sa.DateTime),
            sa.Column("p", sa.Double),
        )
        self.table.create(self.engine)
        self.rows: dict[int, tuple[int | None, datetime, object]] = {}
        self.next_key = 0

    def insert(self, rows: list[tuple[datetime, object]], ids: list[int | None] | None = None) -> None:
        records = []
        for j, (ts, p) in enumerate(rows):
            ident = self.next_key if ids is None else ids[j]
            self.rows[self.next_key] = (ident, ts, p)
            wall = to_wall_clock(ts, ZoneInfo(self.zone))
            records.append({"k": self.next_key, "id": ident, "ts": wall, "p": p})
            self.next_key += 1
        if not records:
            return
        with self.engine.begin() as conn:
            plain = [r for r in records if not isinstance(r["p"], str)]
            if plain:
                conn.execute(self.table.insert(), plain)
            for r in records:  # text in a REAL column: SQLite keeps it as text
                if isinstance(r["p"], str):
                    conn.execute(
                        sa.text("INSERT INTO predictions (k, id, ts, p) VALUES (:k, :id, :ts, :p)"),
                        {**r, "ts": r["ts"].isoformat(sep=" ")},
                    )

    def delete(self, keys: list[int]) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.table.delete().where(self.table.c.k.in_(keys)))
        for k in keys:
            del self.rows[k]

    def expected(self, start: datetime, end: datetime) -> dict:
        """Counts, mean, stddev and percentiles of the valid scores in ``[start, end)``; a
        row whose id another row of the window carries is not valid (``duplicate_id``)."""
        in_window = [(i, p) for i, ts, p in self.rows.values() if start <= ts < end]
        carried = Counter(i for i, _ in in_window if i is not None)
        valid = np.array(
            [
                p
                for i, p in in_window
                if isinstance(p, float) and not math.isnan(p) and 0 <= p <= 1 and (i is None or carried[i] == 1)
            ],
            dtype=float,
        )
        out: dict = {"predictions": len(valid), "invalid": len(in_window) - len(valid)}
        if len(valid):
            _, same = np.unique(np.floor(valid * 1e6 + 0.5), return_counts=True)  # rounded half up to 6 decimals
            out |= {"mean": valid.mean(), "stddev": valid.std(), "mode_share": same.max() / len(valid)}
            out |= {"percentiles": {q: np.percentile(valid, q) for q in PERCENTILES}}
        return out


def _score(rng: np.random.Generator, dialect: str) -> object:
    kind = rng.random()
    if kind < 0.03:
        return None
    if kind < 0.06:
        return 1.5
    if kind < 0.08:
        return float("nan") if dialect != "sqlite" else "abc"
    if kind < 0.5:
        return float(np.round(rng.random(), 2))  # discrete: buckets of one score
    return float(rng.random())


def _same(warm: ScoreStats, cold: ScoreStats) -> None:
    assert (warm.window, warm.predictions, warm.invalid, warm.bucketed) == (
        cold.window,
        cold.predictions,
        cold.invalid,
        cold.bucketed,
    )
    for name in ("mean", "stddev", "mode_share"):
        a, b = getattr(warm, name), getattr(cold, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a == pytest.approx(b, rel=1e-12, abs=1e-15), name
    assert warm.percentiles.keys() == cold.percentiles.keys()
    for q in warm.percentiles:
        assert warm.percentiles[q] == pytest.approx(cold.percentiles[q], rel=1e-12), q


def _check(log: Log, warm: ModelRefresher, settings, stores: Stores, as_of: datetime) -> None:
    got = warm.refresh(as_of)
    assert all(s.up for s in got.sources.values()), got.sources
    cold = _refresher(settings, stores).refresh(as_of)
    for w, c, window in zip(got.score_stats, cold.score_stats, ("7m", "1h"), strict=True):
        _same(w, c)
        length = timedelta(minutes=7) if window == "7m" else timedelta(hours=1)
        expected = log.expected(as_of - length, as_of)
        assert w.predictions == expected["predictions"]
        assert sum(w.invalid.values()) - w.invalid["bad_timestamp"] == expected["invalid"]
        if expected["predictions"]:
            assert w.mean == pytest.approx(expected["mean"], rel=1e-9)
            assert w.stddev == pytest.approx(expected["stddev"], rel=1e-6, abs=1e-12)
            bound = w.mode_share_error_bound or 0.0
            assert w.mode_share - 1e-12 <= expected["mode_share"] <= w.mode_share + bound + 1e-12
            for q, value in expected["percentiles"].items():
                assert w.percentiles[q] == pytest.approx(value, abs=10.0 ** -settings.models[0].bucket_decimals)


def _ids(rng: np.random.Generator, log: Log, count: int, unique: bool) -> list[int | None] | None:
    """Ids for ``count`` new rows: none (the row keys) when ``unique``; else mostly new ones,
    some reusing the id of a recent or an old row (a duplicate in some windows only), a few
    NULL (never a duplicate)."""
    if unique:
        return None
    known = [i for i, _, _ in log.rows.values() if i is not None]
    out: list[int | None] = []
    for j in range(count):
        roll = rng.random()
        if roll < 0.1 and known:
            out.append(int(known[-1 - int(rng.integers(0, min(5, len(known))))]))  # recent: minutes away
        elif roll < 0.15 and known:
            out.append(int(rng.choice(known)))  # any: up to hours away
        elif roll < 0.18:
            out.append(None)
        else:
            out.append(10**9 + log.next_key + j)
    return out


@pytest.mark.parametrize(
    "store", ["sqlite", "postgresql", pytest.param("duckdb", marks=pytest.mark.long)], indirect=True
)
@pytest.mark.parametrize("unique", [True, False], ids=["unique-ids", "duplicate-ids"])
@pytest.mark.parametrize(
    ("seed", "fill"),
    [(1, 1), pytest.param(2, 1, marks=pytest.mark.long), pytest.param(3, 4, marks=pytest.mark.long)],
    ids=["1", "2", "3-filling"],
)
def test_kept_slices_equal_a_cold_refresh(store, seed, unique, fill, tmp_path, monkeypatch):
    """The warm refresher's slices read at its first refresh, or (``fill`` 4) filled over 4
    refreshes, reading the windows in one pass meanwhile, and saved as ``mlmon serve`` saves
    them; now and then it is restarted (a new refresher restoring the saved slices); the
    cold refreshers read every slice at once. Results are read 7 rows at a time, so that
    every read of more rows goes through the driver in several chunks."""
    monkeypatch.setattr("exporter.predictions.sources.CHUNK_ROWS", 7)
    url, schema, dialect = store
    rng = np.random.default_rng(seed)
    settings = _settings(url, schema, unique=unique)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect)
    # An hour of history before the first refresh, then refreshes every 10 s to 7 min.
    history = [(START - timedelta(seconds=float(s)), _score(rng, dialect)) for s in rng.uniform(0, 4000, 300)]
    log.insert(history, _ids(rng, log, len(history), unique))
    state = StateDatabase(f"sqlite:///{tmp_path}/state.sqlite")

    def serving() -> ModelRefresher:
        served = _settings(url, schema, unique=unique, slice_fill_refreshes=fill)
        model = served.models[0]
        return ModelRefresher(model, "models[0]", served.refresh_policy, stores, state=state, save_slices=True)

    warm = serving()
    as_of = START
    audits = AuditClock(AUDIT)
    for _step in range(25):
        # New rows stamped up to ingestion_delay before the next refresh time.
        count = int(rng.integers(0, 30))
        following = as_of + timedelta(seconds=float(rng.uniform(10, 420)))
        new = [
            (following - timedelta(seconds=float(s)), _score(rng, dialect))
            for s in rng.uniform(0, DELAY.total_seconds(), count)
        ]
        log.insert(new, _ids(rng, log, count, unique))
        if rng.random() < 0.2:  # written later than ingestion_delay: into sealed slices
            late = [(following - timedelta(minutes=float(m)), 0.123) for m in rng.uniform(5, 50, 3)]
            log.insert(late, _ids(rng, log, 3, unique))
            audits.changed = True
        if rng.random() < 0.2 and log.rows:  # deleted
            log.delete([int(k) for k in rng.choice(list(log.rows), 3, replace=False)])
            audits.changed = True
        as_of = following
        if rng.random() < 0.1:
            warm = serving()
            audits.restart()
        if not audits.comparable(as_of):
            warm.refresh(as_of)
            continue
        _check(log, warm, settings, stores, as_of)
    stores.dispose()
    state.engine.dispose()
    log.engine.dispose()


@pytest.mark.parametrize(
    "store",
    ["sqlite", pytest.param("postgresql", marks=pytest.mark.long), pytest.param("duckdb", marks=pytest.mark.long)],
    indirect=True,
)
@pytest.mark.parametrize("unique", [True, False], ids=["unique-ids", "duplicate-ids"])
def test_a_cold_start_fills_the_slices_a_share_per_refresh(store, unique):
    """From a cold start a refresher keeps 1/24 of the largest window's slices a refresh
    (here 30 slices of 2 min in 1h: 2), the newest missing ones, and those sealed since
    the refresh before, and reads the windows in
    one pass meanwhile: its numbers are then exactly those of a refresher without time
    slices. Once every sealed slice is kept, refreshes merge them, equal to the one-pass
    numbers (to the last bits) and to pandas, while rows keep arriving."""
    url, schema, dialect = store
    rng = np.random.default_rng(5)
    settings = _settings(url, schema, unique=unique, slice_fill_refreshes=24)  # the default
    plain = _settings(url, schema, unique=unique, time_slice=None).models[0]
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect)
    history = [(START - timedelta(seconds=float(s)), _score(rng, dialect)) for s in rng.uniform(0, 4000, 300)]
    log.insert(history, _ids(rng, log, len(history), unique))
    filling = _refresher(settings, stores)
    assert filling.predictions.slices.fill == 2
    store_ = filling.predictions.slices
    assert store_ is not None
    reference = ModelRefresher(plain, "models[0]", settings.refresh_policy, stores)
    as_of, kept, merged = START, [0], 0
    for _ in range(24):
        new = [(as_of - timedelta(seconds=float(s)), _score(rng, dialect)) for s in rng.uniform(0, 60, 10)]
        log.insert(new, _ids(rng, log, len(new), unique))
        got = filling.refresh(as_of)
        one_pass = reference.refresh(as_of)
        sealed = slice_starts(as_of - timedelta(hours=1), floor_to(as_of - DELAY, SLICE), SLICE)
        # 2 a refresh, and the one sealed since the refresh before.
        assert len(store_.slices) <= kept[-1] + 3 and set(store_.slices) <= set(sealed)
        kept.append(len(store_.slices))
        if len(store_.slices) < len(sealed):  # still filling: this refresh took the one-pass path
            assert got.score_stats == one_pass.score_stats
        else:  # the last missing ones were read with the windows' heads and tails
            merged += 1
            for w, c in zip(got.score_stats, one_pass.score_stats, strict=True):
                _same(w, c)
        expected = log.expected(as_of - timedelta(hours=1), as_of)
        assert got.score_stats[1].predictions == expected["predictions"]
        as_of += timedelta(minutes=1)
    assert kept[-1] == len(sealed) and merged >= 5, (kept, merged)
    stores.dispose()
    log.engine.dispose()


@pytest.mark.parametrize("cause", ["outage", "audit"])
def test_many_missing_slices_refill_a_share_per_refresh(tmp_path, monkeypatch, cause):
    """Filled slices (2 of the hour's 30 a refresh), then many missing at once: after the
    store was down for 20 minutes while refreshes went on failing (10 slices sealed
    meanwhile), or after an audit found 6 kept slices changed (a row deleted in each). The
    refresh after reads the windows in one pass and 2 of them (and the one sealed since the
    refresh before), not all at once, keeps every other slice, and so on until every one is
    kept again; each refresh equals the one-pass refresher (exactly while filling) and
    pandas."""
    read: list[int] = []  # slices read per refresh of the sliced refresher
    original = PredictionsSource._read_parts

    def recorded(self, conn, plan):
        read.append(len(plan.new_slices))
        return original(self, conn, plan)

    monkeypatch.setattr(PredictionsSource, "_read_parts", recorded)
    url = f"sqlite:///{tmp_path}/s.sqlite"
    rng = np.random.default_rng(11)
    settings = _settings(url, None, slice_fill_refreshes=24)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, None, "sqlite")
    log.insert([(START - timedelta(seconds=float(s)), _score(rng, "sqlite")) for s in rng.uniform(0, 4000, 300)])
    warm = _refresher(settings, stores)
    slices = warm.predictions.slices
    reference = _refresher(_settings(url, None, time_slice=None), stores)
    as_of = START
    for _ in range(20):
        warm.refresh(as_of)
        as_of += timedelta(minutes=1)
        if slices.filled:
            break
    assert slices.filled and slices.fill == 2
    if cause == "outage":
        kept = set(slices.slices)
        with log.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE predictions RENAME TO predictions_down")
        for _ in range(20):
            assert not warm.refresh(as_of).sources["predictions"].up
            as_of += timedelta(minutes=1)
        with log.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE predictions_down RENAME TO predictions")
        # Rows stamped during the outage, written once the store is back.
        log.insert([(as_of - timedelta(seconds=float(s)), _score(rng, "sqlite")) for s in rng.uniform(0, 1200, 40)])
        read.clear()
        got, one_pass = warm.refresh(as_of), reference.refresh(as_of)
        most = 6  # 11 older missing slices, 2 a refresh
    else:
        # A row deleted in each of the 6 newest kept slices holding rows (just before START),
        # still in the window at the audit (every 20 minutes), the first to see them changed.
        victims = sorted({floor_to(ts, SLICE) for _, ts, _ in log.rows.values()} & set(slices.slices))[-6:]
        log.delete([next(k for k, (_, ts, _) in log.rows.items() if floor_to(ts, SLICE) == v) for v in victims])
        kept = set(slices.slices) - set(victims)
        audited = slices._audited
        while True:
            read.clear()
            got, one_pass = warm.refresh(as_of), reference.refresh(as_of)
            if slices._audited != audited:
                break
            as_of += timedelta(minutes=1)
        most = 2  # 6 missing, 2 a refresh: 4 left, then 2, read with the windows merged
    first = ceil_to(as_of - timedelta(hours=1), SLICE)
    assert {s for s in kept if s >= first} <= set(slices.slices)  # the others are kept
    filling = 0
    while True:
        assert len(read) == 1 and read[0] <= 3, read
        expected = log.expected(as_of - timedelta(hours=1), as_of)
        assert got.score_stats[1].predictions == expected["predictions"]
        if slices.filled:
            for w, c in zip(got.score_stats, one_pass.score_stats, strict=True):
                _same(w, c)
            break
        assert got.score_stats == one_pass.score_stats
        filling += 1
        assert filling <= most, read
        as_of += timedelta(minutes=1)
        read.clear()
        got, one_pass = warm.refresh(as_of), reference.refresh(as_of)
    assert filling >= 2
    stores.dispose()
    log.engine.dispose()


@pytest.mark.long
def test_slices_across_daylight_saving(store):
    """Naive timestamps of America/New_York over the night clocks fall back (1 November
    2026, 06:00 UTC): the wall-clock hour 01:00-02:00 happens twice."""
    url, schema, dialect = store
    rng = np.random.default_rng(7)
    settings = _settings(url, schema, zone="America/New_York")
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect, zone="America/New_York")
    change = datetime(2026, 11, 1, 6, 0, tzinfo=UTC)
    log.insert([(change + timedelta(seconds=float(s)), float(rng.random())) for s in rng.uniform(-7200, 7200, 400)])
    warm = _refresher(settings, stores)
    as_of = change - timedelta(minutes=50, seconds=13)
    while as_of < change + timedelta(minutes=70):
        _check(log, warm, settings, stores, as_of)
        as_of += timedelta(seconds=float(rng.uniform(60, 400)))
    stores.dispose()
    log.engine.dispose()


def test_a_refresh_reads_only_what_can_change(tmp_path):
    """After the first refresh, a refresh reads the sealed slices it does not keep yet and
    each window's head and tail, not the window (SQLite's own count of rows read)."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    settings = _settings(url, None)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, None, "sqlite")
    log.insert([(START - timedelta(seconds=float(s)), 0.5) for s in np.linspace(0, 3600, 3601)[1:]])
    warm = _refresher(settings, stores)
    warm.refresh(START)
    plan = warm.predictions.slices.plan(
        (START + timedelta(minutes=1) - timedelta(minutes=7), START + timedelta(minutes=1) - timedelta(hours=1)),
        START + timedelta(minutes=1),
        DELAY,
    )
    read = sum((end - start for one in plan.passes for start, end in one.reads), timedelta())
    # Head: sealed end to as_of (at most one slice plus the delay); tails: under a slice each.
    assert read <= SLICE + DELAY + 2 * SLICE
    assert all(s >= floor_to(START - DELAY, SLICE) for s in plan.new_slices)
    assert plan.new_slices == () or len(plan.new_slices) <= 1
    stores.dispose()
    log.engine.dispose()


def test_slice_arithmetic():
    width = timedelta(minutes=5)
    t = datetime(2026, 5, 4, 12, 7, 30, tzinfo=UTC)
    assert floor_to(t, width) == datetime(2026, 5, 4, 12, 5, tzinfo=UTC)
    assert ceil_to(t, width) == datetime(2026, 5, 4, 12, 10, tzinfo=UTC)
    assert ceil_to(floor_to(t, width), width) == floor_to(t, width)
    assert floor_to(EPOCH - timedelta(seconds=1), width) == EPOCH - width


@pytest.mark.parametrize("seed", range(5))
def test_top_counts_bound_the_mode_of_a_union(seed):
    """Sets summarized by their 3 most frequent keys: the union's mode count lies within
    ``TopCounts.mode``'s bounds, which are equal when every set kept all its keys."""
    rng = np.random.default_rng(seed)
    sets = [rng.integers(0, 12, int(rng.integers(1, 40))) for _ in range(8)]
    summaries = [TopCounts.of_scores(keys, np.ones(len(keys)), top=3) for keys in sets]
    lower, upper = TopCounts.merge(summaries).mode()
    true = int(np.bincount(np.concatenate(sets)).max())
    assert lower <= true <= upper
    exact = TopCounts.merge(TopCounts.of_scores(keys, np.ones(len(keys)), top=12) for keys in sets).mode()
    assert exact == (true, true)


def test_mode_share_of_continuous_scores_within_its_error_bound(store):
    """Continuous scores, most of them from a few values (each a bucket of several scores):
    slices keeping their 3 most frequent scores give a mode share within the exported
    error bound of the exact one, the same warm and cold."""
    url, schema, dialect = store
    rng = np.random.default_rng(11)
    settings = _settings(url, schema, bucket_decimals=1)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect)
    values = rng.random(6)
    rows = [
        (START - timedelta(seconds=float(s)), float(rng.choice(values)) if rng.random() < 0.3 else float(rng.random()))
        for s in rng.uniform(0, 3600, 1500)
    ]
    log.insert(rows)
    warm = _refresher(settings, stores)
    warm.predictions.top_scores = 3
    bounded = 0
    for minutes in (0, 1, 3, 4, 6):
        as_of = START + timedelta(minutes=minutes)
        got = warm.refresh(as_of)
        cold = _refresher(settings, stores)
        cold.predictions.top_scores = 3
        again = cold.refresh(as_of)
        for w, c in zip(got.score_stats, again.score_stats, strict=True):
            _same(w, c)
            assert w.mode_share_error_bound == c.mode_share_error_bound
            length = timedelta(minutes=7) if w.window == "7m" else timedelta(hours=1)
            expected = log.expected(as_of - length, as_of)
            if not expected["predictions"]:
                continue
            exact, bound = expected["mode_share"], w.mode_share_error_bound or 0.0
            assert w.bucketed and w.mode_share - 1e-12 <= exact <= w.mode_share + bound + 1e-12
            bounded += w.mode_share_error_bound is not None
    assert bounded  # the bound was needed at least once
    stores.dispose()
    log.engine.dispose()


def test_a_window_starting_in_the_last_sealed_slice_has_the_mode_bound_of_a_cold_refresh(store):
    """A window shorter than a slice plus ``ingestion_delay`` (4m, slices of 2m, delay 3m)
    that starts in the last sealed slice: whether that slice is kept or read this time, the
    window is cut into the same sets of rows, so its mode share and error bound are a cold
    refresh's (the slice keeps 3 of its 4 scores: a bound is needed either way)."""
    url, schema, dialect = store
    settings = _settings(url, schema, bucket_decimals=1, windows=["4m", "1h"])
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect)
    base = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)  # a slice boundary
    # Four distinct scores in the sealed slice's end, then the fourth five more times in the
    # head: one bucket of several scores, so the mode comes from the slices' top scores.
    early = [(base - timedelta(seconds=20 - 5 * j), 0.111 + 0.001 * j) for j in range(4)]
    log.insert(early + [(base + timedelta(seconds=60 + 10 * j), 0.114) for j in range(5)])
    warm = _refresher(settings, stores)
    warm.predictions.top_scores = 3
    warm.refresh(base + timedelta(minutes=3, seconds=10))  # seals [11:58, 12:00) and keeps it
    as_of = base + timedelta(minutes=3, seconds=30)  # the 4m window starts at 11:59:30
    got = warm.refresh(as_of).score_stats[0]
    cold = _refresher(settings, stores)
    cold.predictions.top_scores = 3
    again = cold.refresh(as_of).score_stats[0]
    exact = log.expected(as_of - timedelta(minutes=4), as_of)["mode_share"]
    assert exact == pytest.approx(6 / 9)
    assert got.mode_share_error_bound is not None  # the sealed slice kept 3 of its 4 scores
    assert (got.mode_share, got.mode_share_error_bound) == (again.mode_share, again.mode_share_error_bound)
    assert got.mode_share <= exact <= got.mode_share + got.mode_share_error_bound
    stores.dispose()
    log.engine.dispose()


def test_a_late_duplicate_read_again_with_its_slice_is_found_by_the_audit(store):
    """A row written later than ``ingestion_delay`` into a kept slice, with the id of an
    older row of the window: the slice is read again (not audited) because a duplicated id
    it left out is no longer one, which takes the late row in without probing its id. At
    the next audit the refresh must still equal a cold one (both rows ``duplicate_id``)."""
    url, schema, dialect = store
    settings = _settings(url, schema, unique=False)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect)
    base = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    at = [base - timedelta(minutes=m) for m in (59.5, 19.5, 29.5)]
    log.insert([(at[0], 0.2), (at[1], 0.4), (at[2], 0.6)], ids=[1, 1, 2])  # id 1 twice in [11:00, 12:00)
    warm = _refresher(settings, stores)
    warm.refresh(base)  # keeps [11:40, 11:42) without id 1's row
    log.insert([(base - timedelta(minutes=19), 0.3)], ids=[2])  # late, into that slice: id 2 twice
    warm.refresh(base + timedelta(minutes=1))  # id 1 left the window: the slice is read again
    _check(log, warm, settings, stores, base + timedelta(minutes=21))  # the audit (every 20m)
    stores.dispose()
    log.engine.dispose()


def test_ids_made_unique_while_running_leave_nothing_out(store):
    """The duplicates of an id deleted and a unique index created while mlmon runs: once the
    table is reflected again (as after a failed refresh), ids are unique by schema, and the
    id's remaining row, left out of the kept slices as a duplicate, counts again."""
    url, schema, dialect = store
    settings = _settings(url, schema, unique=False)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect)
    base = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    log.insert([(base - timedelta(minutes=m), 0.25 + m / 100) for m in (30, 20, 10)], ids=[1, 1, 2])
    warm = _refresher(settings, stores)
    warm.refresh(base)  # id 1 duplicated: its rows are left out of the kept slices
    log.delete([0])
    sa.Index("predictions_id", log.table.c.id, unique=True).create(log.engine)
    warm.predictions.forget()  # what the refresher does after a failure: reflect again
    assert warm.predictions.queries().unique_ids
    _check(log, warm, settings, stores, base + timedelta(minutes=21))  # after an audit too
    stores.dispose()
    log.engine.dispose()


@pytest.mark.long
def test_a_statement_failing_mid_refresh_leaves_nothing_wrong_kept(tmp_path):
    """Each statement of a refresh in turn fails (the store refuses it) after duplicated ids
    changed since the last one and a row was written late: the refresh after that equals a
    cold one."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    settings = _settings(url, None, unique=False, bucket_decimals=1)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, None, "sqlite")
    rng = np.random.default_rng(3)
    history = [(START - timedelta(seconds=float(s)), float(rng.random())) for s in rng.uniform(0, 3600, 200)]
    log.insert(history, [int(i) for i in rng.integers(0, 150, len(history))])  # ids reused across slices
    failed = 0
    for fail_at in range(12):
        warm = _refresher(settings, stores)
        warm.refresh(START)
        log.insert(
            [(START - timedelta(minutes=40), 0.5), (START + timedelta(seconds=30), 0.25)], ids=[7, 1000 + fail_at]
        )

        seen: list[str] = []

        def refuse(conn, cursor, statement, parameters, context, executemany, seen=seen, fail_at=fail_at):
            seen.append(statement)
            if len(seen) == fail_at + 1:
                raise sa.exc.OperationalError(statement, parameters, Exception("refused"))

        engine = stores.engine("s")
        sa.event.listen(engine, "before_cursor_execute", refuse)
        as_of = START + timedelta(minutes=21)  # the audit is due
        try:
            failed += not warm.refresh(as_of).sources["predictions"].up
        finally:
            sa.event.remove(engine, "before_cursor_execute", refuse)
        _check(log, warm, settings, stores, as_of + timedelta(seconds=20))
    assert failed >= 6  # the refresh runs at least 6 statements: each failed once
    stores.dispose()
    log.engine.dispose()


@pytest.mark.long
@pytest.mark.parametrize("limit", ["MAX_LISTED_DUPLICATES", "MAX_DUPLICATE_ROWS"])
def test_too_many_duplicates_to_list_read_the_windows_in_full(store, monkeypatch, limit, tmp_path):
    """The random sequences with duplicated ids, their ids or rows past a lowered limit at
    some refreshes only: reading the windows in full there, and going back to kept slices
    after, still equals a cold refresh and pandas."""
    monkeypatch.setattr(queries, limit, 6)
    sliced = PredictionsSource._sliced
    paths: Counter[bool] = Counter()

    def counted(self, conn, windows, store):
        result = sliced(self, conn, windows, store)
        paths[result is None] += 1
        return result

    monkeypatch.setattr(PredictionsSource, "_sliced", counted)
    test_kept_slices_equal_a_cold_refresh(store, 1, unique=False, fill=1, tmp_path=tmp_path, monkeypatch=monkeypatch)
    assert paths[True] and paths[False]  # both in full and on kept slices


@pytest.mark.long
def test_a_day_of_one_minute_slices_on_sqlite(tmp_path):
    """1,440 slices of a minute in the 24h window, the most ``time_slice`` allows, each with
    a bucket of several scores: the cold refresh (most frequent scores of every slice) and
    the audit of every kept slice run on SQLite, whose expressions are at most 1,000 deep:
    each reads a few ranges, not one per slice, and equals a cold refresh."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    settings = _settings(url, None, bucket_decimals=1, windows=["7m", "24h"], time_slice="1m")
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, None, "sqlite")
    rng = np.random.default_rng(5)
    day = timedelta(hours=24).total_seconds()
    log.insert(
        [(START - timedelta(seconds=float(s)), 0.5 + 0.1 * float(rng.random())) for s in rng.uniform(0, day, 3000)]
    )
    warm = _refresher(settings, stores)
    for as_of in (START, START + timedelta(minutes=21)):  # the second audits the kept slices
        got = warm.refresh(as_of)
        assert all(s.up for s in got.sources.values()), got.sources
        cold = _refresher(settings, stores).refresh(as_of)
        for w, c in zip(got.score_stats, cold.score_stats, strict=True):
            _same(w, c)
            assert w.mode_share_error_bound == c.mode_share_error_bound
    stores.dispose()
    log.engine.dispose()
