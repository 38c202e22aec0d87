"""A stand-in for the model server, so that the serving dashboard (mlmon-serving) can be
tested and rendered without the docker-compose stack.

It exposes what the real model server does: prometheus-fastapi-instrumentator's standard
metrics with the model server's millisecond latency buckets, the process collector, and
the prediction-cache counters ``model_server_cache_hits_total`` and
``model_server_cache_misses_total``. It calls itself a few dozen times a second for 1000 users, of whom its cache holds 400;
2 % of the calls fail with a 500.

    python grafana/serving_standin.py --port 8000
"""

from __future__ import annotations

import argparse
import random
import threading
import time

import httpx
import uvicorn
from fastapi import FastAPI, HTTPException
from prometheus_client import Counter
from prometheus_fastapi_instrumentator import Instrumentator

CACHE_HITS = Counter("model_server_cache_hits", "Predictions answered from the prediction cache.")
CACHE_MISSES = Counter("model_server_cache_misses", "Predictions computed because the cache had none.")

CACHE_SIZE = 400
#: The model server's LATENCY_BUCKETS (stack/model_server/app.py), so that the per-handler
#: p95 reads as it does there rather than ~95 ms within the default 0.1/0.5/1 s buckets.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
app = FastAPI()
cache: dict[int, float] = {}


@app.get("/predict")
def predict(user: int) -> dict[str, float]:
    if user % 50 == 0:
        raise HTTPException(status_code=500, detail="feature store unavailable")
    if user in cache:
        CACHE_HITS.inc()
    else:
        CACHE_MISSES.inc()
        time.sleep(random.uniform(0.001, 0.02))  # a model evaluation takes a while
        if len(cache) >= CACHE_SIZE:
            del cache[next(iter(cache))]  # evict the oldest entry
        cache[user] = random.random() / 20
    return {"score": cache[user]}


Instrumentator(excluded_handlers=["/metrics"]).instrument(app, latency_lowr_buckets=LATENCY_BUCKETS).expose(app)


def traffic(base: str) -> None:
    """Call /predict forever, for users drawn from a pool so that some calls hit the cache."""
    with httpx.Client(base_url=base, timeout=5) as client:
        while True:
            try:
                client.get("/predict", params={"user": random.randint(1, 1000)})
            except httpx.HTTPError:
                pass  # the server is starting or stopping
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    threading.Thread(target=traffic, args=(f"http://{args.host}:{args.port}",), daemon=True).start()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
