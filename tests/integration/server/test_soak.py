"""Soak: the real `mlmon serve` refreshing 50 models for 30 minutes while new predictions
keep arriving and /metrics is scraped every second. No error, and resident memory after
the first 5 minutes grows by less than 5 MB in all (issue 13). It rose by about 3 MB a
minute in glibc's malloc arenas (capped: exporter/server/malloc.py), then by 1.3 to 6 MB a
minute from connections opened and closed all the time by 50 refreshes sharing a pool of
5 (+ 10 overflow) (now one connection per model, at most 10, kept open:
exporter/server/app.py, docs/reliability.md). The resident memory over time is printed.
`MLMON_SOAK_SECONDS` shortens it on a laptop (the warm-up is then a third of the run);
`MLMON_SOAK_TIME_SLICE` (e.g. `auto`) gives every model that `time_slice`, so that the
kept slices, saved in the state database, are under the same checks."""

from __future__ import annotations

import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, start_process, wait_until_answers

MODELS = 50
SECONDS = float(os.environ.get("MLMON_SOAK_SECONDS", 1800))
#: Seconds in which connection pools, SQLite page caches and malloc arenas fill.
WARM_UP = min(300.0, SECONDS / 3)
TIME_SLICE = os.environ.get("MLMON_SOAK_TIME_SLICE")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 600)  # the run itself, then setup and the final checks
def test_fifty_models_for_thirty_minutes_with_flat_memory(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/store.sqlite"
    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    predictions = sa.Table(
        "predictions",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_name", sa.String),
        sa.Column("ts", sa.DateTime),
        sa.Column("score", sa.Double),
        sa.Index("ix_model_ts", "model_name", "ts"),
    )
    labels = sa.Table("labels", metadata, sa.Column("id", sa.Integer, index=True), sa.Column("clicked", sa.Integer))
    metadata.create_all(engine)
    with engine.begin() as conn:  # WAL: the writer below and mlmon's read transactions do not block each other
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    rng = np.random.default_rng(0)
    next_id = 0

    def append(start: datetime, end: datetime, per_model: int) -> None:
        nonlocal next_id
        rows, clicks = [], []
        for m in range(MODELS):
            for offset in rng.uniform(0, (end - start).total_seconds(), per_model):
                score = float(np.round(rng.beta(1.2, 40), 4))
                rows.append(
                    {
                        "id": next_id,
                        "model_name": f"m{m}",
                        "ts": start + timedelta(seconds=float(offset)),
                        "score": score,
                    }
                )
                if rng.random() < score:
                    clicks.append({"id": next_id, "clicked": 1})
                next_id += 1
        with engine.begin() as conn:
            conn.execute(predictions.insert(), rows)
            if clicks:
                conn.execute(labels.insert(), clicks)

    now = datetime.now(UTC).replace(tzinfo=None)
    append(now - timedelta(hours=24), now, per_model=2000)
    model_lines = "\n".join(
        f"  - {{name: m{m}, predictions: {{store: s, table: predictions, columns: {{id: id, timestamp: ts, score: score}}, "
        f"filter: {{model_name: m{m}}}}}, labels: {{store: s, table: labels, columns: {{id: id, label: clicked}}, missing: negative}}, "
        "windows: [1h, 24h], label_delay: 0s" + (f", time_slice: {TIME_SLICE}}}" if TIME_SLICE else "}")
        for m in range(MODELS)
    )
    # Every 15 s, four times the default. A refresh of one of these models costs 110 to 140
    # ms in all (docs/performance.md, *SQLite: each row's date-time text read once*), so the
    # server uses about 70% of one core; before that fix, 250 to 450 ms, and with the rows
    # the test adds (the window holds 2,000 predictions a model at first, 3,800 at the end)
    # it saturated both cores, up to 57 refreshes waited at once, and resident memory rose
    # with them (5.6 MB in the two minutes compared, against 1.0 MB since).
    (tmp_path / "mlmon.yml").write_text(
        f'refresh_interval: 15s\nstores: {{s: {{url: "{url}"}}}}\nstate: {{url: "sqlite:///{tmp_path}/state.sqlite"}}\nmodels:\n{model_lines}\n'
    )
    port = free_port()
    log = tmp_path / "server.log"
    server = start_process(
        [sys.executable, "-m", "exporter", "serve", "--config", str(tmp_path / "mlmon.yml"), "--port", str(port)], log
    )
    base = f"http://127.0.0.1:{port}"
    samples: list[tuple[float, float]] = []
    failures = 0
    try:
        # The first refresh of all 50 models at once: under 60 s on one 2-core machine, over
        # it on a slower one (seen at ca8f3df too); the test is about what follows.
        wait_until_answers(f"{base}/readyz", server, log, timeout=300)
        started = last_append = time.monotonic()
        while (elapsed := time.monotonic() - started) < SECONDS:
            tick = time.monotonic()
            try:
                if httpx.get(f"{base}/metrics", timeout=5).status_code != 200:
                    failures += 1
            except httpx.HTTPError:
                failures += 1
            if tick - last_append >= 5:  # new predictions keep arriving
                end = datetime.now(UTC).replace(tzinfo=None)
                append(end - timedelta(seconds=5), end, per_model=5)
                last_append = tick
            if not samples or elapsed - samples[-1][0] >= 10:
                samples.append((elapsed, rss_mb(server.pid)))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        final = httpx.get(f"{base}/metrics", timeout=5).text
    finally:
        server.terminate()
        server.wait(timeout=30)

    with capsys.disabled():
        print(
            f"\nsoak: {MODELS} models, {SECONDS:.0f} s, RSS MB over time: "
            + ", ".join(f"{t:.0f}s={r:.0f}" for t, r in samples)
        )
    families = {f.name: f for f in text_string_to_metric_families(final)}
    assert failures == 0
    assert {s.value for s in families["mlmon_source_up"].samples} == {1.0}
    errors = {tuple(s.labels.values()): s.value for s in families["mlmon_refresh_errors"].samples if s.value}
    assert errors == {}, log.read_text()[-3000:]  # (model, source, reason): count, and what the server logged
    assert len({s.labels["model"] for s in families["mlmon_window_predictions"].samples}) == MODELS
    # Flat: the level the process holds in the last two minutes is the one it held in the
    # two minutes after the warm-up. Medians, so that the transient peaks of refreshes and
    # renderings that happen to be sampled (up to about 10 MB) are not taken for growth.
    settled = [r for t, r in samples if WARM_UP <= t < WARM_UP + 120]
    final_level = [r for t, r in samples if t >= SECONDS - 120]
    assert settled and final_level and SECONDS - 120 >= WARM_UP + 120, f"run longer than {SECONDS} s: {samples}"
    growth = statistics.median(final_level) - statistics.median(settled)
    assert max(r for _, r in samples) < 300.0, samples
    assert growth < 5.0, (growth, samples)  # issue 13's goal, after the first 5 minutes
