"""The fill of time slices from a cold start (docs/metrics.md, "Time slices"): what each
refresh costs while the slices fill, against the one-pass refresh of the same model
(``time_slice`` unset) and the bare scan of the 24h window, and the peak RSS.

On the tables ``generate.py`` wrote (N predictions over the 24 h before ``generate.NOW``,
labels and replays), for the default configuration of ``refresh.py`` (windows 1h and 24h,
ids not declared unique), in one process each, every refresh one simulated minute after
the previous one (no new rows: the windows slide over the generated day):

- ``one-pass``: ``--refreshes`` refreshes without time slices;
- ``filling``: ``time_slice: auto`` (5 minutes: 288 slices), ``slice_fill_refreshes``
  ``--fill`` (default 24), ``--refreshes`` refreshes: the first ``--fill`` or so read the
  windows in one pass and 1/``--fill`` of the slices, then the slices are merged.

Printed per run: the floor (bare ``count(*), sum(score)`` of the 24h window, median of 3),
each refresh's seconds (and its ratio to the median one-pass refresh), and the process's
peak RSS.

    python benchmarks/generate.py --url postgresql+psycopg://postgres@127.0.0.1:5432/bench_fill --rows 1000000
    python benchmarks/fill.py --url postgresql+psycopg://postgres@127.0.0.1:5432/bench_fill --refreshes 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def run(url: str, mode: str, refreshes: int, fill: int) -> dict:
    """``refreshes`` timed refreshes of one refresher (``mode``: ``one-pass`` or ``filling``)."""
    from generate import NOW
    from refresh import settings
    from steady import own_rss_mb

    from exporter.predictions.refresh import ModelRefresher
    from exporter.predictions.stores import Stores

    settings_ = settings(url)
    if mode == "filling":
        model = settings_.models[0].model_copy(update={"time_slice": "auto", "slice_fill_refreshes": fill})
        settings_ = settings_.model_copy(update={"models": [model]})
    stores = Stores(settings_.stores, settings_.query_timeout)
    refresher = ModelRefresher(settings_.models[0], "models[0]", settings_.refresh_policy, stores)
    refresher.check_schema()  # reflection, once per process as in serve: not timed
    seconds, kept = [], []
    for k in range(refreshes):
        started = time.perf_counter()
        snapshot = refresher.refresh(NOW + timedelta(minutes=k))
        seconds.append(time.perf_counter() - started)
        assert all(s.up for s in snapshot.sources.values()), snapshot.errors
        store = refresher.predictions.slices
        kept.append(0 if store is None else len(store.slices))
    stores.dispose()
    return {"seconds": seconds, "kept": kept, "peak_rss_mb": own_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--refreshes", type=int, default=30)
    parser.add_argument("--fill", type=int, default=24, help="slice_fill_refreshes")
    parser.add_argument("--child", choices=["one-pass", "filling"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.url, args.child, args.refreshes, args.fill)))
        return
    from refresh import run_floor

    run_floor(args.url)  # warm-up
    floor = statistics.median(run_floor(args.url)["seconds"] for _ in range(3))
    results = {}
    for mode in ("one-pass", "filling"):
        command = [sys.executable, __file__, "--url", args.url, "--refreshes", str(args.refreshes)]
        output = subprocess.run([*command, "--fill", str(args.fill), "--child", mode], capture_output=True, text=True)
        if output.returncode != 0:
            sys.exit(f"{mode}: {output.stderr[-2000:]}")
        results[mode] = json.loads(output.stdout)
    base = statistics.median(results["one-pass"]["seconds"])
    print(f"floor {floor:.3f} s; one-pass refresh median {base:.3f} s ({base / floor:.1f}x floor)")
    filling = results["filling"]
    for k, (took, kept) in enumerate(zip(filling["seconds"], filling["kept"], strict=True)):
        print(
            f"refresh {k:3d}: {took:8.3f} s  {took / base:5.2f}x one-pass  {took / floor:7.2f}x floor  {kept} kept slices"
        )
    for mode, r in results.items():
        print(f"{mode}: peak RSS {r['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
