"""Query plans stay linear in the window's rows when PostgreSQL has no statistics (issue 11, section 6).

Tables loaded and queried before ANALYZE (``autovacuum_enabled = false`` keeps autovacuum
from analyzing them during the test) make PostgreSQL guess a window of a few rows and join
by nested loops; mlmon's refresh transaction forbids them (``db.timed_connection``).
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa
from sklearn.metrics import log_loss, roc_auc_score
from typer.testing import CliRunner

from exporter.cli import app
from exporter.config import parse_settings
from exporter.db import timed_connection
from exporter.predictions.queries import DuplicateIds, LabelMaturity, PredictionQueries, ReplayQueries, Windows
from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.slices import boundaries
from exporter.predictions.stores import Stores, TimeColumn
from exporter.training.skew import bins
from tests.conftest import model_settings

AS_OF = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
N = 20_000


def _unanalyzed_tables(
    url: str, schema: str, replay_index: bool = False, predictions_id: str = "bigint"
) -> dict[str, np.ndarray]:
    """predictions (id, ts, p, v), labels (id, y), replays (id, p): N rows each over the 30
    days before AS_OF, ids bigint (the predictions' of type ``predictions_id``), no index (but
    one on the replay id with ``replay_index``), never analyzed. Returns the rows as arrays."""
    rng = np.random.default_rng(11)
    ids = rng.permutation(N).astype(np.int64) + 1_000_000  # ids in no relation to the insertion order
    seconds = rng.uniform(1, 30 * 86_400 - 1, N)
    scores = rng.beta(2, 5, N)
    labels = (rng.random(N) < scores).astype(int)
    replays = np.where(rng.random(N) < 0.9, scores, np.clip(scores + rng.normal(0, 0.01, N), 0, 1))
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for ddl in (
            f"predictions (id {predictions_id}, ts timestamp, p double precision, v text)",
            "labels (id bigint, y integer)",
            "replays (id bigint, p double precision)",
        ):
            conn.execute(sa.text(f'CREATE TABLE "{schema}".{ddl} WITH (autovacuum_enabled = false)'))
        if replay_index:
            conn.execute(sa.text(f'CREATE INDEX ON "{schema}".replays (id)'))
        start = AS_OF.replace(tzinfo=None) - timedelta(days=30)
        conn.execute(
            sa.text(f'INSERT INTO "{schema}".predictions VALUES (:id, :ts, :p, :v)'),
            [
                {"id": int(i), "ts": start + timedelta(seconds=float(s)), "p": float(p), "v": "v7"}
                for i, s, p in zip(ids, seconds, scores, strict=False)
            ],
        )
        order = rng.permutation(N)  # labels and replays in another order than the predictions
        conn.execute(
            sa.text(f'INSERT INTO "{schema}".labels VALUES (:id, :y)'),
            [{"id": int(ids[k]), "y": int(labels[k])} for k in order],
        )
        conn.execute(
            sa.text(f'INSERT INTO "{schema}".replays VALUES (:id, :p)'),
            [{"id": int(ids[k]), "p": float(replays[k])} for k in order],
        )
    with engine.connect() as conn:
        never_analyzed = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_user_tables WHERE schemaname = :s "
                "AND last_analyze IS NULL AND last_autoanalyze IS NULL"
            ),
            {"s": schema},
        ).scalar()
    engine.dispose()
    assert never_analyzed == 3
    return {"scores": scores, "labels": labels, "replays": replays}


def _settings(url: str, schema: str):
    source = {"store": "s", "schema": schema}
    return parse_settings(
        {
            "stores": {"s": {"url": url}},
            "models": [
                {
                    "name": "ctr",
                    "predictions": {
                        **source,
                        "table": "predictions",
                        "columns": {"id": "id", "timestamp": "ts", "score": "p", "version": "v"},
                    },
                    "labels": {**source, "table": "labels", "columns": {"id": "id", "label": "y"}},
                    "replays": {**source, "table": "replays", "columns": {"id": "id", "score": "p"}},
                    "windows": ["30d"],
                    "label_delay": "0s",
                }
            ],
        }
    )


def _plan(conn, statement) -> dict:
    """EXPLAIN (FORMAT JSON) of a statement, run on ``conn`` (with its planner settings): the top plan node."""
    compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    return conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + compiled.string, compiled.params).scalar()[0]["Plan"]


def _refresh_and_default_plans(engine, statements: dict) -> tuple[dict, dict]:
    """(each statement's plan under a refresh's planner settings, ``timed_connection``; the
    ``online`` statement's plan with PostgreSQL left to its guesses: the premise, a loop)."""
    with timed_connection(engine, 30) as conn:
        plans = {name: _plan(conn, statement) for name, statement in statements.items()}
    with engine.connect() as conn:
        return plans, _plan(conn, statements["online"])


def _quadratic_loops(node: dict) -> list[str]:
    """The nested loops of a plan whose inner side is not an index lookup: each rescans a
    whole input per outer row, quadratic in the rows."""
    found = []
    if node["Node Type"] == "Nested Loop":
        inner = node["Plans"][1]
        while inner["Node Type"] in ("Limit", "Subquery Scan") and inner.get("Plans"):
            inner = inner["Plans"][0]
        if inner["Node Type"] not in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"):
            found.append(f"Nested Loop over {inner['Node Type']}")
    for child in node.get("Plans", []):
        found += _quadratic_loops(child)
    return found


def _node_types(node: dict, relation: str | None = None) -> set[str]:
    """The node types of a plan (only those reading ``relation`` when given)."""
    own = {node["Node Type"]} if relation is None or node.get("Relation Name") == relation else set()
    return own.union(*(_node_types(child, relation) for child in node.get("Plans", [])))


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("replay_index", "predictions_id"),
    [(False, "bigint"), (True, "bigint"), (True, "double precision"), (True, "numeric")],
    ids=["no-index", "replay-id-index", "replay-id-index-double-ids", "replay-id-index-numeric-ids"],
)
@pytest.mark.long
def test_unanalyzed_tables_are_refreshed_in_linear_time_and_no_plan_loops_over_a_scan(
    replay_index, predictions_id, postgres_schema
):
    """Without any index every join must be a hash (or merge) join; with an index on the
    replay id, replays are looked up in it, row by row of the window, when both ids have
    one type: ``double precision`` or ``numeric`` predictions ids make PostgreSQL cast the
    bigint replay id, which its index does not serve, so the replays are hash joined."""
    url, schema = postgres_schema
    rows = _unanalyzed_tables(url, schema, replay_index, predictions_id)
    settings = _settings(url, schema)
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
        started = time.perf_counter()
        snap = refresher.refresh(AS_OF)
        elapsed = time.perf_counter() - started
        # Another refresh, so that the counter query (new_predictions) runs too.
        second = refresher.refresh(AS_OF + timedelta(minutes=1))

        assert {name: s.up for name, s in snap.sources.items()} == {
            "predictions": True,
            "labels": True,
            "replays": True,
        }
        assert all(s.up for s in second.sources.values())
        assert not any(snap.errors.values()), {k: v for k, v in snap.errors.items() if v}
        # Nested loops took minutes here; hash joins take well under a second.
        assert elapsed < settings.query_timeout.total_seconds() / 3, elapsed

        scores, labels, replays = rows["scores"], rows["labels"], rows["replays"]
        online = snap.online[0]
        assert online.predictions == online.labeled == N
        assert online.positives == int(labels.sum())
        assert online.roc_auc == pytest.approx(
            roc_auc_score(labels, scores), abs=max(online.roc_auc_error_bound or 0, 1e-12)
        )
        assert online.logloss == pytest.approx(log_loss(labels, scores), rel=1e-9)
        assert snap.score_stats[0].predictions == N
        assert snap.score_stats[0].mean == pytest.approx(scores.mean(), rel=1e-12)
        (replay,) = snap.replays
        assert replay.replayed == N
        assert replay.abs_error_max == pytest.approx(np.abs(scores - replays).max(), abs=1e-15)
        diff = np.abs(scores - replays)
        assert replay.ratio == pytest.approx(np.mean(diff <= 1e-6 + 1e-6 * np.maximum(scores, replays)), abs=1e-15)

        q, label_q, replay_q = (refresher.sources[name].queries() for name in ("predictions", "labels", "replays"))
        start, end = AS_OF - timedelta(days=30), AS_OF
        windows = Windows.ending(end, [timedelta(days=1), timedelta(days=30)])
        duplicates = DuplicateIds(None)  # the costliest: each query searches them itself
        statements = {
            "duplicate_search": q.duplicate_search(windows),
            "histogram": q.histogram(windows, duplicates),
            "mode_counts": q.mode_counts(windows, duplicates, 6),
            "online": q.online(label_q, windows, duplicates, end),
            "repeated_label_ids": label_q.repeated_ids(windows, end, None),
            "online_one_to_one": q.online(label_q, windows, duplicates, end, repeated=(3,)),
            "online_apart": q.online(label_q, windows, duplicates, end, repeated=(3,), apart=True),
            "replays": q.replays(replay_q, windows, duplicates),
            "last_timestamp": q.last_timestamp(end, end),
            "new_predictions": q.new_predictions(start, end, [0.5]),
            "serving_version": q.serving_version(end),
        }
        plans, default_plan = _refresh_and_default_plans(stores.engine("s"), statements)
    finally:
        stores.dispose()
    assert _quadratic_loops(default_plan), default_plan
    looping = {name: _quadratic_loops(plan) for name, plan in plans.items() if _quadratic_loops(plan)}
    assert not looping, looping
    assert "Hash Join" in _node_types(plans["online"]), plans["online"]
    # The replay table is read through its index when it has one that serves the join, else scanned once.
    replay_reads = _node_types(plans["replays"], "replays")
    if replay_index and predictions_id == "bigint":
        assert replay_reads and replay_reads <= {"Index Scan", "Index Only Scan", "Bitmap Heap Scan"}, replay_reads
    else:
        assert replay_reads == {"Seq Scan"}, replay_reads


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("predictions_id", "replay_id", "lookup"),
    [
        ("bigint", "bigint", True),
        ("integer", "integer", True),
        ("numeric(20, 0)", "numeric(20, 0)", True),
        ("text", "text", True),
        ("double precision", "bigint", False),
        ("numeric", "bigint", False),
        ("bigint", "numeric", False),
        ("integer", "bigint", False),
        ("numeric(20, 0)", "numeric(10, 0)", False),
        ("varchar(20)", "text", False),
    ],
)
def test_replays_are_looked_up_by_index_only_when_both_ids_have_one_type(
    predictions_id, replay_id, lookup, postgres_schema
):
    """The LATERAL lookup only where the index on the replay id serves ``replay.id = window.id``
    as written: the same reflected type on both sides (else PostgreSQL may cast the indexed side)."""
    url, schema = postgres_schema
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(f'CREATE TABLE "{schema}".predictions (id {predictions_id}, ts timestamp, p float8, v text)')
            )
            conn.execute(sa.text(f'CREATE TABLE "{schema}".replays (id {replay_id} PRIMARY KEY, p float8)'))
        model = _settings(url, schema).models[0]
        metadata = sa.MetaData()
        predictions = sa.Table("predictions", metadata, schema=schema, autoload_with=engine)
        replays = sa.Table("replays", metadata, schema=schema, autoload_with=engine)
    finally:
        engine.dispose()
    q = PredictionQueries(
        model, predictions, TimeColumn(predictions.c.ts, "naive", "UTC", predictions.c.ts), "postgresql"
    )
    replay_q = ReplayQueries(model.replays, replays)
    assert replay_q.indexed
    assert q.replays_by_lookup(replay_q) is lookup
    assert (
        " LATERAL " in str(q.replays(replay_q, Windows.ending(AS_OF, [timedelta(hours=1)]), DuplicateIds.none(1)))
    ) is lookup


@pytest.mark.parametrize(
    ("index", "lookup"),
    [
        ("CREATE INDEX ON {t} (id)", True),
        ("CREATE INDEX ON {t} USING hash (id)", True),
        ("CREATE INDEX ON {t} (id) WHERE p > 0.5", False),  # partial: most ids are not in it
        ("CREATE INDEX ON {t} USING brin (id)", False),  # no equality lookup
        ("CREATE INDEX ON {t} (ts, id)", False),  # not led by the id
    ],
)
def test_ids_are_looked_up_only_in_an_index_that_serves_every_id(index, lookup, postgres_schema):
    """The duplicate-id probe looks each probed id up (a LATERAL count) only in an index
    every id's lookup can use: in a partial or a BRIN index each lookup would be a scan of
    the window, quadratic in the rows probed (8.8 s against 0.03 s at 10^5 rows)."""
    url, schema = postgres_schema
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE TABLE "{schema}".predictions (id bigint, ts timestamp, p float8, v text)'))
            conn.execute(sa.text(index.format(t=f'"{schema}".predictions')))
        model = _settings(url, schema).models[0]
        predictions = sa.Table("predictions", sa.MetaData(), schema=schema, autoload_with=engine)
    finally:
        engine.dispose()
    q = PredictionQueries(
        model, predictions, TimeColumn(predictions.c.ts, "naive", "UTC", predictions.c.ts), "postgresql"
    )
    probe = q.duplicates_among(AS_OF - timedelta(hours=1), AS_OF, [(AS_OF - timedelta(minutes=5), AS_OF)], [])
    assert q.indexed is lookup and (" LATERAL " in str(probe)) is lookup


@pytest.mark.postgres
def test_label_times_and_a_joined_feature_table_unanalyzed_are_refreshed_without_loops(postgres_schema):
    """The statements the first test leaves out: labels with their own arrival time and a
    label delay (the labels filtered by time, the windows shifted), and a feature table
    joined by id (an outer join). N rows a table, ids bigint, no index, never analyzed:
    no plan loops over a scan, the refresh stays well within the timeout, and the counts
    are those numpy gives on the same rows."""
    url, schema = postgres_schema
    rng = np.random.default_rng(7)
    ids = rng.permutation(N).astype(np.int64) + 1_000_000
    start = AS_OF.replace(tzinfo=None) - timedelta(days=30)
    stamped = np.array([start + timedelta(seconds=float(s)) for s in rng.uniform(1, 30 * 86_400 - 1, N)])
    arrived = stamped + np.array([timedelta(seconds=float(s)) for s in rng.uniform(0, 3 * 3600, N)])
    labels = rng.integers(0, 2, N)
    has_features = rng.random(N) < 0.9  # the other predictions have no feature row
    age = np.where(rng.random(N) < 0.05, np.nan, rng.normal(40, 10, N))  # NaN: stored as NULL
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for ddl in (
            "predictions (id bigint, ts timestamp, p double precision)",
            "labels (id bigint, y integer, ts timestamp)",
            "features (id bigint, age double precision, device text)",
        ):
            conn.execute(sa.text(f'CREATE TABLE "{schema}".{ddl} WITH (autovacuum_enabled = false)'))
        # One statement a table (arrays unnested on the server): row by row took 2 s.
        order = rng.permutation(N)  # labels and features in another order than the predictions
        featured = order[has_features[order]]
        for table, columns in (
            ("predictions", {"id": (ids, "bigint"), "ts": (stamped, "timestamp"), "p": (np.full(N, 0.5), "float8")}),
            (
                "labels",
                {"id": (ids[order], "bigint"), "y": (labels[order], "int"), "ts": (arrived[order], "timestamp")},
            ),
            (
                "features",
                {
                    "id": (ids[featured], "bigint"),
                    "age": (np.where(np.isnan(age), None, age)[featured], "float8"),
                    "device": (np.array([f"d{k % 3}" for k in featured]), "text"),
                },
            ),
        ):
            arrays = ", ".join(f"CAST(:{name} AS {kind}[])" for name, (_, kind) in columns.items())
            conn.execute(
                sa.text(f'INSERT INTO "{schema}".{table} SELECT * FROM unnest({arrays})'),
                {name: values.tolist() for name, (values, _) in columns.items()},
            )
    engine.dispose()
    source = {"store": "s", "schema": schema}
    settings = parse_settings(
        {
            "stores": {"s": {"url": url}},
            "models": [
                {
                    "name": "ctr",
                    "predictions": {
                        **source,
                        "table": "predictions",
                        "columns": {"id": "id", "timestamp": "ts", "score": "p"},
                    },
                    "labels": {**source, "table": "labels", "columns": {"id": "id", "label": "y", "timestamp": "ts"}},
                    "features": {
                        "schema": schema,
                        "table": "features",
                        "id": "id",
                        "numeric": ["age"],
                        "categorical": ["device"],
                    },
                    "windows": ["30d"],
                    "label_delay": "1h",
                }
            ],
        }
    )
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
        started = time.perf_counter()
        snap = refresher.refresh(AS_OF)
        elapsed = time.perf_counter() - started
        assert all(s.up for s in snap.sources.values()), snap.errors
        assert elapsed < settings.query_timeout.total_seconds() / 3, elapsed

        naive = AS_OF.replace(tzinfo=None)
        delayed = (stamped >= naive - timedelta(days=30, hours=1)) & (stamped < naive - timedelta(hours=1))
        # label maturity: a label counts when it arrived from the start of its prediction's
        # slice (time_slice auto: 30d / 12) to 1h after its end, and before the refresh time
        width = timedelta(days=30) / 12
        epoch = datetime(1970, 1, 1)
        opened = np.array([epoch + (t - epoch) // width * width for t in stamped])
        matured = np.minimum(opened + width + timedelta(hours=1), naive)
        seen = delayed & (arrived >= opened) & (arrived < matured)
        online = snap.online[0]
        assert online.predictions == int(delayed.sum()) and online.labeled == int(seen.sum())
        assert online.positives == int(labels[seen].sum())
        in_window = stamped >= naive - timedelta(days=30)
        skews = {f.feature: f for f in snap.features}
        assert skews["age"].rows == skews["device"].rows == int(in_window.sum())
        missing_age = in_window & (~has_features | np.isnan(age))
        assert skews["age"].missing_ratio == pytest.approx(missing_age.sum() / in_window.sum(), rel=1e-12)
        assert skews["device"].missing_ratio == pytest.approx((in_window & ~has_features).sum() / in_window.sum())

        features = refresher.sources["features"]
        planned = [(f, bins(None, f.kind, 30)) for f in features.queries().features]
        q, label_q = (refresher.sources[name].queries() for name in ("predictions", "labels"))
        windows = Windows.ending(AS_OF - timedelta(hours=1), [timedelta(days=30)])
        maturity = LabelMaturity(boundaries(windows.start, windows.end, width), timedelta(hours=1))
        statements = {
            "online": q.online(label_q, windows, DuplicateIds(None), AS_OF, maturity),
            "repeated_label_ids": label_q.repeated_ids(windows, AS_OF, maturity),
            "online_one_to_one": q.online(label_q, windows, DuplicateIds(None), AS_OF, maturity, repeated=(3,)),
            # One id: IN of one value, an equality PostgreSQL would turn the join's into (_only).
            "online_apart": q.online(label_q, windows, DuplicateIds(None), AS_OF, maturity, repeated=(3,), apart=True),
            "online_only": q.online(label_q, windows, DuplicateIds(None), AS_OF, maturity, only=(3,)),
            "features": features._statement(planned, AS_OF, None),
        }
        # PostgreSQL's own settings plan these without loops too (the first test shows the premise).
        plans, _ = _refresh_and_default_plans(stores.engine("s"), statements)
    finally:
        stores.dispose()
    looping = {name: _quadratic_loops(plan) for name, plan in plans.items() if _quadratic_loops(plan)}
    assert not looping, looping


@pytest.mark.postgres
def test_load_leaves_its_tables_analyzed(postgres_schema, postgres_engine, tmp_path):
    url, schema = postgres_schema
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text(
        "id,timestamp,score\n" + "".join(f"{i},2024-06-01T11:{i % 60:02d}:00Z,0.{i % 10}\n" for i in range(1500))
    )
    second.write_text("id,timestamp,score\n" + "".join(f"{i},2024-06-01T12:00:00Z,0.5\n" for i in range(1500, 2000)))
    result = CliRunner().invoke(
        app, ["load", str(first), str(second), "--url", url, "--table", "preds", "--schema", schema]
    )
    assert result.exit_code == 0, result.output
    with postgres_engine.connect() as conn:
        # ANALYZE sets reltuples (-1 until then), transactionally; the second file's ANALYZE counts both.
        reltuples = conn.execute(
            sa.text("SELECT reltuples FROM pg_class WHERE oid = CAST(:t AS regclass)"), {"t": f'"{schema}".preds'}
        ).scalar()
        assert reltuples == 2000
        # The statistics of the time column exist: the planner reads windows from them.
        columns = (
            conn.execute(
                sa.text("SELECT attname FROM pg_stats WHERE schemaname = :s AND tablename = 'preds' ORDER BY attname"),
                {"s": schema},
            )
            .scalars()
            .all()
        )
        assert columns == ["id", "score", "timestamp"]
        deadline = time.monotonic() + 10  # the cumulative statistics reach pg_stat_* within a second or so
        while True:
            last = conn.execute(
                sa.text("SELECT last_analyze FROM pg_stat_user_tables WHERE schemaname = :s AND relname = 'preds'"),
                {"s": schema},
            ).scalar()
            if last is not None or time.monotonic() > deadline:
                break
            conn.rollback()  # a new snapshot of the statistics
            time.sleep(0.2)
        assert last is not None


def test_load_analyzes_sqlite_tables_too(tmp_path):
    url = f"sqlite:///{tmp_path}/store.sqlite"
    path = tmp_path / "labels.csv"
    path.write_text("id,label\n" + "".join(f"{i},{i % 2}\n" for i in range(300)))
    result = CliRunner().invoke(app, ["load", str(path), "--url", url, "--table", "labels"])
    assert result.exit_code == 0, result.output
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        # Without an index, SQLite keeps the table's row count in a row whose idx is NULL.
        assert conn.execute(sa.text("SELECT stat FROM sqlite_stat1 WHERE tbl = 'labels'")).scalar() == "300"
    engine.dispose()


def test_load_analyzes_a_large_sqlite_table_from_a_sample(tmp_path):
    """Issue B8: ANALYZE reads each index whole unless PRAGMA analysis_limit is set; with
    it, the index statistics of a 20000-row table are an estimate, not the exact count."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE labels (id INTEGER, label INTEGER)"))
        conn.execute(sa.text("CREATE INDEX labels_label ON labels (label)"))
    path = tmp_path / "labels.csv"
    path.write_text("id,label\n" + "".join(f"{i},{i % 7}\n" for i in range(20000)))
    result = CliRunner().invoke(app, ["load", str(path), "--url", url, "--table", "labels"])
    assert result.exit_code == 0, result.output
    with engine.connect() as conn:
        stat = conn.execute(sa.text("SELECT stat FROM sqlite_stat1 WHERE idx = 'labels_label'")).scalar()
    engine.dispose()
    rows, per_value = (int(n) for n in stat.split())
    assert rows != 20000 and rows == pytest.approx(20000, rel=0.5)  # a full scan gives "20000 2858"
    assert per_value > 0


def _label_rows_scanned_per_prediction(plan: list[tuple]) -> bool:
    """Whether an EXPLAIN QUERY PLAN of SQLite (rows of id, parent, _, detail) scans the
    materialised label rows inside a loop over predictions: a ``SCAN label_rows`` after a
    loop reading predictions under the same parent (loops are listed outer first). As the
    outer loop, with each prediction looked up by its id, it reads every label row once."""
    seen: dict[int, bool] = {}
    for _, parent, _, step in plan:
        if step.startswith("SCAN label_rows") and seen.get(parent):
            return True
        if " predictions" in step or "valid_rows" in step or "part_rows" in step:
            seen[parent] = True
    return False


def _sqlite_plans(settings, as_of: datetime, keep) -> tuple:
    """Refreshes the model of ``settings`` at ``as_of`` on a SQLite store and returns its
    snapshot and the ``EXPLAIN QUERY PLAN`` rows of each statement it ran for which
    ``keep(statement)`` holds, with the parameters it ran with, by statement."""
    stores = Stores(settings.stores, settings.query_timeout)
    statements = []

    def record(conn, cursor, statement, params, *_):
        statements.append((statement, params))

    sa.event.listen(stores.engine("s"), "before_cursor_execute", record)
    try:
        snap = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores).refresh(as_of)
        sa.event.remove(stores.engine("s"), "before_cursor_execute", record)
        with stores.engine("s").connect() as conn:
            plans = {
                statement: [tuple(row) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)]
                for statement, params in statements
                if keep(statement)
            }
    finally:
        stores.dispose()
    return snap, plans


@pytest.mark.parametrize("time_slice", [None, "5m"], ids=["one-pass", "sliced"])
def test_sqlite_text_timestamps_are_read_as_an_index_range(tmp_path, time_slice):
    """On SQLite, where timestamps are text read through an expression no index serves,
    every statement that reads windows narrows them by the text as stored first: a range of
    the index on the timestamp, not a scan of the table's whole history. Only the probe of
    the newest, future and unreadable timestamps (``PredictionQueries.last_timestamp``) reads every
    row: text that is no date-time is counted over the whole table."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    engine = sa.create_engine(url)
    as_of = datetime(2026, 5, 4, 12, tzinfo=UTC)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE predictions (id INTEGER PRIMARY KEY, ts TEXT, p REAL)")
        conn.exec_driver_sql("CREATE INDEX ix_ts ON predictions (ts)")
        conn.exec_driver_sql("CREATE TABLE labels (id INTEGER PRIMARY KEY, y INTEGER, ts TEXT)")
        conn.exec_driver_sql("CREATE INDEX ix_labels_ts ON labels (ts)")
        rows = [
            (i, (as_of - timedelta(minutes=7 * i)).strftime("%Y-%m-%d %H:%M:%S"), (i % 97) / 97) for i in range(3000)
        ]
        conn.exec_driver_sql("INSERT INTO predictions VALUES (?, ?, ?)", rows)
        conn.exec_driver_sql("INSERT INTO labels VALUES (?, ?, ?)", [(i, i % 2, ts) for i, ts, _ in rows])
    engine.dispose()  # never analyzed: SQLite plans by its default estimates
    settings = model_settings(
        url,
        labels={"columns": {"timestamp": "ts"}},
        model={"windows": ["1h", "24h"], "label_delay": "1h"} | ({"time_slice": time_slice} if time_slice else {}),
    )
    snap, plans = _sqlite_plans(
        settings, as_of, lambda statement: "FROM predictions" in statement and " AS unreadable" not in statement
    )
    assert all(source.up for source in snap.sources.values()), snap.errors
    assert len(plans) >= 2  # the histogram (and, sliced, the most frequent scores), online accuracy
    for stmt, plan in plans.items():
        reads = [step for *_, step in plan if " predictions" in step]
        if "label_rows" in stmt:
            # Joined to the label rows SQLite materialises: read as the whole history
            # (PredictionQueries.valid_rows, before_materialized), else, on a table never
            # analyzed, SQLite could expect few predictions and scan every label row for each.
            assert not _label_rows_scanned_per_prediction(plan), plan
            continue
        assert reads and all("INDEX ix_ts (ts>? AND ts<?)" in step for step in reads), (plan, stmt[:300])


@pytest.mark.parametrize("time_slice", [None, "5m"], ids=["one-pass", "sliced"])
def test_sqlite_predictions_joined_to_label_rows_look_each_one_up(tmp_path, time_slice):
    """On SQLite the label rows with their time are a subquery SQLite materialises
    (``LabelQueries._timed``), which it indexes only when it expects many predictions to
    join. Read through the index range of the stored dates, or as a subquery kept apart,
    the predictions of a table never analyzed looked few: SQLite scanned every label row
    once per prediction (new-user finding: the demo's online statement took 5 s instead of
    0.6 s, its refresh longer than its interval; with time slices, the kept online slices'
    read, 7.7 s: review finding). The predictions joined to them are read as before
    (``PredictionQueries.valid_rows``, ``before_materialized``; ``matured_labels``)."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    engine = sa.create_engine(url)
    as_of = datetime(2026, 5, 4, 12, tzinfo=UTC)
    with engine.begin() as conn:  # the demo's tables, shortened
        conn.exec_driver_sql(
            "CREATE TABLE predictions (id INTEGER PRIMARY KEY, model_name VARCHAR NOT NULL, ts DATETIME NOT NULL, p REAL)"
        )
        conn.exec_driver_sql("CREATE INDEX ix_model_ts ON predictions (model_name, ts)")
        conn.exec_driver_sql("CREATE TABLE labels (id INTEGER NOT NULL, y INTEGER NOT NULL, ts DATETIME NOT NULL)")
        conn.exec_driver_sql("CREATE INDEX ix_labels_id ON labels (id)")
        rows = [
            (i, "ab"[i % 2], (as_of - timedelta(seconds=37 * i)).strftime("%Y-%m-%d %H:%M:%S.%f"), (i % 97) / 97)
            for i in range(40000)
        ]
        conn.exec_driver_sql("INSERT INTO predictions VALUES (?, ?, ?, ?)", rows)
        conn.exec_driver_sql("INSERT INTO labels VALUES (?, ?, ?)", [(i, 1, ts) for i, _, ts, _ in rows if i % 3 == 0])
    engine.dispose()
    settings = model_settings(
        url,
        labels={"columns": {"timestamp": "ts"}},
        predictions={"filter": {"model_name": "a"}},
        model={"windows": ["1h", "24h"], "label_delay": "1h"}
        | ({"time_slice": time_slice, "slice_fill_refreshes": 1} if time_slice else {}),
    )
    snap, plans = _sqlite_plans(
        settings, as_of, lambda statement: "label_rows" in statement and "FROM predictions" in statement
    )
    assert snap.sources["labels"].up, snap.errors
    assert snap.online[1].predictions == sum(1 for i, m, *_ in rows if m == "a" and 3600 <= 37 * i < 25 * 3600)
    assert plans
    for plan in plans.values():
        assert not _label_rows_scanned_per_prediction(plan), plan


_MINUTE = timedelta(minutes=1)


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("reads", "branches"),
    [
        (
            [
                (AS_OF - timedelta(hours=24), AS_OF - timedelta(hours=24) + 3 * _MINUTE),  # the 24h window's tail
                (AS_OF - timedelta(minutes=90), AS_OF - timedelta(minutes=80)),  # a slice missed by an outage
                (AS_OF - timedelta(hours=1), AS_OF - timedelta(hours=1) + 3 * _MINUTE),  # the 1h window's tail
                (AS_OF - 5 * _MINUTE, AS_OF),  # the head
            ],
            4,
        ),
        # Slices scattered over the day (an audit's, or those left out of a restart): grouped.
        ([(AS_OF - k * 30 * _MINUTE, AS_OF - k * 30 * _MINUTE + 5 * _MINUTE) for k in range(40, 0, -1)], 16),
    ],
    ids=["steady", "scattered"],
)
def test_sliced_reads_of_a_table_never_analyzed_are_index_ranges(postgres_schema, reads, branches):
    """A steady refresh on time slices reads a few stretches of minutes (a head and one tail
    per window): on a predictions table never analyzed, indexed on (model, time), each
    stretch is an index range of its own; more stretches than ``MAX_UNION_BRANCHES`` are
    read in that many index ranges. Read as one disjunction, PostgreSQL expected a row
    from the valid replays' scores and scanned every row of the table (33 s at 10^7 rows,
    docs/performance.md *Stale planner statistics at 1e7*)."""
    url, schema = postgres_schema
    rows = 200_000  # two models over the 24 h before AS_OF, ids in time order
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    f'CREATE TABLE "{schema}".predictions (model_name text, id bigint, ts timestamp, p float8) '
                    "WITH (autovacuum_enabled = false)"
                )
            )
            conn.execute(
                sa.text(f'CREATE TABLE "{schema}".replays (id bigint, p float8) WITH (autovacuum_enabled = false)')
            )
            conn.execute(sa.text(f'CREATE INDEX ON "{schema}".predictions (model_name, ts)'))
            conn.execute(sa.text(f'CREATE INDEX ON "{schema}".replays (id)'))
            conn.execute(
                sa.text(
                    f"INSERT INTO \"{schema}\".predictions SELECT 'm' || (g % 2), g, "
                    f"timestamp '2024-06-01 12:00' - g * interval '{86_400 / rows} seconds', (g % 997) / 997.0 "
                    f"FROM generate_series(1, {rows}) g"
                )
            )
            conn.execute(
                sa.text(f'INSERT INTO "{schema}".replays SELECT id, p FROM "{schema}".predictions WHERE id % 3 = 0')
            )
        source = {"store": "s", "schema": schema}
        model = parse_settings(
            {
                "stores": {"s": {"url": url}},
                "models": [
                    {
                        "name": "m0",
                        "predictions": {
                            **source,
                            "table": "predictions",
                            "filter": {"model_name": "m0"},
                            "columns": {"id": "id", "timestamp": "ts", "score": "p"},
                        },
                        "replays": {**source, "table": "replays", "columns": {"id": "id", "score": "p"}},
                        "windows": ["1h", "24h"],
                    }
                ],
            }
        ).models[0]
        metadata = sa.MetaData()
        predictions = sa.Table("predictions", metadata, schema=schema, autoload_with=engine)
        replays = sa.Table("replays", metadata, schema=schema, autoload_with=engine)
        q = PredictionQueries(
            model, predictions, TimeColumn(predictions.c.ts, "naive", "UTC", predictions.c.ts), "postgresql"
        )
        points = sorted({p for r in reads for p in r})
        statements = {
            "replays": q.sliced_replays(ReplayQueries(model.replays, replays), points, reads),
            "histogram": q.sliced_histogram(points, reads),
        }
        with timed_connection(engine, 30) as conn:
            plans = {name: _plan(conn, statement) for name, statement in statements.items()}
            # Each part holds the model's rows of its range, counted here one range at a time.
            counted = Counter()
            for row in conn.execute(statements["histogram"]):
                counted[points[row.part]] += row.n
            expected = {
                start: conn.execute(
                    sa.select(sa.func.count()).where(
                        predictions.c.model_name == "m0",
                        predictions.c.ts >= start.replace(tzinfo=None),
                        predictions.c.ts < end.replace(tzinfo=None),
                    )
                ).scalar()
                for start, end in reads
            }
    finally:
        engine.dispose()
    assert counted == expected and all(expected.values())

    def reads_of_predictions(node: dict) -> list[dict]:
        own = (
            [node] if node.get("Relation Name") == "predictions" or "predictions_" in node.get("Index Name", "") else []
        )
        return own + [n for child in node.get("Plans", []) for n in reads_of_predictions(child)]

    for name, plan in plans.items():
        scans = reads_of_predictions(plan)
        assert "Seq Scan" not in {s["Node Type"] for s in scans}, name
        ranges = [s["Index Cond"] for s in scans if "Index Cond" in s]
        assert len(ranges) == branches, (name, ranges)
        assert all("ts >= " in r and "ts < " in r for r in ranges), (name, ranges)


def _rows_read(node: dict, table: str) -> int:
    """The rows of ``table`` the scans of an ``EXPLAIN (ANALYZE, FORMAT JSON)`` plan read:
    those they returned and those their filters removed, at every loop."""
    own = 0
    if node.get("Relation Name") == table:
        read = (
            node["Actual Rows"] + node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
        )
        own = read * node["Actual Loops"]
    return own + sum(_rows_read(child, table) for child in node.get("Plans", []))


@pytest.mark.postgres
def test_a_steady_search_without_an_id_index_reads_the_new_rows_not_the_window(postgres_schema):
    """In the default configuration (ids neither declared unique nor indexed) a steady
    refresh on time slices probed its new rows' ids against the whole 24 h window: a scan of
    the window per source and refresh, 1.1x the bare scan each at 10^6 rows (issue 12:
    steady ≤ 0.1x). Ids that grow with time (here with a few seconds of jitter, as a sequence
    written by several writers gives them) are searched in the slices whose id ranges meet
    the new rows' instead: the whole steady refresh reads under a tenth of the window's
    rows, and finds the new duplicate (of a row 3 minutes older) and the old one (two rows
    10 hours back) as a cold refresh at the same time does."""
    url, schema = postgres_schema
    n = 20_000
    rng = np.random.default_rng(5)
    start = AS_OF.replace(tzinfo=None) - timedelta(days=1)
    # Id g stamped g * 4.32 s into the day, give or take 3 s.
    seconds = np.clip(np.arange(n) * 86_400 / n + rng.uniform(-3, 3, n), 0, 86_399)
    rows = [(int(g), start + timedelta(seconds=float(s)), float(rng.random())) for g, s in enumerate(seconds)]
    rows.append((11_000, start + timedelta(seconds=11_000 * 4.32 + 1), 0.5))  # an old duplicate id
    minute = [(n + k, AS_OF.replace(tzinfo=None) + timedelta(seconds=4 * k + 1), 0.25) for k in range(14)]
    minute.append((rows[-50][0], AS_OF.replace(tzinfo=None) + timedelta(seconds=30), 0.75))  # 3.6 min older
    engine = sa.create_engine(url)
    insert = sa.text(f'INSERT INTO "{schema}".predictions VALUES (:id, :ts, :p)')
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE TABLE "{schema}".predictions (id bigint, ts timestamp, p float8)'))
            conn.execute(sa.text(f'CREATE INDEX ON "{schema}".predictions (ts)'))
            conn.execute(insert, [{"id": i, "ts": t, "p": p} for i, t, p in rows])
            conn.execute(sa.text(f'ANALYZE "{schema}".predictions'))
        settings = model_settings(
            url,
            schema,
            labels=False,
            model={"windows": ["1h", "24h"], "time_slice": "5m", "slice_fill_refreshes": 1},
        )
        stores = Stores(settings.stores, settings.query_timeout)
        refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
        refresher.refresh(AS_OF)
        with engine.begin() as conn:
            conn.execute(insert, [{"id": i, "ts": t, "p": p} for i, t, p in minute])
        statements = []

        def record(conn, cursor, statement, params, *_):
            if statement.lstrip().upper().startswith(("SELECT", "WITH")):
                statements.append((statement, params))

        sa.event.listen(stores.engine("s"), "before_cursor_execute", record)
        steady = refresher.refresh(AS_OF + _MINUTE)
        sa.event.remove(stores.engine("s"), "before_cursor_execute", record)
        cold = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores).refresh(AS_OF + _MINUTE)
        with engine.connect() as conn:
            plans = [
                conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params).scalar()[0]["Plan"]
                for statement, params in statements
            ]
        read = sum(_rows_read(plan, "predictions") for plan in plans)
        # A new row carrying the id of a row 6 hours back, out of the ids' order: its
        # slice's id range now meets every slice since, which the search reads.
        with engine.begin() as conn:
            conn.execute(insert, {"id": 15_000, "ts": AS_OF.replace(tzinfo=None) + timedelta(seconds=90), "p": 0.5})
        later = refresher.refresh(AS_OF + 2 * _MINUTE)
        later_cold = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores).refresh(
            AS_OF + 2 * _MINUTE
        )
        stores.dispose()
    finally:
        engine.dispose()
    window = sum(
        1 for _, t, _ in [*rows, *minute] if start + timedelta(minutes=1) <= t < AS_OF.replace(tzinfo=None) + _MINUTE
    )
    assert steady.sources["predictions"].up, steady.errors
    assert [s.invalid.get("duplicate_id", 0) for s in steady.score_stats] == [2, 4]
    for warm, fresh in ((steady, cold), (later, later_cold)):
        assert [(s.predictions, dict(s.invalid)) for s in warm.score_stats] == [
            (s.predictions, dict(s.invalid)) for s in fresh.score_stats
        ]
    # Only the 24h window holds both rows of id 15,000.
    assert [s.invalid.get("duplicate_id", 0) for s in later.score_stats] == [2, 6]
    assert steady.score_stats[1].predictions == window - 4  # the rows of a duplicate id are invalid
    assert read < window / 10, (read, window)
    # The probed ids are one semi-join, not a subplan tested per row (quadratic once the
    # probe outgrows work_mem: review finding), here with a known duplicated id.
    assert not [plan for plan in plans if _subplans(plan)], plans


def _subplans(node: dict) -> list[dict]:
    """The nodes of a plan run as a subplan of the node above them (per row or hashed)."""
    own = [node] if node.get("Parent Relationship") == "SubPlan" else []
    return own + [n for child in node.get("Plans", []) for n in _subplans(child)]
