"""Bad and hostile data in the monitored tables (issue 7), on SQLite and on the real
PostgreSQL (and DuckDB for binary versions): labels -1, 2, NULL, NaN, 0.5 and text; a
text label column; predictions stamped in the future; empty tables; serving versions
that are not UTF-8 or are 1 MB long. Each case is either counted with a reason and left
out of the math, or reported as a clear error naming the config key or the reason; no
healthy source fails, no number is NaN, and what the math keeps is checked against
scikit-learn on the valid rows only."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pydantic
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import log_loss, roc_auc_score

from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.stores import Stores
from exporter.reasons import SchemaError
from exporter.training.schema import TrainingRun
from exporter.training.storage import StateDatabase, save_run
from exporter.versions import VERSION_MAX_LENGTH
from tests.conftest import model_settings, refresh_once

AS_OF = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    """(url, schema, dialect) of an empty store: a SQLite file or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.sqlite", None, "sqlite"
    return (*request.getfixturevalue("postgres_schema"), "postgresql")


def _qualified(schema: str | None, table: str) -> str:
    return f'"{schema}".{table}' if schema else table


def _naive(instant: datetime) -> datetime:
    return instant.astimezone(UTC).replace(tzinfo=None)


def _settings(url, schema=None, missing="ignore", version=False, labels=True, replays=False, state=None):
    return model_settings(
        url,
        schema,
        labels=labels and {"missing": missing},
        replays=replays,
        predictions={"columns": {"version": "v"}} if version else None,
        **({"state": {"url": state}} if state else {}),
    )


def _predictions_table(engine, schema, rows, version_type=None):
    """Create ``predictions`` (id, ts, p[, v]) and insert ``rows`` (dicts with aware ``ts``)."""
    metadata = sa.MetaData(schema=schema)
    columns = [sa.Column("id", sa.BigInteger), sa.Column("ts", sa.DateTime), sa.Column("p", sa.Double)]
    if version_type is not None:
        columns.append(sa.Column("v", version_type))
    table = sa.Table("predictions", metadata, *columns)
    metadata.create_all(engine)
    if rows:
        with engine.begin() as conn:
            conn.execute(table.insert(), [{**row, "ts": _naive(row["ts"])} for row in rows])
    return table


def _refresh(settings, *times):
    """The snapshots of one refresher refreshed at each of ``times`` in turn."""
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
        return [refresher.refresh(t) for t in times]
    finally:
        stores.dispose()


def _samples(text: str) -> dict:
    """(metric name, frozenset of labels) -> value of an exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _no_nan(text: str) -> None:
    assert all(not math.isnan(value) for value in _samples(text).values())
    assert "nan" not in text.lower().replace("nan_score", "")


# -- 1. label values that are not 0/1 ------------------------------------------------------

#: (label column type, [(value stored, what it means: 0, 1, or None for not a label)]).
#: SQLite gives a column declared INTEGER or BOOLEAN numeric affinity: text that reads as
#: a number ('1', '0') is stored as that number, other text ('yes', '') and blobs are kept
#: as they are and must not pass for a label (a CAST to INTEGER would read them as 0).
SQLITE_VALUES = [
    (-1, None),
    (2, None),
    (None, None),
    ("yes", None),
    ("", None),
    ("true", None),
    (b"\x01", None),
    (0.5, None),
    ("1", 1),
    ("0", 0),
    (1.0, 1),
]
LABEL_CASES = {
    "sqlite-integer": ("sqlite", "INTEGER", SQLITE_VALUES),
    "sqlite-boolean": ("sqlite", "BOOLEAN", SQLITE_VALUES),
    "postgresql-integer": ("postgresql", "integer", [(-1, None), (2, None), (None, None), (1, 1)]),
    "postgresql-double": (
        "postgresql",
        "double precision",
        [(-1.0, None), (2.0, None), (None, None), (0.5, None), (float("nan"), None), (float("inf"), None), (1.0, 1)],
    ),
    "postgresql-boolean": ("postgresql", "boolean", [(None, None), (True, 1), (False, 0)]),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_labels_that_are_not_0_or_1_are_counted_and_left_out(case, tmp_path, request):
    dialect, label_type, hostile = LABEL_CASES[case]
    if dialect == "sqlite":
        url, schema = f"sqlite:///{tmp_path}/store.sqlite", None
    else:
        url, schema = request.getfixturevalue("postgres_schema")
    engine = sa.create_engine(url)
    rng = np.random.default_rng(7)
    n = 300
    scores = np.round(rng.beta(2, 5, n), 2)  # two decimals: exact buckets, ties
    _predictions_table(
        engine,
        schema,
        [{"id": i, "ts": AS_OF - timedelta(seconds=10 + 11 * i), "p": float(s)} for i, s in enumerate(scores)],
    )
    boolean = label_type.lower() == "boolean"
    rows = [(i, int(rng.random() < scores[i])) for i in range(200)]  # (id, meaning): valid labels
    # Each hostile value twice: alone on its id, and beside a valid 1 on another id.
    label_rows = [(i, bool(y) if boolean else y, y) for i, y in rows]
    for k, (value, meaning) in enumerate(hostile):
        label_rows.append((200 + k, value, meaning))
        label_rows += [(250 + k, value, meaning), (250 + k, True if boolean else 1, 1)]
    # ids 200 + len(hostile) .. 249 and beyond 250 + len(hostile) have no label row
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {_qualified(schema, 'labels')} (id BIGINT, y {label_type})"))
        for i, value, _ in label_rows:
            conn.execute(sa.text(f"INSERT INTO {_qualified(schema, 'labels')} VALUES (:i, :y)"), {"i": i, "y": value})
    engine.dispose()

    by_id: dict[int, list] = {}
    for i, _, meaning in label_rows:
        by_id.setdefault(i, []).append(meaning)
    for missing in ("ignore", "negative"):
        (snap,) = _refresh(_settings(url, schema, missing=missing), AS_OF)
        assert all(s.up for s in snap.sources.values()), snap.errors
        online = snap.online[0]
        y, p, covered, conflicting, bad = [], [], 0, 0, 0
        for i in range(n):
            values = {m for m in by_id.get(i, []) if m is not None}
            if i in by_id and not values:
                bad += 1  # a label row, but no 0/1 in it: NULL included
            elif len(values) > 1:
                conflicting += 1
            elif values:
                covered += 1
                y.append(values.pop())
                p.append(scores[i])
            elif missing == "negative":
                y.append(0)
                p.append(scores[i])
        y, p = np.array(y), np.array(p)
        assert bad == sum(1 for _, meaning in hostile if meaning is None) > 0
        assert dict(online.invalid_labels) == {"conflicting": conflicting, "invalid_value": bad}
        assert online.predictions == n
        assert online.labeled == len(y) and online.positives == int(y.sum())
        assert online.label_coverage == pytest.approx(covered / n, abs=1e-15)
        assert online.logloss == pytest.approx(log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1]), abs=1e-9)
        assert online.roc_auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert online.positive_ratio == pytest.approx(y.mean(), abs=1e-15)


def test_a_text_label_column_is_a_schema_error_naming_the_key(store, caplog):
    url, schema, _ = store
    engine = sa.create_engine(url)
    _predictions_table(engine, schema, [{"id": 1, "ts": AS_OF - timedelta(minutes=5), "p": 0.3}])
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {_qualified(schema, 'labels')} (id BIGINT, y TEXT)"))
        conn.execute(sa.text(f"INSERT INTO {_qualified(schema, 'labels')} VALUES (1, '1'), (1, 'yes')"))
    engine.dispose()
    settings = _settings(url, schema)
    stores = Stores(settings.stores, settings.query_timeout)
    refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
    with pytest.raises(
        SchemaError, match=r"^models\[0\]\.labels\.columns\.label: column 'y' .*TEXT.*expected a number or a boolean"
    ):
        refresher.check_schema()
    with caplog.at_level(logging.WARNING):
        snap = refresher.refresh(AS_OF)
    stores.dispose()
    assert {name: s.up for name, s in snap.sources.items()} == {"predictions": True, "labels": False}
    assert {k: v for k, v in snap.errors.items() if v} == {("labels", "schema"): 1}
    assert snap.online == () and snap.score_stats[0].predictions == 1
    assert "models[0].labels.columns.label" in caplog.text


# -- 2. predictions stamped in the future --------------------------------------------------


def test_predictions_stamped_in_the_future_are_reported_and_counted_only_when_their_time_comes(store):
    url, schema, _ = store
    past = [{"id": i, "ts": AS_OF - timedelta(minutes=i + 1), "p": 0.01 * i} for i in range(50)]
    future = [
        {"id": 100, "ts": AS_OF, "p": 0.5},  # at the refresh time: not before it, so in no window yet
        {"id": 104, "ts": AS_OF + timedelta(seconds=30), "p": 0.2},  # in no window, but within the minute of tolerance
        {"id": 101, "ts": AS_OF + timedelta(minutes=5), "p": 0.9},
        {"id": 102, "ts": AS_OF + timedelta(hours=2), "p": 0.7},
        {"id": 103, "ts": AS_OF + timedelta(days=1), "p": None},
    ]
    rows = past + future
    _predictions_table(sa.create_engine(url), schema, rows)
    times = [AS_OF - timedelta(minutes=30), AS_OF, AS_OF + timedelta(minutes=10), AS_OF + timedelta(days=1, seconds=1)]
    snaps = _refresh(_settings(url, schema, labels=False), *times)

    counted: list[dict] = []
    for when, snap in zip(times[1:], snaps[1:], strict=False):
        assert snap.sources["predictions"].up, snap.errors
        assert snap.future_predictions == sum(1 for r in rows if r["ts"] >= when + timedelta(minutes=1))
        counted = [r for r in rows if times[0] <= r["ts"] < when and r["p"] is not None]
        assert snap.counter.total == len(counted)
        assert snap.counter.score_sum == pytest.approx(sum(r["p"] for r in counted), rel=1e-12)
        newest = max(r["ts"] for r in rows if r["ts"] < when)
        assert snap.last_prediction_timestamp == pytest.approx(newest.timestamp(), abs=1e-3)
        assert snap.last_prediction_timestamp < when.timestamp()
        in_window = [r["p"] for r in rows if when - timedelta(hours=1) <= r["ts"] < when and r["p"] is not None]
        assert snap.score_stats[0].predictions == len(in_window)
        assert snap.score_stats[0].mean == (pytest.approx(np.mean(in_window), rel=1e-12) if in_window else None)
    assert [s.future_predictions for s in snaps] == [
        34,
        3,
        2,
        0,
    ]  # at first also the 29 past rows of [as_of - 29m, as_of)
    assert snaps[-1].counter.total == 30 + 4  # each counted once, the NULL score never

    text = refresh_once(_settings(url, schema, labels=False), AS_OF).decode()
    got = _samples(text)
    assert got[("mlmon_future_predictions", frozenset({("model", "ctr")}))] == 3
    assert got[("mlmon_prediction_last_timestamp_seconds", frozenset({("model", "ctr")}))] == pytest.approx(
        (AS_OF - timedelta(minutes=1)).timestamp(), abs=1e-3
    )


def test_tiny_scores_and_replays_keep_every_source_up_with_exact_numbers(store):
    """Attack 2026-12-01: PostgreSQL raises "value out of range: underflow" when x * x rounds
    to 0 for a non-zero x: one score of 1e-200 (a valid probability) took the predictions
    source down at every refresh, a replay of 1e-320 the replays source (rtol x score).
    Squares below queries.SQUARE_FLOOR are summed as 0; the numbers are numpy's."""
    url, schema, _ = store
    scores = [1e-200, 5e-324, 1e-320, 0.25, 0.5, 0.75]
    labels = [0, 0, 1, 1, 0, 1]
    engine = sa.create_engine(url)
    rows = [{"id": i, "ts": AS_OF - timedelta(minutes=i + 1), "p": p} for i, p in enumerate(scores)]
    _predictions_table(engine, schema, rows)
    metadata = sa.MetaData(schema=schema)
    label_table = sa.Table("labels", metadata, sa.Column("id", sa.BigInteger), sa.Column("y", sa.Integer))
    replay_table = sa.Table("replays", metadata, sa.Column("id", sa.BigInteger), sa.Column("p", sa.Double))
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(label_table.insert(), [{"id": i, "y": y} for i, y in enumerate(labels)])
        conn.execute(replay_table.insert(), [{"id": i, "p": p} for i, p in enumerate(scores)])  # all reproduced
    engine.dispose()

    [snap] = _refresh(_settings(url, schema, replays=True), AS_OF)
    assert all(s.up for s in snap.sources.values()) and not any(snap.errors.values()), snap.errors
    stats, online, replay = snap.score_stats[0], snap.online[0], snap.replays[0]
    assert stats.predictions == len(scores)
    assert stats.mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert stats.stddev == pytest.approx(np.std(scores), rel=1e-9)
    assert online.roc_auc == pytest.approx(roc_auc_score(labels, scores))
    assert (replay.replayed, replay.ratio, replay.abs_error_max) == (len(scores), 1.0, 0.0)


# -- 3. empty tables ----------------------------------------------------------------------


def test_empty_tables_keep_sources_up_with_zero_counts_and_no_undefined_numbers(store):
    url, schema, _ = store
    engine = sa.create_engine(url)
    _predictions_table(engine, schema, [])
    metadata = sa.MetaData(schema=schema)
    sa.Table("labels", metadata, sa.Column("id", sa.BigInteger), sa.Column("y", sa.Integer))
    sa.Table("replays", metadata, sa.Column("id", sa.BigInteger), sa.Column("p", sa.Double))
    metadata.create_all(engine)
    engine.dispose()

    for missing in ("ignore", "negative"):
        settings = _settings(url, schema, missing=missing, replays=True)
        _, snap = _refresh(settings, AS_OF - timedelta(minutes=5), AS_OF)  # the second one runs the counter query
        assert {name: s.up for name, s in snap.sources.items()} == {
            "predictions": True,
            "labels": True,
            "replays": True,
        }
        assert not any(snap.errors.values())
        stats, online, replay = snap.score_stats[0], snap.online[0], snap.replays[0]
        assert stats.predictions == 0
        assert dict(stats.invalid) == dict.fromkeys(
            ["null_score", "non_numeric_score", "nan_score", "out_of_range", "duplicate_id", "bad_timestamp"], 0
        )
        assert (stats.mean, stats.stddev, stats.percentiles, stats.mode_share) == (None, None, {}, None)
        assert snap.last_prediction_timestamp is None and snap.future_predictions == 0
        counter = snap.counter
        assert (counter.total, counter.score_sum, counter.cumulative_buckets) == (0, 0.0, (0,) * len(counter.bounds))
        assert (online.predictions, online.labeled, online.positives, online.extreme_scores) == (0, 0, 0, 0)
        assert dict(online.invalid_labels) == {"conflicting": 0, "invalid_value": 0}
        undefined = (
            online.logloss,
            online.roc_auc,
            online.roc_auc_error_bound,
            online.calibration_ratio,
            online.positive_ratio,
            online.label_coverage,
        )
        assert undefined == (None,) * 6
        assert (replay.replayed, replay.ratio, replay.abs_error_max) == (0, None, None)

        text = refresh_once(settings, AS_OF).decode()
        _no_nan(text)
        names = {name for name, _ in _samples(text)}
        for name in [
            "mlmon_prediction_score_mean",
            "mlmon_prediction_score_stddev",
            "mlmon_prediction_score_percentile",
            "mlmon_prediction_mode_share_ratio",
            "mlmon_prediction_last_timestamp_seconds",
            "mlmon_online_logloss",
            "mlmon_online_roc_auc",
            "mlmon_online_positive_ratio",
            "mlmon_online_calibration_ratio",
            "mlmon_online_label_coverage_ratio",
            "mlmon_replay_reproducibility_ratio",
            "mlmon_replay_abs_error_max",
        ]:
            assert name not in names, name
        got = _samples(text)
        windowed = frozenset({("model", "ctr"), ("window", "1h")})
        for name in [
            "mlmon_window_predictions",
            "mlmon_online_predictions",
            "mlmon_online_labeled_predictions",
            "mlmon_replay_predictions",
        ]:
            assert got[(name, windowed)] == 0, name
        model = frozenset({("model", "ctr")})
        assert got[("mlmon_predictions_total", model)] == 0 and got[("mlmon_future_predictions", model)] == 0
        for source in ("predictions", "labels", "replays"):
            assert got[("mlmon_source_up", model | {("source", source)})] == 1


# -- 4. serving versions that cannot be a label value or a run's version ----------------------


def _state(tmp_path) -> str:
    """A state database with runs v1 (validation log loss 0.25) and, newer, v2 (0.2)."""
    url = f"sqlite:///{tmp_path}/state.sqlite"
    state = StateDatabase(url)
    for version, days, logloss in [("v1", 2, 0.25), ("v2", 1, 0.2)]:
        run = TrainingRun(
            model="ctr",
            version=version,
            trained_at=AS_OF - timedelta(days=days),
            training_rows=100,
            validation_logloss=logloss,
        )
        save_run(state.ready(), run, AS_OF)
    state.engine.dispose()
    return url


def test_version_limit_is_the_longest_training_run_version():
    TrainingRun(model="ctr", version="a" * VERSION_MAX_LENGTH, trained_at=AS_OF, training_rows=1)
    with pytest.raises(pydantic.ValidationError):
        TrainingRun(model="ctr", version="a" * (VERSION_MAX_LENGTH + 1), trained_at=AS_OF, training_rows=1)


VERSION_CASES = {
    # case: (dialect, column type, newest prediction's version as SQL, parameters, reason logged or None)
    "sqlite-valid": ("sqlite", "TEXT", ":v", {"v": "v1"}, None),
    "sqlite-not-utf8": ("sqlite", "TEXT", "CAST(x'ff61' AS TEXT)", {}, "not UTF-8"),
    "sqlite-1mb": ("sqlite", "TEXT", ":v", {"v": "v1" * 500_000}, "longer than 100"),
    "sqlite-1mb-not-utf8": ("sqlite", "TEXT", "CAST(:v AS TEXT)", {"v": b"\xff" * 1_000_000}, "longer than 100"),
    "postgresql-valid": ("postgresql", "text", ":v", {"v": "v1"}, None),
    "postgresql-1mb": ("postgresql", "text", ":v", {"v": "v1" * 500_000}, "longer than 100"),
    "postgresql-bytea-valid": ("postgresql", "bytea", ":v", {"v": b"v1"}, None),
    "postgresql-bytea-not-utf8": ("postgresql", "bytea", ":v", {"v": b"\xffa"}, "not UTF-8"),
    "postgresql-bytea-1mb": ("postgresql", "bytea", ":v", {"v": b"v" * 1_000_000}, "longer than 100"),
    "postgresql-integer": ("postgresql", "integer", "7", {}, None),
    "duckdb-blob-valid": ("duckdb", "BLOB", ":v", {"v": b"v1"}, None),
    "duckdb-blob-not-utf8": ("duckdb", "BLOB", ":v", {"v": b"\xffa"}, "not UTF-8"),
    "duckdb-varchar-1mb": ("duckdb", "VARCHAR", ":v", {"v": "v1" * 500_000}, "longer than 100"),
}


@pytest.mark.parametrize("case", list(VERSION_CASES))
def test_serving_versions_not_utf8_or_1mb_long_match_no_run_and_are_reported(case, tmp_path, request, caplog):
    dialect, version_type, newest_version, params, reason = VERSION_CASES[case]
    if dialect in ("sqlite", "duckdb"):
        url, schema = f"{dialect}:///{tmp_path}/store.{dialect}", None
    else:
        url, schema = request.getfixturevalue("postgres_schema")
    engine = sa.create_engine(url)
    scores = [0.2 + 0.1 * (i % 2) for i in range(10)]
    predictions, labels = _qualified(schema, "predictions"), _qualified(schema, "labels")
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"CREATE TABLE {predictions} (id BIGINT, ts TIMESTAMP, p DOUBLE PRECISION, v {version_type})")
        )
        conn.execute(sa.text(f"CREATE TABLE {labels} (id BIGINT, y INTEGER)"))
        old = (
            "'1'"
            if version_type == "integer"
            else ("CAST('v1' AS BYTEA)" if version_type in ("bytea", "BLOB") else "'v1'")
        )
        for i, p in enumerate(scores):  # id 0 is the newest prediction, with the odd version
            ts = f"'{_naive(AS_OF - timedelta(minutes=10 + i)):%Y-%m-%d %H:%M:%S}'"
            conn.execute(
                sa.text(f"INSERT INTO {predictions} VALUES ({i}, {ts}, {p}, {newest_version if i == 0 else old})"),
                params if i == 0 else {},
            )
            conn.execute(sa.text(f"INSERT INTO {labels} VALUES ({i}, {i % 2})"))
    engine.dispose()

    with caplog.at_level(logging.WARNING, logger="exporter.predictions.refresh"):
        text = refresh_once(_settings(url, schema, version=True, state=_state(tmp_path)), AS_OF).decode()
    _no_nan(text)
    got = _samples(text)
    windowed = frozenset({("model", "ctr"), ("window", "1h")})
    assert got[("mlmon_source_up", frozenset({("model", "ctr"), ("source", "labels")}))] == 1
    online = log_loss([i % 2 for i in range(10)], scores)
    assert got[("mlmon_online_logloss", windowed)] == pytest.approx(online, rel=1e-12)
    ratio = got.get(("mlmon_online_logloss_vs_offline_ratio", windowed))
    warnings = [r.getMessage() for r in caplog.records if "serving version" in r.getMessage()]
    if reason is None and version_type != "integer":
        assert ratio == pytest.approx(online / 0.25, rel=1e-12)  # served by v1
        assert warnings == []
    elif reason is None:
        assert ratio is None and warnings == []  # "7" is a version with no run: absent, as documented
    else:
        assert ratio is None  # neither v1's nor the newest (v2) run: none is that version
        assert len(warnings) == 1 and reason in warnings[0] and "ctr" in warnings[0], warnings
        assert len(warnings[0]) < 300  # never the 1 MB value itself
    assert max(len(line) for line in text.splitlines()) < 1000  # nothing of it in the exposition


def test_a_bad_serving_version_is_logged_once_until_it_changes(tmp_path, caplog):
    url = f"sqlite:///{tmp_path}/store.sqlite"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE predictions (id BIGINT, ts TIMESTAMP, p DOUBLE PRECISION, v TEXT)"))
        conn.execute(sa.text("CREATE TABLE labels (id BIGINT, y INTEGER)"))
        conn.execute(
            sa.text("INSERT INTO predictions VALUES (1, :ts, 0.3, CAST(x'ff61' AS TEXT))"),
            {"ts": f"{_naive(AS_OF - timedelta(minutes=5))}"},
        )

    def set_version(sql: str) -> None:
        with engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE predictions SET v = {sql}"))

    def warnings() -> int:
        return sum(1 for r in caplog.records if "serving version" in r.getMessage())

    settings = _settings(url, version=True)
    stores = Stores(settings.stores, settings.query_timeout)
    refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
    with caplog.at_level(logging.WARNING, logger="exporter.predictions.refresh"):
        snaps = [refresher.refresh(AS_OF + timedelta(minutes=k)) for k in range(3)]
        assert all(s.sources["labels"].up for s in snaps) and warnings() == 1
        set_version("'v1'")
        assert refresher.refresh(AS_OF).online[0].serving_version == "v1" and warnings() == 1
        set_version("'x' || CAST(x'ff' AS TEXT)")
        refresher.refresh(AS_OF)
        assert warnings() == 2  # a new bad value is reported again
    stores.dispose()
    engine.dispose()
