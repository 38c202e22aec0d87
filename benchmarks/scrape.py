"""``/metrics`` latency and throughput under concurrent scrapers, with 100 configured
models and their full metric set (2 windows, labels, replays; no training runs), while the
refresh loop keeps running.

    python benchmarks/scrape.py --models 100 --scrapers 4 --seconds 20

Starts ``mlmon serve`` on loopback over a SQLite store it fills, waits until every model
refreshed once, then scrapes for the given time and prints p50/p99 latency, scrapes per
second and the exposition size.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy as sa


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(url: str, models: int, rows_per_model: int) -> None:
    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    predictions = sa.Table(
        "predictions",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_name", sa.String),
        sa.Column("ts", sa.DateTime),
        sa.Column("score", sa.Double),
    )
    labels = sa.Table("labels", metadata, sa.Column("id", sa.Integer), sa.Column("clicked", sa.Integer))
    replays = sa.Table("replays", metadata, sa.Column("id", sa.Integer), sa.Column("score", sa.Double))
    metadata.create_all(engine)
    rng = np.random.default_rng(0)
    now = datetime.now(UTC).replace(tzinfo=None)
    n = models * rows_per_model
    scores = np.round(rng.beta(1.2, 40, n), 4)
    with engine.begin() as conn:
        conn.execute(
            predictions.insert(),
            [
                {"id": i, "model_name": f"m{i % models}", "ts": now - timedelta(seconds=float(s)), "score": float(p)}
                for i, (s, p) in enumerate(zip(rng.uniform(0, 86_000, n), scores, strict=True))
            ],
        )
        conn.execute(
            labels.insert(), [{"id": i, "clicked": 1} for i in np.flatnonzero(rng.random(n) < scores).tolist()]
        )
        conn.execute(replays.insert(), [{"id": i, "score": float(scores[i])} for i in range(0, n, 10)])
    engine.dispose()


def config(url: str, state: str, models: int) -> str:
    lines = [f'refresh_interval: 5s\nstores: {{s: {{url: "{url}"}}}}\nstate: {{url: "{state}"}}\nmodels:']
    for m in range(models):
        lines.append(
            f"  - name: m{m}\n"
            f"    predictions: {{store: s, table: predictions, columns: {{id: id, timestamp: ts, score: score}}, filter: {{model_name: m{m}}}}}\n"
            "    labels: {store: s, table: labels, columns: {id: id, label: clicked}, missing: negative}\n"
            "    replays: {store: s, table: replays, columns: {id: id, score: score}}\n"
            "    windows: [1h, 24h]\n    label_delay: 0s"
        )
    return "\n".join(lines) + "\n"


async def scrape(url: str, scrapers: int, seconds: float, gzipped: bool) -> tuple[list[float], int]:
    latencies: list[float] = []
    size = 0
    deadline = time.monotonic() + seconds

    async def scraper(client: httpx.AsyncClient) -> None:
        nonlocal size
        while time.monotonic() < deadline:
            started = time.perf_counter()
            response = await client.get(url)
            latencies.append(time.perf_counter() - started)
            size = len(response.content)

    # identity by default: the client's own gunzip would be counted as server latency
    headers = {"Accept-Encoding": "gzip" if gzipped else "identity"}
    async with httpx.AsyncClient(timeout=10, headers=headers) as client:
        await asyncio.gather(*(scraper(client) for _ in range(scrapers)))
    return latencies, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--rows-per-model", type=int, default=500)
    parser.add_argument("--scrapers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--gzip", action="store_true", help="ask for gzip, as Prometheus does")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store, state = f"sqlite:///{tmp}/store.sqlite", f"sqlite:///{tmp}/state.sqlite"
        fill(store, args.models, args.rows_per_model)
        Path(tmp, "mlmon.yml").write_text(config(store, state, args.models))
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "exporter", "serve", "--config", f"{tmp}/mlmon.yml", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=Path(__file__).parent.parent,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit("mlmon did not become ready")
                time.sleep(0.5)
            latencies, size = asyncio.run(scrape(f"{base}/metrics", args.scrapers, args.seconds, args.gzip))
        finally:
            server.terminate()
            server.wait(timeout=30)
    ms = np.array(latencies) * 1000
    print(
        f"{args.models} models, {args.scrapers} concurrent scrapers{' (gzip)' if args.gzip else ''}, {args.seconds:.0f} s, refreshes every 5 s meanwhile: "
        f"{len(ms)} scrapes, {len(ms) / args.seconds:.0f}/s, p50 {np.percentile(ms, 50):.1f} ms, "
        f"p99 {np.percentile(ms, 99):.1f} ms, exposition {size / 1024:.0f} KiB"
    )


if __name__ == "__main__":
    main()
