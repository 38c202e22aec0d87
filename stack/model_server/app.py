"""A small CTR model server for the docker-compose stack: the thing mlmon watches.

A scikit-learn LogisticRegression, trained at startup on a deterministic synthetic
click data set (no downloads), served by FastAPI with a prediction cache. Every served
prediction is logged to the prediction store (id, model_name, model_version, timestamp,
score): that table is what mlmon reads. Instrumented the way a real model server would
be: prometheus-fastapi-instrumentator (http_requests_total, latencies), the process
collector (CPU, memory) and the cache counters that the "Serving system" dashboard uses.

Settings come from the environment: DATABASE_URL (a SQLAlchemy URL), DATABASE_PASSWORD
(kept out of the URL), MODEL_NAME, MODEL_VERSION, CACHE_SIZE.

Run: uvicorn --factory app:create_app
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, GCCollector, PlatformCollector, ProcessCollector
from prometheus_fastapi_instrumentator import Instrumentator
from pydantic import BaseModel, ConfigDict, Field
from sklearn.linear_model import LogisticRegression

log = logging.getLogger("model_server")

#: Upper bounds (seconds) of http_request_duration_seconds, the per-handler histogram: a
#: model server answers in milliseconds, so the instrumentator's default 0.1/0.5/1 s
#: would put every request in the first bucket and a p95 would read ~95 ms whatever the
#: latency. Twelve bounds from 1 ms to 2.5 s, times the handlers, stay a few series.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)

DEVICES = ("mobile", "desktop", "tablet")
# The synthetic world's click model: logit = INTERCEPT + design_matrix(...) @ COEF. The
# served model is fitted on samples of it, so in normal operation it is well calibrated
# and mlmon's online metrics look healthy until an incident is switched on.
TRUE_INTERCEPT = -3.4
TRUE_COEF = np.array([-0.18, 0.35, -0.25, 9.0, 1.1])  # position, mobile, tablet, user_ctr, ad_quality
TRAINING_ROWS = 50_000
TRAINING_SEED = 20240101

predictions_table = sa.Table(
    "predictions",
    sa.MetaData(),
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("model_name", sa.Text, nullable=False),
    sa.Column("model_version", sa.Text, nullable=False),
    sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
    sa.Column("score", sa.Float, nullable=False),
)


class Features(BaseModel):
    """One ad impression to score."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    position: int = Field(ge=1, le=10, description="ad slot, 1 is the top")
    device: Literal["mobile", "desktop", "tablet"]
    user_ctr: float = Field(ge=0, le=1, description="the user's historical click-through rate")
    ad_quality: float = Field(ge=0, le=1)


def design_matrix(position, device_index, user_ctr, ad_quality) -> np.ndarray:
    """Model inputs as float64 columns: position, is_mobile, is_tablet, user_ctr, ad_quality."""
    device_index = np.asarray(device_index)
    return np.column_stack(
        [
            np.asarray(position, dtype=np.float64),
            (device_index == 0).astype(np.float64),
            (device_index == 2).astype(np.float64),
            np.asarray(user_ctr, dtype=np.float64),
            np.asarray(ad_quality, dtype=np.float64),
        ]
    )


def synthetic_clicks(rows: int = TRAINING_ROWS, seed: int = TRAINING_SEED) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic CTR-like training set: (X, clicked), about 3 % positives."""
    rng = np.random.default_rng(seed)
    x = design_matrix(
        rng.integers(1, 11, rows),
        rng.choice(3, rows, p=[0.6, 0.3, 0.1]),
        np.round(rng.beta(1.2, 40.0, rows), 3),
        np.round(rng.uniform(0.0, 1.0, rows), 2),
    )
    probability = 1.0 / (1.0 + np.exp(-(TRUE_INTERCEPT + x @ TRUE_COEF)))
    return x, (rng.random(rows) < probability).astype(np.int8)


def train_model() -> LogisticRegression:
    x, y = synthetic_clicks()
    return LogisticRegression(C=10.0, max_iter=1000).fit(x, y)


class PredictionCache:
    """A bounded LRU cache of scores by feature values, shared by the request threads."""

    def __init__(self, size: int):
        self.size = size
        self._scores: OrderedDict[tuple, float] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> float | None:
        with self._lock:
            score = self._scores.get(key)
            if score is not None:
                self._scores.move_to_end(key)
            return score

    def put(self, key: tuple, score: float) -> None:
        with self._lock:
            self._scores[key] = score
            self._scores.move_to_end(key)
            while len(self._scores) > self.size:
                self._scores.popitem(last=False)


def database_engine(url: str, password: str | None) -> sa.Engine:
    parsed = sa.make_url(url)
    if password:
        parsed = parsed.set(password=password)
    # pool_pre_ping: the stack's PostgreSQL may restart under a running server.
    return sa.create_engine(parsed, pool_pre_ping=True)


def create_app(
    database_url: str | None = None,
    database_password: str | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
    cache_size: int | None = None,
) -> FastAPI:
    """The ASGI app; arguments left out come from the environment. Each app has its own
    metrics registry, so tests can build several in one process."""
    env = os.environ
    engine = database_engine(
        database_url or env.get("DATABASE_URL", "sqlite:///predictions.sqlite"),
        database_password if database_password is not None else env.get("DATABASE_PASSWORD"),
    )
    model_name = model_name or env.get("MODEL_NAME", "ctr")
    model_version = model_version or env.get("MODEL_VERSION", "v1")
    cache = PredictionCache(cache_size or int(env.get("CACHE_SIZE", "10000")))
    model = train_model()

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    cache_hits = Counter("model_server_cache_hits", "Predictions answered from the cache.", registry=registry)
    cache_misses = Counter("model_server_cache_misses", "Predictions computed by the model.", registry=registry)
    log_errors = Counter(
        "model_server_prediction_log_errors", "Predictions served but not logged to the store.", registry=registry
    )

    def score(features: Features) -> float:
        x = design_matrix(
            [features.position], [DEVICES.index(features.device)], [features.user_ctr], [features.ad_quality]
        )
        return float(model.predict_proba(x)[0, 1])

    app = FastAPI(title="mlmon stack model server")

    @app.post("/predict")
    def predict(features: Features) -> dict:
        """Serve a score (from the cache when these features were seen) and log it."""
        key = (features.position, features.device, features.user_ctr, features.ad_quality)
        value = cache.get(key)
        if value is None:
            cache_misses.inc()
            value = score(features)
            cache.put(key, value)
        else:
            cache_hits.inc()
        row = {
            "id": uuid.uuid4().hex,
            "model_name": model_name,
            "model_version": model_version,
            "timestamp": datetime.now(UTC),
            "score": value,
        }
        try:
            with engine.begin() as conn:
                conn.execute(predictions_table.insert(), row)
        except sa.exc.SQLAlchemyError as exc:
            # Serving goes on when the log store is down; the gap shows in mlmon's metrics.
            log_errors.inc()
            log.warning("prediction %s not logged: %s", row["id"], str(exc).splitlines()[0])
        return {**row, "timestamp": row["timestamp"].isoformat()}

    @app.post("/score")
    def offline_score(features: Features) -> dict:
        """Score without cache or log: what an offline replay job computes."""
        return {"score": score(features), "model_name": model_name, "model_version": model_version}

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok\n"

    Instrumentator(registry=registry, excluded_handlers=["/metrics"]).instrument(
        app, latency_lowr_buckets=LATENCY_BUCKETS
    ).expose(app, include_in_schema=False)
    app.state.engine = engine
    return app
