"""Every window of a source in one pass (issue 12): for random rows (invalid scores,
duplicate ids inside some windows and not others, late, conflicting and invalid labels,
labels whose arrival time is no instant,
replays off by more or less than the tolerance) and several window sets, each window's
numbers equal those computed by pandas, numpy and scikit-learn on the same rows, on
SQLite, PostgreSQL and DuckDB; with the duplicate ids listed once per source and with
too many to list (each query then searches them itself), and the label ids with several
label rows listed (their predictions read apart, the others joined to their one label row)
or too many to list (every id's label rows grouped)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from sklearn.metrics import log_loss, roc_auc_score

from exporter.durations import parse_duration
from exporter.monitoring_math import PERCENTILES
from exporter.predictions import queries
from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.stores import Stores
from tests.conftest import model_settings

AS_OF = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
N = 600


def _naive(instant: datetime) -> datetime:
    return instant.astimezone(UTC).replace(tzinfo=None)


def _rows(dialect: str, continuous: bool, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(predictions, labels, replays) as frames with naive UTC timestamps."""
    rng = np.random.default_rng(seed)
    ts = [_naive(AS_OF) - timedelta(seconds=float(s)) for s in np.sort(rng.uniform(-600, 30 * 3600, N))]
    scores = rng.random(N) if continuous else np.round(rng.random(N), 2)
    scores = scores.astype(object)
    bad = rng.choice(N, 40, replace=False)
    scores[bad[:10]] = None
    scores[bad[10:20]] = 1.5
    scores[bad[20:30]] = -0.25
    if dialect != "sqlite":  # SQLite stores no NaN
        scores[bad[30:40]] = float("nan")
    ids = np.arange(N)
    # Duplicates: a tenth of the rows reuse the id of the row before them in time (minutes
    # away) or of any row before them (hours away): duplicates in some windows only.
    reused = rng.choice(np.arange(1, N), N // 10, replace=False)
    ids[reused] = np.where(rng.random(len(reused)) < 0.5, reused - 1, rng.integers(0, reused))
    predictions = pd.DataFrame({"id": ids, "ts": ts, "p": scores})
    labeled = rng.choice(np.unique(ids), N // 2, replace=False)
    label_rows = []
    for i in labeled:
        made = predictions.loc[predictions.id == i, "ts"].min()
        for _ in range(rng.choice([1, 1, 1, 2])):  # some ids labeled twice: agreeing or conflicting
            y = int(rng.choice([0, 1, 1, 2])) if rng.random() < 0.05 else int(rng.random() < 0.3 + 0.5 * rng.random())
            late = rng.uniform(-1800, 0) if rng.random() < 0.1 else rng.uniform(0, 4 * 3600)  # some before it
            label_rows.append({"id": int(i), "y": y, "ts": made + timedelta(seconds=float(late))})
    labels = pd.DataFrame(label_rows)
    replayed = rng.choice(np.unique(ids), N // 3, replace=False)
    online = predictions.groupby("id")["p"].first()
    offsets = rng.choice([0.0, 1e-9, 1e-3], len(replayed))
    replays = pd.DataFrame(
        {
            "id": replayed,
            "p": [
                (float(online[i]) + o if isinstance(online[i], float) and 0 <= online[i] <= 1 else 0.5)
                for i, o in zip(replayed, offsets, strict=True)
            ],
        }
    )
    replays.loc[replays.index[:5], "p"] = 3.0  # not a probability: never reproduced
    return predictions, labels, replays


def _write(url: str, schema: str | None, frames) -> None:
    predictions, labels, replays = frames
    engine = sa.create_engine(url)
    metadata = sa.MetaData(schema=schema)
    p = sa.Table(
        "predictions",
        metadata,
        sa.Column("id", sa.BigInteger),
        sa.Column("ts", sa.DateTime),
        sa.Column("p", sa.Double),
    )
    labels_table = sa.Table(
        "labels", metadata, sa.Column("id", sa.BigInteger), sa.Column("y", sa.Integer), sa.Column("ts", sa.DateTime)
    )
    r = sa.Table("replays", metadata, sa.Column("id", sa.BigInteger), sa.Column("p", sa.Double))
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(p.insert(), [{"id": int(a), "ts": b, "p": c} for a, b, c in predictions.itertuples(index=False)])
        conn.execute(labels_table.insert(), labels.to_dict("records"))
        conn.execute(r.insert(), [{"id": int(a), "p": float(b)} for a, b in replays.itertuples(index=False)])
    engine.dispose()


#: Label arrival times written but no instant (docs/metrics.md, "No instant"), per dialect.
NO_INSTANT = {"sqlite": ["yesterday", "", "2024-02-30 11:00:00"], "postgresql": ["infinity", "-infinity"]}
NO_INSTANT["duckdb"] = NO_INSTANT["postgresql"]


def _write_unplaced_labels(url: str, schema: str | None, dialect: str, ids: np.ndarray, seed: int) -> None:
    """A label row (0, 1 or 2) for each of ``ids`` whose arrival time is no instant: text on
    SQLite, ±infinity elsewhere (cast from text, which SQLAlchemy's DateTime cannot bind)."""
    rng = np.random.default_rng(seed)
    table = f'"{schema}".labels' if schema else "labels"
    ts = ":ts" if dialect == "sqlite" else "CAST(:ts AS TIMESTAMP)"
    values = NO_INSTANT[dialect]
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"INSERT INTO {table} (id, y, ts) VALUES (:id, :y, {ts})"),
            [{"id": int(i), "y": int(rng.choice([0, 1, 2])), "ts": values[k % len(values)]} for k, i in enumerate(ids)],
        )
    engine.dispose()


def _reasons(frame: pd.DataFrame) -> pd.Series:
    """Each row's reason in its window, by ``INVALID_REASONS``' precedence."""
    p = pd.to_numeric(frame["p"], errors="coerce")
    duplicated = frame["id"].map(frame["id"].value_counts()) > 1
    reason = pd.Series("ok", index=frame.index)
    reason[duplicated] = "duplicate_id"
    reason[(p < 0) | (p > 1)] = "out_of_range"
    reason[frame["p"].map(lambda v: isinstance(v, float) and np.isnan(v))] = "nan_score"
    reason[frame["p"].isna() & ~frame["p"].map(lambda v: isinstance(v, float))] = "null_score"
    return reason


def _expected_stats(predictions: pd.DataFrame, window: timedelta, continuous: bool) -> dict:
    end = _naive(AS_OF)
    rows = predictions[(predictions.ts >= end - window) & (predictions.ts < end)]
    reason = _reasons(rows)
    valid = rows.loc[reason == "ok", "p"].astype(float).to_numpy()
    counts = reason[reason != "ok"].value_counts().to_dict()
    out = {"predictions": len(valid), "invalid": {r: counts.get(r, 0) for r in queries.INVALID_REASONS[:-1]}}
    if len(valid):
        _, mode = np.unique(np.floor(valid * 1e6 + 0.5), return_counts=True)
        out |= {
            "mean": valid.mean(),
            "stddev": valid.std(),
            "mode_share": mode.max() / len(valid),
            "percentiles": {q: np.percentile(valid, q) for q in PERCENTILES},
        }
    return out


def _expected_online(
    predictions, labels, unplaced: np.ndarray, window: timedelta, label_delay: timedelta, grain: timedelta, missing: str
) -> dict:
    """``unplaced``: ids with a label row whose arrival time is no instant. With a
    ``label_delay``, a prediction's labels are those recorded from the start of its slice of
    ``grain`` (aligned to the epoch) to ``label_delay`` after its end; without, those
    recorded from the window's start to ``AS_OF``."""
    end = _naive(AS_OF) - label_delay
    rows = predictions[(predictions.ts >= end - window) & (predictions.ts < end)]
    rows = rows[_reasons(rows) == "ok"]
    if label_delay:
        joined = rows[["id", "ts"]].reset_index().merge(labels, on="id", suffixes=("", "_label"))
        first = joined.ts.dt.floor(grain)  # pandas floors fixed frequencies from the epoch
        last = np.minimum(first + grain + label_delay, _naive(AS_OF))
        recorded = joined[(joined.ts_label >= first) & (joined.ts_label < last)].set_index("index")
        usable = recorded[recorded.y.isin([0, 1])].groupby(level=0)["y"].agg(["min", "max"])
        has_rows = pd.Series(rows.index.isin(recorded.index), index=rows.index)
        low, high = usable["min"].reindex(rows.index), usable["max"].reindex(rows.index)
    else:
        recorded = labels[(labels.ts >= end - window) & (labels.ts < _naive(AS_OF))]
        usable = recorded[recorded.y.isin([0, 1])].groupby("id")["y"].agg(["min", "max"])
        has_rows = rows.id.isin(recorded.id)
        low, high = rows.id.map(usable["min"]), rows.id.map(usable["max"])
    unknown_arrival = ~has_rows & rows.id.isin(unplaced)  # in no range: neither a label nor a 0
    has_label = low.notna() & (low == high)
    y = low.where(has_label)
    if missing == "negative":
        y = y.where(has_rows | unknown_arrival, 0)
    labeled = y.notna()
    p, y = rows.loc[labeled, "p"].astype(float).to_numpy(), y[labeled].astype(int).to_numpy()
    return {
        "predictions": len(rows),
        "labeled": len(y),
        "positives": int(y.sum()),
        "label_coverage": has_label.sum() / len(rows) if len(rows) else None,
        "conflicting": int((low.notna() & (low != high)).sum()),
        "invalid_value": int((has_rows & low.isna()).sum()),
        "bad_timestamp": int(unknown_arrival.sum()),
        "logloss": log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1]) if len(y) else None,
        "roc_auc": roc_auc_score(y, p) if 0 < y.sum() < len(y) else None,
    }


def _expected_replays(predictions, replays, window: timedelta) -> dict:
    end = _naive(AS_OF)
    rows = predictions[(predictions.ts >= end - window) & (predictions.ts < end)]
    rows = rows[_reasons(rows) == "ok"].merge(replays, on="id", suffixes=("", "_replay"))
    a, b = rows["p"].astype(float).to_numpy(), rows["p_replay"].to_numpy()
    valid = (b >= 0) & (b <= 1)
    diff = np.abs(a - b)
    reproduced = valid & (diff <= 1e-6 + 1e-6 * np.maximum(np.abs(a), np.abs(b)))
    return {
        "replayed": len(rows),
        "reproduced": int(reproduced.sum()),
        "max": diff[valid].max() if valid.any() else None,
    }


@pytest.mark.parametrize(
    ("windows", "label_delay", "time_slice", "grain", "missing", "continuous"),
    [
        pytest.param(["1h", "24h"], "0s", None, None, "negative", False, id="1h-24h-discrete"),
        # grain, the label slices: auto's, the largest window / 288 (5 minutes) or the
        # smallest / 12 (15 minutes), or time_slice's
        pytest.param(
            ["30m", "6h", "2h", "1d"],
            "1h",
            None,
            "5m",
            "ignore",
            True,
            id="four-windows-continuous",
            marks=pytest.mark.long,
        ),
        pytest.param(["3h"], "2h", None, "15m", "negative", True, id="one-window", marks=pytest.mark.long),
        pytest.param(["2h", "6h"], "30m", "7m", "7m", "negative", False, id="set-slices"),
    ],
)
@pytest.mark.parametrize(
    "listed",
    [
        pytest.param("listed", id="listed-duplicates", marks=pytest.mark.long),
        pytest.param("searched", id="searched-duplicates"),
        pytest.param("searched-grouped", id="searched-duplicates-grouped-label-rows"),
    ],
)
def test_every_window_in_one_pass_equals_pandas_on_the_same_rows(
    store, windows, label_delay, time_slice, grain, missing, continuous, listed, monkeypatch
):
    url, schema, dialect = store
    frames = _rows(dialect, continuous, seed=len(windows))
    _write(url, schema, frames)
    predictions, labels, replays = frames
    # Label rows of unknown arrival: for ids of any time, and of the last hours (short windows).
    rng = np.random.default_rng(len(windows))
    recent = np.unique(predictions.id[predictions.ts >= _naive(AS_OF) - timedelta(hours=4)])
    unplaced = np.union1d(rng.choice(np.unique(predictions.id), N // 40), rng.choice(recent, N // 40))
    _write_unplaced_labels(url, schema, dialect, unplaced, seed=len(windows))
    # Some ids have several label rows: their predictions are read apart, the others joined to
    # their one label row; beyond the listed ones, every id's label rows are grouped.
    assert labels.id.duplicated().any()
    if listed != "listed":  # more duplicate ids than the source lists: each query searches them itself
        monkeypatch.setattr(queries, "MAX_LISTED_DUPLICATES", 3)
    if listed == "searched-grouped":
        monkeypatch.setattr(queries, "MAX_LISTED_LABEL_IDS", 3)
    settings = model_settings(
        url,
        schema,
        labels={"missing": missing, "columns": {"timestamp": "ts"}},
        replays=True,
        # Continuous scores in 10^-2 buckets hold several each: the mode is counted by its own query.
        model={"windows": windows, "label_delay": label_delay, "bucket_decimals": 2 if continuous else 5}
        | ({"time_slice": time_slice} if time_slice else {}),
    )
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
        snap = refresher.refresh(AS_OF)
    finally:
        stores.dispose()
    assert all(s.up for s in snap.sources.values()), snap.errors
    delay = parse_duration(label_delay, allow_zero=True)
    assert any(s.bucketed for s in snap.score_stats) is continuous
    duplicates = [s.invalid["duplicate_id"] for s in snap.score_stats]
    assert max(duplicates) > 0 and (len(windows) == 1 or len(set(duplicates)) > 1)  # differ between windows
    assert max(online.invalid_labels["bad_timestamp"] for online in snap.online) > 0
    for stats, online, replay, window in zip(snap.score_stats, snap.online, snap.replays, windows, strict=True):
        span = parse_duration(window)
        want = _expected_stats(predictions, span, continuous)
        assert stats.window == online.window == replay.window == window
        assert stats.predictions == want["predictions"], window
        assert {r: stats.invalid[r] for r in want["invalid"]} == want["invalid"], window
        assert stats.mean == pytest.approx(want["mean"], rel=1e-12)
        assert stats.stddev == pytest.approx(want["stddev"], rel=1e-9)
        assert stats.mode_share == want["mode_share"]
        assert stats.bucketed is (continuous and stats.bucketed)
        for q, value in stats.percentiles.items():  # exact on pure buckets, within a bucket otherwise
            assert value == pytest.approx(want["percentiles"][q], abs=1e-2 if continuous else 1e-12)

        want = _expected_online(predictions, labels, unplaced, span, delay, grain and parse_duration(grain), missing)
        assert online.predictions == want["predictions"], window
        assert online.labeled == want["labeled"] and online.positives == want["positives"], window
        assert online.invalid_labels == {r: want[r] for r in ("conflicting", "invalid_value", "bad_timestamp")}
        assert online.label_coverage == pytest.approx(want["label_coverage"], rel=1e-12)
        assert online.logloss == pytest.approx(want["logloss"], rel=1e-12)
        assert online.roc_auc == pytest.approx(want["roc_auc"], abs=(online.roc_auc_error_bound or 0) + 1e-12)

        want = _expected_replays(predictions, replays, span)
        assert replay.replayed == want["replayed"] > 0, window
        assert replay.ratio == pytest.approx(want["reproduced"] / want["replayed"], rel=1e-12)
        assert replay.abs_error_max == pytest.approx(want["max"], rel=1e-12)


def test_duplicate_ids_are_searched_again_at_each_refresh(tmp_path):
    """The predictions' duplicate-id search is reused by the replays of the same refresh
    only: a duplicate written between two refreshes at the same time is seen by the next
    (written within ``ingestion_delay`` of its timestamp; a later one waits for the audit
    of kept time slices: test_time_slices.py)."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    stamp = _naive(AS_OF) - timedelta(minutes=5)
    predictions = pd.DataFrame({"id": [1, 2, 3], "ts": [stamp] * 3, "p": [0.1, 0.2, 0.3]})
    _write(url, None, (predictions, pd.DataFrame({"id": [1], "y": [1], "ts": [stamp]}), predictions[["id", "p"]]))
    settings = model_settings(url, replays=True, predictions={"unique_ids": False, "ingestion_delay": "10m"})
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
        first = refresher.refresh(AS_OF)
        with stores.engine("s").begin() as conn:
            conn.execute(sa.text("INSERT INTO predictions (id, ts, p) VALUES (2, :ts, 0.2)"), {"ts": stamp})
        second = refresher.refresh(AS_OF)
    finally:
        stores.dispose()
    assert [first.score_stats[0].invalid["duplicate_id"], first.replays[0].replayed] == [0, 3]
    assert [second.score_stats[0].invalid["duplicate_id"], second.replays[0].replayed] == [2, 2]
    assert second.online[0].predictions == 2


UUID7, UUID8 = "0b6f8c2e-7a1d-4c3e-9f00-000000000007", "0b6f8c2e-7a1d-4c3e-9f00-000000000008"
#: (engine, prediction id type, label id type, the id X as the predictions hold it, as the
#: label rows hold it (equal to it in the join), the other id Y, whether each prediction
#: joins its one label row: the id columns compare alike, PredictionQueries.joins_labels_one_to_one)
ID_TYPES = [
    ("postgresql", "bigint", "bigint", "7", "7", "8", True),
    ("postgresql", "numeric", "numeric", "7", "7.00", "8", True),
    ("postgresql", "uuid", "uuid", f"'{UUID7}'", f"'{UUID7.upper()}'", f"'{UUID8}'", True),
    ("postgresql", "text", "text", "'abc'", "'abc'", "'def'", True),
    ("postgresql", "text", "varchar(8)", "'abc'", "'abc'", "'def'", False),
    # char(n) ids are read back padded ('abc     '), and compared with text without it.
    ("postgresql", "text", "char(8)", "'abc'", "'abc'", "'def'", False),
    # float4 ids are read back as doubles, which no longer equal the stored values.
    ("postgresql", "real", "real", "0.1", "0.1", "0.2", False),
    # A case-insensitive collation groups ids that the predictions' column tells apart.
    ("postgresql", "text", "text COLLATE {schema}.ci", "'abc'", "'ABC'", "'def'", False),
    ("duckdb", "BIGINT", "BIGINT", "7", "7", "8", True),
    ("duckdb", "VARCHAR", "VARCHAR COLLATE NOCASE", "'abc'", "'ABC'", "'def'", False),
    ("sqlite", "INTEGER", "INTEGER", "7", "7", "8", True),
    # SQLAlchemy reads SQLite's NUMERIC as a float: ids above 2^53 would come back changed,
    # and text in a NUMERIC-affinity column (any type name SQLite does not know) fails.
    ("sqlite", "NUMERIC(20, 0)", "NUMERIC(20, 0)", "9007199254740993", "9007199254740993", "9007199254740995", False),
    ("sqlite", "UUID", "UUID", f"'{UUID7}'", f"'{UUID7}'", f"'{UUID8}'", False),
]


@pytest.mark.parametrize(
    ("dialect", "prediction_type", "label_type", "x", "x_label", "y", "one_to_one"),
    ID_TYPES,
    ids=[f"{d}-{p}-{lt.split(' COLLATE')[0]}{'-collated' if 'COLLATE' in lt else ''}" for d, p, lt, *_ in ID_TYPES],
)
@pytest.mark.parametrize("label_delay", ["0s", "10m"], ids=["per-window", "matured"])
def test_label_ids_the_predictions_compare_otherwise_are_grouped(
    request, tmp_path, dialect, prediction_type, label_type, x, x_label, y, one_to_one, label_delay, monkeypatch
):
    """Each prediction joins its one label row only where the label ids listed with several
    rows compare with the predictions' ids as the join compares the two columns; otherwise
    the label rows are grouped (attack findings: ``char(n)``, ``real`` and collated ids
    counted a prediction once per label row). X carries two conflicting label rows, Y one:
    the numbers written out by hand, and the same with every id's label rows grouped."""
    if dialect == "postgresql":
        url, schema = request.getfixturevalue("postgres_schema")
        engine = sa.create_engine(url)
        prefix = f"{schema}."
        with engine.begin() as conn:  # ICU: PostgreSQL's nondeterministic collations need it
            conn.exec_driver_sql(
                f"CREATE COLLATION {schema}.ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
            )
    else:
        url, schema, prefix = f"{dialect}:///{tmp_path}/store.{dialect}", None, ""
        engine = sa.create_engine(url)
    made = _naive(AS_OF) - timedelta(minutes=30)
    recorded = made + timedelta(minutes=1)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE {prefix}predictions (id {prediction_type}, ts timestamp, p double precision)"
        )
        conn.exec_driver_sql(
            f"CREATE TABLE {prefix}labels (id {label_type.format(schema=schema)}, y integer, ts timestamp)"
        )
        for ident, p in ((x, 0.2), (y, 0.7)):
            conn.exec_driver_sql(f"INSERT INTO {prefix}predictions VALUES ({ident}, '{made}', {p})")
        for ident, label in ((x_label, 1), (x_label, 0), (y, 0)):
            conn.exec_driver_sql(f"INSERT INTO {prefix}labels VALUES ({ident}, {label}, '{recorded}')")
    engine.dispose()
    settings = model_settings(url, schema, labels={"columns": {"timestamp": "ts"}}, model={"label_delay": label_delay})

    def online():
        stores = Stores(settings.stores, settings.query_timeout)
        try:
            refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
            snap = refresher.refresh(AS_OF)
            q, labels = (refresher.sources[name].queries() for name in ("predictions", "labels"))
            assert q.joins_labels_one_to_one(labels) is one_to_one
        finally:
            stores.dispose()
        assert all(s.up for s in snap.sources.values()), snap.errors
        return snap.online[0]

    found = online()
    assert (found.predictions, found.labeled, found.positives) == (2, 1, 0)
    assert found.invalid_labels == {"conflicting": 1, "invalid_value": 0, "bad_timestamp": 0}
    assert found.logloss == pytest.approx(log_loss([0], [0.7], labels=[0, 1]), rel=1e-12)
    monkeypatch.setattr(queries, "MAX_LISTED_LABEL_IDS", -1)  # every id's label rows grouped
    assert online() == found


#: SQLite id columns by declared type, with three ids X, Y, Z as they are written: a type
#: name SQLite does not know (STRING, UUID) has NUMERIC affinity, which SQLAlchemy reads as
#: a number, and integers above 2**53 do not survive a float.
SQLITE_ID_TYPES = [
    ("INTEGER", ["9007199254740993", "9007199254740995", "9007199254740997"]),
    ("NUMERIC", ["9007199254740993", "9007199254740995", "9007199254740997"]),
    ("STRING", ["'a-1'", "'b-2'", "'c-3'"]),
    ("UUID", [f"'{UUID7}'", f"'{UUID8}'", "'0b6f8c2e-7a1d-4c3e-9f00-000000000009'"]),
    ("TEXT", ["'a-1'", "'b-2'", "'c-3'"]),
    ("", ["'a-1'", "9007199254740995", "7.5"]),  # no type: each value as written
]


@pytest.mark.parametrize(("id_type", "ids"), SQLITE_ID_TYPES, ids=[t or "untyped" for t, _ in SQLITE_ID_TYPES])
@pytest.mark.parametrize("time_slice", [None, "5m"], ids=["one-pass", "sliced"])
def test_duplicated_ids_of_every_sqlite_declared_type_are_left_out(tmp_path, id_type, ids, time_slice):
    """The duplicate ids are read out of a SQLite store and sent back as it holds them,
    whatever the column's declared type (found reading the diff: a STRING or UUID id
    column with a duplicate made the predictions source fail, and NUMERIC ids above 2**53
    were not left out). X is carried by two predictions; a second prediction of Y, written
    before the second refresh, makes Y a duplicate too (with time slices, found among the
    new rows' ids, X sent back as known). Hand-counted: valid predictions 2 then 1."""
    x, y, z = ids
    url = f"sqlite:///{tmp_path}/s.sqlite"
    made = _naive(AS_OF) - timedelta(minutes=30)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE predictions (id {id_type}, ts TIMESTAMP, p DOUBLE PRECISION)")
        conn.exec_driver_sql(f"CREATE TABLE labels (id {id_type}, y INTEGER)")
        for ident, p in ((x, 0.1), (x, 0.2), (y, 0.3), (z, 0.4)):
            conn.exec_driver_sql(f"INSERT INTO predictions VALUES ({ident}, '{made}', {p})")
        for ident, label in ((x, 1), (y, 0), (z, 1)):
            conn.exec_driver_sql(f"INSERT INTO labels VALUES ({ident}, {label})")
    model = {"time_slice": time_slice} if time_slice else {}
    settings = model_settings(url, predictions={"ingestion_delay": "5m"}, model=model)
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
        first = refresher.refresh(AS_OF)
        later = _naive(AS_OF) + timedelta(seconds=30)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"INSERT INTO predictions VALUES ({y}, '{later}', 0.5)")
        second = refresher.refresh(AS_OF + timedelta(minutes=1))
    finally:
        stores.dispose()
        engine.dispose()
    for snap in (first, second):
        assert all(s.up for s in snap.sources.values()), snap.errors
    assert [first.score_stats[0].predictions, first.score_stats[0].invalid["duplicate_id"]] == [2, 2]
    assert [second.score_stats[0].predictions, second.score_stats[0].invalid["duplicate_id"]] == [1, 4]
    assert [first.online[0].predictions, first.online[0].positives] == [2, 1]  # Y (0), Z (1)
    assert [second.online[0].predictions, second.online[0].positives] == [1, 1]  # Z
