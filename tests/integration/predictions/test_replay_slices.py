"""Kept replay slices (issue 12): with time slices on, a refresher that keeps the settled
slices' replay aggregates between refreshes gives the reproducibility a fresh refresher
computes in one pass at the same time, and both equal the rule of docs/metrics.md applied
in Python to the same rows: after random sequences of refreshes at unaligned times,
predictions written within ``ingestion_delay``, replays written within ``replay_delay``,
replays that reproduce, miss or are no probability, and predictions and replays written
later than that, deleted or rewritten (taken in by the next audit), with ids declared
unique and with duplicated ids, on SQLite, PostgreSQL and DuckDB; and after a restart,
from the slices saved in the state database."""

from __future__ import annotations

import sqlite3
from collections import Counter
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import sqlalchemy as sa

from exporter.predictions.refresh import ModelRefresher, worst_case_queries
from exporter.predictions.slices import EPOCH, floor_to
from exporter.predictions.sources import ReplaysSource
from exporter.predictions.stores import Stores
from exporter.training.storage import StateDatabase, kept_replay_slices
from tests.conftest import AuditClock, model_settings, statements_by_source
from tests.integration.predictions.test_time_slices import _same as _same_stats

START = datetime(2026, 5, 4, 12, 0, 7, tzinfo=UTC)
SLICE = timedelta(minutes=2)
INGESTION = timedelta(minutes=1)
REPLAY_DELAY = timedelta(minutes=10)
AUDIT = timedelta(minutes=20)
WINDOWS = {"15m": timedelta(minutes=15), "1h": timedelta(hours=1)}


def _settings(url: str, schema: str | None, fill: int, unique: bool = True):
    return model_settings(
        url,
        schema,
        labels=False,
        replays=True,
        predictions={"unique_ids": unique, "ingestion_delay": "1m"},
        model={
            "windows": list(WINDOWS),
            "time_slice": "2m",
            "replay_delay": "10m",
            "slice_audit_interval": "20m",
            "slice_fill_refreshes": fill,
        },
    )


def _refresher(settings, stores: Stores) -> ModelRefresher:
    return ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)


def _naive(instant: datetime) -> datetime:
    return instant.astimezone(UTC).replace(tzinfo=None)


class Tables:
    """The prediction and replay tables and a copy of their rows: predictions as (id, UTC
    instant, score), replays by key (id, score)."""

    def __init__(self, url: str, schema: str | None, id_index: bool = False):
        self.engine = sa.create_engine(url)
        metadata = sa.MetaData(schema=schema)
        self.predictions = sa.Table(
            "predictions",
            metadata,
            sa.Column("id", sa.BigInteger, index=id_index),
            sa.Column("ts", sa.DateTime),
            sa.Column("p", sa.Double),
        )
        self.replays = sa.Table(
            "replays",
            metadata,
            sa.Column("k", sa.BigInteger),
            sa.Column("id", sa.BigInteger, index=id_index),
            sa.Column("p", sa.Double),
        )
        metadata.create_all(self.engine)
        self.rows: list[tuple[int, datetime, float | None]] = []
        self.replayed: dict[int, tuple[int, float | None]] = {}
        self.next_id = 0

    def predict(self, rows: list[tuple[datetime, float | None]], ids: list[int] | None = None) -> list[int]:
        """Write predictions, with new ids unless ``ids`` (ids already used: duplicated)."""
        if ids is None:
            ids = list(range(self.next_id + 1, self.next_id + 1 + len(rows)))
            self.next_id += len(rows)
        written = [(i, ts, p) for i, (ts, p) in zip(ids, rows, strict=True)]
        self.rows += written
        if written:
            with self.engine.begin() as conn:
                conn.execute(self.predictions.insert(), [{"id": i, "ts": _naive(ts), "p": p} for i, ts, p in written])
        return ids

    def replay(self, rows: list[tuple[int, float | None]]) -> None:
        records = []
        for ident, p in rows:
            k = len(self.replayed) and max(self.replayed) + 1
            self.replayed[k] = (ident, p)
            records.append({"k": k, "id": ident, "p": p})
        if records:
            with self.engine.begin() as conn:
                conn.execute(self.replays.insert(), records)

    def rewrite_replay(self, k: int, p: float | None) -> None:
        self.replayed[k] = (self.replayed[k][0], p)
        with self.engine.begin() as conn:
            conn.execute(self.replays.update().where(self.replays.c.k == k).values(p=p))

    def delete_replays(self, keys: list[int]) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.replays.delete().where(self.replays.c.k.in_(keys)))
        for k in keys:
            self.replayed.pop(k)

    def delete_predictions(self, ids: list[int]) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.predictions.delete().where(self.predictions.c.id.in_(ids)))
        self.rows = [row for row in self.rows if row[0] not in ids]

    def expected(self, window: timedelta, as_of: datetime) -> tuple[int, int, float | None]:
        """(replayed, reproduced, abs_error_max) of ``window`` at ``as_of`` by the rule of
        docs/metrics.md: every (valid prediction, replay row) pair of the window, a
        prediction whose id several rows of the window carry left out; reproduced when the
        replay is a probability within atol + rtol x max(|a|, |b|) (1e-6 each)."""
        in_window = [row for row in self.rows if as_of - window <= row[1] < as_of]
        carried = Counter(ident for ident, _, _ in in_window)
        by_id: dict[int, list[float | None]] = {}
        for ident, p in self.replayed.values():
            by_id.setdefault(ident, []).append(p)
        replayed, reproduced, errors = 0, 0, []
        for ident, _, a in in_window:
            if a is None or not 0 <= a <= 1 or carried[ident] > 1:
                continue
            for b in by_id.get(ident, []):
                replayed += 1
                if b is not None and 0 <= b <= 1:
                    errors.append(abs(a - b))
                    reproduced += abs(a - b) <= 1e-6 + 1e-6 * max(abs(a), abs(b))
        return replayed, reproduced, max(errors) if errors else None


def _score(rng: np.random.Generator) -> float | None:
    kind = rng.random()
    if kind < 0.04:
        return None
    if kind < 0.08:
        return 1.5
    return float(rng.random())


def _replay_of(score: float | None, rng: np.random.Generator) -> float | None:
    """A replay of a served ``score``: the same, off by less or more than the tolerance, or
    no probability."""
    kind = rng.random()
    base = 0.5 if score is None or not 0 <= score <= 1 else score
    if kind < 0.05:
        return None
    if kind < 0.1:
        return 1.5
    if kind < 0.5:
        return base
    if kind < 0.75:
        return min(1.0, base + 1e-9)
    return abs(base - float(rng.uniform(1e-4, 0.3)))


def _check(tables: Tables, warm: ModelRefresher, cold_settings, stores: Stores, as_of: datetime) -> None:
    got = warm.refresh(as_of)
    assert all(s.up for s in got.sources.values()), got.sources
    cold = _refresher(cold_settings, stores).refresh(as_of)
    for w, c in zip(got.score_stats, cold.score_stats, strict=True):  # the predictions' too
        _same_stats(w, c)
    for w, c in zip(got.replays, cold.replays, strict=True):
        replayed, reproduced, largest = tables.expected(WINDOWS[w.window], as_of)
        assert (w.replayed, c.replayed) == (replayed, replayed), w.window
        assert w.ratio == c.ratio == (reproduced / replayed if replayed else None), w.window
        assert w.abs_error_max == c.abs_error_max == pytest.approx(largest, rel=1e-12), w.window


# Every (case, engine) pair runs in CI: the default tier (5-minute budget) runs case 1 on
# SQLite and PostgreSQL and the duplicated-id cases on PostgreSQL (with an id index: the
# LATERAL lookups); the long tier every other pair.
@pytest.mark.parametrize(
    ("store", "seed", "unique", "id_index"),
    [
        pytest.param(
            store, seed, unique, id_index, id=f"{name}-{store}", marks=() if store in fast_on else pytest.mark.long
        )
        for name, seed, unique, id_index, fast_on in [
            ("1", 1, True, False, ("sqlite", "postgresql")),
            ("3-duplicates", 3, False, False, ("postgresql",)),
            ("4-duplicates-id-index", 4, False, True, ("postgresql",)),
            ("2", 2, True, False, ()),
        ]
        for store in ("sqlite", "postgresql", "duckdb")
    ],
    indirect=["store"],
)
def test_kept_replay_slices_equal_a_one_pass_refresh(store, seed, unique, id_index, tmp_path):
    """The warm refresher reads every settled slice at its first refresh
    (``slice_fill_refreshes`` 1) and keeps them; each cold refresher fills (the default
    24), so its first refresh reads the windows in one pass. Replays of the predictions of
    the last 9 minutes are written before their slice settles (``replay_delay`` 10m after
    its end); the others are late, and count from the next audit. With ``id_index``, both
    ids are indexed (PostgreSQL then looks each probed id up in the predictions' index,
    ``PredictionQueries.duplicates_among``, and each prediction's replays up in theirs,
    ``replays_by_lookup``); the prediction statistics are compared too. The warm refresher
    saves its slices as ``mlmon serve`` does and is now and then restarted (a new
    refresher restoring them)."""
    url, schema, _ = store
    rng = np.random.default_rng(seed)
    stores = Stores(_settings(url, schema, 1, unique).stores, timedelta(seconds=30))
    tables = Tables(url, schema, id_index)
    history = sorted(START - timedelta(seconds=float(s)) for s in rng.uniform(0, 4800, 300))
    ids = tables.predict([(ts, _score(rng)) for ts in history])
    scores = {ident: p for ident, _, p in tables.rows}
    tables.replay([(i, _replay_of(scores[i], rng)) for i in ids for _ in range(int(rng.choice([0, 1, 1, 2])))])
    if not unique:  # duplicated ids in the history too
        again = [int(i) for i in rng.choice(ids, 12, replace=False)]
        tables.predict([(START - timedelta(seconds=float(rng.uniform(90, 4800))), 0.5) for _ in again], again)
    state = StateDatabase(f"sqlite:///{tmp_path}/state.sqlite")

    def serving() -> ModelRefresher:
        served = _settings(url, schema, 1, unique)
        model = served.models[0]
        return ModelRefresher(model, "models[0]", served.refresh_policy, stores, state=state, save_slices=True)

    warm = serving()
    cold_settings = _settings(url, schema, 24, unique)
    as_of = START
    audits = AuditClock(AUDIT)
    for _step in range(22):
        following = as_of + timedelta(seconds=float(rng.uniform(10, 300)))
        fresh = [following - timedelta(seconds=float(s)) for s in rng.uniform(0, 60, int(rng.integers(0, 25)))]
        tables.predict([(ts, _score(rng)) for ts in fresh])
        # On time: replays of predictions of the last 9 minutes (their slices settle later).
        recent = [(i, p) for i, ts, p in tables.rows if ts >= following - timedelta(minutes=9)]
        if recent:
            chosen = rng.choice(len(recent), min(len(recent), int(rng.integers(0, 15))), replace=False)
            tables.replay([(recent[c][0], _replay_of(recent[c][1], rng)) for c in chosen])
        if not unique and rng.random() < 0.5:  # an id used again, by a row in the minute before
            ident = int(rng.choice([i for i, _, _ in tables.rows]))
            tables.predict([(following - timedelta(seconds=float(rng.uniform(0, 60))), _score(rng))], [ident])
        # Predictions of settled slices inside the hour: a change to them is late.
        old = [
            (i, p)
            for i, ts, p in tables.rows
            if following - timedelta(minutes=55) <= ts < following - timedelta(minutes=15)
        ]
        roll = rng.random()
        if roll < 0.1:  # a replay written late: its prediction's slice is settled
            ident, p = old[int(rng.integers(len(old)))]
            tables.replay([(ident, _replay_of(p, rng))])
            audits.changed = True
        elif roll < 0.15 and tables.replayed:  # a replay rewritten with another score
            tables.rewrite_replay(int(rng.choice(list(tables.replayed))), float(rng.random()))
            audits.changed = True
        elif roll < 0.2 and tables.replayed:  # replays deleted
            tables.delete_replays([int(k) for k in rng.choice(list(tables.replayed), 2, replace=False)])
            audits.changed = True
        elif roll < 0.25:  # a prediction written late, replayed too
            (ident,) = tables.predict([(following - timedelta(minutes=float(rng.uniform(15, 50))), 0.25)])
            tables.replay([(ident, 0.25)])
            audits.changed = True
        elif roll < 0.3 and not unique:  # an id used again by a row written late, any score
            ident = int(rng.choice([i for i, _ in old]))
            tables.predict([(following - timedelta(minutes=float(rng.uniform(15, 50))), _score(rng))], [ident])
            audits.changed = True
        elif roll < 0.35:  # deleted predictions
            tables.delete_predictions([int(i) for i in rng.choice([i for i, _ in old], 2, replace=False)])
            audits.changed = True
        as_of = following
        if rng.random() < 0.1:  # a restart: a new refresher restores the saved slices
            warm = serving()
            audits.restart()
        if not audits.comparable(as_of):
            warm.refresh(as_of)
            continue
        _check(tables, warm, cold_settings, stores, as_of)
    assert warm.sources["replays"].slices.slices, "settled slices were kept"
    if not unique:
        assert warm.sources["replays"]._left_out.ids, "kept slices left duplicated ids out"
    stores.dispose()
    state.engine.dispose()
    tables.engine.dispose()


def _minutely(tables: Tables) -> None:
    """A prediction scored 0.5 at each minute from 1 to 69 before ``START``, each replayed
    exactly."""
    ids = tables.predict([(START - timedelta(minutes=m), 0.5) for m in range(1, 70)])
    tables.replay([(i, 0.5) for i in ids])


def test_a_steady_refresh_reads_only_the_slices_not_yet_settled(tmp_path):
    """Once the settled slices are kept, the replay statement reads only the window's head
    (the slices ending less than ``ingestion_delay`` + ``replay_delay`` ago) and tail: a
    replay written for a prediction of a settled slice is not seen until the audit, and is
    seen then; one of a slice not yet settled is seen at the next refresh."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    settings = _settings(url, None, 1)
    stores = Stores(settings.stores, timedelta(seconds=30))
    tables = Tables(url, None)
    _minutely(tables)
    warm = _refresher(settings, stores)
    hour = next(r for r in warm.refresh(START).replays if r.window == "1h")
    assert (hour.replayed, hour.ratio) == (60, 1.0)
    kept = warm.sources["replays"].slices.slices
    # The window [11:00:07, 12:00:07): the slices wholly in it that end by 11:49:07
    # (ingestion_delay + replay_delay before its end) are settled, 11:02 to 11:46.
    assert sorted(kept) == [datetime(2026, 5, 4, 11, 2, tzinfo=UTC) + k * timedelta(minutes=2) for k in range(23)]
    by_minute = {round((START - ts).total_seconds() / 60): i for i, ts, _ in tables.rows}
    tables.replay([(by_minute[30], 0.9), (by_minute[5], 0.9)])  # settled, and not yet
    second = next(r for r in warm.refresh(START + timedelta(seconds=20)).replays if r.window == "1h")
    # The hour lost minute 60's prediction and gained the replay of minute 5's, not yet settled.
    assert second.replayed == 60 and second.abs_error_max == pytest.approx(0.4)
    audited = warm.refresh(START + AUDIT + timedelta(seconds=20))
    cold = _refresher(_settings(url, None, 24), stores).refresh(START + AUDIT + timedelta(seconds=20))
    assert audited.replays == cold.replays
    hour = next(r for r in audited.replays if r.window == "1h")
    assert hour.replayed == tables.expected(WINDOWS["1h"], START + AUDIT + timedelta(seconds=20))[0] == 41
    stores.dispose()
    tables.engine.dispose()


@pytest.mark.parametrize("unique", [True, False], ids=["unique", "duplicates"])
def test_worst_case_queries_counts_the_replays_on_slices(tmp_path, unique):
    """A refresh that audits the kept replay slices, with a duplicated id in the window and
    the 15m window's tail in a slice settled since the refresh before: the audit, (without
    unique ids) the id ranges of the slices read, the duplicated ids and their rows, two
    passes and the rows of those ids added back: 3 with unique ids, 7 without
    (``refresh.worst_case_queries``)."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    settings = _settings(url, None, 1, unique)
    stores = Stores(settings.stores, timedelta(seconds=30))
    tables = Tables(url, None)
    _minutely(tables)
    if not unique:
        tables.predict([(START - timedelta(minutes=20, seconds=30), 0.5)], [tables.rows[0][0]])
    refresher = _refresher(settings, stores)
    refresher.refresh(START - AUDIT)  # the audit is due 20 minutes later
    by_source = statements_by_source(refresher, stores)
    # At 12:02:00 the 15m window starts at 11:47:00, in the slice [11:46, 11:48), settled
    # (by 12:02 - 11m) since the refresh before: read this time, so the tail is a second pass.
    as_of = datetime(2026, 5, 4, 12, 2, tzinfo=UTC)
    snap = refresher.refresh(as_of)
    assert all(s.up for s in snap.sources.values())
    predictions = 9 if unique else 10  # and the id ranges
    assert len(by_source["replays"]) == worst_case_queries(settings.models[0]) - predictions == (3 if unique else 7)
    cold = _refresher(_settings(url, None, 24, unique), stores).refresh(as_of)
    assert snap.replays == cold.replays
    stores.dispose()
    tables.engine.dispose()


def test_replays_on_slices_only_where_most_of_the_window_settles():
    """``ingestion_delay`` + ``replay_delay`` beyond half the largest window: the replays
    read their windows in one pass (a sliced statement over most of the window costs more)."""

    def on_slices(replay_delay: str, ingestion_delay: str = "1m") -> bool:
        settings = model_settings(
            "sqlite:///unused.sqlite",
            labels=False,
            replays=True,
            predictions={"ingestion_delay": ingestion_delay},
            model={"windows": ["1h", "24h"], "time_slice": "auto", "replay_delay": replay_delay},
        )
        return settings.models[0].replays_on_slices()

    assert on_slices("0s") and on_slices("11h59m")
    assert not on_slices("12h") and not on_slices("24h") and not on_slices("11h", ingestion_delay="2h")


def _saved(state_url: str) -> dict[datetime, str]:
    """The saved replay slices' starts and fingerprints."""
    engine = sa.create_engine(state_url)
    with engine.connect() as conn:
        table = kept_replay_slices
        rows = conn.execute(sa.select(table.c.slice_start_us, table.c.fingerprint)).all()
    engine.dispose()
    return {EPOCH + timedelta(microseconds=us): f for us, f in rows}


@pytest.mark.parametrize(
    "store", ["sqlite", "postgresql", pytest.param("duckdb", marks=pytest.mark.long)], indirect=True
)
def test_a_restart_reads_only_the_replay_slices_that_changed(store, state_url, slices_read_by_store):
    """A refresh keeping every settled replay slice saves them (``mlmon serve``); while no
    process runs, a replay is written late for a prediction of a kept slice and another
    deleted; a new refresher on the same state database restores the slices, audits them
    and reads from the store only those two and the ones settled since (no fill), equal to
    a cold refresh and to the rule in Python. Without unique ids, the slices that leave out a
    duplicated id's predictions are not saved."""
    url, schema, _ = store
    settings = _settings(url, schema, 1)
    stores = Stores(settings.stores, timedelta(seconds=30))
    tables = Tables(url, schema)
    rng = np.random.default_rng(5)
    ids = tables.predict([(START - timedelta(seconds=float(s)), _score(rng)) for s in rng.uniform(0, 4800, 300)])
    scores = {ident: p for ident, _, p in tables.rows}
    tables.replay([(i, _replay_of(scores[i], rng)) for i in ids if rng.random() < 0.7])
    states = [StateDatabase(state_url)]

    def serving(settings_) -> ModelRefresher:
        model = settings_.models[0]
        return ModelRefresher(model, "models[0]", settings_.refresh_policy, stores, state=states[0], save_slices=True)

    first = serving(settings)
    assert all(s.up for s in first.refresh(START).sources.values())
    kept = first.sources["replays"].slices.slices
    assert set(_saved(state_url)) == set(kept) and len(kept) == 23
    # Predictions of kept slices that stay in the hour at the restart.
    in_kept = sorted(
        (ts, i)
        for i, ts, p in tables.rows
        if p is not None and 0 <= p <= 1 and floor_to(ts, SLICE) in kept and ts >= START - timedelta(minutes=55)
    )
    (late_at, late), (gone_at, gone) = in_kept[3], in_kept[-3]
    tables.replay([(late, 0.5)])
    tables.delete_replays([k for k, (i, _) in tables.replayed.items() if i == gone] or [])
    tables.delete_predictions([gone])
    as_of = START + timedelta(minutes=2)
    restarted = serving(_settings(url, schema, 10))
    _check(tables, restarted, _settings(url, schema, 24), stores, as_of)
    store_ = restarted.sources["replays"].slices
    settled = floor_to(as_of - INGESTION - REPLAY_DELAY, SLICE)
    since = {settled - SLICE} if settled - SLICE not in kept else set()
    assert set(slices_read_by_store[id(store_)]) == {floor_to(late_at, SLICE), floor_to(gone_at, SLICE), *since}
    assert store_.filled and set(_saved(state_url)) == set(store_.slices)
    # Without unique ids, the slices that left out a duplicated id's predictions depend on
    # the ids known, which are not saved: the others are saved.
    (twice_at, twice) = in_kept[5]
    written_again = START - timedelta(minutes=25)
    tables.predict([(written_again, 0.5)], ids=[twice])
    duplicates = serving(_settings(url, schema, 1, unique=False))
    assert all(s.up for s in duplicates.refresh(as_of + timedelta(minutes=1)).sources.values())
    kept_now = set(duplicates.sources["replays"].slices.slices)
    left_out = {floor_to(twice_at, SLICE), floor_to(written_again, SLICE)}
    assert left_out < kept_now and set(_saved(state_url)) == kept_now - left_out
    stores.dispose()
    tables.engine.dispose()
    states[0].engine.dispose()


def test_an_on_time_replay_counts_after_a_clock_set_back(tmp_path):
    """Naive Europe/Berlin timestamps; the clocks go back at 01:00 UTC on 2026-10-25. A
    prediction stamped 02:20 (the second one, written at 01:20 UTC, read as 00:40 UTC) is
    replayed 15 minutes after it was written, within replay_delay (20m): its slice settles
    only 20 minutes after its rows are written (``written_by(x - replay_delay)``), so the
    replay counts at the next refresh, as in one pass (it was kept at 01:31:30 before)."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    berlin = ZoneInfo("Europe/Berlin")
    settings = model_settings(
        url,
        labels=False,
        replays=True,
        predictions={"unique_ids": True, "ingestion_delay": "0s", "timezone": "Europe/Berlin"},
        model={
            "windows": ["1h"],
            "time_slice": "2m",
            "replay_delay": "20m",
            "slice_audit_interval": "1h",
            "slice_fill_refreshes": 1,
        },
    )
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE predictions (id INTEGER, ts TIMESTAMP, p REAL)")
        conn.exec_driver_sql("CREATE TABLE replays (id INTEGER, p REAL)")
        for k in range(111):  # 23:30 to 01:20 UTC, one a minute, all replayed but the last
            real = datetime(2026, 10, 24, 23, 30, tzinfo=UTC) + timedelta(minutes=k)
            wall = real.astimezone(berlin).replace(tzinfo=None).isoformat(" ")
            conn.exec_driver_sql("INSERT INTO predictions VALUES (?, ?, 0.5)", (k, wall))
            if k < 110:
                conn.exec_driver_sql("INSERT INTO replays VALUES (?, 0.5)", (k,))
    stores = Stores(settings.stores, timedelta(seconds=30))
    warm = _refresher(settings, stores)
    warm.refresh(datetime(2026, 10, 25, 1, 31, 30, tzinfo=UTC))
    with engine.begin() as conn:  # at 01:35 UTC: 15 minutes after the prediction was written
        conn.exec_driver_sql("INSERT INTO replays VALUES (110, 0.0)")
    at = datetime(2026, 10, 25, 1, 36, tzinfo=UTC)
    assert warm.refresh(at).replays == _refresher(settings, stores).refresh(at).replays  # 32 vs 33 pairs


def test_a_refresh_failing_after_its_audit_leaves_the_every_id_probe_owed(tmp_path, monkeypatch):
    """A row with a NULL score written late into a kept slice duplicates the id of a replayed
    prediction in another kept slice: the replay audit cannot see it (valid predictions
    only), only its every-id probe can. That refresh times out on the probe: the next
    search probes every id (``LeftOutIds``; before, the next refreshes counted the id until
    the next audit: 39 pairs, one pass 38)."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    stores = Stores(_settings(url, None, 1, unique=False).stores, timedelta(seconds=30))
    tables = Tables(url, None)
    _minutely(tables)
    warm = _refresher(_settings(url, None, 1, unique=False), stores)
    warm.refresh(START)
    ident = next(i for i, ts, _ in tables.rows if ts == START - timedelta(minutes=30))
    tables.predict([(START - timedelta(minutes=20, seconds=30), None)], [ident])
    running, run = [], ReplaysSource.run

    def recorded(self, as_of):
        running.append(True)
        try:
            return run(self, as_of)
        finally:
            running.pop()

    monkeypatch.setattr(ReplaysSource, "run", recorded)
    left = [1]

    def timeout(conn, cursor, statement, *args):  # the every-id search of the audit's refresh
        if running and left[0] and "HAVING count(*) >" in statement:
            left[0] = 0
            raise sqlite3.OperationalError("interrupted")

    sa.event.listen(stores.engine("s"), "before_cursor_execute", timeout)
    assert not warm.refresh(START + timedelta(minutes=20, seconds=20)).sources["replays"].up
    at = START + timedelta(minutes=21)
    cold = _refresher(_settings(url, None, 24, unique=False), stores).refresh(at)
    assert warm.refresh(at).replays == cold.replays
