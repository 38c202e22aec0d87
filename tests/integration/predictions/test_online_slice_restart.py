"""Kept online slices survive a restart: ``mlmon serve``'s labels save their settled online
slices in the state database after each successful refresh, and a new refresher on the same
state database restores them, audits them at its first refresh and reads only what changed
(no fill, so the labels are not down for a fill's one-pass statement), equal to a cold
refresh and to the label maturity rule in Python on SQLite, PostgreSQL and DuckDB; another
label configuration, unreadable rows, duplicate ids and a failing state database each leave
a correct, colder refresh."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from exporter.config import Store
from exporter.predictions import queries
from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.saved_slices import encode_online
from exporter.predictions.slices import EPOCH, OnlineBuckets, floor_to, slice_starts
from exporter.predictions.stores import Stores
from exporter.server.loop import RefreshLoop, refresh_all
from exporter.snapshot import SnapshotStore
from exporter.training.storage import StateDatabase, kept_online_slices, kept_slices
from tests.integration.predictions.test_online_slices import (
    INGESTION,
    LABEL_DELAY,
    SLICE,
    START,
    Tables,
    _check,
    _label_value,
    _score,
    _settings,
)


@pytest.fixture
def one_pass(monkeypatch):
    """The ``id`` of every ``PredictionQueries`` whose one-pass online statement was built
    (``PredictionQueries.online``): with unique ids, a refresh on kept online slices builds
    it only while the slices fill."""
    built: list[int] = []
    original = queries.PredictionQueries.online

    def recorded(self, *args, **kwargs):
        built.append(id(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(queries.PredictionQueries, "online", recorded)
    return built


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


def _saved(state_url: str, table: sa.Table = kept_online_slices) -> dict[datetime, str]:
    """The saved online slices' (or ``table``'s) starts and fingerprints."""
    engine = sa.create_engine(state_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table.c.slice_start_us, table.c.fingerprint)).all()
    engine.dispose()
    return {EPOCH + timedelta(microseconds=us): f for us, f in rows}


def _history(tables: Tables, seed: int = 1) -> None:
    """80 minutes of predictions before ``START``, and label rows 0 to 9 minutes after them
    (within and beyond ``label_delay``), some twice, written before ``START - INGESTION``."""
    rng = np.random.default_rng(seed)
    history = sorted(START - timedelta(seconds=float(s)) for s in rng.uniform(0, 4800, 300))
    tables.predict([(ts, _score(rng)) for ts in history])
    labels = []
    for ident, (ts, _) in tables.scored.items():
        for _ in range(int(rng.choice([0, 1, 1, 2]))):
            arrived = ts + timedelta(seconds=float(rng.uniform(-30, 540)))
            if arrived < START - INGESTION:
                labels.append((ident, arrived, _label_value(rng)))
    tables.label(labels)


def _valid(tables: Tables, start: datetime, end: datetime, unlabeled: bool = False) -> int:
    """A prediction stamped in ``[start, end)`` with a valid score (and no label row)."""
    labeled = {ident for ident, _, _ in tables.label_rows.values()}
    return next(
        ident
        for ident, (ts, p) in tables.scored.items()
        if start <= ts < end and p is not None and 0 <= p <= 1 and not (unlabeled and ident in labeled)
    )


def _saved_once(tmp_path, state_url: str, serving, missing: str = "ignore"):
    """A SQLite store holding ``_history``, refreshed once at ``START`` by a refresher
    saving its slices in ``state_url`` and reading every settled slice at once
    (``slice_fill_refreshes`` 1): (url, settings, stores, tables, that refresher)."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    settings = _settings(url, None, missing, 1)
    stores = Stores(settings.stores, timedelta(seconds=30))
    tables = Tables(url, None, "sqlite")
    _history(tables)
    first = serving(settings, stores, state_url)
    assert all(s.up for s in first.refresh(START).sources.values())
    return url, settings, stores, tables, first


@pytest.mark.parametrize(
    "store", ["sqlite", "postgresql", pytest.param("duckdb", marks=pytest.mark.long)], indirect=True
)
def test_a_restart_reads_only_the_online_slices_that_changed(store, tmp_path, slices_read_by_store, one_pass, serving):
    """A refresh keeping every settled online slice (and saving them), then, while no process
    runs, a label row written late for a prediction of a kept slice, a kept slice's
    prediction deleted, new predictions; a new refresher on the same state database, with
    the default-like fill (``slice_fill_refreshes`` 10: 3 of the hour's 30 slices), restores
    the slices, audits them and reads from the store only those two and the one settled
    since: it does not fill (no one-pass online statement), and equals a cold refresh
    and the maturity rule in Python; so does its next refresh."""
    url, schema, dialect = store
    settings = _settings(url, schema, "ignore", 1)
    stores = Stores(settings.stores, timedelta(seconds=30))
    tables = Tables(url, schema, dialect)
    _history(tables)
    state_url = f"sqlite:///{tmp_path}/state.sqlite"
    first = serving(settings, stores, state_url)
    assert all(s.up for s in first.refresh(START).sources.values())
    kept = first.sources["labels"].slices.slices
    assert set(_saved(state_url)) == set(kept) and len(kept) == 29
    # While mlmon is down: a label row for an unlabeled prediction of a kept slice, recorded
    # in time to mature but written late; a kept slice's prediction deleted; new predictions.
    late = _valid(tables, START - timedelta(minutes=40), START - timedelta(minutes=30), unlabeled=True)
    late_at = tables.scored[late][0]
    tables.label([(late, late_at + timedelta(seconds=5), 1)])
    gone = _valid(tables, START - timedelta(minutes=20), START - timedelta(minutes=14))
    gone_at = tables.scored[gone][0]
    tables.delete_predictions([gone])
    tables.predict([(START + timedelta(seconds=s), 0.5) for s in (10, 50, 100)])
    as_of = START + timedelta(minutes=2)
    restarted = serving(_settings(url, schema, "ignore", 10), stores, state_url)
    cold_settings = _settings(url, schema, "ignore", 24)
    _check(tables, restarted, cold_settings, stores, as_of, "ignore")
    online = restarted.sources["labels"].slices
    settled = floor_to(as_of - LABEL_DELAY - INGESTION, SLICE) - SLICE
    assert sorted(slices_read_by_store[id(online)]) == sorted(
        {floor_to(late_at, SLICE), floor_to(gone_at, SLICE), settled}
    )
    assert id(restarted.predictions.queries()) not in one_pass and online.filled  # no fill
    assert set(_saved(state_url)) == set(online.slices)
    # The next refresh of the restarted process keeps going from there.
    _check(tables, restarted, cold_settings, stores, as_of + timedelta(minutes=2), "ignore")
    assert id(restarted.predictions.queries()) not in one_pass
    stores.dispose()
    tables.engine.dispose()


def test_another_label_configuration_ignores_the_saved_online_slices(
    tmp_path, state_url, slices_read_by_store, caplog, serving
):
    """Saved with ``missing: ignore``, restarted with ``missing: negative``: the labels'
    first refresh is cold and their saved slices are replaced, while the predictions' saved
    slices, which ``missing`` does not change, are restored (SQLite and PostgreSQL state
    databases)."""
    url, settings, stores, tables, _ = _saved_once(tmp_path, state_url, serving)
    before = set(_saved(state_url).values())
    count = len(_saved(state_url))
    predictions_saved = _saved(state_url, kept_slices)
    other = _settings(url, None, "negative", 1)
    restarted = serving(other, stores, state_url)
    caplog.set_level(logging.INFO)
    as_of = START + timedelta(seconds=30)
    _check(tables, restarted, _settings(url, None, "negative", 24), stores, as_of, "negative")
    assert (
        f"{count} kept online slices in the state database were saved with another configuration "
        "of the predictions or the labels; ignored, and replaced"
    ) in caplog.text
    assert f"{len(predictions_saved)} kept time slices restored from the state database" in caplog.text
    assert "kept online slices restored" not in caplog.text
    end = as_of - LABEL_DELAY
    window = slice_starts(end - timedelta(hours=1), floor_to(end - INGESTION, SLICE), SLICE)
    assert set(slices_read_by_store[id(restarted.sources["labels"].slices)]) == set(window)  # cold
    after = set(_saved(state_url).values())
    assert len(after) == 1 and after.isdisjoint(before)  # replaced
    assert _saved(state_url, kept_slices) == predictions_saved
    stores.dispose()
    tables.engine.dispose()


def test_an_unreadable_online_slice_is_read_again(tmp_path, state_url, slices_read_by_store, caplog, serving):
    """Four saved rows spoiled (buckets not an ``.npy`` array, JSON cut short, buckets whose
    positives do not add up to the totals, the predictions' histogram form): each is logged
    and read from the store again, the others are kept; the refresh equals a cold one."""
    url, settings, stores, tables, first = _saved_once(tmp_path, state_url, serving)
    kept = first.sources["labels"].slices.slices
    bad = sorted(_saved(state_url))[5:9]
    us = [(s - EPOCH) // timedelta(microseconds=1) for s in bad]
    other = next(b for s, b in kept.items() if s not in bad and b.counts[2] != kept[bad[2]].counts[2])
    table = kept_online_slices
    engine = sa.create_engine(state_url)
    with engine.begin() as conn:
        conn.execute(table.update().where(table.c.slice_start_us == us[0]).values(buckets=b"\x93NUMPY garbage"))
        conn.execute(table.update().where(table.c.slice_start_us == us[1]).values(meta="{"))
        conn.execute(table.update().where(table.c.slice_start_us == us[2]).values(buckets=encode_online(other)[0]))
        conn.execute(
            table.update()
            .where(table.c.slice_start_us == us[3])
            .values(buckets=conn.execute(sa.select(kept_slices.c.hist).limit(1)).scalar_one())
        )
    engine.dispose()
    restarted = serving(settings, stores, state_url)
    caplog.set_level(logging.WARNING)
    as_of = START + timedelta(seconds=30)  # no slice settled since: only the bad ones are read
    _check(tables, restarted, _settings(url, None, "ignore", 24), stores, as_of, "ignore")
    assert sorted(slices_read_by_store[id(restarted.sources["labels"].slices)]) == bad
    assert caplog.text.count("kept online slice at") == 4 and caplog.text.count("cannot be read back") == 4
    assert set(_saved(state_url)) == set(restarted.sources["labels"].slices.slices)
    stores.dispose()
    tables.engine.dispose()


def test_duplicate_ids_save_the_online_slices_that_leave_no_id_out(tmp_path, slices_read_by_store, serving):
    """Ids not unique: the online slices that left out the predictions of a duplicated id
    are not saved, the others are. While no process runs, the duplicated id's predictions
    are deleted and an id of a saved slice is written again into another saved slice; the
    new refresher reads again the slices never saved, the two that now leave an id out and
    the one settled since, and equals a cold refresh and the maturity rule in Python."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    settings = _settings(url, None, "ignore", 1, unique=False)
    stores = Stores(settings.stores, timedelta(seconds=30))
    tables = Tables(url, None, "sqlite")
    _history(tables)
    twice = _valid(tables, START - timedelta(minutes=50), START - timedelta(minutes=48))
    written_twice = START - timedelta(minutes=30)
    tables.predict_again([(twice, written_twice, 0.75)])
    state_url = f"sqlite:///{tmp_path}/state.sqlite"
    first = serving(settings, stores, state_url)
    assert all(s.up for s in first.refresh(START).sources.values())
    kept = set(first.sources["labels"].slices.slices)
    left_out = {floor_to(tables.scored[twice][0], SLICE), floor_to(written_twice, SLICE)}
    assert left_out < kept and set(_saved(state_url)) == kept - left_out
    # While mlmon is down.
    tables.delete_predictions([twice])
    again = _valid(tables, START - timedelta(minutes=40), START - timedelta(minutes=38))
    written_again = START - timedelta(minutes=20)
    tables.predict_again([(again, written_again, 0.5)])
    as_of = START + timedelta(minutes=2)
    restarted = serving(settings, stores, state_url)
    cold_settings = _settings(url, None, "ignore", 24, unique=False)
    _check(tables, restarted, cold_settings, stores, as_of, "ignore")
    online = restarted.sources["labels"].slices
    settled = floor_to(as_of - LABEL_DELAY - INGESTION, SLICE) - SLICE
    now_left_out = {floor_to(tables.scored[again][0], SLICE), floor_to(written_again, SLICE)}
    assert sorted(slices_read_by_store[id(online)]) == sorted({*left_out, *now_left_out, settled})
    assert set(_saved(state_url)) == set(online.slices) - now_left_out
    _check(tables, restarted, cold_settings, stores, as_of + timedelta(minutes=2), "ignore")
    stores.dispose()
    tables.engine.dispose()


@pytest.mark.parametrize(
    "spoil",
    ["DROP TABLE mlmon_kept_online_slices", "UPDATE mlmon_alembic_version SET version_num = '9999'"],
    ids=["table-gone", "unknown-revision"],
)
def test_a_failing_state_database_leaves_the_labels_up(tmp_path, caplog, serving, spoil):
    """The saved online slices' table gone, or the state database at a revision this mlmon
    does not know: loading and each save of the online slices fail with a warning; the
    labels are up and right at every refresh."""
    state_url = f"sqlite:///{tmp_path}/state.sqlite"
    StateDatabase(state_url).ready().dispose()
    engine = sa.create_engine(state_url)
    with engine.begin() as conn:
        conn.execute(sa.text(spoil))
    engine.dispose()
    caplog.set_level(logging.WARNING)
    url, settings, stores, tables, refresher = _saved_once(tmp_path, state_url, serving)
    assert "reading the kept online slices from the state database failed" in caplog.text
    assert "saving the kept online slices in the state database failed" in caplog.text
    cold_settings = _settings(url, None, "ignore", 24)
    _check(tables, refresher, cold_settings, stores, START + timedelta(minutes=3), "ignore")
    assert refresher.sources["labels"].slices.slices
    stores.dispose()
    tables.engine.dispose()


def test_serve_saves_the_online_slices_and_once_does_not(tmp_path):
    """``mlmon once`` (``refresh_all``) opens the state database for the training runs and
    saves no online slices there; ``mlmon serve``'s refresh loop saves them."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    state_url = f"sqlite:///{tmp_path}/state.sqlite"
    settings = _settings(url, None, "ignore", 1).model_copy(update={"state": Store(url=state_url)})
    tables = Tables(url, None, "sqlite")
    _history(tables)
    refresh_all(settings, START)
    assert not _saved(state_url)  # migrated, nothing saved
    stores, state = Stores(settings.stores, settings.query_timeout), StateDatabase(state_url)
    loop = RefreshLoop(settings, SnapshotStore(["ctr"]), stores, state)
    loop.refreshers[0].refresh(START)
    online = loop.refreshers[0].sources["labels"].slices.slices
    assert online and set(_saved(state_url)) == set(online)
    stores.dispose()
    state.engine.dispose()
    tables.engine.dispose()


def test_the_saved_online_slices_follow_the_kept_ones(tmp_path, serving):
    """Each save writes what changed: the slice settled since, and deletes the one that left
    the window; a refresh with nothing new writes nothing."""
    state_url = f"sqlite:///{tmp_path}/state.sqlite"
    _, _, stores, tables, refresher = _saved_once(tmp_path, state_url, serving)
    online = refresher.sources["labels"].slices
    statements: list[str] = []
    state = refresher.predictions.slice_state
    sa.event.listen(state.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    refresher.refresh(START + timedelta(seconds=20))  # nothing settled or left since START
    assert not [s for s in statements if "mlmon_kept_online_slices" in s and not s.lstrip().startswith("SELECT")]
    refresher.refresh(START + timedelta(minutes=2))
    assert set(_saved(state_url)) == set(online.slices) and len(online.slices) == 29
    writes = [s for s in statements if "mlmon_kept_online_slices" in s and not s.lstrip().startswith("SELECT")]
    assert len(writes) == 2, writes  # one delete (the slice settled since, the one gone), one insert
    stores.dispose()
    tables.engine.dispose()


def test_an_online_slice_saved_empty_is_restored_empty(tmp_path, slices_read_by_store, serving):
    """A settled slice whose predictions are all deleted is read again (by the audit) as
    ``OnlineBuckets.empty()`` and saved so: restored, it is kept as it is, not read again."""
    state_url = f"sqlite:///{tmp_path}/state.sqlite"
    _, settings, stores, tables, first = _saved_once(tmp_path, state_url, serving)
    kept = first.sources["labels"].slices.slices
    oldest = min(kept)
    tables.delete_predictions([i for i, (ts, _) in tables.scored.items() if oldest <= ts < oldest + SLICE])
    second = serving(settings, stores, state_url)
    second.refresh(START + timedelta(seconds=10))  # the audit finds the slice changed: read again, empty
    assert slices_read_by_store[id(second.sources["labels"].slices)] == [oldest]
    assert int(second.sources["labels"].slices.slices[oldest].counts[0]) == 0 < int(kept[oldest].counts[0])
    restarted = serving(settings, stores, state_url)
    restarted.refresh(START + timedelta(seconds=20))
    online = restarted.sources["labels"].slices
    assert slices_read_by_store[id(online)] == []  # restored, audited, nothing read
    restored = online.slices[oldest]
    assert isinstance(restored, OnlineBuckets) and int(restored.counts[0]) == 0 and not len(restored.key)
    stores.dispose()
    tables.engine.dispose()
