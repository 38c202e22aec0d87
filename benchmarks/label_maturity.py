"""The online-accuracy statements with label maturity against the same without it, and each
as the refresh runs them against the one statement that groups the label rows, on
PostgreSQL, on the same rows: N predictions over the last 25 hours (ids unique), a label
for 30% of them recorded 0 to 90 minutes after the prediction (300 of them with a second,
conflicting label row a minute later), windows 1h and 24h, ``label_delay`` 1h, slices of 5
minutes (``auto``).

1. floor: ``SELECT count(*), sum(score)`` over the 24h window;
2. ``per_window``: the online accuracy of the same model with ``label_delay: 0`` (each
   window's labels recorded from its start to the refresh time), as
   ``LabelsSource._online`` runs it: the label ids with several rows
   (``LabelQueries.repeated_ids``), the other predictions joined to their one label row,
   those ids' predictions; ``per_window_grouped``: one statement, label rows grouped per id
   (what the refresh runs beyond ``MAX_LISTED_LABEL_IDS`` such ids);
3. ``matured``, ``matured_grouped``: the same with ``LabelMaturity`` (docs/metrics.md,
   *Label maturity*); grouped, the label rows are grouped per prediction.

Each runs ``--repeat`` times in a refresh transaction (``db.timed_connection``) as the
refresh runs it (``LabelsSource._online``; JIT off for the statements with maturity, as
``LabelsSource.run`` opens their connection), the grouped ones with ``MAX_LISTED_LABEL_IDS`` set to -1; the median is
printed, ratios first.

With ``--kept``, the labels source with time slices on (``time_slice: auto``) is then run
as the refresher runs it: refreshes one second apart until its online slices are filled
(``fill``: ``slice_fill_refreshes``, one pass plus a share of the slices each), then
``--steps`` steady refreshes, each after one more minute of rows (N/1440 predictions
stamped in the minute before the new refresh time, labels recorded in that minute for 30%
of the predictions of the 90 minutes before it) and 60 s later (``steady``: the window's
head and tail; the median is printed).

With ``--duplicates``, the default configuration: ids not declared unique, and 300 ids
carried by two rows each (a second row stamped anywhere in the 25 hours), plus one more in
the labels' head before each steady refresh; the steady refresh then also finds the duplicated
ids among the rows it reads and adds their rows back per window. The one-pass statements
above are timed without the duplicate-id search the refresh runs before them.

    python benchmarks/label_maturity.py --url postgresql+psycopg://postgres@127.0.0.1:5432/test --rows 1000000

Writes (and with ``--drop``, drops) the schema ``bench_maturity``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from exporter.config import Settings, parse_settings
from exporter.db import timed_connection
from exporter.predictions import queries
from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.sources import LabelsSource
from exporter.predictions.stores import Stores

NOW = datetime(2026, 5, 4, 12, tzinfo=UTC)
SCHEMA = "bench_maturity"


def load(url: str, rows: int, duplicates: bool, id_index: bool) -> None:
    """The tables, written by PostgreSQL itself (generate_series), indexed and analyzed, 300
    label ids with two label rows; with ``duplicates``, 300 ids carried by a second row; with ``id_index``, both tables
    indexed on the id too."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}")
        conn.exec_driver_sql(
            f"CREATE TABLE {SCHEMA}.predictions (id bigint, ts timestamp, p float8);"
            f"CREATE TABLE {SCHEMA}.labels (id bigint, y int, ts timestamp)"
        )
        conn.exec_driver_sql(
            f"INSERT INTO {SCHEMA}.predictions SELECT g, timestamp '2026-05-04 12:00' - random() * interval '25 hours', "
            f"random() FROM generate_series(1, {rows}) g"
        )
        conn.exec_driver_sql(
            f"INSERT INTO {SCHEMA}.labels SELECT id, (random() < p)::int, ts + random() * interval '90 minutes' "
            f"FROM {SCHEMA}.predictions WHERE random() < 0.3"
        )
        conn.exec_driver_sql(
            f"INSERT INTO {SCHEMA}.labels SELECT id, 1 - y, ts + interval '1 minute' FROM {SCHEMA}.labels "
            "ORDER BY id LIMIT 300"
        )
        if duplicates:
            conn.exec_driver_sql(
                f"INSERT INTO {SCHEMA}.predictions SELECT g * {rows // 300}, "
                f"timestamp '2026-05-04 12:00' - random() * interval '25 hours', random() FROM generate_series(1, 300) g"
            )
        if id_index:
            conn.exec_driver_sql(f"CREATE INDEX ON {SCHEMA}.predictions (id); CREATE INDEX ON {SCHEMA}.labels (id)")
        conn.exec_driver_sql(
            f"CREATE INDEX ON {SCHEMA}.predictions (ts); ANALYZE {SCHEMA}.predictions; ANALYZE {SCHEMA}.labels"
        )
    engine.dispose()


def kept(
    settings: Settings, stores: Stores, rows: int, steps: int, fill: int, duplicates: bool
) -> dict[str, list[float]]:
    """Seconds of the labels source's refreshes on kept online slices: ``fill`` (until
    filled) and ``steady`` (module docstring)."""
    model = settings.models[0].model_copy(update={"time_slice": "auto", "slice_fill_refreshes": fill})
    refresher = ModelRefresher(model, "models[0]", settings.refresh_policy, stores)
    source = refresher.sources["labels"]
    assert isinstance(source, LabelsSource) and source.slices is not None
    out: dict[str, list[float]] = {"fill": [], "steady": []}
    as_of = NOW
    while not source.slices.filled:
        started = time.perf_counter()
        source.run(as_of)
        out["fill"].append(time.perf_counter() - started)
        as_of += timedelta(seconds=1)
    minute = max(1, rows // 1440)
    for step in range(steps):
        as_of += timedelta(seconds=60)
        stamp = f"timestamp '{as_of:%Y-%m-%d %H:%M:%S}'"
        with stores.engine("s").begin() as conn:
            conn.exec_driver_sql(
                f"INSERT INTO {SCHEMA}.predictions SELECT (SELECT max(id) FROM {SCHEMA}.predictions) + g, "
                f"{stamp} - random() * interval '60 seconds', random() FROM generate_series(1, {minute}) g"
            )
            if duplicates:  # one id used again, in the labels' windows (they end label_delay earlier)
                conn.exec_driver_sql(
                    f"INSERT INTO {SCHEMA}.predictions SELECT {rows // 7 + step}, "
                    f"{stamp} - interval '1 hour 30 seconds', 0.5"
                )
            conn.exec_driver_sql(
                f"INSERT INTO {SCHEMA}.labels SELECT id, (random() < p)::int, {stamp} - random() * interval '60 seconds' "
                f"FROM {SCHEMA}.predictions WHERE ts >= {stamp} - interval '90 minutes' AND ts < {stamp} "
                f"AND random() < {0.3 / 90}"
            )
        started = time.perf_counter()
        source.run(as_of)
        out["steady"].append(time.perf_counter() - started)
    held = sum(
        sum(a.nbytes for a in (b.key, b.positives, b.negatives, b.low, b.high, b.counts, b.sums))
        for b in source.slices.slices.values()
    )
    labeled = sum(len(b.key) for b in source.slices.slices.values())
    print(f"kept online slices: {len(source.slices.slices)}, {labeled:,} labeled buckets, {held / 2**20:.1f} MB")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a PostgreSQL URL")
    parser.add_argument("--rows", type=float, default=1e6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--drop", action="store_true", help="drop the schema at the end")
    parser.add_argument("--kept", action="store_true", help="also time the labels on kept online slices")
    parser.add_argument("--steps", type=int, default=5, help="steady refreshes with --kept")
    parser.add_argument("--fill", type=int, default=24, help="slice_fill_refreshes with --kept")
    parser.add_argument("--duplicates", action="store_true", help="ids not declared unique, some duplicated")
    parser.add_argument("--id-index", action="store_true", help="index both tables on the id too")
    args = parser.parse_args()
    load(args.url, int(args.rows), args.duplicates, args.id_index)
    source = {"store": "s", "schema": SCHEMA}
    settings = parse_settings(
        {
            "stores": {"s": {"url": args.url}},
            "query_timeout": "600s",  # the one-pass statement at 1e7 exceeds the default 30 s
            "models": [
                {
                    "name": "m",
                    "predictions": {
                        **source,
                        "table": "predictions",
                        "columns": {"id": "id", "timestamp": "ts", "score": "p"},
                        "unique_ids": not args.duplicates,
                    },
                    "labels": {**source, "table": "labels", "columns": {"id": "id", "label": "y", "timestamp": "ts"}},
                    "windows": ["1h", "24h"],
                    "label_delay": "1h",
                }
            ],
        }
    )
    model = settings.models[0]
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        refresher = ModelRefresher(model, "models[0]", settings.refresh_policy, stores)
        # The same model with label_delay 0: each window's labels recorded from its start on.
        unmatured = model.model_copy(update={"label_delay": timedelta(0)})
        sources = {
            "per_window": ModelRefresher(unmatured, "models[0]", settings.refresh_policy, stores).sources["labels"],
            "matured": refresher.sources["labels"],
        }
        start, end = (f"{t:%Y-%m-%d %H:%M}" for t in (NOW - timedelta(hours=24), NOW))
        floor = sa.text(f"SELECT count(*), sum(p) FROM {SCHEMA}.predictions WHERE ts >= '{start}' AND ts < '{end}'")

        def online(conn: sa.Connection, name: str, grouped: bool) -> None:
            """The online statements as the refresh runs them (``LabelsSource._online``), or
            grouped: as beyond ``MAX_LISTED_LABEL_IDS`` label ids with several rows."""
            listed = queries.MAX_LISTED_LABEL_IDS
            queries.MAX_LISTED_LABEL_IDS = -1 if grouped else listed
            try:
                sources[name]._online(conn, NOW)
            finally:
                queries.MAX_LISTED_LABEL_IDS = listed

        runs = {
            "floor": lambda conn: conn.execute(floor).all(),
            "per_window_grouped": lambda conn: online(conn, "per_window", True),
            "per_window": lambda conn: online(conn, "per_window", False),
            "matured_grouped": lambda conn: online(conn, "matured", True),
            "matured": lambda conn: online(conn, "matured", False),
        }
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeat):
            for name, run in runs.items():
                with timed_connection(stores.engine("s"), 600, jit=not name.startswith("matured")) as conn:
                    started = time.perf_counter()
                    run(conn)
                    seconds[name].append(time.perf_counter() - started)
        if args.kept:
            seconds |= kept(settings, stores, int(args.rows), args.steps, args.fill, args.duplicates)
    finally:
        stores.dispose()
        if args.drop:
            with sa.create_engine(args.url).begin() as conn:
                conn.exec_driver_sql(f"DROP SCHEMA {SCHEMA} CASCADE")
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"rows {int(args.rows):,}, median of {args.repeat}")
    if args.kept:
        print(f"steady / floor: {median['steady'] / median['floor']:.3f}x")
        print(f"steady / matured: {median['steady'] / median['matured']:.3f}x")
        print(f"fill / matured: {median['fill'] / median['matured']:.2f}x ({len(seconds['fill'])} refreshes)")
    print(f"matured / matured_grouped: {median['matured'] / median['matured_grouped']:.2f}x")
    print(f"per_window / per_window_grouped: {median['per_window'] / median['per_window_grouped']:.2f}x")
    print(f"matured / per_window: {median['matured'] / median['per_window']:.2f}x")
    print(f"matured / floor: {median['matured'] / median['floor']:.1f}x")
    print(f"per_window / floor: {median['per_window'] / median['floor']:.1f}x")
    for name, value in median.items():
        print(f"{name}: {value:.3f} s")


if __name__ == "__main__":
    main()
