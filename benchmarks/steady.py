"""Cold and steady-state refreshes of one model while rows keep arriving (issue 12, "Prove
it"), against the bare scan of the 24h window, pandas + scikit-learn and Evidently.

For each ``--rows`` N: ``generate.py`` writes N predictions over the 24 h before
``generate.NOW`` (labels and replays included); then, per configuration (``default``: ids
not declared unique; ``unique``: ``unique_ids: true``), one process builds the refresher of
``refresh.py`` (windows 1h and 24h, labels, replays; ``--label-delay``, default 1h as
mlmon's: labels mature by slice, recorded 0 to 30 s after their prediction) and runs, in
simulated time:

1. a cold refresh at ``as_of`` (the first refresh of the process), timed;
2. ``--steps`` K steady refreshes, each after inserting one minute of new rows (N / 1440
   predictions stamped in the minute before the new ``as_of``, with their labels and
   replays as ``generate.py`` makes them, written beforehand to CSV files by another
   process so that the refreshing one holds no pandas) and moving ``as_of`` 60 s on;
3. a check: a new refresher's cold refresh at the last ``as_of`` must give the same
   statistics as the steady one (floats to 1e-9 relative), timed as a second cold refresh.

Each refresh is timed in total and per source (``ModelRefresher.sources``, in refresh
order), with its statement count. The second configuration starts where the first ended
(``as_of`` K minutes later), so each sees a 24 h window of N rows. Reported per refresh
and per source, ratios first: cold / floor and median steady / floor, where the floor is
the bare ``SELECT count(*), sum(score)`` of the 24h window (``refresh.run_floor``, median
of 3, after one warm-up run); peak RSS of the refreshing process (``VmHWM``); the memory
of the kept slices and, apart, of each window's merge of them (the bytes of their arrays,
over every source's ``slices.slices`` and ``_merged``: ``array_bytes``, each buffer once)
and their projection to 100 models; and
``refresh.py``'s ``naive`` (pandas.read_sql + numpy/scikit-learn) and ``evidently``
methods on the same window, the latter run by ``--evidently-python`` (a separate
environment: Evidently is no dependency of mlmon) when given.

    python benchmarks/steady.py --url postgresql+psycopg://postgres@127.0.0.1:5432/bench_steady --rows 1e5 1e6
    python benchmarks/steady.py --url duckdb:////tmp/bench_steady.duckdb --rows 1e5 1e6 --evidently-python /tmp/bench-venv/bin/python

``--no-analyze`` (PostgreSQL): the tables are never analyzed (stale planner statistics).
``--ordered-ids``: the predictions' ids grow with their time (a sequence), which narrows a
duplicate search without an id index (``LeftOutIds._narrowed``); by default they are drawn in
no relation to it (the new minutes' ids always follow the earlier ones).
``--reuse`` skips writing the tables (one ``--rows`` value; the rows of earlier runs'
minutes are still there: the window then holds a few more than N).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import fields, is_dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

CONFIGS = ("default", "unique")
MINUTE = timedelta(minutes=1)
MINUTES_PER_DAY = 1440
ROOT = Path(__file__).parent.parent
TABLES = ("bench_predictions", "bench_labels", "bench_replays")


def write_minutes(url: str, directory: Path, rows: int, steps: int, first_minute: int) -> None:
    """CSV files ``{table}-{k}.csv`` of minute ``k`` in ``[first_minute, first_minute +
    steps)``: ``rows / 1440`` predictions stamped in ``[NOW + k min, NOW + (k + 1) min)``
    with ids after the first ``rows`` and their labels and replays (``generate.chunks``).
    Deletes from the tables at ``url`` the rows of those and later minutes an earlier run
    (``--reuse``) left, which would otherwise be duplicate ids."""
    import sqlalchemy as sa
    from generate import NOW, chunks

    per_minute = max(1, rows // MINUTES_PER_DAY)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for table in TABLES:
            conn.execute(
                sa.text(f"DELETE FROM {table} WHERE id >= :first"), {"first": rows + first_minute * per_minute}
            )
    engine.dispose()
    for k in range(first_minute, first_minute + steps):
        # A seed per minute: the same rows whichever configuration writes them.
        (frames,) = chunks(
            per_minute, 1, 1 / 60, 0.5, 0.01, seed=1000 + k, end=NOW + (k + 1) * MINUTE, first_id=rows + k * per_minute
        )
        for table, frame in zip(TABLES, frames, strict=True):
            frame.to_csv(
                directory / f"{table}-{k}.csv", index=False, header=False, date_format="%Y-%m-%d %H:%M:%S.%f+00"
            )


def insert_minute(engine: Any, directory: Path, k: int) -> None:
    """Append minute ``k``'s files (``write_minutes``) through ``engine`` (PostgreSQL: COPY;
    DuckDB: COPY FROM the file), in one transaction."""
    with engine.begin() as conn:
        for table in TABLES:
            path = directory / f"{table}-{k}.csv"
            if path.stat().st_size == 0:  # a minute of few rows may have no label or replay
                continue
            if engine.dialect.name == "postgresql":
                with (
                    conn.connection.driver_connection.cursor() as cursor,
                    cursor.copy(f"COPY {table} FROM STDIN WITH (FORMAT csv)") as copy,
                ):
                    copy.write(path.read_bytes())
            else:
                conn.exec_driver_sql(f"COPY {table} FROM '{path}' (FORMAT csv, HEADER false, DELIMITER ',')")


def same(a: Any, b: Any) -> bool:
    """Equal snapshots' values: floats to 1e-9 relative (summation order), the rest exactly."""
    if is_dataclass(a) and is_dataclass(b):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def run_refreshes(
    url: str, config: str, directory: Path, first_minute: int, steps: int, label_delay: str
) -> dict[str, Any]:
    """The cold refresh, ``steps`` steady ones and the check (module docstring), in this
    process. Returns each refresh's ``seconds`` and per-source ``sources`` seconds and
    ``statements``, the kept slices' bytes, the check's result and this process's peak RSS."""
    import sqlalchemy as sa
    from generate import NOW
    from refresh import settings

    from exporter.predictions import sources
    from exporter.predictions.refresh import ModelRefresher
    from exporter.predictions.stores import Stores

    settings_ = settings(url, unique_ids=config == "unique", label_delay=label_delay)
    # Time slices are off by default (docs/metrics.md): this benchmark measures them, with
    # the width `auto` derives from the windows (5 minutes for [1h, 24h]).
    # The cold refresh measured here reads every slice at once (slice_fill_refreshes 1); by
    # default a cold start reads the windows in one pass and fills the slices over 24 refreshes.
    model = settings_.models[0].model_copy(update={"time_slice": "auto", "slice_fill_refreshes": 1})
    settings_ = settings_.model_copy(update={"models": [model]})
    stores = Stores(settings_.stores, settings_.query_timeout)
    engine = stores.engine("bench")
    current = [""]
    statements: list[tuple[str, str, float]] = []  # (source, where, seconds) of each statement

    def where() -> str:
        # The innermost line of the sources module that ran the statement: names the query.
        for frame in reversed(traceback.extract_stack()):
            if frame.filename.endswith(os.path.join("predictions", "sources.py")):
                return f"{frame.name}:{frame.lineno} {frame.line}"
        return "?"

    streaming = [False]

    def executed(conn: Any, *_: Any) -> None:
        if not streaming[0]:
            statements.append((current[0], where(), time.perf_counter() - conn.info["t"]))

    sa.event.listen(engine, "before_cursor_execute", lambda conn, *_: conn.info.__setitem__("t", time.perf_counter()))
    sa.event.listen(engine, "after_cursor_execute", executed)
    read_table = sources._table

    def timed_table(conn: Any, statement: Any, stream: bool) -> Any:
        # A streamed read's rows are fetched after its statement returns (a server-side
        # cursor's DECLARE): the whole read is timed, as one statement.
        streaming[0] = True
        started = time.perf_counter()
        try:
            return read_table(conn, statement, stream)
        finally:
            streaming[0] = False
            statements.append((current[0], where(), time.perf_counter() - started))

    sources._table = timed_table

    def refresher_() -> tuple[ModelRefresher, dict[str, float]]:
        refresher = ModelRefresher(settings_.models[0], "models[0]", settings_.refresh_policy, stores)
        refresher.check_schema()  # reflection, once per process as in serve: not timed
        seconds: dict[str, float] = {}
        for name, source in refresher.sources.items():

            def timed(as_of: Any, run: Any = source.run, name: str = name) -> Any:
                current[0] = name
                started = time.perf_counter()
                try:
                    return run(as_of)
                finally:
                    seconds[name] = time.perf_counter() - started
                    current[0] = ""

            source.run = timed  # type: ignore[method-assign]
        return refresher, seconds

    def timed_refresh(refresher: ModelRefresher, seconds: dict[str, float], as_of: Any) -> tuple[Any, dict[str, Any]]:
        seconds.clear()
        statements.clear()
        started = time.perf_counter()
        snapshot = refresher.refresh(as_of)
        total = time.perf_counter() - started
        down = [name for name, status in snapshot.sources.items() if not status.up]
        assert not down, (down, snapshot.errors)
        return snapshot, {"seconds": total, "sources": dict(seconds), "statements": list(statements)}

    refresher, seconds = refresher_()
    as_of = NOW + first_minute * MINUTE
    _, cold = timed_refresh(refresher, seconds, as_of)
    steady = []
    for k in range(first_minute, first_minute + steps):
        insert_minute(engine, directory, k)
        as_of = NOW + (k + 1) * MINUTE
        snapshot, result = timed_refresh(refresher, seconds, as_of)
        steady.append(result)
    kept, merges = kept_slices([refresher])
    seen: set[int] = set()  # each buffer once: a merge of one slice is that slice
    slice_bytes = array_bytes(kept, seen)
    merge_bytes = array_bytes(merges, seen)
    peak = own_rss_mb()
    check_refresher, check_seconds = refresher_()
    fresh, check = timed_refresh(check_refresher, check_seconds, as_of)
    names = ("score_stats", "last_prediction_timestamp", "future_predictions", "online", "replays")
    equal = {name: same(getattr(snapshot, name), getattr(fresh, name)) for name in names}
    stores.dispose()
    return {
        "cold": cold,
        "steady": steady,
        "check": check,
        "equal": equal,
        "rows": snapshot.score_stats[-1].predictions,
        "kept_slices": len(kept),
        "slice_bytes": slice_bytes,
        "merge_bytes": merge_bytes,
        "peak_rss_mb_before_check": peak,
        "own_peak_rss_mb": own_rss_mb(),
    }


def array_bytes(value: Any, seen: set[int]) -> int:
    """The bytes of the numpy arrays in ``value`` (dataclasses, sequences and mappings of
    them): a kept slice's memory (``slices.Histogram``: 48 bytes per bucket key). An array
    counts the whole buffer it views, once: buffers whose ``id`` is in ``seen`` are not
    counted again (a one-set ``TopCounts`` holds one array as ``lower`` and ``upper``)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        while isinstance(value.base, np.ndarray):
            value = value.base
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return int(value.nbytes)
    if is_dataclass(value):
        return sum(array_bytes(getattr(value, f.name), seen) for f in fields(value))
    if isinstance(value, dict):
        return sum(array_bytes(v, seen) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(array_bytes(v, seen) for v in value)
    return 0


def kept_slices(refreshers: list[Any]) -> tuple[list[Any], list[Any]]:
    """What the ``refreshers``' sources keep between refreshes: the aggregates of their kept
    slices (every source that keeps time slices, ``Source.slices``, whatever it keeps in
    them), and apart each window's merge of its kept slices (``SliceStore.merge``)."""
    stores = [source.slices for r in refreshers for source in r.sources.values() if source.slices is not None]
    kept = [a for store in stores for a in store.slices.values()]
    merges = [merged for store in stores for _, merged in store._merged.values()]
    return kept, merges


def own_rss_mb(field: str = "VmHWM") -> float:
    """This process's peak RSS in MB (``VmHWM``, Linux): unlike ``ru_maxrss``, not raised to
    the parent's peak by a ``vfork``-ed start (``subprocess`` uses ``vfork`` on Linux);
    ``field="VmRSS"``: its RSS now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    assert field == "VmHWM", f"no {field} in /proc/self/status"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: list[str], python: str = sys.executable) -> dict[str, Any]:
    """Run ``args`` (this script's or ``refresh.py``'s child mode) in a new process; its
    JSON result with its peak RSS (``peak_rss_mb``, from wait4's rusage)."""
    # Warnings off: Evidently's scikit-learn calls warn at every undefined precision.
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([python, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": f"exit {os.waitstatus_to_exitcode(status)}"}
    result: dict[str, Any] = json.loads(output)
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    return result


def refresh_method(url: str, method: str, python: str = sys.executable) -> dict[str, Any]:
    """One of ``refresh.py``'s methods (``floor``, ``naive``, ``evidently``) at ``NOW``."""
    return child([str(Path(__file__).parent / "refresh.py"), "--url", url, "--child", method], python)


def report(rows: int, floor: float, results: dict[str, dict[str, Any]], others: dict[str, dict[str, Any]]) -> None:
    """Print the table of one size: per configuration and source, ratios first."""
    print(f"\n{rows:,} rows, floor (bare count/sum of the 24h window) {floor:.3f} s")
    print(
        f"{'config':>8} {'source':>12} {'cold/floor':>10} {'steady/floor':>12} {'cold s':>8} {'steady s':>9}"
        f" {'cold stmts':>10} {'steady stmts':>12}"
    )
    for config, r in results.items():
        if "error" in r:
            print(f"{config:>8} {'':>12} {r['error']}")
            continue
        for name in ["total", *r["cold"]["sources"]]:

            def pick(refresh: dict[str, Any], name: str = name) -> float:
                return float(refresh["seconds"] if name == "total" else refresh["sources"][name])

            def count(refresh: dict[str, Any], name: str = name) -> int:
                return sum(1 for source, *_ in refresh["statements"] if name in ("total", source))

            cold = pick(r["cold"])
            steady = statistics.median(pick(s) for s in r["steady"])
            print(
                f"{config:>8} {name:>12} {cold / floor:10.2f} {steady / floor:12.3f} {cold:8.3f} {steady:9.4f}"
                f" {count(r['cold']):10d} {statistics.median(count(s) for s in r['steady']):12.0f}"
            )
        # Each statement's median over the steady refreshes (the same statements in each,
        # bar the hourly audit): where the steady time goes.
        by_where: dict[tuple[str, str], list[float]] = {}
        for s in r["steady"]:
            for source, place, took in s["statements"]:
                by_where.setdefault((source, place), []).append(took)
        slowest = sorted(by_where.items(), key=lambda item: -statistics.median(item[1]))[:4]
        for (source, place), took in slowest:
            print(
                f"{config:>8} {source:>12} steady statement {statistics.median(took):.4f} s"
                f" ({statistics.median(took) / floor:.3f}x floor, {len(took)}x): {place}"
            )
        print(
            f"{config:>8} {'':>12} check: cold refresh again at the last as_of {r['check']['seconds']:.3f} s"
            f" ({r['check']['seconds'] / floor:.2f}x floor), equal to the steady one: {r['equal']}"
        )
        print(
            f"{config:>8} {'':>12} peak RSS {r['own_peak_rss_mb']:.0f} MB (VmHWM; before the check {r['peak_rss_mb_before_check']:.0f} MB,"
            f" rusage {r['peak_rss_mb']:.0f} MB);"
            f" {r['kept_slices']} kept slices, {r['slice_bytes'] / 1e6:.3f} MB and their merges {r['merge_bytes'] / 1e6:.3f} MB,"
            f" x100 models {100 * (r['slice_bytes'] + r['merge_bytes']) / 1e6:.1f} MB"
        )
    for method, r in others.items():
        if "seconds" not in r:
            print(f"{method:>8}: {r.get('skipped') or r.get('error')}")
            continue
        ratios = []
        for config, c in results.items():
            if "cold" in c:
                steady = statistics.median(s["seconds"] for s in c["steady"])
                ratios.append(
                    f"/{config} cold {r['seconds'] / c['cold']['seconds']:.1f}x, steady {r['seconds'] / steady:.1f}x"
                )
        print(
            f"{method:>8}: {r['seconds']:.3f} s ({r['seconds'] / floor:.1f}x floor), peak RSS {r['peak_rss_mb']:.0f} MB;"
            f" {method}{'; '.join(ratios)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rows", type=float, nargs="+", default=[1e5, 1e6])
    parser.add_argument("--steps", type=int, default=10, help="steady refreshes, one simulated minute apart")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--reuse", action="store_true", help="use the tables already written (one --rows value)")
    parser.add_argument(
        "--no-analyze", action="store_true", help="PostgreSQL: tables never analyzed (stale planner statistics)"
    )
    parser.add_argument("--no-naive", action="store_true", help="skip refresh.py's naive method")
    parser.add_argument("--ordered-ids", action="store_true", help="ids growing with the time (generate.py)")
    parser.add_argument(
        "--evidently-python", help="interpreter of an environment with evidently (refresh.py's evidently method)"
    )
    parser.add_argument(
        "--label-delay",
        default="1h",
        help="the model's label_delay (mlmon's default 1h: labels mature by slice and keep online slices; 0s: "
        "the online accuracy reads its windows in full every refresh)",
    )
    parser.add_argument(
        "--child", nargs=5, metavar=("CONFIG", "DIR", "FIRST_MINUTE", "STEPS", "LABEL_DELAY"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--child-minutes", nargs=4, metavar=("DIR", "ROWS", "FIRST_MINUTE", "STEPS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        config, directory, first, steps, label_delay = args.child
        print(json.dumps(run_refreshes(args.url, config, Path(directory), int(first), int(steps), label_delay)))
        return
    if args.child_minutes:
        directory, rows, first, steps = args.child_minutes
        write_minutes(args.url, Path(directory), int(rows), int(steps), int(first))
        print("{}")
        return
    script = str(Path(__file__).resolve())
    for rows in map(int, args.rows):
        if not args.reuse:
            # In a child process: a parent grown by the data would inflate its children's peak RSS.
            subprocess.run(
                [sys.executable, str(Path(__file__).parent / "generate.py"), "--url", args.url, "--rows", str(rows)]
                + (["--no-analyze"] if args.no_analyze else [])
                + (["--ordered-ids"] if args.ordered_ids else []),
                check=True,
                stdout=subprocess.DEVNULL,
            )
        refresh_method(args.url, "floor")  # warms the database's cache once, so no method pays for it alone
        floor = statistics.median(refresh_method(args.url, "floor")["seconds"] for _ in range(3))
        others = {} if args.no_naive else {"naive": refresh_method(args.url, "naive")}
        if args.evidently_python:
            others["evidently"] = refresh_method(args.url, "evidently", args.evidently_python)
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            first = 0
            for config in args.configs:
                child([script, "--url", args.url, "--child-minutes", tmp, str(rows), str(first), str(args.steps)])
                results[config] = child(
                    [script, "--url", args.url, "--child", config, tmp, str(first), str(args.steps), args.label_delay]
                )
                first += args.steps
        report(rows, floor, results, others)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
