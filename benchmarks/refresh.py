"""One full refresh of one model (windows 1h and 24h, all online metrics, replays) against
the usual alternatives, on the same store and the same rows, each in its own process:

1. mlmon: ``ModelRefresher.refresh`` (queries pushed down, aggregates merged in Python),
   in the default configuration (ids not declared unique: one duplicate-id search per
   source) and with ``unique_ids: true`` (``mlmon_unique``), each statement timed;
2. naive: ``pandas.read_sql`` of the window (predictions left-joined to labels and
   replays), then the same numbers with numpy and scikit-learn;
3. Evidently's classification metrics on that DataFrame, when evidently is installed;
4. floor: one bare aggregate scan, ``SELECT count(*), sum(score)`` over the window;
5. with ``--features`` (10 numeric and 10 categorical feature columns written by
   ``generate.py --features``): ``features``, the same refresh with every feature compared
   with a training run of the same distribution (training/serving skew), against
   ``mlmon``, the prediction-only refresh on the same table; ``features_exact``, the same
   with every numeric feature of the training run on 200 distinct values (sent exactly
   as ``value_shares``: 200 bins per numeric feature, the most the client sends), the
   largest feature statement.

    python benchmarks/refresh.py --url postgresql+psycopg://postgres@127.0.0.1:5432/bench --rows 100000 1000000

Prints wall time and peak RSS of each (from the child's own rusage), and the ratios
mlmon/floor and naive/mlmon. ``--reuse`` skips writing the data (``benchmarks/generate.py``);
``--methods`` runs only some (the floor always runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from generate import FEATURES_CATEGORICAL, FEATURES_NUMERIC, NOW, feature_frame  # noqa: E402

METHODS = ("floor", "mlmon", "mlmon_unique", "naive", "evidently")
FEATURE_METHODS = ("features", "features_exact")
#: Distinct values of each numeric training feature in ``features_exact`` (``client.MAX_EXACT_VALUES``).
EXACT_VALUES = 200
WINDOW = timedelta(hours=24)


def settings(
    url: str, unique_ids: bool = False, features: bool = False, state: str | None = None, label_delay: str = "0s"
):
    """The benchmark's model ``m0`` (windows 1h and 24h, labels with ``missing: negative``,
    replays); with a ``label_delay`` above 0, the labels' recording time (``bench_labels.ts``)
    too, so that they mature by slice (docs/metrics.md, *Label maturity*)."""
    from exporter.config import parse_settings
    from exporter.durations import parse_duration

    source = {"store": "bench"}
    matured = parse_duration(label_delay, allow_zero=True) > timedelta(0)
    feature_config = {
        "numeric": [f"f{i}" for i in range(FEATURES_NUMERIC)],
        "categorical": [f"c{i}" for i in range(FEATURES_CATEGORICAL)],
    }
    return parse_settings(
        {
            "stores": {"bench": {"url": url}},
            **({"state": {"url": state}} if state else {}),
            "query_timeout": "1h",
            "models": [
                {
                    "name": "m0",
                    "predictions": {
                        **source,
                        "table": "bench_predictions",
                        "columns": {"id": "id", "timestamp": "ts", "score": "score"},
                        "filter": {"model_name": "m0"},
                        # The default (False) searches duplicate ids; the generator writes none.
                        "unique_ids": unique_ids,
                    },
                    "labels": {
                        **source,
                        "table": "bench_labels",
                        "columns": {"id": "id", "label": "clicked", **({"timestamp": "ts"} if matured else {})},
                        "missing": "negative",
                    },
                    "replays": {**source, "table": "bench_replays", "columns": {"id": "id", "score": "score"}},
                    **({"features": feature_config} if features else {}),
                    "windows": ["1h", "24h"],
                    "label_delay": label_delay,
                }
            ],
        }
    )


def run_floor(url: str) -> dict:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    table = sa.Table("bench_predictions", sa.MetaData(), autoload_with=engine)
    query = sa.select(sa.func.count(), sa.func.sum(table.c.score)).where(
        table.c.model_name == "m0", table.c.ts >= _bind(engine, NOW - WINDOW), table.c.ts < _bind(engine, NOW)
    )
    with engine.connect() as conn:
        started = time.perf_counter()
        n, _ = conn.execute(query).one()
        return {"seconds": time.perf_counter() - started, "rows": int(n)}


def _bind(engine, instant):
    return instant.replace(tzinfo=None) if engine.dialect.name == "sqlite" else instant


def run_mlmon(url: str, unique_ids: bool = False) -> dict:
    import sqlalchemy as sa

    from exporter.predictions.refresh import ModelRefresher
    from exporter.predictions.stores import Stores

    config = settings(url, unique_ids)
    stores = Stores(config.stores, config.query_timeout)
    refresher = ModelRefresher(config.models[0], "models[0]", config.refresh_policy, stores)
    refresher.check_schema()  # reflection is done once per process, not per refresh
    durations: list[float] = []  # each statement's, against the default query_timeout (30 s)
    engine = stores.engine("bench")
    sa.event.listen(engine, "before_cursor_execute", lambda conn, *_: conn.info.__setitem__("t", time.perf_counter()))
    sa.event.listen(
        engine, "after_cursor_execute", lambda conn, *_: durations.append(time.perf_counter() - conn.info["t"])
    )
    started = time.perf_counter()
    snapshot = refresher.refresh(NOW)
    seconds = time.perf_counter() - started
    assert all(s.up for s in snapshot.sources.values()), snapshot.errors
    day = snapshot.online[1]
    return {
        "seconds": seconds,
        "rows": snapshot.score_stats[1].predictions,
        "logloss": day.logloss,
        "roc_auc": day.roc_auc,
        "longest_query": max(durations),
        "queries": len(durations),
    }


def run_mlmon_unique(url: str) -> dict:
    """mlmon with ``unique_ids: true``: no duplicate-id search."""
    return run_mlmon(url, unique_ids=True)


def run_features(url: str, exact: bool = False) -> dict:
    """The refresh with 20 features; ``exact``: the training run's numeric features on
    ``EXACT_VALUES`` distinct values. Also the longest statement's characters and seconds."""
    import tempfile

    import numpy as np
    import sqlalchemy as sa

    from exporter.client import build_training_run
    from exporter.predictions.refresh import ModelRefresher
    from exporter.predictions.stores import Stores
    from exporter.training.storage import StateDatabase, save_run

    with tempfile.TemporaryDirectory() as tmp:
        config = settings(url, features=True, state=f"sqlite:///{tmp}/state.sqlite")
        state = StateDatabase(config.state.resolved_url())
        training = feature_frame(np.random.default_rng(1), 20_000)
        if exact:
            for i in range(FEATURES_NUMERIC):
                values = training[f"f{i}"].to_numpy()
                grid = np.nanquantile(values, np.linspace(0, 1, EXACT_VALUES))
                ceiling = grid[np.clip(np.searchsorted(grid, np.nan_to_num(values)), 0, EXACT_VALUES - 1)]
                training[f"f{i}"] = np.where(np.isnan(values), np.nan, ceiling)
        run = build_training_run(
            model="m0",
            version="v1",
            trained_at=NOW - timedelta(days=1),
            training_data=training,
            training_rows=1_000_000,
        )
        save_run(state.ready(), run, NOW)
        stores = Stores(config.stores, config.query_timeout)
        refresher = ModelRefresher(
            config.models[0], "models[0]", config.refresh_policy, stores, training=config.training, state=state
        )
        refresher.check_schema()
        statements: list[tuple[int, float]] = []  # (characters, seconds) of each statement in the store
        engine = stores.engine("bench")
        sa.event.listen(
            engine, "before_cursor_execute", lambda conn, *_: conn.info.__setitem__("t", time.perf_counter())
        )
        sa.event.listen(
            engine,
            "after_cursor_execute",
            lambda conn, cursor, statement, *_: statements.append(
                (len(statement), time.perf_counter() - conn.info["t"])
            ),
        )
        started = time.perf_counter()
        snapshot = refresher.refresh(NOW)
        seconds = time.perf_counter() - started
        assert all(s.up for s in snapshot.sources.values()), snapshot.errors
        longest_chars, longest_seconds = max(statements)
        psi = max(f.psi for f in snapshot.features if f.psi is not None)
        stores.dispose()
        state.engine.dispose()
    day = snapshot.online[1]
    return {
        "seconds": seconds,
        "rows": snapshot.score_stats[1].predictions,
        "logloss": day.logloss,
        "roc_auc": day.roc_auc,
        "max_psi": psi,
        "statement_chars": longest_chars,
        "statement_seconds": longest_seconds,
    }


def run_features_exact(url: str) -> dict:
    """``run_features`` with 200 bins per numeric feature."""
    return run_features(url, exact=True)


def _window_frame(url: str):
    import pandas as pd
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    sql = sa.text(
        "SELECT p.id, p.ts, p.score, l.clicked, r.score AS replay FROM bench_predictions p "
        "LEFT JOIN bench_labels l ON l.id = p.id LEFT JOIN bench_replays r ON r.id = p.id "
        "WHERE p.model_name = 'm0' AND p.ts >= :start AND p.ts < :end"
    )
    return pd.read_sql(sql, engine, params={"start": _bind(engine, NOW - WINDOW), "end": _bind(engine, NOW)})


def run_naive(url: str) -> dict:
    import numpy as np
    import pandas as pd
    from sklearn.metrics import log_loss, roc_auc_score

    started = time.perf_counter()
    frame = _window_frame(url)
    out = {}
    for name, span in (("1h", timedelta(hours=1)), ("24h", WINDOW)):
        ts = pd.to_datetime(frame["ts"], utc=True).dt.tz_localize(None)  # SQLite returns text
        w = frame[ts >= (NOW - span).replace(tzinfo=None)]
        p = w["score"].to_numpy(np.float64)
        y = w["clicked"].fillna(0).to_numpy()
        _, mode = np.unique(np.floor(p * 1e6 + 0.5), return_counts=True)
        replayed = w["replay"].notna()
        out[name] = {
            "mean": p.mean(),
            "std": p.std(),
            "percentiles": np.percentile(p, [1, 5, 25, 50, 75, 95, 99]),
            "mode_share": mode.max() / len(p),
            "logloss": log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1]),
            "roc_auc": roc_auc_score(y, p),
            "calibration": p.mean() / y.mean(),
            "reproducibility": np.mean(
                np.abs(w["score"][replayed] - w["replay"][replayed]) <= 1e-6 + 1e-6 * w["score"][replayed]
            ),
        }
    return {
        "seconds": time.perf_counter() - started,
        "rows": len(frame),
        "logloss": out["24h"]["logloss"],
        "roc_auc": out["24h"]["roc_auc"],
    }


def run_evidently(url: str) -> dict:
    try:
        from evidently import Report  # noqa: F401
    except ImportError:
        return {"skipped": "evidently is not installed"}
    from evidently import BinaryClassification, DataDefinition, Dataset, Report
    from evidently.presets import ClassificationPreset

    started = time.perf_counter()
    frame = _window_frame(url)
    frame["clicked"] = frame["clicked"].fillna(0).astype(int)
    definition = DataDefinition(classification=[BinaryClassification(target="clicked", prediction_probas="score")])
    Report([ClassificationPreset()]).run(
        Dataset.from_pandas(frame[["clicked", "score"]], data_definition=definition), None
    )
    return {"seconds": time.perf_counter() - started, "rows": len(frame)}


def measure(method: str, url: str) -> dict:
    """Run one method in a child process; its own peak RSS comes from wait4's rusage."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--url", url, "--child", method],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        return {"error": f"exit {child.returncode}"}
    result = json.loads(output)
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rows", type=float, nargs="+", default=[1e5, 1e6])
    parser.add_argument("--reuse", action="store_true", help="use the tables already written (one --rows value)")
    parser.add_argument(
        "--features",
        action="store_true",
        help="with 10 numeric and 10 categorical features: also time the skew refresh",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--child", choices=METHODS + FEATURE_METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(
            json.dumps(
                {
                    k: (float(v) if hasattr(v, "__float__") else v)
                    for k, v in globals()[f"run_{args.child}"](args.url).items()
                }
            )
        )
        return
    print(f"{'rows':>10} {'method':>10} {'seconds':>9} {'peak RSS MB':>12}  notes")
    for rows in map(int, args.rows):
        if not args.reuse:
            # In a child process: a fork of a parent grown by the data would inflate the
            # children's peak RSS, which counts the pages they inherit before exec.
            subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).parent / "generate.py"),
                    "--url",
                    args.url,
                    "--rows",
                    str(rows),
                    "--replay-share",
                    "0.01",
                ]
                + (["--features"] if args.features else []),
                check=True,
                stdout=subprocess.DEVNULL,
            )
        measure("floor", args.url)  # warm the database's cache once, so no method pays for it alone
        chosen = [m for m in METHODS if m in {"floor", *args.methods}] + (
            list(FEATURE_METHODS) if args.features else []
        )
        results = {method: measure(method, args.url) for method in chosen}
        for method, r in results.items():
            note = r.get("skipped") or r.get("error") or ""
            if "longest_query" in r:
                note = f"{r['queries']:.0f} statements, longest {r['longest_query']:.2f} s (default query_timeout 30 s)"
            if "statement_chars" in r:
                note = f"largest statement {r['statement_chars']:,.0f} characters, {r['statement_seconds']:.2f} s"
            seconds = f"{r['seconds']:9.3f}" if "seconds" in r else f"{'-':>9}"
            rss = f"{r['peak_rss_mb']:12.0f}" if "seconds" in r else f"{'-':>12}"
            print(f"{rows:>10,} {method:>10} {seconds} {rss}  {note}")
        floor, mlmon, naive = results["floor"], results.get("mlmon", {}), results.get("naive", {})
        if all("seconds" in results.get(m, {}) for m in ("mlmon", "mlmon_unique")):
            print(
                f"{rows:>10,}  mlmon/floor {mlmon['seconds'] / floor['seconds']:.1f}x"
                f"   mlmon_unique/floor {results['mlmon_unique']['seconds'] / floor['seconds']:.1f}x"
            )
        if all("seconds" in r for r in (floor, mlmon, naive)):
            print(
                f"{rows:>10,}  mlmon/floor {mlmon['seconds'] / floor['seconds']:.1f}x   naive/mlmon {naive['seconds'] / mlmon['seconds']:.1f}x"
                f"   log loss mlmon {mlmon['logloss']:.12f} naive {naive['logloss']:.12f}   AUC mlmon {mlmon['roc_auc']:.6f} naive {naive['roc_auc']:.6f}"
            )
        features = results.get("features", {})
        if "seconds" in features and "seconds" in mlmon:
            print(
                f"{rows:>10,}  features/mlmon {features['seconds'] / mlmon['seconds']:.2f}x"
                f"   (+{features['seconds'] - mlmon['seconds']:.3f} s for 20 features; largest PSI {features['max_psi']:.4f}, same distribution)"
            )
        exact = results.get("features_exact", {})
        if "seconds" in exact and "seconds" in mlmon:
            print(
                f"{rows:>10,}  features_exact/mlmon {exact['seconds'] / mlmon['seconds']:.2f}x   (+{exact['seconds'] - mlmon['seconds']:.3f} s)"
            )


if __name__ == "__main__":
    main()
