"""Every online metric of a refresh against numpy/scikit-learn on exactly the same rows,
on SQLite and on the real PostgreSQL, with the edge cases of docs/metrics.md: ties, exact 0/1
scores, NULL and NaN scores, out-of-range scores, duplicate ids, invalid and conflicting
labels, labels that arrive after ``as_of``, timestamps with offsets, one-class and empty
windows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
import sqlalchemy as sa
from sklearn.metrics import log_loss, roc_auc_score

from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.stores import Stores
from tests.conftest import model_settings

AS_OF = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
DELAY = timedelta(hours=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SLICE = timedelta(minutes=5)
WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24)}
ATOL, RTOL = 1e-6, 1e-3


@dataclass
class Data:
    predictions: list[dict]  # id, ts (aware), score (float, None or NaN)
    labels: list[dict]  # id, y, ts (aware)
    replays: list[dict]  # id, score


def make_data(seed: int, stores_nan: bool) -> Data:
    rng = np.random.default_rng(seed)
    n = 4000
    offsets = [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30))]
    predictions = []
    for i in range(n):
        instant = AS_OF - timedelta(seconds=float(rng.uniform(0, 27 * 3600)))
        score = float(np.round(rng.beta(1.5, 6), 2))  # two decimals: many ties
        predictions.append({"id": i, "ts": instant.astimezone(offsets[i % 3]), "score": score})
    # exact 0 and 1 scores, invalid scores, duplicate ids, a prediction exactly at as_of (excluded)
    for i, score in zip(range(0, 40), [0.0, 1.0] * 20, strict=False):
        predictions[i]["score"] = score
    for i in range(40, 50):
        predictions[i]["score"] = None
    for i in range(50, 60):
        predictions[i]["score"] = float("nan") if stores_nan else None
    for i, score in zip(range(60, 70), [1.5, -0.2, 1e200, -1e200, float("inf")] * 2, strict=False):
        predictions[i]["score"] = score
    for i in range(70, 80):
        predictions.append({**predictions[i], "ts": predictions[i]["ts"] - timedelta(minutes=1), "score": 0.5})
    predictions.append({"id": n + 1, "ts": AS_OF, "score": 0.3})

    labels = []
    for p in predictions[:n]:
        if rng.random() < 0.75:
            y = int(rng.random() < (p["score"] if isinstance(p["score"], float) and 0 <= p["score"] <= 1 else 0.5))
            labels.append({"id": p["id"], "y": y, "ts": AS_OF - timedelta(seconds=float(rng.uniform(0, 3600)))})
    labels += [{"id": 100 + i, "y": 2, "ts": AS_OF - timedelta(hours=2)} for i in range(5)]  # invalid value
    labels += [
        {"id": 200 + i, "y": y, "ts": AS_OF - timedelta(hours=2)} for i in range(5) for y in (0, 1)
    ]  # conflicting
    labels += [{"id": 300 + i, "y": 1, "ts": AS_OF + timedelta(minutes=5)} for i in range(50)]  # not arrived yet

    replays = []
    for p in predictions[:n]:
        if rng.random() < 0.4 and isinstance(p["score"], float) and not math.isnan(p["score"]):
            kind = rng.integers(0, 5)
            offline = [p["score"], p["score"] * (1 + 1e-4), p["score"] + 0.05, None, float("inf")][kind]
            replays.append({"id": p["id"], "score": offline})
    return Data(predictions, labels, replays)


# -- the stores under test ----------------------------------------------------------------


def _create(engine, schema, aware: bool, label_type):
    metadata = sa.MetaData(schema=schema)
    ts_type = sa.DateTime(timezone=aware)
    predictions = sa.Table(
        "predictions", metadata, sa.Column("id", sa.BigInteger), sa.Column("ts", ts_type), sa.Column("p", sa.Double)
    )
    labels = sa.Table(
        "labels", metadata, sa.Column("id", sa.BigInteger), sa.Column("y", label_type), sa.Column("ts", ts_type)
    )
    replays = sa.Table("replays", metadata, sa.Column("id", sa.BigInteger), sa.Column("p", sa.Double))
    metadata.create_all(engine)
    return predictions, labels, replays


def _ts(value: datetime, aware: bool):
    return value if aware else value.astimezone(UTC).replace(tzinfo=None)


def load(engine, schema, data: Data, aware: bool, label_type=sa.Integer):
    predictions, labels, replays = _create(engine, schema, aware, label_type)
    if label_type is sa.Boolean:  # a boolean column cannot hold the invalid values
        data.labels = [dict(r, y=bool(r["y"])) for r in data.labels if r["y"] in (0, 1)]
    with engine.begin() as conn:
        conn.execute(
            predictions.insert(),
            [{"id": p["id"], "ts": _ts(p["ts"], aware), "p": p["score"]} for p in data.predictions],
        )
        if data.labels:
            conn.execute(
                labels.insert(), [{"id": r["id"], "y": r["y"], "ts": _ts(r["ts"], aware)} for r in data.labels]
            )
        if data.replays:
            conn.execute(replays.insert(), [{"id": r["id"], "p": r["score"]} for r in data.replays])


def settings_for(url, schema, missing="ignore", label_timestamp=True, ingestion_delay="0s"):
    return model_settings(
        url,
        schema,
        predictions={"ingestion_delay": ingestion_delay},
        labels={"missing": missing, "columns": {"timestamp": "ts"} if label_timestamp else {}},
        replays=True,
        model={"windows": list(WINDOWS), "label_delay": "1h", "replay_tolerance": {"atol": ATOL, "rtol": RTOL}},
    )


# -- the reference, written independently of exporter/ ------------------------------------


def classify(data: Data, start, end, stores_nan: bool):
    """(valid (id, score) pairs, invalid counts by reason) of the window, by the rules of docs/metrics.md."""
    rows = [p for p in data.predictions if start <= p["ts"] < end]
    ids = [p["id"] for p in rows]
    invalid = dict.fromkeys(
        ["null_score", "non_numeric_score", "nan_score", "out_of_range", "duplicate_id", "bad_timestamp"], 0
    )
    valid = []
    for p in rows:
        s = p["score"]
        if s is None or (math.isnan(s) and not stores_nan):
            invalid["null_score"] += 1
        elif math.isnan(s):
            invalid["nan_score"] += 1
        elif not 0 <= s <= 1:
            invalid["out_of_range"] += 1
        elif ids.count(p["id"]) > 1:
            invalid["duplicate_id"] += 1
        else:
            valid.append((p["id"], s))
    return valid, invalid


def refresh(url, schema, **kwargs):
    settings = settings_for(url, schema, **kwargs)
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
        refresher.refresh(AS_OF - timedelta(minutes=30))  # starts the counters' watermark
        return refresher.refresh(AS_OF)
    finally:
        stores.dispose()


# -- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "store, aware",
    [("sqlite", False), ("postgresql", False), ("postgresql", True), ("duckdb", False), ("duckdb", True)],
    ids=[
        "sqlite-naive-utc",
        "postgresql-naive-utc",
        "postgresql-timestamptz",
        "duckdb-naive-utc",
        "duckdb-timestamptz",
    ],
    indirect=["store"],
)
def test_prediction_statistics(store, aware):
    url, schema, dialect = store
    stores_nan = dialect in ("postgresql", "duckdb")
    data = make_data(1, stores_nan)
    load(sa.create_engine(url), schema, data, aware)
    snap = refresh(url, schema)
    assert all(s.up for s in snap.sources.values()), snap.errors

    for stats in snap.score_stats:
        valid, invalid = classify(data, AS_OF - WINDOWS[stats.window], AS_OF, stores_nan)
        scores = np.array([s for _, s in valid])
        assert stats.predictions == len(scores) > 0
        assert dict(stats.invalid) == invalid
        if stats.window == "24h":  # the edge cases are really there
            assert invalid["duplicate_id"] > 0 and invalid["null_score"] > 0 and invalid["out_of_range"] > 0
            assert invalid["nan_score"] > 0 or not stores_nan
        assert stats.mean == pytest.approx(np.mean(scores), rel=1e-12)
        assert stats.stddev == pytest.approx(np.std(scores), rel=1e-9)
        for q, value in stats.percentiles.items():
            assert value == pytest.approx(np.percentile(scores, q), abs=1e-12), q
        _, counts = np.unique(np.floor(scores * 1e6 + 0.5), return_counts=True)
        assert stats.mode_share == pytest.approx(counts.max() / len(scores), abs=1e-15)
        assert not stats.bucketed

    newest = max(p["ts"] for p in data.predictions if p["ts"] < AS_OF)
    assert snap.last_prediction_timestamp == pytest.approx(newest.timestamp(), abs=1e-3)


@pytest.mark.parametrize("delay", [timedelta(0), timedelta(minutes=10)], ids=["no-delay", "ingestion-delay"])
def test_counter_and_histogram_count_each_new_prediction_once(store, delay):
    url, schema, dialect = store
    data = make_data(2, dialect == "postgresql")
    load(sa.create_engine(url), schema, data, dialect == "postgresql")
    snap = refresh(url, schema, ingestion_delay=f"{int(delay.total_seconds())}s")
    start, end = AS_OF - timedelta(minutes=30) - delay, AS_OF - delay
    scores = np.array(
        [
            p["score"]
            for p in data.predictions
            if start <= p["ts"] < end and p["score"] is not None and not math.isnan(p["score"]) and 0 <= p["score"] <= 1
        ]
    )
    counter = snap.counter
    assert counter.total == len(scores) > 0
    assert counter.score_sum == pytest.approx(scores.sum(), rel=1e-12)
    assert counter.cumulative_buckets == tuple(int(np.sum(scores <= b)) for b in counter.bounds)


@pytest.mark.parametrize(
    "missing, label_timestamp, label_type",
    [
        ("ignore", True, sa.Integer),
        ("negative", True, sa.Integer),
        ("ignore", False, sa.Integer),
        ("ignore", True, sa.Boolean),
    ],
    ids=["ignore", "negative", "no-label-timestamp", "boolean-labels"],
)
def test_online_accuracy(store, missing, label_timestamp, label_type):
    url, schema, dialect = store
    stores_nan = dialect in ("postgresql", "duckdb")
    data = make_data(3, stores_nan)
    load(sa.create_engine(url), schema, data, stores_nan, label_type)
    snap = refresh(url, schema, missing=missing, label_timestamp=label_timestamp)
    assert all(s.up for s in snap.sources.values()), snap.errors

    def matured(made: datetime, arrived: datetime) -> bool:
        """Label maturity (docs/metrics.md): from the start of the prediction's slice (5
        minutes: time_slice auto for windows 1h and 24h) to DELAY after its end, and before
        AS_OF; without a label timestamp, every label row."""
        if not label_timestamp:
            return True
        start = EPOCH + (made - EPOCH) // SLICE * SLICE
        return start <= arrived < min(start + SLICE + DELAY, AS_OF)

    for online in snap.online:
        end = AS_OF - DELAY
        start = end - WINDOWS[online.window]
        valid, _ = classify(data, start, end, stores_nan)
        made = {p["id"]: p["ts"] for p in data.predictions if start <= p["ts"] < end}  # one a valid id
        by_id: dict[int, list[int]] = {}
        for r in data.labels:
            if r["id"] in made and matured(made[r["id"]], r["ts"]):
                by_id.setdefault(r["id"], []).append(r["y"])
        y, p, covered, conflicting, bad = [], [], 0, 0, 0
        for pid, score in valid:
            values = [v for v in by_id.get(pid, []) if v in (0, 1)]
            if pid in by_id and not values:
                bad += 1
            elif values and len(set(values)) > 1:
                conflicting += 1
            elif values:
                covered += 1
                y.append(values[0])
                p.append(score)
            elif missing == "negative":
                y.append(0)
                p.append(score)
        y, p = np.array(y, dtype=int), np.array(p)
        assert online.predictions == len(valid)
        assert online.labeled == len(y) > 0
        assert online.positives == int(y.sum())
        assert online.label_coverage == pytest.approx(covered / len(valid), abs=1e-15)
        assert online.logloss == pytest.approx(log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1]), abs=1e-9)
        assert online.roc_auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert online.roc_auc_error_bound is None
        assert online.positive_ratio == pytest.approx(y.mean(), abs=1e-15)
        assert online.calibration_ratio == pytest.approx(p.mean() / y.mean(), rel=1e-12)
        assert online.extreme_scores == int(np.sum((p == 0) | (p == 1))) > 0
        # bad_timestamp: a reason only with a label timestamp, whose values here are all instants
        expected = {"conflicting": conflicting, "invalid_value": bad} | (
            {"bad_timestamp": 0} if label_timestamp else {}
        )
        assert dict(online.invalid_labels) == expected


def test_reproducibility(store):
    url, schema, dialect = store
    stores_nan = dialect in ("postgresql", "duckdb")
    data = make_data(5, stores_nan)
    load(sa.create_engine(url), schema, data, stores_nan)
    snap = refresh(url, schema)
    for replay in snap.replays:
        valid = dict(classify(data, AS_OF - WINDOWS[replay.window], AS_OF, stores_nan)[0])
        pairs = [(valid[r["id"]], r["score"]) for r in data.replays if r["id"] in valid]
        online = np.array([a for a, _ in pairs])
        offline = np.array([np.nan if b is None else b for _, b in pairs])
        valid_offline = (offline >= 0) & (offline <= 1)  # NaN compares False: not a probability
        diff = np.abs(online - offline)
        ok = valid_offline & (diff <= ATOL + RTOL * np.maximum(np.abs(online), np.abs(offline)))
        assert replay.replayed == len(pairs) > 0
        assert replay.ratio == pytest.approx(ok.mean(), abs=1e-15)
        assert 0 < replay.ratio < 1
        assert replay.abs_error_max == pytest.approx(diff[valid_offline].max(), abs=1e-12)


def test_bucketed_auc_and_percentiles_of_continuous_scores(tmp_path):
    url = f"sqlite:///{tmp_path}/store.sqlite"
    rng = np.random.default_rng(6)
    n = 3000
    scores = rng.beta(1, 20, n)  # continuous: ~n distinct scores
    made = [AS_OF - DELAY - timedelta(seconds=float(rng.uniform(1, 3500))) for _ in range(n)]
    data = Data(
        [{"id": i, "ts": made[i], "score": float(s)} for i, s in enumerate(scores)],
        # each label 10 minutes after its prediction: within label maturity
        [
            {"id": i, "y": int(rng.random() < s * 4), "ts": made[i] + timedelta(minutes=10)}
            for i, s in enumerate(scores)
        ],
        [],
    )
    load(sa.create_engine(url), None, data, False)
    settings = settings_for(url, None)
    model = settings.models[0].model_copy(update={"bucket_decimals": 3})
    stores = Stores(settings.stores, settings.query_timeout)
    snap = ModelRefresher(model, "models[0]", settings.refresh_policy, stores).refresh(AS_OF)
    stores.dispose()
    online = next(o for o in snap.online if o.window == "1h")
    y = np.array([r["y"] for r in data.labels])
    exact = roc_auc_score(y, scores)
    assert online.roc_auc_error_bound is not None and online.roc_auc_error_bound > 0
    assert abs(online.roc_auc - exact) <= online.roc_auc_error_bound
    assert online.logloss == pytest.approx(log_loss(y, scores), abs=1e-9)  # log loss stays exact
    stats = next(s for s in snap.score_stats if s.window == "24h")
    assert stats.bucketed
    assert stats.stddev == pytest.approx(np.std(scores), rel=1e-9)  # exact: centered sums per bucket
    for q, value in stats.percentiles.items():
        assert abs(value - np.percentile(scores, q)) < 1e-3, q  # within one bucket
    _, counts = np.unique(np.floor(scores * 1e6 + 0.5), return_counts=True)
    assert stats.mode_share == counts.max() / n  # exact: counted in SQL when buckets are impure


def test_single_class_and_empty_windows(tmp_path):
    url = f"sqlite:///{tmp_path}/store.sqlite"
    data = Data(
        [{"id": i, "ts": AS_OF - DELAY - timedelta(minutes=10 + i), "score": 0.1 * (i % 5)} for i in range(20)],
        [{"id": i, "y": 1, "ts": AS_OF - DELAY - timedelta(minutes=5 + i)} for i in range(20)],  # 5 minutes later
        [],
    )
    load(sa.create_engine(url), None, data, False)
    snap = refresh(url, None)
    one_hour = next(o for o in snap.online if o.window == "1h")
    assert one_hour.labeled == 20 and one_hour.positives == 20
    assert one_hour.roc_auc is None  # one class: absent, never 0 or 0.5
    assert one_hour.logloss == pytest.approx(
        log_loss(np.ones(20), np.clip([0.1 * (i % 5) for i in range(20)], 1e-15, 1), labels=[0, 1])
    )
    empty = next(s for s in snap.score_stats if s.window == "1h")  # nothing in [as_of - 1h, as_of)
    assert empty.predictions == 0 and empty.mean is None and empty.percentiles == {} and empty.mode_share is None


def test_all_negative_window_and_empty_online_and_replay_windows(tmp_path):
    url = f"sqlite:///{tmp_path}/store.sqlite"
    # 10 predictions in the online 1h window, no label rows at all, no replays
    data = Data(
        [{"id": i, "ts": AS_OF - DELAY - timedelta(minutes=5 + i), "score": 0.01 * i} for i in range(10)], [], []
    )
    load(sa.create_engine(url), None, data, False)
    negative = refresh(url, None, missing="negative")
    online = {o.window: o for o in negative.online}
    assert online["1h"].labeled == 10 and online["1h"].positives == 0
    assert online["1h"].roc_auc is None and online["1h"].calibration_ratio is None  # one class, no positive
    assert online["1h"].label_coverage == 0.0
    assert online["1h"].logloss == pytest.approx(
        log_loss(np.zeros(10), np.clip(0.01 * np.arange(10), 1e-15, 1), labels=[0, 1])
    )
    ignore = {o.window: o for o in refresh(url, None, missing="ignore").online}
    assert ignore["1h"].labeled == 0 and ignore["1h"].logloss is None and ignore["1h"].positive_ratio is None
    assert all(r.replayed == 0 and r.ratio is None and r.abs_error_max is None for r in negative.replays)
