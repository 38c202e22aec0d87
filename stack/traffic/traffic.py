"""Traffic for the docker-compose stack: ad impressions sent to the model server at a
steady rate, click labels written later, replays for a sample, and incidents to switch on.

The world: each impression's click probability is the model's score of its real
features (the model was fitted on this world) times CLICK_RATE_FACTOR. Clicks are written
to ``labels`` LABEL_DELAY seconds after the prediction, and only clicks: no row means no
click (mlmon's ``missing: negative``). For a share of predictions an offline replay
re-scores the same features through the model server's /score and writes ``replays``.

Incidents (environment variables, 1 = on):
  STUCK_FEATURE=1      the feature lookup is stuck: every request carries the same feature
                       row, so every prediction is identical (mode share -> 1)
  DROP_TRAFFIC=1       no more requests: predictions stop arriving
  REPLAY_SKEW=1        the offline replay reads the ad position off by one: replays no
                       longer reproduce the served scores (training/serving skew)
  CLICK_RATE_FACTOR=x  users click x times as often as the model predicts (calibration)
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import sqlalchemy as sa

log = logging.getLogger("traffic")

metadata = sa.MetaData()
labels_table = sa.Table(
    "labels",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("clicked", sa.SmallInteger, nullable=False),
    sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
)
replays_table = sa.Table(
    "replays",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("score", sa.Float, nullable=False),
)

DEVICES = ("mobile", "desktop", "tablet")
STUCK_ROW = {"position": 3, "device": "mobile", "user_ctr": 0.021, "ad_quality": 0.5}


def _flag(env, name: str) -> bool:
    return env.get(name, "0").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    model_server_url: str = "http://model-server:8000"
    database_url: str = "sqlite:///predictions.sqlite"
    database_password: str | None = None
    rate: float = 20.0
    """Requests per second."""
    label_delay: float = 120.0
    """Seconds between a prediction and its click label."""
    replay_share: float = 0.1
    pool_size: int = 2000
    """Recurring impressions (popular users and ads), drawn with pool_share: the cache's hits."""
    pool_share: float = 0.7
    seed: int = 7
    stuck_feature: bool = False
    drop_traffic: bool = False
    replay_skew: bool = False
    click_rate_factor: float = 1.0
    heartbeat_file: str | None = None

    @classmethod
    def from_env(cls, env=os.environ) -> Settings:
        return cls(
            model_server_url=env.get("MODEL_SERVER_URL", cls.model_server_url),
            database_url=env.get("DATABASE_URL", cls.database_url),
            database_password=env.get("DATABASE_PASSWORD") or None,
            rate=float(env.get("RATE", cls.rate)),
            label_delay=float(env.get("LABEL_DELAY_SECONDS", cls.label_delay)),
            replay_share=float(env.get("REPLAY_SHARE", cls.replay_share)),
            seed=int(env.get("SEED", cls.seed)),
            stuck_feature=_flag(env, "STUCK_FEATURE"),
            drop_traffic=_flag(env, "DROP_TRAFFIC"),
            replay_skew=_flag(env, "REPLAY_SKEW"),
            click_rate_factor=float(env.get("CLICK_RATE_FACTOR", cls.click_rate_factor)),
            heartbeat_file=env.get("HEARTBEAT_FILE", "/tmp/traffic-heartbeat"),
        )


class Traffic:
    """One impression per ``step``; ``flush_labels`` writes the clicks that are due."""

    def __init__(self, settings: Settings, client: httpx.Client, engine: sa.Engine):
        self.settings = settings
        self.client = client
        self.engine = engine
        self.rng = random.Random(settings.seed)
        self.pool = [self._random_impression() for _ in range(settings.pool_size)]
        self.pending: deque[tuple[float, str]] = deque()  # (due time, prediction id) of clicks

    def _random_impression(self) -> dict:
        rng = self.rng
        return {
            "position": rng.randint(1, 10),
            "device": rng.choices(DEVICES, weights=(6, 3, 1))[0],
            "user_ctr": round(min(rng.betavariate(1.2, 40.0), 1.0), 3),
            "ad_quality": round(rng.random(), 2),
        }

    def impression(self) -> dict:
        """A popular impression from the pool (skewed towards its head) or a new one."""
        if self.pool and self.rng.random() < self.settings.pool_share:
            return self.pool[int(len(self.pool) * self.rng.random() ** 3)]
        return self._random_impression()

    def step(self, now: float) -> dict | None:
        """Send one request; schedule its click; maybe replay it. Returns the served prediction."""
        if self.settings.drop_traffic:
            return None
        real = self.impression()
        sent = STUCK_ROW if self.settings.stuck_feature else real
        served = self._post("/predict", sent)
        # Users react to the real ad, whatever features the model was given.
        truth = served["score"] if sent == real else self._post("/score", real)["score"]
        if self.rng.random() < min(1.0, truth * self.settings.click_rate_factor):
            self.pending.append((now + self.settings.label_delay, served["id"]))
        if self.rng.random() < self.settings.replay_share:
            self.replay(served["id"], sent)
        return served

    def replay(self, prediction_id: str, features: dict) -> None:
        """Re-score the logged features offline and store the result beside the served one."""
        offline = dict(features)
        if self.settings.replay_skew:
            offline["position"] = offline["position"] % 10 + 1  # 1 -> 2, ..., 10 -> 1: always wrong
        score = self._post("/score", offline)["score"]
        with self.engine.begin() as conn:
            conn.execute(replays_table.insert(), {"id": prediction_id, "score": score})

    def flush_labels(self, now: float) -> int:
        """Write the clicks whose delay has passed; returns how many."""
        due = []
        while self.pending and self.pending[0][0] <= now:
            due.append(self.pending.popleft()[1])
        if due:
            stamp = datetime.now(UTC)
            with self.engine.begin() as conn:
                conn.execute(labels_table.insert(), [{"id": i, "clicked": 1, "timestamp": stamp} for i in due])
        return len(due)

    def _post(self, path: str, features: dict) -> dict:
        response = self.client.post(path, json=features)
        response.raise_for_status()
        return response.json()

    def run(self) -> None:
        """Forever, at ``rate`` requests per second; a failure is logged, never fatal."""
        interval = 1.0 / self.settings.rate
        heartbeat = Path(self.settings.heartbeat_file) if self.settings.heartbeat_file else None
        next_time = time.monotonic()
        while True:
            try:
                self.step(time.monotonic())
                self.flush_labels(time.monotonic())
            except (httpx.HTTPError, sa.exc.SQLAlchemyError) as exc:
                log.warning("%s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                time.sleep(1.0)  # a down dependency: do not spin
            if heartbeat is not None:
                heartbeat.touch()  # the container's healthcheck reads its age
            next_time = max(next_time + interval, time.monotonic() - 1.0)
            time.sleep(max(0.0, next_time - time.monotonic()))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    url = sa.make_url(settings.database_url)
    if settings.database_password:
        url = url.set(password=settings.database_password)
    engine = sa.create_engine(url, pool_pre_ping=True)
    log.info(
        "%.1f requests/s to %s; incidents: stuck_feature=%s drop_traffic=%s replay_skew=%s click_rate_factor=%s",
        settings.rate,
        settings.model_server_url,
        settings.stuck_feature,
        settings.drop_traffic,
        settings.replay_skew,
        settings.click_rate_factor,
    )
    with httpx.Client(base_url=settings.model_server_url, timeout=5.0) as client:
        Traffic(settings, client, engine).run()


if __name__ == "__main__":
    main()
