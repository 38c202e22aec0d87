"""Peak RSS of one process refreshing many models (issue 12: memory "documented for 100
models"), as ``mlmon serve`` holds them: one ``ModelRefresher`` per model over one ``Stores``.

``generate.py`` writes ``--models`` M x ``--rows`` N predictions in the 24 h before
``generate.NOW`` (models ``m0`` to ``m{M-1}``, N each, with labels and replays). Then, per
configuration, a child process builds the M refreshers of ``refresh.py``'s model (windows 1h
and 24h, labels recorded with ``label_delay`` 1h, replays; ``filter: model_name = mi``) and
refreshes every model at ``NOW`` (the cold round), then ``--rounds`` more times, each one
simulated minute later, all the models of a round at once, each in a thread of its own, as
``mlmon serve`` runs them (``server.loop``; the store's pool of ``max_connections``, 10 by
default, lets that many read at a time), with glibc's malloc arenas capped as there
(``server.malloc``). No rows are added between rounds: the memory held between refreshes is
the point here, the cost of new rows is ``steady.py``'s. Configurations:

- ``default``: mlmon's defaults, time slices off: a refresh holds its results only while it
  runs, so the peak is what the process holds at rest plus the refreshes running at once
  (as many as the pool's connections);
- ``slices``: ``time_slice: auto`` (5-minute slices) with ``slice_fill_refreshes: 1``: each
  model's cold refresh reads every slice of its 24 h window and keeps them, so the peak
  holds M models' kept slices.

Reported per configuration: the process's RSS once its refreshers are built, before the
first round (the baseline: the interpreter, mlmon, and this benchmark's imports, pandas
among them, which ``mlmon serve`` does not load), its peak RSS (``VmHWM``), its RSS after
the last round (``VmRSS``, its connections still open), the kept slices' bytes in all with
each window's merge of them (``steady.array_bytes``), the predictions in every model's 24 h
window at the last round and seconds per round.

Not as ``mlmon serve``: no state database (serve also saves the kept slices after each
refresh), ``query_timeout`` is 1 h (``refresh.settings``; it also sets how long a refresh
waits for a connection), the tables are reflected before the first round (serve reflects in
it), and the
models of a round start together (serve's drift apart after their first refresh, so the
later rounds here are the worst case of their overlap).

    python benchmarks/models.py --url postgresql+psycopg://postgres@127.0.0.1:5432/bench_models --models 100 --rows 1e5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

CONFIGS = ("default", "slices")


def run_models(url: str, config: str, models: int, rounds: int) -> dict[str, Any]:
    """The M refreshers' rounds (module docstring), in this process."""
    from generate import NOW
    from refresh import settings
    from steady import array_bytes, kept_slices, own_rss_mb

    from exporter.predictions.refresh import ModelRefresher
    from exporter.predictions.stores import Stores
    from exporter.server.app import store_pools
    from exporter.server.malloc import limit_malloc_arenas

    limit_malloc_arenas()  # as mlmon serve does, before any thread starts

    base = settings(url, label_delay="1h")
    template = base.models[0]
    if config == "slices":
        template = template.model_copy(update={"time_slice": "auto", "slice_fill_refreshes": 1})
    configs = [
        template.model_copy(
            update={
                "name": f"m{m}",
                "predictions": template.predictions.model_copy(update={"filter": {"model_name": f"m{m}"}}),
            }
        )
        for m in range(models)
    ]
    all_models = base.model_copy(update={"models": configs})
    # The store's pool as mlmon serve sizes it: max_connections (10) connections, a
    # checkout waiting up to a refresh's deadline.
    stores = Stores(all_models.stores, all_models.query_timeout, store_pools(all_models))
    refreshers = []
    for m, model in enumerate(configs):
        refresher = ModelRefresher(model, f"models[{m}]", all_models.refresh_policy, stores)
        refresher.check_schema()
        refreshers.append(refresher)
    baseline = own_rss_mb("VmRSS")
    seconds, rows = [], 0
    with ThreadPoolExecutor(max_workers=models) as threads:
        for k in range(rounds + 1):
            started = time.perf_counter()
            snapshots = list(threads.map(lambda r: r.refresh(NOW + timedelta(minutes=k)), refreshers))  # noqa: B023
            seconds.append(time.perf_counter() - started)
            for refresher, snapshot in zip(refreshers, snapshots, strict=True):
                down = [name for name, status in snapshot.sources.items() if not status.up]
                assert not down, (refresher.model.name, down, snapshot.errors)
            rows = sum(snapshot.score_stats[-1].predictions for snapshot in snapshots)
    kept, merges = kept_slices(refreshers)
    result = {
        "seconds": seconds,
        "kept_mb": array_bytes([*kept, *merges], set()) / 1e6,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": own_rss_mb(),
        "rss_mb": own_rss_mb("VmRSS"),
        "rows": rows,
    }
    stores.dispose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--rows", type=float, default=1e5, help="predictions per model in the 24 h window")
    parser.add_argument("--rounds", type=int, default=2, help="refreshes of every model after the cold one")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--reuse", action="store_true", help="use the tables already written")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_models(args.url, args.child, args.models, args.rounds)))
        return
    if not args.reuse:
        total = str(int(args.rows) * args.models)
        generate = [sys.executable, str(Path(__file__).parent / "generate.py"), "--url", args.url, "--rows", total]
        subprocess.run([*generate, "--models", str(args.models)], check=True, stdout=subprocess.DEVNULL)
    print(
        f"{args.models} models, {args.rows:.0e} predictions each in the 24 h window, {args.rounds} rounds after the cold one"
    )
    print(
        "| configuration | predictions in all | baseline RSS MB | peak RSS MB | RSS after MB | kept slices MB | cold round s | later rounds s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for config in args.configs:
        command = [sys.executable, __file__, "--url", args.url, "--models", str(args.models)]
        out = subprocess.run(
            [*command, "--rounds", str(args.rounds), "--child", config], check=True, stdout=subprocess.PIPE, text=True
        )
        r = json.loads(out.stdout)
        later = " / ".join(f"{s:.1f}" for s in r["seconds"][1:])
        print(
            f"| {config} | {r['rows']:,} | {r['baseline_rss_mb']:,.0f} | {r['peak_rss_mb']:,.0f} | {r['rss_mb']:,.0f} | {r['kept_mb']:,.1f} "
            f"| {r['seconds'][0]:.1f} | {later} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
