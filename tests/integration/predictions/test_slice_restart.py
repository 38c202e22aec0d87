"""Kept time slices survive a restart (issue 12): ``mlmon serve``'s refresher saves its sealed
slices in the state database, and a new refresher on the same state database restores them,
audits them at its first refresh and reads only what changed, equal to a cold refresh and to
pandas on SQLite, PostgreSQL and DuckDB; another configuration, unreadable rows, duplicate
ids and a failing state database each leave a correct, colder refresh."""

from __future__ import annotations

import io
import logging
from datetime import datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from exporter.config import Settings, Store
from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.saved_slices import TOP_DTYPE, decode, encode
from exporter.predictions.slices import EPOCH, Histogram, Sliced, TopCounts, floor_to, slice_starts
from exporter.predictions.sources import PredictionsSource
from exporter.predictions.stores import Stores
from exporter.server.loop import RefreshLoop, refresh_all
from exporter.snapshot import SnapshotStore
from exporter.training.storage import StateDatabase, kept_slices
from tests.integration.predictions.test_time_slices import DELAY, SLICE, START, Log, _check, _settings


@pytest.fixture
def read_slices(monkeypatch):
    """The starts of the sealed slices each refresher's refreshes read from the store (by
    ``PredictionsSource``), recorded as ``_read_parts`` reads them."""
    read: dict[int, list[datetime]] = {}
    original = PredictionsSource._read_parts

    def recorded(self, conn, plan):
        read.setdefault(id(self), []).extend(plan.new_slices)
        return original(self, conn, plan)

    monkeypatch.setattr(PredictionsSource, "_read_parts", recorded)
    return read


@pytest.fixture
def serving():
    """Makes a refresher as ``mlmon serve`` builds it, as a new process would: ``(settings,
    stores, state_url)`` to one on the state database at ``state_url``; its engines are
    disposed after the test."""
    states: list[StateDatabase] = []

    def make(settings, stores: Stores, state_url: str) -> ModelRefresher:
        states.append(StateDatabase(state_url))
        model = settings.models[0]
        return ModelRefresher(model, "models[0]", settings.refresh_policy, stores, state=states[-1], save_slices=True)

    yield make
    for state in states:
        state.engine.dispose()


def _saved(state_url: str) -> dict[datetime, str]:
    """The saved slices' starts and fingerprints."""
    engine = sa.create_engine(state_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(kept_slices.c.slice_start_us, kept_slices.c.fingerprint)).all()
    engine.dispose()
    return {EPOCH + timedelta(microseconds=us): f for us, f in rows}


def _history(log: Log, seed: int = 1, count: int = 400) -> None:
    rng = np.random.default_rng(seed)
    scores = [float(np.round(rng.random(), 2)) if rng.random() < 0.5 else float(rng.random()) for _ in range(count)]
    log.insert(
        [(START - timedelta(seconds=float(s)), p) for s, p in zip(rng.uniform(0, 4000, count), scores, strict=True)]
    )


def _saved_once(tmp_path, state_url: str, serving) -> tuple[str, Settings, Stores, Log]:
    """A SQLite store holding ``_history``, refreshed once at ``START`` by a refresher saving
    its slices in ``state_url``: (store url, settings, stores, log)."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    settings = _settings(url, None)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, None, "sqlite")
    _history(log)
    serving(settings, stores, state_url).refresh(START)
    return url, settings, stores, log


def test_a_restart_reads_only_what_changed_meanwhile(store, tmp_path, read_slices, serving):
    """A refresh, then, while no process runs, a row written late into a kept slice, a row
    of another deleted and new rows; a new refresher on the same state database reads from
    the store only those two slices (found by the audit) and the one sealed since, not the
    hour, and equals a cold refresh and pandas."""
    url, schema, dialect = store
    settings = _settings(url, schema)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect)
    _history(log)
    state_url = f"sqlite:///{tmp_path}/state.sqlite"
    first = serving(settings, stores, state_url)
    first.refresh(START)
    kept = first.predictions.slices.slices
    assert set(_saved(state_url)) == set(kept) and len(kept) > 20
    # While mlmon is down: a row written late into a kept slice, a kept slice's row deleted,
    # new rows.
    late = START - timedelta(minutes=30)
    log.insert([(late, 0.375)])
    gone_key = next(
        k for k, (_, ts, _) in log.rows.items() if START - timedelta(minutes=50) <= ts < START - timedelta(minutes=48)
    )
    gone = log.rows[gone_key][1]
    log.delete([gone_key])
    log.insert([(START + timedelta(seconds=s), 0.5) for s in (10, 50, 100)])
    as_of = START + timedelta(minutes=2)
    restarted = serving(settings, stores, state_url)
    _check(log, restarted, settings, stores, as_of)  # equal to a cold refresh and to pandas
    newly_sealed = floor_to(as_of - DELAY, SLICE) - SLICE
    assert sorted(read_slices[id(restarted.predictions)]) == sorted(
        {floor_to(late, SLICE), floor_to(gone, SLICE), newly_sealed}
    )
    assert set(_saved(state_url)) == set(restarted.predictions.slices.slices)
    # The next refresh of the restarted process keeps going from there.
    _check(log, restarted, settings, stores, as_of + timedelta(minutes=2))
    stores.dispose()
    log.engine.dispose()


def test_a_restart_while_the_slices_fill_goes_on_filling(tmp_path, read_slices, serving):
    """With the default fill (2 of the hour's 30 slices a refresh, the newest missing), a
    process refreshed twice and stopped: the new one restores its 4 slices, audits them (a
    row written late into the oldest is found), reads that one again and the one before
    it, and keeps filling; every refresh equals a cold one and pandas."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    settings = _settings(url, None, slice_fill_refreshes=24)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, None, "sqlite")
    _history(log)
    state_url = f"sqlite:///{tmp_path}/state.sqlite"
    first = serving(settings, stores, state_url)
    first.refresh(START)
    first.refresh(START + timedelta(seconds=10))
    kept = sorted(first.predictions.slices.slices)
    assert len(kept) == 4 and set(_saved(state_url)) == set(kept)
    log.insert([(kept[0] + timedelta(seconds=1), 0.375)])  # late, into a kept slice
    restarted = serving(settings, stores, state_url)
    _check(log, restarted, settings, stores, START + timedelta(seconds=20))
    again = read_slices[id(restarted.predictions)]
    assert sorted(again) == [kept[0] - SLICE, kept[0]] and len(restarted.predictions.slices.slices) == 5, again
    assert not restarted.predictions.slices.filled
    stores.dispose()
    log.engine.dispose()


def test_another_configuration_ignores_the_saved_slices(tmp_path, state_url, read_slices, caplog, serving):
    """Saved with ``bucket_decimals`` 5, restarted with 3: the first refresh is cold, and
    the saved slices are replaced by the new ones (SQLite and PostgreSQL state databases)."""
    url, settings, stores, log = _saved_once(tmp_path, state_url, serving)
    before = set(_saved(state_url).values())
    count = len(_saved(state_url))
    other = _settings(url, None, bucket_decimals=3)
    restarted = serving(other, stores, state_url)
    caplog.set_level(logging.INFO, "exporter.predictions.saved_slices")
    as_of = START + timedelta(minutes=1)
    _check(log, restarted, other, stores, as_of)
    assert f"{count} kept time slices in the state database were saved with another configuration" in caplog.text
    window = slice_starts(as_of - timedelta(hours=1), as_of - DELAY, SLICE)
    assert set(read_slices[id(restarted.predictions)]) == set(window)  # cold
    after = set(_saved(state_url).values())
    assert len(after) == 1 and after.isdisjoint(before)  # replaced
    stores.dispose()
    log.engine.dispose()


def test_a_longer_ingestion_delay_keeps_the_saved_slices_it_seals(tmp_path, state_url, read_slices, serving):
    """Restarted with an ``ingestion_delay`` three slices longer: the saved slices are kept
    (the delay decides when a slice is sealed, not what it holds), except the last three,
    which the new delay does not seal yet; nothing is read again, and the refresh equals a
    cold one and pandas."""
    _, settings, stores, log = _saved_once(tmp_path, state_url, serving)
    saved = sorted(_saved(state_url))
    model = settings.models[0]
    longer = model.predictions.model_copy(update={"ingestion_delay": DELAY + 3 * SLICE})
    other = settings.model_copy(update={"models": [model.model_copy(update={"predictions": longer})]})
    restarted = serving(other, stores, state_url)
    _check(log, restarted, other, stores, START + timedelta(seconds=30))
    assert read_slices.get(id(restarted.predictions), []) == []
    assert sorted(restarted.predictions.slices.slices) == saved[:-3]
    stores.dispose()
    log.engine.dispose()


def _top_bytes(keys, lower, upper) -> bytes:
    """A saved row's most frequent scores (``saved_slices.TOP_DTYPE``) as ``.npy`` bytes."""
    top = np.zeros(len(keys), dtype=TOP_DTYPE)
    top["key"], top["lower"], top["upper"] = keys, lower, upper
    buffer = io.BytesIO()
    np.save(buffer, top, allow_pickle=False)
    return buffer.getvalue()


def test_an_unreadable_saved_slice_is_read_again(tmp_path, state_url, read_slices, caplog, serving):
    """Four saved rows spoiled (not an ``.npy`` array, JSON cut short, most frequent scores
    whose upper count is below the lower one, an ``.npz`` archive): each is logged and read
    from the store again, the others are kept."""
    _, settings, stores, log = _saved_once(tmp_path, state_url, serving)
    bad = sorted(_saved(state_url))[5:9]
    archive = io.BytesIO()
    np.savez(archive, hist=np.zeros(3))
    engine = sa.create_engine(state_url)
    us = [(s - EPOCH) // timedelta(microseconds=1) for s in bad]
    with engine.begin() as conn:
        conn.execute(
            kept_slices.update().where(kept_slices.c.slice_start_us == us[0]).values(hist=b"\x93NUMPY garbage")
        )
        conn.execute(kept_slices.update().where(kept_slices.c.slice_start_us == us[1]).values(meta="{"))
        conn.execute(kept_slices.update().where(kept_slices.c.slice_start_us == us[3]).values(hist=archive.getvalue()))
        conn.execute(
            kept_slices.update().where(kept_slices.c.slice_start_us == us[2]).values(top=_top_bytes([7], [3], [2]))
        )
    engine.dispose()
    restarted = serving(settings, stores, state_url)
    caplog.set_level(logging.WARNING)
    as_of = START + timedelta(seconds=30)  # no slice sealed since: only the bad ones are read
    _check(log, restarted, settings, stores, as_of)
    assert sorted(read_slices[id(restarted.predictions)]) == bad
    assert caplog.text.count("cannot be read back") == 4
    assert set(_saved(state_url)) == set(restarted.predictions.slices.slices)
    stores.dispose()
    log.engine.dispose()


@pytest.mark.parametrize(
    "store", ["sqlite", "postgresql", pytest.param("duckdb", marks=pytest.mark.long)], indirect=True
)
def test_duplicate_ids_save_the_slices_that_leave_no_id_out(store, tmp_path, read_slices, serving):
    """Ids not unique: a kept slice that left out the rows of a duplicated id depends on the
    ids known, which are not saved, so the others alone are saved. While no process runs,
    a row of the duplicated id is deleted (it is one no more) and an id of a saved slice is
    written again into another saved slice (a new duplicate); the new refresher reads again
    the two slices never saved, the two that now leave an id out and the one sealed since,
    and equals a cold refresh and pandas."""
    url, schema, dialect = store
    settings = _settings(url, schema, unique=False)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, schema, dialect)
    _history(log)
    twice = [START - timedelta(minutes=50), START - timedelta(minutes=30)]
    log.insert([(twice[0], 0.25), (twice[1], 0.75)], ids=[10**6, 10**6])
    state_url = f"sqlite:///{tmp_path}/state.sqlite"
    first = serving(settings, stores, state_url)
    first.refresh(START)
    kept = set(first.predictions.slices.slices)
    left_out = {floor_to(t, SLICE) for t in twice}
    assert left_out < kept and set(_saved(state_url)) == kept - left_out
    # While mlmon is down.
    log.delete([next(k for k, (i, ts, _) in log.rows.items() if i == 10**6 and ts == twice[0])])
    again_id, again_at = next(
        (i, ts) for i, ts, _ in log.rows.values() if START - timedelta(minutes=40) <= ts < START - timedelta(minutes=38)
    )
    written_again = START - timedelta(minutes=20)
    log.insert([(written_again, 0.5)], ids=[again_id])
    as_of = START + timedelta(minutes=2)
    restarted = serving(settings, stores, state_url)
    _check(log, restarted, settings, stores, as_of)  # equal to a cold refresh and to pandas
    newly_sealed = floor_to(as_of - DELAY, SLICE) - SLICE
    assert sorted(read_slices[id(restarted.predictions)]) == sorted(
        {*left_out, floor_to(again_at, SLICE), floor_to(written_again, SLICE), newly_sealed}
    )
    now_left_out = {floor_to(again_at, SLICE), floor_to(written_again, SLICE)}
    assert set(_saved(state_url)) == set(restarted.predictions.slices.slices) - now_left_out
    _check(log, restarted, settings, stores, as_of + timedelta(minutes=2))
    stores.dispose()
    log.engine.dispose()


def test_an_id_rewritten_in_place_while_down_is_found(tmp_path, serving):
    """Ids not unique; while no process runs, a row of a saved slice gets the id of a row
    of another saved slice (an UPDATE: every count and sum the audit compares stays the
    same). The restarted refresher's audit finds no change, but its first refresh probes
    every id: both rows are duplicates, left out as a cold refresh and pandas leave them."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    settings = _settings(url, None, unique=False)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, None, "sqlite")
    _history(log)
    state_url = f"sqlite:///{tmp_path}/state.sqlite"
    serving(settings, stores, state_url).refresh(START)
    key = next(
        k for k, (_, ts, _) in log.rows.items() if START - timedelta(minutes=46) <= ts < START - timedelta(minutes=44)
    )
    other = next(
        i for i, ts, _ in log.rows.values() if START - timedelta(minutes=26) <= ts < START - timedelta(minutes=24)
    )
    with log.engine.begin() as conn:
        conn.execute(sa.update(log.table).where(log.table.c.k == key).values(id=other))
    _, ts, p = log.rows[key]
    log.rows[key] = (other, ts, p)
    _check(log, serving(settings, stores, state_url), settings, stores, START + timedelta(minutes=2))
    stores.dispose()
    log.engine.dispose()


def test_serve_saves_and_once_does_not(tmp_path):
    """``mlmon once`` (``refresh_all``) opens the state database for the training runs and
    saves no slices there; ``mlmon serve``'s refresh loop saves them."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    state_url = f"sqlite:///{tmp_path}/state.sqlite"
    settings = _settings(url, None).model_copy(update={"state": Store(url=state_url)})
    log = Log(url, None, "sqlite")
    _history(log)
    refresh_all(settings, START)
    assert not _saved(state_url)  # migrated, nothing saved
    stores, state = Stores(settings.stores, settings.query_timeout), StateDatabase(state_url)
    loop = RefreshLoop(settings, SnapshotStore(["ctr"]), stores, state)
    loop.refreshers[0].refresh(START)
    assert set(_saved(state_url)) == set(loop.refreshers[0].predictions.slices.slices)
    stores.dispose()
    state.engine.dispose()
    log.engine.dispose()


@pytest.mark.parametrize(
    "spoil",
    ["DROP TABLE mlmon_kept_slices", "UPDATE mlmon_alembic_version SET version_num = '9999'"],
    ids=["table-gone", "unknown-revision"],
)
def test_a_failing_state_database_leaves_the_refresh_up(tmp_path, caplog, serving, spoil):
    """The saved slices' table gone, or the state database at a revision this mlmon does
    not know (Alembic refuses it): loading and each save fail with a warning; the refresh
    is up and right."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    state_url = f"sqlite:///{tmp_path}/state.sqlite"
    settings = _settings(url, None)
    stores = Stores(settings.stores, settings.query_timeout)
    log = Log(url, None, "sqlite")
    _history(log)
    StateDatabase(state_url).ready().dispose()
    engine = sa.create_engine(state_url)
    with engine.begin() as conn:
        conn.execute(sa.text(spoil))
    engine.dispose()
    refresher = serving(settings, stores, state_url)
    caplog.set_level(logging.WARNING)
    _check(log, refresher, settings, stores, START)
    assert "reading the kept time slices from the state database failed" in caplog.text
    assert "saving the kept time slices in the state database failed" in caplog.text
    _check(log, refresher, settings, stores, START + timedelta(minutes=3))
    stores.dispose()
    log.engine.dispose()


def test_saved_form_round_trip():
    """Several sets of most frequent scores, excluded keys (NaN), and an empty slice."""
    hist = Histogram.from_scores([0, 0, 2, 0], [0.25, 0.5, None, 0.25], 5)
    top = TopCounts.merge(
        [TopCounts.of(np.arange(5), np.arange(5, 0, -1), top=2), TopCounts.of(np.array([7]), np.array([3]))]
    )
    for sliced in (Sliced(hist, top), Sliced.merge([])):
        back = decode(*encode(sliced))
        for name in ("key", "n", "low", "high", "s1", "s2"):
            np.testing.assert_array_equal(getattr(back.hist, name), getattr(sliced.hist, name))
        for name in ("keys", "lower", "upper"):
            np.testing.assert_array_equal(getattr(back.top, name), getattr(sliced.top, name))
        assert back.top.unseen == sliced.top.unseen
        assert back.top.mode() == sliced.top.mode()


def test_saved_form_refuses_a_boolean_count():
    """JSON ``true`` where the ``unseen`` count or the form is due is refused, not read as 1;
    so is a row of the earlier form 1 (its sets of most frequent scores)."""
    hist_bytes, top_bytes, _ = encode(Sliced(Histogram.empty(), TopCounts.of(np.array([3]), np.array([2]))))
    with pytest.raises(ValueError, match="'unseen'"):
        decode(hist_bytes, top_bytes, '{"format": 2, "unseen": true}')
    for form in ("true", "2.0", "1"):
        with pytest.raises(ValueError, match="not of form 2"):
            decode(hist_bytes, top_bytes, f'{{"format": {form}, "unseen": 0}}')
    assert decode(hist_bytes, top_bytes, '{"format": 2, "unseen": 0}').top.mode() == (2, 2)


def test_saved_form_refuses_counts_out_of_order():
    """Most frequent scores whose keys repeat or whose upper count is below the lower one."""
    hist_bytes, _, meta = encode(Sliced.merge([]))
    for keys, lower, upper in (([1, 1], [2, 2], [2, 2]), ([1], [3], [2]), ([1], [0], [0])):
        with pytest.raises(ValueError, match="top: keys not strictly increasing"):
            decode(hist_bytes, _top_bytes(keys, lower, upper), meta)
