"""The refresh on a distributed SQL engine, for real: Apache Spark SQL in local mode, reached
through its Thrift server (``HiveThriftServer2``, shipped in PyPI's ``pyspark``) and PyHive's
``hive://`` dialect, against PostgreSQL on the same rows: a cold refresh, then a second one
after rows were inserted and ``as_of`` advanced (kept time slices, with duplicate ids in
the default configuration and with ``unique_ids``). docs/scaling.md, "Spark SQL", says how
to set the engine up.

Marked ``engine`` and deselected by default: the server takes 20 to 70 s to start (idle
to busy machine) and each refresh 10 to 20 s. Run with ``.venv/bin/python -m pytest -m engine -n 0`` after
``pip install -e '.[spark]'``; it needs Java 17.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import socket
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.stores import Stores
from tests.conftest import free_port, log_tail, model_settings, require, start_process
from tests.integration.predictions.test_portability import _close
from tests.integration.predictions.test_refresh_metrics import AS_OF, ATOL, RTOL, WINDOWS, Data, make_data

pytestmark = pytest.mark.engine

#: Predictions of ``make_data`` kept (its first rows hold every edge case: exact 0 and 1,
#: NULL, NaN, out-of-range and infinite scores); its rows past 4,000 (duplicate ids, a
#: prediction at ``as_of``) are kept too. A few hundred rows: each is a literal in one
#: ``INSERT`` statement that Spark parses and plans.
KEPT = 300
#: The second refresh's ``as_of``: after the rows of ``_later``.
LATER = AS_OF + timedelta(minutes=20)


def _pyspark_home() -> Path | None:
    spec = importlib.util.find_spec("pyspark")
    return Path(spec.origin).parent if spec and spec.origin else None


def _wait_for_thrift(port: int, process, log: Path, timeout: float = 180) -> None:
    """Wait until the Thrift server answers ``SELECT 1`` (it opens its port once the
    session and the metastore are up); fail with the end of its log otherwise."""
    deadline = time.monotonic() + timeout
    engine = sa.create_engine(f"hive://mlmon@127.0.0.1:{port}/default")
    try:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"Spark Thrift server exited with {process.returncode}:\n{log_tail(log)}"
            try:
                # The port first: PyHive lets thrift's own exception through while it is closed.
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1")).all()
                return
            except (OSError, sa.exc.DBAPIError):
                time.sleep(1)
    finally:
        engine.dispose()
    raise AssertionError(f"Spark Thrift server not ready within {timeout} s:\n{log_tail(log)}")


@pytest.fixture(scope="module")
def spark_port(tmp_path_factory):
    """The port of a Spark Thrift server in local mode (two cores), started for the module.
    Its session time zone is UTC: PyHive reads and writes timestamps as text of that zone."""
    home = _pyspark_home()
    require(home is not None, "pyspark is not installed (pip install -e '.[spark]')")
    require(shutil.which("java") is not None, "java is not installed (Debian package openjdk-17-jre-headless)")
    for module in ("pyhive", "thrift_sasl", "puresasl"):
        require(importlib.util.find_spec(module) is not None, f"{module} is not installed (pip install -e '.[spark]')")
    assert home is not None
    jars = list((home / "jars").glob("spark-hive-thriftserver_*.jar"))
    require(bool(jars), f"pyspark at {home} has no spark-hive-thriftserver jar")
    work = tmp_path_factory.mktemp("spark")
    port, log = free_port(), work / "thriftserver.log"
    args = [
        str(home / "bin" / "spark-submit"),
        "--master",
        "local[2]",
        "--class",
        "org.apache.spark.sql.hive.thriftserver.HiveThriftServer2",
        "--conf",
        f"spark.hive.server2.thrift.port={port}",
        "--conf",
        "spark.hive.server2.thrift.bind.host=127.0.0.1",
        "--conf",
        "spark.sql.session.timeZone=UTC",
        "--conf",
        f"spark.sql.warehouse.dir={work / 'warehouse'}",
        "--conf",
        "spark.ui.enabled=false",
        "--conf",
        "spark.sql.shuffle.partitions=2",  # 200 by default: 200 tasks per GROUP BY of a few hundred rows
        "--driver-java-options",
        f"-Dderby.system.home={work}",  # the embedded metastore's files, not the working directory
        "spark-internal",
    ]
    process = start_process(args, log, cwd=work, env={**os.environ, "SPARK_HOME": str(home)})
    try:
        _wait_for_thrift(port, process, log)
        yield port
    finally:
        process.terminate()  # spark-submit execs the JVM: this is the server itself
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def spark_schema(spark_port):
    """(url, schema): a fresh Spark database, dropped with its tables after the test."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    url = f"hive://mlmon@127.0.0.1:{spark_port}/default"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {schema}"))
    yield url, schema
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP DATABASE {schema} CASCADE"))
    engine.dispose()


def _tables(schema: str) -> tuple[sa.Table, sa.Table, sa.Table]:
    """The tests' standard tables (conftest.model_settings), timestamps in UTC without zone."""
    metadata = sa.MetaData(schema=schema)
    predictions = sa.Table(
        "predictions", metadata, sa.Column("id", sa.BigInteger), sa.Column("ts", sa.DateTime), sa.Column("p", sa.Double)
    )
    labels = sa.Table(
        "labels", metadata, sa.Column("id", sa.BigInteger), sa.Column("y", sa.Integer), sa.Column("ts", sa.DateTime)
    )
    replays = sa.Table("replays", metadata, sa.Column("id", sa.BigInteger), sa.Column("p", sa.Double))
    return predictions, labels, replays


def _double(value: float | None):
    """A score as an insertable value: NaN and infinities as a cast of their text, which both
    engines read (PyHive would write them as ``nan`` and ``inf``: column names to Spark)."""
    if value is not None and not math.isfinite(value):
        return sa.cast(sa.literal(str(value)), sa.Double)
    return value


def _timestamp(value: datetime):
    """An instant as a UTC wall-clock literal cast to a timestamp: PyHive writes a datetime
    as text, which Spark does not cast to a timestamp column on insert (CANNOT_SAFELY_CAST)."""
    return sa.cast(sa.literal(value.astimezone(UTC).replace(tzinfo=None)), sa.DateTime)


def _insert(engine: sa.Engine, schema: str, data: Data, create: bool) -> None:
    """Write ``data`` into both engines alike: one multi-row ``INSERT`` per table (PyHive's
    ``executemany`` runs one Spark job per row)."""
    predictions, labels, replays = _tables(schema)
    if create:
        predictions.metadata.create_all(engine, checkfirst=False)  # PyHive cannot tell Spark's "table not found"
    with engine.begin() as conn:
        for table, rows in (
            (
                predictions,
                [{"id": p["id"], "ts": _timestamp(p["ts"]), "p": _double(p["score"])} for p in data.predictions],
            ),
            (labels, [{"id": r["id"], "y": r["y"], "ts": _timestamp(r["ts"])} for r in data.labels]),
            (replays, [{"id": r["id"], "p": _double(r["score"])} for r in data.replays]),
        ):
            if rows:
                conn.execute(table.insert().values(rows))


def _first() -> Data:
    """A few hundred rows of ``make_data`` with its edge cases (NaN stored, as both engines can)."""
    data = make_data(12, stores_nan=True)
    predictions = data.predictions[:KEPT] + data.predictions[4000:]
    ids = {p["id"] for p in predictions}
    return Data(
        predictions,
        [r for r in data.labels if r["id"] in ids or r["ts"] > AS_OF],  # and labels that arrive after as_of
        [r for r in data.replays if r["id"] in ids],
    )


def _later() -> Data:
    """Rows written between the two refreshes: predictions in ``[AS_OF, LATER)`` (one NaN,
    one out of range), labels for some of them and for earlier predictions, replays."""
    rng = np.random.default_rng(13)
    predictions = [
        {
            "id": 10_000 + i,
            "ts": AS_OF + timedelta(seconds=float(rng.uniform(0, 1190))),
            "score": float(np.round(rng.beta(2, 5), 3)),
        }
        for i in range(60)
    ]
    predictions[0]["score"], predictions[1]["score"] = float("nan"), 1.25
    labels = [
        {"id": p["id"], "y": int(rng.random() < p["score"]), "ts": LATER - timedelta(minutes=1)}
        for p in predictions[2:40]
    ]
    labels += [
        {"id": i, "y": 1, "ts": LATER - timedelta(minutes=2)} for i in range(100, 140)
    ]  # late labels of old predictions
    replays = [{"id": p["id"], "score": p["score"]} for p in predictions[2:30]]
    return Data(predictions, labels, replays)


def _refresher(url: str, schema: str, unique_ids: bool):
    settings = model_settings(
        url,
        schema,
        predictions={"unique_ids": unique_ids},
        labels={"missing": "negative", "columns": {"timestamp": "ts"}},
        replays=True,
        model={
            "windows": list(WINDOWS),
            "label_delay": "1h",
            "replay_tolerance": {"atol": ATOL, "rtol": RTOL},
            "time_slice": "auto",  # the second refresh reads the kept slices
            "slice_fill_refreshes": 1,  # the cold refresh reads every slice: the sliced statements on Spark
        },
    )
    stores = Stores(settings.stores, settings.query_timeout)
    return ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores), stores


def _numbers(snapshot) -> dict:
    """What a snapshot exports, without durations and timing."""
    return {
        "score_stats": snapshot.score_stats,
        "online": snapshot.online,
        "replays": snapshot.replays,
        "counter": snapshot.counter,
        "last_prediction_timestamp": snapshot.last_prediction_timestamp,
        "future_predictions": snapshot.future_predictions,
        "errors": {key: n for key, n in snapshot.errors.items() if n},
        "up": {name: status.up for name, status in snapshot.sources.items()},
    }


def _assert_same(spark: dict, postgresql: dict, when: str) -> None:
    assert spark["errors"] == {} and all(spark["up"].values()), (when, spark["errors"])
    for part in ("score_stats", "online", "replays"):
        assert len(spark[part]) == len(postgresql[part]) == len(WINDOWS), (when, part)
        for a, b in zip(spark[part], postgresql[part], strict=True):
            assert _close(a, b), (when, part, a, b)
    assert _close(spark["counter"], postgresql["counter"]), (when, spark["counter"], postgresql["counter"])
    for key in ("last_prediction_timestamp", "future_predictions", "errors", "up"):
        assert spark[key] == postgresql[key], (when, key)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("unique_ids", [False, True], ids=["duplicate-ids", "unique-ids"])
def test_spark_refresh_equals_postgresql(spark_schema, postgres_schema, unique_ids):
    runs = {"spark": spark_schema, "postgresql": postgres_schema}
    first, later = _first(), _later()
    if unique_ids:  # the duplicate ids are then the user's promise broken: leave them out
        first.predictions = [p for p in first.predictions if p["id"] not in range(70, 80)]
    numbers: dict[str, list[dict]] = {}
    for name, (url, schema) in runs.items():
        engine = sa.create_engine(url)
        refresher, stores = _refresher(url, schema, unique_ids)
        try:
            _insert(engine, schema, first, create=True)
            refresher.refresh(AS_OF - timedelta(minutes=30))  # starts the counter's watermark
            cold = refresher.refresh(AS_OF)
            _insert(engine, schema, later, create=False)
            numbers[name] = [_numbers(cold), _numbers(refresher.refresh(LATER))]
        finally:
            stores.dispose()
            engine.dispose()
    spark, postgresql = numbers["spark"], numbers["postgresql"]
    for when, (a, b) in zip(("cold", "after inserts"), zip(spark, postgresql, strict=True), strict=True):
        _assert_same(a, b, when)
    # The rows are what the windows hold: NaN named, the inserts counted.
    day = postgresql[1]["score_stats"][1]
    assert day.invalid["nan_score"] > 0 and day.invalid["out_of_range"] > 0
    assert postgresql[1]["counter"].total > postgresql[0]["counter"].total


def test_spark_missing_table_is_a_schema_error(spark_schema, caplog):
    """PyHive reports Spark's missing table as any failed statement (``OperationalError``);
    mlmon tells it by its SQLSTATE 42P01 and names the config key, as on other engines."""
    url, schema = spark_schema
    refresher, stores = _refresher(url, schema, unique_ids=False)
    try:
        snapshot = refresher.refresh(AS_OF)
    finally:
        stores.dispose()
    assert {key: n for key, n in snapshot.errors.items() if n} == {
        ("predictions", "schema"): 1,
        ("labels", "schema"): 1,
        ("replays", "schema"): 1,
    }
    assert f"models[0].predictions.table: table '{schema}.predictions' does not exist in store 's'" in caplog.text
