"""Write N synthetic CTR predictions (+ click labels for a share, + replays for a sample)
for M models into PostgreSQL, DuckDB or SQLite, fast (COPY on PostgreSQL).

    python benchmarks/generate.py --url postgresql+psycopg://postgres@127.0.0.1:5432/test --rows 1000000

Tables (replaced): ``bench_predictions(id, model_name, ts, score)`` with an index on
(model_name, ts), ``bench_labels(id, clicked, ts)`` (``ts``: when the click was recorded, 0
to 30 s after the prediction) and ``bench_replays(id, score)`` indexed by id. Timestamps
are spread uniformly over ``--hours`` before ``--now``; scores are Beta(1.2, 40) (mean
~3%), continuous like a model's raw output. With ``--features`` the predictions also carry
``FEATURES_NUMERIC`` numeric (``f0``...: log-normal, 2% NULL) and ``FEATURES_CATEGORICAL``
categorical (``c0``...: 20 categories, Zipf-like) feature columns (:func:`feature_frame`).
"""

from __future__ import annotations

import argparse
import io
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import sqlalchemy as sa

CHUNK = 1_000_000
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
FEATURES_NUMERIC = 10
FEATURES_CATEGORICAL = 10
CATEGORIES = [f"v{i:02d}" for i in range(20)]
CATEGORY_SHARES = (1 / np.arange(1, 21)) / (1 / np.arange(1, 21)).sum()


def feature_frame(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """``n`` rows of the benchmark's features, the same distribution for training and serving."""
    columns = {}
    for i in range(FEATURES_NUMERIC):
        values = rng.lognormal(3.0 + 0.1 * i, 1.0, n)
        values[rng.random(n) < 0.02] = np.nan
        columns[f"f{i}"] = values
    for i in range(FEATURES_CATEGORICAL):
        columns[f"c{i}"] = rng.choice(CATEGORIES, n, p=CATEGORY_SHARES)
    return pd.DataFrame(columns)


def tables(metadata: sa.MetaData, aware: bool, features: bool = False) -> tuple[sa.Table, sa.Table, sa.Table]:
    feature_columns = []
    if features:
        feature_columns = [sa.Column(f"f{i}", sa.Double) for i in range(FEATURES_NUMERIC)]
        feature_columns += [sa.Column(f"c{i}", sa.String(20)) for i in range(FEATURES_CATEGORICAL)]
    predictions = sa.Table(
        "bench_predictions",
        metadata,
        sa.Column("id", sa.BigInteger, nullable=False),
        sa.Column("model_name", sa.String(50), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=aware), nullable=False),
        sa.Column("score", sa.Double, nullable=False),
        *feature_columns,
    )
    labels = sa.Table(
        "bench_labels",
        metadata,
        sa.Column("id", sa.BigInteger),
        sa.Column("clicked", sa.Integer),
        sa.Column("ts", sa.DateTime(timezone=aware)),
    )
    replays = sa.Table("bench_replays", metadata, sa.Column("id", sa.BigInteger), sa.Column("score", sa.Double))
    return predictions, labels, replays


def chunks(
    rows: int,
    models: int,
    hours: float,
    label_share: float,
    replay_share: float,
    seed: int,
    features: bool = False,
    end: datetime = NOW,
    first_id: int = 0,
    ordered_ids: bool = False,
):
    """DataFrames (predictions, labels, replays) of up to CHUNK predictions each, stamped
    in the ``hours`` before ``end``, with ids from ``first_id`` on: drawn in no relation to
    the time, or with ``ordered_ids`` growing with it (as a sequence gives them)."""
    rng = np.random.default_rng(seed)
    start = end - timedelta(hours=hours)
    for first in range(first_id, first_id + rows, CHUNK):
        n = min(CHUNK, first_id + rows - first)
        ids = np.arange(first, first + n, dtype=np.int64)
        score = rng.beta(1.2, 40, n)
        if ordered_ids:  # this chunk's share of the hours, in order
            low, high = ((k - first_id) / rows * hours * 3600 for k in (first, first + n))
            offsets = np.sort(rng.uniform(low, high, n))
        else:
            offsets = rng.uniform(0, hours * 3600, n)
        ts = pd.Timestamp(start) + pd.to_timedelta(offsets, unit="s")
        predictions = pd.DataFrame({"id": ids, "model_name": (ids % models).astype(str), "ts": ts, "score": score})
        predictions["model_name"] = "m" + predictions["model_name"]
        if features:
            predictions = pd.concat([predictions, feature_frame(rng, n)], axis=1)
        # Labels for positives only (clicks), for the share of predictions whose label arrived.
        clicked = (rng.random(n) < label_share) & (rng.random(n) < score)
        # Recorded (the click) 0 to 30 s after the prediction: mature for its slice.
        recorded = ts[clicked] + pd.to_timedelta(rng.uniform(0, 30, clicked.sum()), unit="s")
        labels = pd.DataFrame({"id": ids[clicked], "clicked": 1, "ts": recorded})
        replayed = rng.random(n) < replay_share
        noise = np.where(rng.random(replayed.sum()) < 0.99, 0.0, 0.01)
        replays = pd.DataFrame({"id": ids[replayed], "score": score[replayed] + noise})
        yield predictions, labels, replays


def copy_postgres(conn, table: str, frame: pd.DataFrame) -> None:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, header=False, date_format="%Y-%m-%d %H:%M:%S.%f+00")
    buffer.seek(0)
    raw = conn.connection.driver_connection
    with raw.cursor() as cursor, cursor.copy(f"COPY {table} FROM STDIN WITH (FORMAT csv)") as copy:
        while data := buffer.read(1 << 20):
            copy.write(data)


def generate(
    url: str,
    rows: int,
    models: int,
    hours: float,
    label_share: float,
    replay_share: float,
    seed: int = 0,
    features: bool = False,
    analyze: bool = True,
    ordered_ids: bool = False,
) -> None:
    """Write the tables; ``analyze=False`` (PostgreSQL): the tables are never analyzed, not
    even by autovacuum (disabled for them from their creation), so the planner works with
    stale statistics (default estimates), as on a table loaded since the last analyze."""
    engine = sa.create_engine(url)
    dialect = engine.dialect.name
    metadata = sa.MetaData()
    predictions, labels, replays = tables(metadata, aware=dialect != "sqlite", features=features)
    metadata.drop_all(engine)
    metadata.create_all(engine)
    if dialect == "postgresql" and not analyze:
        with engine.begin() as conn:
            for table in (predictions, labels, replays):
                conn.exec_driver_sql(f"ALTER TABLE {table.name} SET (autovacuum_enabled = false)")
    with engine.begin() as conn:
        for frames in chunks(rows, models, hours, label_share, replay_share, seed, features, ordered_ids=ordered_ids):
            for table, frame in zip((predictions, labels, replays), frames, strict=True):
                if dialect == "postgresql":
                    copy_postgres(conn, table.name, frame)
                elif dialect == "duckdb":
                    raw = conn.connection.driver_connection
                    raw.register("frame", frame)
                    raw.execute(f"INSERT INTO {table.name} SELECT * FROM frame")
                    raw.unregister("frame")
                else:
                    if dialect == "sqlite" and "ts" in frame:
                        frame = frame.assign(ts=frame["ts"].dt.tz_localize(None))
                    frame.to_sql(table.name, conn, if_exists="append", index=False, chunksize=50_000)
    # Indexes after loading: faster than maintaining them row by row.
    with engine.begin() as conn:
        sa.Index("ix_bench_predictions_model_ts", predictions.c.model_name, predictions.c.ts).create(conn)
        sa.Index("ix_bench_labels_id", labels.c.id).create(conn)
        sa.Index("ix_bench_replays_id", replays.c.id).create(conn)
        if dialect == "postgresql" and analyze:
            conn.exec_driver_sql("ANALYZE bench_predictions; ANALYZE bench_labels; ANALYZE bench_replays")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="SQLAlchemy URL of the target database")
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--models", type=int, default=1)
    parser.add_argument(
        "--hours", type=float, default=24.0, help="time span of the predictions, ending at 2026-11-28 12:00 UTC"
    )
    parser.add_argument(
        "--label-share", type=float, default=0.5, help="share of predictions whose label (if a click) arrived"
    )
    parser.add_argument("--replay-share", type=float, default=0.01)
    parser.add_argument("--features", action="store_true", help="add 10 numeric and 10 categorical feature columns")
    parser.add_argument(
        "--no-analyze", action="store_true", help="PostgreSQL: never analyze the tables (autovacuum off for them)"
    )
    parser.add_argument("--ordered-ids", action="store_true", help="ids growing with the time, as a sequence gives")
    args = parser.parse_args()
    started = time.perf_counter()
    generate(
        args.url,
        args.rows,
        args.models,
        args.hours,
        args.label_share,
        args.replay_share,
        features=args.features,
        analyze=not args.no_analyze,
        ordered_ids=args.ordered_ids,
    )
    print(f"wrote {args.rows:,} predictions in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
