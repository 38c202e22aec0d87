"""Kept online slices (issue 12): with time slices on and labels that mature by slice (a
label timestamp and ``label_delay`` above 0), a refresher that keeps the mature slices'
online aggregates between refreshes gives the online accuracy a fresh refresher computes
in one pass at the same time, and both equal the label maturity rule applied in Python
with scikit-learn on the same rows: after random sequences of refreshes at unaligned
times, predictions and label rows written within ``ingestion_delay``, conflicting and
invalid labels, predictions and label rows written later than that, deleted, and label
rows whose arrival time is no instant (taken in by the next audit), with ids declared
unique and, in the default configuration, with duplicated ids (a prediction whose id
several rows of a window carry is left out of that window), on SQLite, PostgreSQL and
DuckDB."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import sqlalchemy as sa
from sklearn.metrics import log_loss, roc_auc_score

from exporter.predictions import queries
from exporter.predictions.refresh import ModelRefresher, worst_case_queries
from exporter.predictions.slices import floor_to
from exporter.predictions.stores import Stores
from exporter.snapshot import OnlineAccuracy
from exporter.training.storage import StateDatabase
from tests.conftest import AuditClock, model_settings, statements_by_source

START = datetime(2026, 5, 4, 12, 0, 7, tzinfo=UTC)
SLICE = timedelta(minutes=2)
LABEL_DELAY = timedelta(minutes=5)
INGESTION = timedelta(minutes=1)
AUDIT = timedelta(minutes=20)
WINDOWS = {"7m": timedelta(minutes=7), "1h": timedelta(hours=1)}
#: A label arrival time written but no instant, per dialect (docs/metrics.md, "No instant").
NO_INSTANT = {"sqlite": "yesterday", "postgresql": "infinity", "duckdb": "infinity"}


def _settings(url: str, schema: str | None, missing: str, fill: int, unique: bool = True):
    return model_settings(
        url,
        schema,
        labels={"columns": {"timestamp": "ts"}, "missing": missing},
        predictions={"unique_ids": unique, "ingestion_delay": "1m"},
        model={
            "windows": list(WINDOWS),
            "label_delay": "5m",
            "time_slice": "2m",
            "slice_audit_interval": "20m",
            "slice_fill_refreshes": fill,
        },
    )


def _refresher(settings, stores: Stores) -> ModelRefresher:
    return ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)


def _naive(instant: datetime) -> datetime:
    return instant.astimezone(UTC).replace(tzinfo=None)


class Tables:
    """The prediction and label tables and a copy of their rows: predictions by id (UTC
    instant, score) and the rows written again with an id already used (id, instant,
    score), label rows by key (id, UTC arrival time or ``None`` for no instant, y)."""

    def __init__(self, url: str, schema: str | None, dialect: str):
        self.engine = sa.create_engine(url)
        self.dialect, self.schema = dialect, schema
        metadata = sa.MetaData(schema=schema)
        self.predictions = sa.Table(
            "predictions",
            metadata,
            sa.Column("id", sa.BigInteger),
            sa.Column("ts", sa.DateTime),
            sa.Column("p", sa.Double),
        )
        self.labels = sa.Table(
            "labels",
            metadata,
            sa.Column("k", sa.BigInteger),
            sa.Column("id", sa.BigInteger),
            sa.Column("y", sa.Integer),
            sa.Column("ts", sa.DateTime),
        )
        metadata.create_all(self.engine)
        self.scored: dict[int, tuple[datetime, float | None]] = {}
        self.again: list[tuple[int, datetime, float | None]] = []
        self.label_rows: dict[int, tuple[int, datetime | None, int]] = {}
        self.next_label = 0
        self.next_id = 0

    def predict(self, rows: list[tuple[datetime, float | None]]) -> None:
        records = []
        for ts, p in rows:
            ident = self.next_id = self.next_id + 1
            self.scored[ident] = (ts, p)
            records.append({"id": ident, "ts": _naive(ts), "p": p})
        if records:
            with self.engine.begin() as conn:
                conn.execute(self.predictions.insert(), records)

    def minutely(self, minutes: int, labeled: bool) -> dict[int, int]:
        """Predictions scored 0.5 at each minute from 1 to ``minutes`` - 1 before ``START``,
        with ``labeled`` a label row of 1 recorded 30 s after each; their ids by minute."""
        self.predict([(START - timedelta(minutes=m), 0.5) for m in range(1, minutes)])
        by_minute = {round((START - ts).total_seconds() / 60): i for i, (ts, _) in self.scored.items()}
        if labeled:
            self.label([(i, ts + timedelta(seconds=30), 1) for i, (ts, _) in self.scored.items()])
        return by_minute

    def predict_again(self, rows: list[tuple[int, datetime, float | None]]) -> None:
        """Predictions carrying an id that other rows carry: duplicated ids."""
        self.again += rows
        if rows:
            with self.engine.begin() as conn:
                conn.execute(self.predictions.insert(), [{"id": i, "ts": _naive(ts), "p": p} for i, ts, p in rows])

    def label(self, rows: list[tuple[int, datetime | None, int]]) -> None:
        with self.engine.begin() as conn:
            for ident, ts, y in rows:
                k, self.next_label = self.next_label, self.next_label + 1
                self.label_rows[k] = (ident, ts, y)
                if ts is not None:
                    conn.execute(self.labels.insert(), {"k": k, "id": ident, "y": y, "ts": _naive(ts)})
                else:  # text on SQLite, infinity elsewhere: SQLAlchemy's DateTime cannot bind either
                    table = f'"{self.schema}".labels' if self.schema else "labels"
                    value = ":ts" if self.dialect == "sqlite" else "CAST(:ts AS TIMESTAMP)"
                    conn.execute(
                        sa.text(f"INSERT INTO {table} (k, id, y, ts) VALUES (:k, :id, :y, {value})"),
                        {"k": k, "id": ident, "y": y, "ts": NO_INSTANT[self.dialect]},
                    )

    def delete_predictions(self, ids: list[int]) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.predictions.delete().where(self.predictions.c.id.in_(ids)))
        for ident in ids:
            self.scored.pop(ident)
        self.again = [row for row in self.again if row[0] not in ids]

    def delete_labels(self, keys: list[int]) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.labels.delete().where(self.labels.c.k.in_(keys)))
        for k in keys:
            self.label_rows.pop(k)

    def expected(self, window: timedelta, as_of: datetime, missing: str) -> dict:
        """The online accuracy of ``window`` at ``as_of`` by the rule of docs/metrics.md,
        *Label maturity*: the window ends ``label_delay`` before ``as_of``; a prediction of
        the slice ``[s, s + w)`` counts the label rows recorded in ``[s, s + w + delay)``
        and before ``as_of``, and those whose arrival time is no instant. A prediction whose
        id several rows of the window carry (whatever their scores) is left out."""
        end = as_of - LABEL_DELAY
        by_id: dict[int, list[tuple[datetime | None, int]]] = {}
        for ident, ts, y in self.label_rows.values():
            by_id.setdefault(ident, []).append((ts, y))
        rows = [(ident, ts, p) for ident, (ts, p) in self.scored.items()] + self.again
        in_window = [row for row in rows if end - window <= row[1] < end]
        carried = Counter(ident for ident, _, _ in in_window)
        n, ys, scores = 0, [], []
        reasons = {"conflicting": 0, "invalid_value": 0, "bad_timestamp": 0}
        for ident, ts, p in in_window:
            if p is None or not 0 <= p <= 1 or carried[ident] > 1:
                continue
            n += 1
            s = floor_to(ts, SLICE)
            rows = by_id.get(ident, [])
            matured = [y for r, y in rows if r is not None and s <= r < min(s + SLICE + LABEL_DELAY, as_of)]
            bad = any(r is None for r, _ in rows)
            valid = {y for y in matured if y in (0, 1)}
            if len(valid) == 2:
                reasons["conflicting"] += 1
            elif valid:
                ys.append(valid.pop())
                scores.append(p)
            elif matured:
                reasons["invalid_value"] += 1
            elif bad:
                reasons["bad_timestamp"] += 1
            elif missing == "negative":
                ys.append(0)
                scores.append(p)
        out = {"predictions": n, "labeled": len(ys), "positives": int(sum(ys)), "invalid_labels": reasons}
        if ys:
            # Clipped to [1e-15, 1 - 1e-15] as docs/metrics.md says (scikit-learn clips at float64's eps).
            out["logloss"] = log_loss(ys, np.clip(scores, 1e-15, 1 - 1e-15), labels=[0, 1])
        if len(set(ys)) == 2:
            out["roc_auc"] = roc_auc_score(ys, scores)
        return out


def _same(warm: OnlineAccuracy, cold: OnlineAccuracy) -> None:
    for name in ("window", "predictions", "labeled", "positives", "extreme_scores", "invalid_labels"):
        assert getattr(warm, name) == getattr(cold, name), name
    for name in ("logloss", "roc_auc", "roc_auc_error_bound", "calibration_ratio", "positive_ratio", "label_coverage"):
        a, b = getattr(warm, name), getattr(cold, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a == pytest.approx(b, rel=1e-9, abs=1e-12), name


def _check(tables: Tables, warm: ModelRefresher, cold_settings, stores: Stores, as_of: datetime, missing: str):
    got = warm.refresh(as_of)
    assert all(s.up for s in got.sources.values()), got.sources
    cold = _refresher(cold_settings, stores).refresh(as_of)
    for w, c in zip(got.online, cold.online, strict=True):
        _same(w, c)
        expected = tables.expected(WINDOWS[w.window], as_of, missing)
        assert (w.predictions, w.labeled, w.positives) == (
            expected["predictions"],
            expected["labeled"],
            expected["positives"],
        )
        assert w.invalid_labels == expected["invalid_labels"]
        if "logloss" in expected:
            assert w.logloss == pytest.approx(expected["logloss"], rel=1e-9)
        if "roc_auc" in expected:
            # Continuous scores share 10^-5 buckets: the AUC is exact within its bound.
            bound = w.roc_auc_error_bound or 0.0
            assert abs(w.roc_auc - expected["roc_auc"]) <= bound + 1e-9


def _score(rng: np.random.Generator) -> float | None:
    kind = rng.random()
    if kind < 0.04:
        return None
    if kind < 0.08:
        return 1.5
    if kind < 0.5:
        return float(np.round(rng.random(), 2))  # discrete: buckets of one score
    return float(rng.random())


def _label_value(rng: np.random.Generator) -> int:
    return 2 if rng.random() < 0.05 else int(rng.random() < 0.4)


# Every (case, engine) pair runs in CI: the default tier (5-minute budget) runs case 1 on
# SQLite and PostgreSQL and the duplicated ids on PostgreSQL; the long tier every other pair.
@pytest.mark.parametrize(
    ("store", "seed", "missing", "unique"),
    [
        pytest.param(
            store, seed, missing, unique, id=f"{name}-{store}", marks=() if store in fast_on else pytest.mark.long
        )
        for name, seed, missing, unique, fast_on in [
            ("1", 1, "ignore", True, ("sqlite", "postgresql")),
            ("3-duplicates", 3, "ignore", False, ("postgresql",)),
            ("2-negative", 2, "negative", True, ()),
            ("4-negative-duplicates", 4, "negative", False, ()),
        ]
        for store in ("sqlite", "postgresql", "duckdb")
    ],
    indirect=["store"],
)
def test_kept_online_slices_equal_a_one_pass_refresh(store, seed, missing, unique, tmp_path, monkeypatch):
    """The warm refresher reads every mature slice at its first refresh (``slice_fill_refreshes``
    1) and keeps them; each cold refresher fills (the default 24), so its first refresh
    reads the windows in one pass. Without ``unique``, ids are not declared unique and
    some predictions carry an id other rows carry: written in the minute before a refresh
    (found by the next one) or late, into a mature slice (found by the audit); the other
    row in either window, in the larger only, or out of both. The warm refresher saves its
    slices as ``mlmon serve`` does and is now and then restarted (a new refresher restoring
    them). Results are read 7 rows at a time, so that every read of more rows goes through
    the driver in several chunks."""
    monkeypatch.setattr("exporter.predictions.sources.CHUNK_ROWS", 7)
    url, schema, dialect = store
    rng = np.random.default_rng(seed)
    stores = Stores(_settings(url, schema, missing, 1, unique).stores, timedelta(seconds=30))
    tables = Tables(url, schema, dialect)
    # 80 minutes of history before the first refresh: predictions, and label rows 0 to 9
    # minutes after them (within and beyond label_delay), some twice.
    history = sorted(START - timedelta(seconds=float(s)) for s in rng.uniform(0, 4800, 300))
    tables.predict([(ts, _score(rng)) for ts in history])
    labels = []
    for ident, (ts, _) in tables.scored.items():
        for _ in range(int(rng.choice([0, 1, 1, 2]))):
            arrived = ts + timedelta(seconds=float(rng.uniform(-30, 540)))
            if arrived < START - INGESTION:
                labels.append((ident, arrived, _label_value(rng)))
    tables.label(labels)
    if not unique:  # duplicated ids in the history too
        chosen = rng.choice(list(tables.scored), 12, replace=False)
        tables.predict_again([(int(i), START - timedelta(seconds=float(rng.uniform(90, 4800))), 0.5) for i in chosen])
    state = StateDatabase(f"sqlite:///{tmp_path}/state.sqlite")

    def serving() -> ModelRefresher:
        served = _settings(url, schema, missing, 1, unique)
        model = served.models[0]
        return ModelRefresher(model, "models[0]", served.refresh_policy, stores, state=state, save_slices=True)

    warm = serving()
    cold_settings = _settings(url, schema, missing, 24, unique)
    as_of = START
    audits = AuditClock(AUDIT)
    for _step in range(22):
        following = as_of + timedelta(seconds=float(rng.uniform(10, 300)))
        # Written within ingestion_delay: predictions stamped, and label rows recorded, in the
        # minute before the next refresh time (labels of predictions of the last 12 minutes).
        fresh = [following - timedelta(seconds=float(s)) for s in rng.uniform(0, 60, int(rng.integers(0, 25)))]
        tables.predict([(ts, _score(rng)) for ts in fresh])
        recent = [i for i, (ts, _) in tables.scored.items() if ts >= following - timedelta(minutes=12)]
        if recent:
            chosen = rng.choice(recent, min(len(recent), int(rng.integers(0, 15))), replace=False)
            arrived = [following - timedelta(seconds=float(s)) for s in rng.uniform(0, 60, len(chosen))]
            tables.label([(int(i), t, _label_value(rng)) for i, t in zip(chosen, arrived, strict=True)])
        if not unique and rng.random() < 0.5:  # an id used again, by a row in the minute before
            ident = int(rng.choice(list(tables.scored)))
            tables.predict_again([(ident, following - timedelta(seconds=float(rng.uniform(0, 60))), _score(rng))])
        roll = rng.random()
        if not unique and roll < 0.1:  # an id used again by a row written late, into a mature slice
            ident = int(rng.choice(list(tables.scored)))
            late = following - timedelta(minutes=float(rng.uniform(12, 50)))
            tables.predict_again([(ident, late, _score(rng))])  # any score makes the id duplicated
            audits.changed = True
        elif roll < 0.1:  # a prediction written later than ingestion_delay: into a mature slice
            tables.predict([(following - timedelta(minutes=float(rng.uniform(12, 50))), 0.25)])
            audits.changed = True
        elif roll < 0.2:  # a label row recorded long ago, written only now
            old = [i for i, (ts, _) in tables.scored.items() if ts < following - timedelta(minutes=15)]
            ident = int(rng.choice(old))
            tables.label([(ident, tables.scored[ident][0] + timedelta(minutes=1), 1)])
            audits.changed = True
        elif roll < 0.25:  # a label row whose arrival time is no instant: counts in every slice
            tables.label([(int(rng.choice(list(tables.scored))), None, int(rng.integers(0, 2)))])
            audits.changed = True
        elif roll < 0.3:  # deleted predictions and label rows
            tables.delete_predictions([int(i) for i in rng.choice(list(tables.scored), 2, replace=False)])
            tables.delete_labels([int(k) for k in rng.choice(list(tables.label_rows), 2, replace=False)])
            audits.changed = True
        as_of = following
        if rng.random() < 0.1:  # a restart: a new refresher restores the saved slices
            warm = serving()
            audits.restart()
        if not audits.comparable(as_of):
            warm.refresh(as_of)
            continue
        _check(tables, warm, cold_settings, stores, as_of, missing)
    assert warm.sources["labels"].slices.slices, "mature slices were kept"
    if not unique:
        assert warm.sources["labels"]._left_out.ids, "kept slices left duplicated ids out"
    stores.dispose()
    state.engine.dispose()
    tables.engine.dispose()


def test_a_steady_refresh_reads_only_the_slices_not_yet_mature(tmp_path):
    """Once the mature slices are kept, the online statement reads only the window's head
    (the slices not yet mature) and tail: a prediction written into a mature slice is not
    seen until the audit, and is seen then."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    settings = _settings(url, None, "ignore", 1)
    stores = Stores(settings.stores, timedelta(seconds=30))
    tables = Tables(url, None, "sqlite")
    tables.predict([(START - timedelta(minutes=m), 0.5) for m in range(1, 70)])
    tables.label([(i, ts + timedelta(seconds=30), 1) for i, (ts, _) in tables.scored.items()])
    warm = _refresher(settings, stores)
    first = warm.refresh(START)
    hour = next(o for o in first.online if o.window == "1h")
    assert hour.labeled == hour.predictions == 60
    kept = warm.sources["labels"].slices.slices
    # The window [10:55:07, 11:55:07): the slices wholly in it that end by 11:54:07
    # (ingestion_delay before its end) are mature, 10:56 to 11:52.
    assert sorted(kept) == [datetime(2026, 5, 4, 10, 56, tzinfo=UTC) + k * SLICE for k in range(29)]
    # Written late into a mature slice, with its label: not read by the next refresh...
    late = START - timedelta(minutes=30, seconds=30)
    tables.predict([(late, 0.9)])
    tables.label([(max(tables.scored), late + timedelta(seconds=5), 0)])
    second = warm.refresh(START + timedelta(seconds=20))
    assert next(o for o in second.online if o.window == "1h").labeled == 60
    # ...until the audit reads the kept slices' totals again.
    third = warm.refresh(START + AUDIT + timedelta(seconds=20))
    cold = _refresher(_settings(url, None, "ignore", 24), stores).refresh(START + AUDIT + timedelta(seconds=20))
    for w, c in zip(third.online, cold.online, strict=True):
        _same(w, c)
    stores.dispose()
    tables.engine.dispose()


@pytest.mark.parametrize("unique", [True, False], ids=["unique-ids", "duplicated-id"])
def test_worst_case_queries_counts_an_online_audit_that_starts_a_fill(tmp_path, unique):
    """The most statements the labels run with kept online slices: an audit that finds more
    kept slices changed (4) than a refresh fills (3 of the 1h window's 29), (without unique
    ids, one of them duplicated: the id ranges, the duplicated ids and their rows), then the
    fill's pass and the windows in one pass, which has a label id with two rows to search
    and read apart: 5, or 8 (``refresh.worst_case_queries``)."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    settings = _settings(url, None, "ignore", 12, unique)
    stores = Stores(settings.stores, timedelta(seconds=30))
    tables = Tables(url, None, "sqlite")
    tables.predict([(START - timedelta(minutes=m), 0.5) for m in range(1, 70)])
    refresher = _refresher(settings, stores)
    online = refresher.sources["labels"].slices
    for k in range(11):  # 3 slices a refresh, a second apart: no audit due yet
        refresher.refresh(START + timedelta(seconds=k))
    assert online.filled and len(online.slices) == 29
    # Label rows written late for predictions of 4 kept slices.
    late = [i for i, (ts, _) in tables.scored.items() if ts < START - timedelta(minutes=15)][:8:2]
    tables.label([(i, tables.scored[i][0] + timedelta(seconds=5), 1) for i in late])
    tables.label([(late[0], tables.scored[late[0]][0] + timedelta(seconds=6), 1)])  # the same label twice
    if not unique:  # a second row of an id, in the 1h window: left out of it
        tables.predict_again([(late[1], START - timedelta(minutes=30), 0.5)])
    by_source = statements_by_source(refresher, stores)
    snap = refresher.refresh(START + AUDIT + timedelta(seconds=11))
    assert all(s.up for s in snap.sources.values()) and not online.filled
    # No version column; predictions run at most 9, 10 with the id ranges; no replays.
    predictions = 9 if unique else 10
    assert len(by_source["labels"]) == worst_case_queries(settings.models[0]) - predictions == (5 if unique else 8)
    assert next(o for o in snap.online if o.window == "1h").labeled == (4 if unique else 3)
    stores.dispose()
    tables.engine.dispose()


def test_a_failing_audit_is_tried_again_an_interval_later(tmp_path, monkeypatch):
    """An audit that fails (a timeout on a large window) fails its refresh, and the next
    refreshes merge the kept slices without it until ``slice_audit_interval`` has passed
    again: before, it stayed due and failed every refresh, so the labels stayed down."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    settings = _settings(url, None, "ignore", 1)
    stores = Stores(settings.stores, timedelta(seconds=30))
    tables = Tables(url, None, "sqlite")
    tables.predict([(START - timedelta(minutes=m), 0.5) for m in range(1, 70)])
    refresher = _refresher(settings, stores)
    audits = []
    sliced_online = queries.PredictionQueries.sliced_online

    def failing_audit(self, *args, by_bucket=True, **kwargs):
        if not by_bucket:
            audits.append(args)
            raise sa.exc.OperationalError("the audit", {}, Exception("canceling statement due to statement timeout"))
        return sliced_online(self, *args, by_bucket=by_bucket, **kwargs)

    monkeypatch.setattr(queries.PredictionQueries, "sliced_online", failing_audit)
    up = {m: refresher.refresh(START + timedelta(minutes=m)).sources["labels"].up for m in range(0, 45, 4)}
    # Due 20 minutes after the first refresh (at 20 and 40): those fail, the others merge.
    assert up == {m: m not in (20, 40) for m in range(0, 45, 4)}
    assert len(audits) == 2
    stores.dispose()
    tables.engine.dispose()


@pytest.mark.long
def test_rows_of_the_repeated_hour_count_as_they_are_written(tmp_path):
    """Naive New York predictions written in real time across the fall-back of 2026-11-01
    (06:00Z: 02:00 EDT back to 01:00 EST), labels in epoch seconds: a row of the second pass
    is read up to an hour before it is written (``stores.from_wall_clock``), so slices are
    kept only once every row read into them is written (``stores.written_by``). Before,
    the kept slices missed those rows until the audit (180 predictions in the 1h window
    against 210 in one pass at 06:10Z), and the counter never counted some. Refreshes every
    2 minutes, every fifth compared with a one-pass refresher."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE predictions (id INTEGER, ts TIMESTAMP, p REAL)")
        conn.exec_driver_sql("CREATE TABLE labels (id INTEGER, y INTEGER, ts REAL)")

    def settings(fill: int):
        return model_settings(
            url,
            labels={"columns": {"timestamp": "ts"}},
            predictions={"unique_ids": True, "ingestion_delay": "30s", "timezone": "America/New_York"},
            model={
                "windows": ["15m", "1h"],
                "label_delay": "5m",
                "time_slice": "1m",
                "slice_audit_interval": "3h",  # no audit in the run: the kept slices alone
                "slice_fill_refreshes": fill,
            },
        )

    stores = Stores(settings(1).stores, timedelta(seconds=30))
    warm = _refresher(settings(1), stores)
    new_york = ZoneInfo("America/New_York")
    real, ident = datetime(2026, 11, 1, 4, 30, tzinfo=UTC), 0
    while real < datetime(2026, 11, 1, 7, 30, tzinfo=UTC):
        predictions, labels = [], []
        for k in range(12):  # a prediction every 10 s, its label 20 s later
            ident += 1
            t = real + timedelta(seconds=10 * k)
            # Stamped by a writer's clock: the local time, 01:xx twice.
            wall = t.astimezone(new_york).replace(tzinfo=None)
            predictions.append((ident, wall.isoformat(sep=" "), (ident % 97) / 100))
            labels.append((ident, int(ident % 3 == 0), (t + timedelta(seconds=20)).timestamp()))
        real += timedelta(minutes=2)
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO predictions VALUES (?, ?, ?)", predictions)
            conn.exec_driver_sql("INSERT INTO labels VALUES (?, ?, ?)", labels)
        got = warm.refresh(real)
        if real.minute % 10 == 0:
            cold = _refresher(settings(24), stores).refresh(real)
            assert [s.predictions for s in got.score_stats] == [s.predictions for s in cold.score_stats], real
            for w, c in zip(got.online, cold.online, strict=True):
                _same(w, c)
    # Every row counted once (all valid), the repeated hour too, but for those before the
    # first refresh's horizon (04:30:00 to 04:31:20: the counter starts with the process)
    # and those after the last one's (07:29:30 to 07:29:50).
    assert warm.predictions.counter.total == ident - 9 - 3
    stores.dispose()
    engine.dispose()


def test_timestamps_that_are_instants_are_not_held_back_by_the_zone(tmp_path):
    """Epoch seconds are instants whatever ``timezone`` says: the counter counts them up to
    the refresh time minus ``ingestion_delay`` across New York's fall-back too (holding it
    back as for naive timestamps froze it for an hour)."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    engine = sa.create_engine(url)
    start = datetime(2026, 11, 1, 4, 50, tzinfo=UTC)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE predictions (id INTEGER, ts REAL, p REAL)")
        rows = [(k, (start + timedelta(minutes=k)).timestamp(), 0.5) for k in range(60)]
        conn.exec_driver_sql("INSERT INTO predictions VALUES (?, ?, ?)", rows)
    settings = model_settings(url, labels=False, predictions={"timezone": "America/New_York"})
    stores = Stores(settings.stores, timedelta(seconds=30))
    refresher = _refresher(settings, stores)
    refresher.refresh(start + timedelta(minutes=5, seconds=30))  # the counter starts: 04:55:30
    refresher.refresh(start + timedelta(minutes=40, seconds=30))  # 05:30:30, within the set-back's hour
    assert refresher.predictions.counter.total == 35  # rows stamped 04:56 to 05:30
    stores.dispose()
    engine.dispose()


def test_duplicated_ids_are_left_out_of_kept_slices_and_added_back_per_window(tmp_path, caplog):
    """Ids not declared unique: a prediction whose id another row of a window carries is
    left out of that window only. The kept slices leave the duplicated ids out, one
    statement adds their rows back per window, and the audit, leaving the same ids out,
    finds nothing changed; a steady refresh runs the audit, the id ranges of the slices
    read, the duplicated ids and their rows, two passes, and the rows added back: 7 of the 8
    ``refresh.worst_case_queries`` counts (a filling refresh reads one pass and the windows in three statements:
    ``test_worst_case_queries_counts_an_online_audit_that_starts_a_fill``)."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    settings = _settings(url, None, "ignore", 1, unique=False)
    stores = Stores(settings.stores, timedelta(seconds=30))
    tables = Tables(url, None, "sqlite")
    by_minute = tables.minutely(70, labeled=True)
    # The labels' windows end at START - 5m: 7m is [START - 12m, START - 5m), 1h [START - 65m, ...).
    tables.predict_again([(by_minute[40], START - timedelta(minutes=50, seconds=30), 0.5)])  # twice in 1h only
    tables.predict_again([(by_minute[30], START - timedelta(minutes=8, seconds=30), 0.5)])  # once in each
    warm = _refresher(settings, stores)
    first = warm.refresh(START)
    counts = {o.window: (o.predictions, o.labeled) for o in first.online}
    # 1h: 60 predictions and 2 more rows, the 4 rows of the two duplicated ids left out.
    # 7m: 7 predictions and the second row of the id carried twice in 1h (its label recorded
    # 21 minutes before it: matured for the first row only, so unlabeled here).
    assert counts == {"7m": (8, 7), "1h": (58, 58)}
    source = warm.sources["labels"]
    assert set(source._left_out.ids) == {by_minute[40], by_minute[30]}
    statements: list[str] = []
    labels_running = []
    run = source.run

    def labels_run(as_of: datetime):
        labels_running.append(True)
        try:
            return run(as_of)
        finally:
            labels_running.clear()

    source.run = labels_run
    sa.event.listen(
        stores.engine("s"), "before_cursor_execute", lambda *args: labels_running and statements.append(args[2])
    )
    caplog.set_level("INFO", logger="exporter.predictions.sources")
    as_of = START + AUDIT + timedelta(seconds=20)
    steady = warm.refresh(as_of)
    assert "kept online slices changed" not in caplog.text
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    # No version column; predictions run at most 10 (with the id ranges); no replays.
    assert len(selects) == 7 and worst_case_queries(settings.models[0]) - 10 == 8
    cold = _refresher(_settings(url, None, "ignore", 24, unique=False), stores).refresh(as_of)
    for w, c in zip(steady.online, cold.online, strict=True):
        _same(w, c)
    stores.dispose()
    tables.engine.dispose()


def test_a_fill_started_by_the_duplicate_search_searches_the_windows_in_full(tmp_path):
    """A search that probed only what its refresh reads, then forgot more kept slices than
    a refresh reads (their left-out ids changed), starts a fill: the pass over the windows
    searches their duplicated ids in full, since a row written late into a kept slice may
    duplicate an id the search did not probe. Before, that pass used the probed ids and
    counted both rows of such an id."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    stores = Stores(_settings(url, None, "ignore", 24, unique=False).stores, timedelta(seconds=30))
    tables = Tables(url, None, "sqlite")
    by_minute = tables.minutely(90, labeled=False)
    warm = _refresher(_settings(url, None, "ignore", 24, unique=False), stores)
    as_of = START
    while not warm.predictions.slices.filled:
        warm.refresh(as_of)
        as_of += timedelta(seconds=1)
    # Written late into a kept slice: the id of minute 40 again (not probed: no audit yet).
    tables.predict_again([(by_minute[40], START - timedelta(minutes=30, seconds=30), 0.5)])
    warm.refresh(as_of)
    # Just written: the ids of 4 kept slices again, more than a refresh fills (2).
    fresh = as_of + timedelta(seconds=10)
    tables.predict_again([(by_minute[m], fresh, 0.5) for m in (50, 46, 44, 36)])
    as_of += timedelta(seconds=20)
    got = warm.refresh(as_of)
    assert not warm.predictions.slices.filled
    cold = _refresher(_settings(url, None, "ignore", 24, unique=False), stores).refresh(as_of)
    assert got.score_stats == cold.score_stats
    hour = next(s for s in got.score_stats if s.window == "1h")
    assert hour.invalid["duplicate_id"] == 10  # the 5 ids, twice each
    stores.dispose()
    tables.engine.dispose()


def test_the_audit_finds_a_late_row_of_any_score_that_duplicates_an_id(tmp_path):
    """A row without a valid score written late into a kept slice, carrying the id of a
    prediction of another kept slice, leaves nothing to see in the online totals the audit
    compares (valid predictions only), yet leaves that prediction out of the window: the
    refresh that audits probes every id."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    settings = _settings(url, None, "ignore", 1, unique=False)
    stores = Stores(settings.stores, timedelta(seconds=30))
    tables = Tables(url, None, "sqlite")
    by_minute = tables.minutely(90, labeled=True)
    warm = _refresher(settings, stores)
    warm.refresh(START)
    tables.predict_again([(by_minute[40], START - timedelta(minutes=30, seconds=30), None)])
    as_of = START + AUDIT + timedelta(seconds=20)  # the audit is due
    got = warm.refresh(as_of)
    cold = _refresher(_settings(url, None, "ignore", 24, unique=False), stores).refresh(as_of)
    for w, c in zip(got.online, cold.online, strict=True):
        _same(w, c)
    # The window [START - 44m40s, START + 15m20s): minutes 1 to 44, minute 40 left out.
    assert next(o for o in got.online if o.window == "1h").predictions == 43
    stores.dispose()
    tables.engine.dispose()


def test_an_id_rewritten_in_a_kept_slice_is_found_by_the_next_audit(tmp_path):
    """An id rewritten in place, to the id of a row of another kept slice, keeps every
    count and sum either audit compares: the refresh that audits probes every id, so both
    the predictions and the labels leave the now duplicated id out, as one pass does."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    settings = _settings(url, None, "ignore", 1, unique=False)
    stores = Stores(settings.stores, timedelta(seconds=30))
    tables = Tables(url, None, "sqlite")
    by_minute = tables.minutely(90, labeled=True)
    warm = _refresher(settings, stores)
    warm.refresh(START)
    with tables.engine.begin() as conn:
        predictions = tables.predictions
        conn.execute(predictions.update().where(predictions.c.id == by_minute[30]).values(id=by_minute[20]))
    as_of = START + AUDIT + timedelta(seconds=20)  # the audit is due
    got = warm.refresh(as_of)
    cold = _refresher(_settings(url, None, "ignore", 24, unique=False), stores).refresh(as_of)
    assert got.score_stats == cold.score_stats
    assert next(s for s in got.score_stats if s.window == "1h").invalid["duplicate_id"] == 2
    for w, c in zip(got.online, cold.online, strict=True):
        _same(w, c)
    stores.dispose()
    tables.engine.dispose()


def test_ids_the_store_holds_equal_are_one_id_to_the_kept_slices(tmp_path):
    """Text ids under a case-insensitive collation: 'p30' and 'P30' are one id to the
    store's GROUP BY and IN, so both rows are duplicates, as a refresh without time slices
    counts them, in the kept slices' online accuracy and prediction statistics too (Python
    once counted them as two ids, each unique)."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE predictions (id TEXT COLLATE NOCASE, ts TIMESTAMP, p FLOAT)")
        conn.exec_driver_sql("CREATE TABLE labels (k INTEGER, id TEXT COLLATE NOCASE, y INTEGER, ts TIMESTAMP)")
        rows = [(f"p{m}", START - timedelta(minutes=m)) for m in range(1, 70)]
        rows.append(("P30", START - timedelta(minutes=8, seconds=30)))
        for k, (ident, ts) in enumerate(rows):
            naive = _naive(ts)
            conn.execute(sa.text("INSERT INTO predictions VALUES (:id, :ts, 0.5)"), {"id": ident, "ts": naive})
            labeled = _naive(ts + timedelta(seconds=30))
            conn.execute(sa.text("INSERT INTO labels VALUES (:k, :id, 1, :ts)"), {"k": k, "id": ident, "ts": labeled})
    engine.dispose()
    settings = _settings(url, None, "ignore", 1, unique=False)
    stores = Stores(settings.stores, timedelta(seconds=30))
    plain = settings.models[0].model_copy(update={"time_slice": None})
    one_pass = ModelRefresher(plain, "models[0]", settings.refresh_policy, stores).refresh(START)
    for fill in (1, 24):
        got = _refresher(_settings(url, None, "ignore", fill, unique=False), stores).refresh(START)
        assert got.score_stats == one_pass.score_stats
        for w, c in zip(got.online, one_pass.online, strict=True):
            _same(w, c)
    hour = next(o for o in one_pass.online if o.window == "1h")
    assert hour.predictions == 59  # minutes 6 to 65 and P30, the two rows of p30 left out
    stores.dispose()


@pytest.mark.parametrize("store", ["postgresql", "duckdb"], indirect=True)
def test_uuid_ids_duplicated_on_kept_slices(store):
    """A uuid id column (docs/configuration.md, *Types of ids*) with a duplicated id and
    time slices: the rows of the duplicated ids are read with the store's own id for each
    (PostgreSQL has no min() of uuid, which once failed both sources)."""
    url, schema, dialect = store
    table = f'"{schema}".' if schema else ""
    engine = sa.create_engine(url)
    ids = [f"00000000-0000-0000-0000-{m:012d}" for m in range(1, 70)]
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table}predictions (id UUID, ts TIMESTAMP, p DOUBLE PRECISION)")
        conn.exec_driver_sql(f"CREATE TABLE {table}labels (k INTEGER, id UUID, y INTEGER, ts TIMESTAMP)")
        rows = [(ident, START - timedelta(minutes=m)) for m, ident in enumerate(ids, start=1)]
        rows.append((ids[29], START - timedelta(minutes=8, seconds=30)))  # minute 30's id again
        for k, (ident, ts) in enumerate(rows):
            values = {"k": k, "id": ident, "ts": _naive(ts), "labeled": _naive(ts + timedelta(seconds=30))}
            conn.execute(sa.text(f"INSERT INTO {table}predictions VALUES (CAST(:id AS UUID), :ts, 0.5)"), values)
            conn.execute(sa.text(f"INSERT INTO {table}labels VALUES (:k, CAST(:id AS UUID), 1, :labeled)"), values)
    engine.dispose()
    settings = _settings(url, schema, "ignore", 1, unique=False)
    stores = Stores(settings.stores, timedelta(seconds=30))
    plain = settings.models[0].model_copy(update={"time_slice": None})
    one_pass = ModelRefresher(plain, "models[0]", settings.refresh_policy, stores).refresh(START)
    got = _refresher(settings, stores).refresh(START)
    assert all(s.up for s in got.sources.values()), got.sources
    assert got.score_stats == one_pass.score_stats
    for w, c in zip(got.online, one_pass.online, strict=True):
        _same(w, c)
    assert next(o for o in got.online if o.window == "1h").predictions == 59
    stores.dispose()
