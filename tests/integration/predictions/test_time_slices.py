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
from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.slices import EPOCH, TopCounts, ceil_to, floor_to
from exporter.predictions.stores import Stores, to_wall_clock
from exporter.snapshot import ScoreStats
from tests.conftest import model_settings

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
        model={"windows": ["7m", "1h"], "time_slice": "2m", "slice_audit_interval": "20m", **model},
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


@pytest.mark.parametrize("unique", [True, False], ids=["unique-ids", "duplicate-ids"])
@pytest.mark.parametrize("seed", [1, 2])
def test_kept_slices_equal_a_cold_refresh(store, seed, unique):
    url, schema, dialect = store
    rng = np.random.default_rng(seed)
    settings = _settings(url, schema, unique=unique)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect)
    # An hour of history before the first refresh, then refreshes every 10 s to 7 min.
    history = [(START - timedelta(seconds=float(s)), _score(rng, dialect)) for s in rng.uniform(0, 4000, 300)]
    log.insert(history, _ids(rng, log, len(history), unique))
    warm = _refresher(settings, stores)
    as_of = START
    last_audit = None  # the first refresh starts the audit clock
    changed_since_audit = False
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
            changed_since_audit = True
        if rng.random() < 0.2 and log.rows:  # deleted
            log.delete([int(k) for k in rng.choice(list(log.rows), 3, replace=False)])
            changed_since_audit = True
        as_of = following
        last_audit = last_audit or as_of
        if changed_since_audit and as_of - last_audit < AUDIT:
            warm.refresh(as_of)  # the change may not be seen before the next audit
            continue
        if as_of - last_audit >= AUDIT:
            last_audit, changed_since_audit = as_of, False
        _check(log, warm, settings, stores, as_of)
    stores.dispose()
    log.engine.dispose()


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
