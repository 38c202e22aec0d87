"""``mlmon demo``: a self-contained SQLite store of two ad-style CTR models, kept growing, served.

The store holds three tables, written with naive UTC timestamps (naive means UTC):

- ``predictions(id, model_name, model_version, timestamp, score, country, device, hour,
  user_age_days)``: one row per served prediction, about one every 10 seconds per model
  (busier in the evening), scores are click probabilities of a few percent rounded to 4
  decimals as serving systems often log them; ``model_version`` is the day's date (a new
  model every day); the last four columns are the features the model was served, drawn as
  in training (:func:`_training_sample`; ``hour`` is the prediction's hour of day).
- ``labels(id, clicked, timestamp)``: rows only for clicks (``clicked = 1``), 1 to 30
  minutes after the prediction; an absent row means no click (``missing: negative``).
- ``replays(id, score)``: an offline re-computation of about 20% of the predictions.

``ctr_search`` is healthy. ``ctr_feed`` has three incidents that mlmon should show:
15% of its predictions stuck at one value (a broken feature fallback, high
``mlmon_prediction_mode_share_ratio``), training/serving skew on 30% of its replays
(``mlmon_replay_reproducibility_ratio`` about 0.7) and over-prediction (its served scores
are 1/0.7 times the true click probability, so clicks happen at 0.7 times the predicted
rate: ``mlmon_online_calibration_ratio`` about 1.43), and its feature pipeline serves
``user_age_days`` in hours instead of days (``served_age_factor`` 24: training/serving
feature skew, ``mlmon_feature_skew_psi{feature="user_age_days"}``). Both models' users click at the same
true rate as in their validation sets, so online log loss compares with offline log loss:
about 1.0 for ``ctr_search``, a few percent above it for ``ctr_feed`` (log loss hardly
moves with a 1.4x over-prediction; calibration is the metric that shows it).

Clicks are drawn by systematic sampling in time order (a running sum of the true click
probabilities; a click wherever it passes a whole number): each prediction clicks with its
probability, and any stretch of predictions gets its expected number of clicks to within
one, so a day's calibration reads what the demo intends (1.43, 1.00) instead of varying
by 10% from one start to the next.

mlmon's state database (a second SQLite file, see :func:`state_path`) holds 60 days of
daily training runs of both models (:func:`seed_training_runs`), one per version of the
prediction log. ``ctr_feed`` has two training incidents: the version of 3 days ago was
trained on half the usual rows (``mlmon_version_training_rows``), and the newest version
logs tablets as mobile (``mlmon_training_feature_psi{feature="device"}``) and scores worse
on validation (``mlmon_offline_logloss_change_ratio`` about 1.2): so it is not deployed,
and ``ctr_feed``'s predictions of its day are still served by the previous version (the
``model_version`` column), whose offline log loss the online one is compared with.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from exporter.client import build_training_run
from exporter.config import Settings, parse_settings
from exporter.predictions.stores import utc_now
from exporter.training.schema import as_utc
from exporter.training.storage import StateDatabase, save_run

log = logging.getLogger(__name__)

#: Mean gap between two predictions of one model.
MEAN_GAP_SECONDS = 10.0
#: How often the running demo appends new rows.
APPEND_EVERY_SECONDS = 5.0
REPLAY_SHARE = 0.2
#: Rows of the sample each training run is summarized from (the reported count is larger).
TRAINING_SAMPLE_ROWS = 4000
#: Rows of each validation set: enough that the day-to-day noise of the validation log
#: loss stays near 2%, so a healthy model's change ratios stay close to 1.
VALIDATION_ROWS = 50_000
COUNTRIES = {"US": 0.35, "GB": 0.12, "DE": 0.12, "FR": 0.10, "JP": 0.09, "BR": 0.08, "IN": 0.08, "CA": 0.06}
DEVICES = {"mobile": 0.62, "desktop": 0.28, "tablet": 0.10}

metadata = sa.MetaData()
predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("model_name", sa.Text, nullable=False),
    sa.Column("model_version", sa.Text, nullable=False),
    sa.Column("timestamp", sa.DateTime(), nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("country", sa.Text),
    sa.Column("device", sa.Text),
    sa.Column("hour", sa.Float),
    sa.Column("user_age_days", sa.Float),
    sa.Index("ix_predictions_model_time", "model_name", "timestamp"),
)
labels = sa.Table(
    "labels",
    metadata,
    sa.Column("id", sa.Integer, nullable=False, index=True),
    sa.Column("clicked", sa.Integer, nullable=False),
    sa.Column("timestamp", sa.DateTime(), nullable=False),
)
replays = sa.Table(
    "replays",
    metadata,
    sa.Column("id", sa.Integer, nullable=False, index=True),
    sa.Column("score", sa.Float, nullable=False),
)


@dataclass(frozen=True)
class DemoModel:
    """How one demo model behaves.

    True click probabilities follow Beta(mean * 60, (1 - mean) * 60), in the predictions
    and in the validation sets alike; the served score is the true probability divided by
    ``click_factor`` (1 is calibrated, 0.7 over-predicts by 1/0.7); ``stuck_share`` of the
    predictions are ``stuck_score`` whatever their probability; ``skew_share`` of the
    replays differ from the served score by 2-8%; the served ``user_age_days`` is the
    true one times ``served_age_factor`` (24: hours instead of days, a feature computed
    differently online than in training).

    Each daily version is trained on about ``training_rows`` rows (2% noise); the version
    ``half_rows_days_ago`` days before the newest on half of them; with ``broken_newest``
    the newest version's training data logs tablets as mobile and its validation scores
    are noisier and too high (log loss about 1.2 times the usual), and it is not deployed:
    the predictions of its day keep the previous version.
    """

    name: str
    mean: float
    click_factor: float = 1.0
    stuck_share: float = 0.0
    stuck_score: float = 0.0123
    skew_share: float = 0.0
    served_age_factor: float = 1.0
    training_rows: int = 4_000_000
    half_rows_days_ago: int | None = None
    broken_newest: bool = False


MODELS = (
    DemoModel("ctr_search", mean=0.03, training_rows=4_200_000),
    DemoModel(
        "ctr_feed",
        mean=0.03,
        click_factor=0.7,
        stuck_share=0.15,
        # The over-predicted mean 0.03 / 0.7, so that the stuck rows over-predict like the
        # others and the calibration ratio is 1/0.7 however many are stuck.
        stuck_score=0.0429,
        skew_share=0.3,
        served_age_factor=24.0,
        training_rows=3_100_000,
        # Inside the exported history (the newest 10 versions), so the dip shows there.
        half_rows_days_ago=3,
        broken_newest=True,
    ),
)


def _naive_utc(t: datetime) -> datetime:
    # The demo tables hold naive UTC date-times.
    return as_utc(t).replace(tzinfo=None)


def _times(start: datetime, end: datetime, rng: np.random.Generator) -> np.ndarray:
    """Sorted prediction times in ``[start, end)`` (naive UTC ``datetime64[us]``) of a
    Poisson process averaging one per ``MEAN_GAP_SECONDS``, with a daily cycle."""
    seconds = (end - start).total_seconds()
    # Thinning: draw at the peak rate, keep each with the relative rate of its hour,
    # which runs from 1/3 (08:00 UTC) to 1 (20:00 UTC) and averages 2/3.
    offsets = rng.uniform(0.0, seconds, rng.poisson(1.5 * seconds / MEAN_GAP_SECONDS))
    times = np.datetime64(start, "us") + (offsets * 1e6).astype("timedelta64[us]")
    hour = (times - times.astype("datetime64[D]")) / np.timedelta64(1, "h")
    keep = rng.uniform(size=times.size) < (1.0 + 0.5 * np.cos(2 * np.pi * (hour - 20.0) / 24.0)) / 1.5
    return np.sort(times[keep])


def _systematic_clicks(probability: np.ndarray, carry: float) -> tuple[np.ndarray, float]:
    """(clicked, new carry): row i clicks where ``carry + cumsum(probability)`` passes a
    whole number; ``carry`` in [0, 1) is where the running sum stood before the first row.
    Each row clicks with its own probability over a uniform ``carry`` (every probability
    below 1), and any run of rows gets the sum of its probabilities in clicks, to within 1."""
    running = carry + np.cumsum(probability)
    whole = np.floor(running)
    clicked = np.diff(whole, prepend=0.0) > 0
    return clicked, float(running[-1] - whole[-1])


def append(
    engine: sa.Engine,
    start: datetime,
    end: datetime,
    rng: np.random.Generator,
    *,
    held_from: datetime | None = None,
    click_carry: dict[str, float] | None = None,
) -> None:
    """Write every model's predictions with a time in ``[start, end)``, their replays and
    their clicks, in one transaction; ids continue after the largest existing id.

    A click's label row is written at once with its future time (1-30 minutes after the
    prediction): mlmon only counts labels older than its ``as_of``, so the row "arrives"
    when the clock passes it. ``start``, ``end`` and ``held_from`` are aware, or naive UTC.

    Args:
        held_from: from this time on, a ``broken_newest`` model's predictions keep the
            version of the day before (its newest version, trained that day, is not deployed).
        click_carry: model name -> where its running sum of click probabilities stood after
            the previous call (:func:`_systematic_clicks`), updated in place, so that the
            running demo's small appends stay systematic; a missing model starts at random.
    """
    start, end = _naive_utc(start), _naive_utc(end)
    held = _naive_utc(held_from) if held_from is not None else None
    carry = {} if click_carry is None else click_carry
    with engine.begin() as conn:
        next_id = (conn.execute(sa.select(sa.func.max(predictions.c.id))).scalar() or 0) + 1
        for model in MODELS:
            times = _times(start, end, rng)
            n = times.size
            if n == 0:
                continue
            ids = np.arange(next_id, next_id + n)
            next_id += n
            truth = rng.beta(model.mean * 60, (1 - model.mean) * 60, n)
            # Rounded like a serving log, but never to 0: a sigmoid does not output 0.
            scores = np.clip(np.round(truth / model.click_factor, 4), 1e-4, 1.0)
            scores[rng.uniform(size=n) < model.stuck_share] = model.stuck_score
            clicked, carry[model.name] = _systematic_clicks(truth, carry.get(model.name, rng.uniform()))
            versions = times.astype("datetime64[D]")
            if held is not None and model.broken_newest:
                day = np.datetime64(held, "D")
                versions = np.where(times >= np.datetime64(held, "us"), day - np.timedelta64(1, "D"), versions)
            click_delays = rng.uniform(60, 30 * 60, n).astype("timedelta64[s]")
            replayed = rng.uniform(size=n) < REPLAY_SHARE
            # Healthy replays differ by float noise only; skewed ones by a few percent either way.
            skewed = rng.uniform(size=n) < model.skew_share
            skew = np.where(skewed, rng.choice([-1, 1], n) * rng.uniform(0.02, 0.08, n), 0.0)
            replay_scores = scores * (1 + skew) + rng.uniform(-1e-9, 1e-9, n)
            features = _serving_features(rng, times, model.served_age_factor)
            conn.execute(
                predictions.insert(),
                [
                    {"id": i, "model_name": model.name, "model_version": f"{v:%Y-%m-%d}", "timestamp": t, "score": s}
                    | row
                    for i, v, t, s, row in zip(
                        ids.tolist(),
                        versions.tolist(),
                        times.tolist(),
                        scores.tolist(),
                        features.to_dict("records"),
                        strict=True,
                    )
                ],
            )
            if clicked.any():
                click_times = (times[clicked] + click_delays[clicked]).tolist()
                conn.execute(
                    labels.insert(),
                    [
                        {"id": i, "clicked": 1, "timestamp": t}
                        for i, t in zip(ids[clicked].tolist(), click_times, strict=False)
                    ],
                )
            if replayed.any():
                conn.execute(
                    replays.insert(),
                    [
                        {"id": i, "score": s}
                        for i, s in zip(ids[replayed].tolist(), replay_scores[replayed].tolist(), strict=False)
                    ],
                )


def newest_version_day(now: datetime) -> datetime:
    """00:00 UTC of ``now``'s day (naive UTC): when the newest version is trained, and from
    when a ``broken_newest`` model keeps serving the version before it."""
    return datetime.combine(_naive_utc(now).date(), time(0))


def seed(engine_or_url: sa.Engine | str, now: datetime, days: int = 7, rng_seed: int = 0) -> dict[str, float]:
    """Create the demo tables (if missing) and write ``days`` days of history up to ``now``
    (aware, or naive UTC), reproducibly for a given ``rng_seed``.

    Returns:
        The click carry to pass on to later :func:`append` calls.
    """
    engine = sa.create_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    try:
        metadata.create_all(engine)
        if engine.dialect.name == "sqlite":
            # WAL: the appender's writes and mlmon's read transactions do not block each other.
            with engine.begin() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        carry: dict[str, float] = {}
        rng = np.random.default_rng(rng_seed)
        append(engine, now - timedelta(days=days), now, rng, held_from=newest_version_day(now), click_carry=carry)
        return carry
    finally:
        if engine is not engine_or_url:
            engine.dispose()


def _training_sample(rng: np.random.Generator, tablets_as_mobile: bool, n: int = TRAINING_SAMPLE_ROWS) -> pd.DataFrame:
    """``n`` rows of one version's training features: two categorical ad features, the hour
    of day (fractional, busier in the evening like the predictions) and the user's account
    age in days (5% unknown)."""
    device = rng.choice(list(DEVICES), n, p=list(DEVICES.values()))
    if tablets_as_mobile:
        device[device == "tablet"] = "mobile"
    # Fractional, not whole hours: PSI bins are the reference's deciles, and on a feature
    # with 24 distinct values small sampling differences move whole deciles.
    # Rejection sampling keeps about 2/3 of a draw: drawn again until n are kept (a single
    # draw of 3n kept fewer than n now and then for the few rows of a 5 s batch).
    hour = np.empty(0)
    while hour.size < n:
        draw = rng.uniform(0.0, 24.0, 3 * n)
        kept = draw[rng.uniform(size=draw.size) < (1.0 + 0.5 * np.cos(2 * np.pi * (draw - 20.0) / 24.0)) / 1.5]
        hour = np.concatenate([hour, kept])
    hour = hour[:n]
    user_age_days = np.round(rng.lognormal(5.0, 1.2, n))
    user_age_days[rng.uniform(size=n) < 0.05] = np.nan
    return pd.DataFrame(
        {
            "country": rng.choice(list(COUNTRIES), n, p=list(COUNTRIES.values())),
            "device": device,
            "hour": hour,
            "user_age_days": user_age_days,
        }
    )


def _serving_features(rng: np.random.Generator, times: np.ndarray, age_factor: float) -> pd.DataFrame:
    """The features served with predictions at ``times``: drawn as in training, ``hour``
    the prediction's own hour of day, ``user_age_days`` times ``age_factor``; a missing age
    is NULL."""
    features = _training_sample(rng, tablets_as_mobile=False, n=times.size)
    features["hour"] = (times - times.astype("datetime64[D]")) / np.timedelta64(1, "h")
    features["user_age_days"] = features["user_age_days"] * age_factor
    return features.astype(object).where(features.notna(), None)


def _validation(rng: np.random.Generator, model: DemoModel, degraded: bool) -> tuple[np.ndarray, np.ndarray]:
    """(clicked, score) of a validation set: calibrated scores like the served ones, or
    degraded ones (log-normal noise around 1.3 times the truth, as from a model
    that lost a feature)."""
    truth = rng.beta(model.mean * 60, (1 - model.mean) * 60, VALIDATION_ROWS)
    clicked = rng.uniform(size=VALIDATION_ROWS) < truth
    score = truth * 1.3 * np.exp(rng.normal(0.0, 0.8, VALIDATION_ROWS)) if degraded else truth
    return clicked, np.clip(np.round(score, 4), 1e-4, 1.0)


def seed_training_runs(state_url: sa.URL | str, now: datetime, days: int = 60, rng_seed: int = 0) -> None:
    """Store one training run per model and day in mlmon's state database (migrated
    first): the versions of the ``days`` days up to ``now``'s (aware, or naive UTC),
    named like the prediction log's ``model_version`` (the day, ``YYYY-MM-DD``).

    Each version is trained at 00:00 UTC of its day, when the prediction log switches to
    it: so the newest one is trained before any ``now`` of its day (mlmon shows runs
    trained by its clock) and is the version the newest predictions were served by.
    Reproducible for a given ``rng_seed``; seeding the same days again changes nothing.
    """
    newest = _naive_utc(now).date()
    rng = np.random.default_rng(rng_seed)
    state = StateDatabase(state_url)
    try:
        engine = state.ready()
        for model in MODELS:
            for days_ago in range(days - 1, -1, -1):
                day = newest - timedelta(days=days_ago)
                broken = model.broken_newest and days_ago == 0
                rows = model.training_rows * rng.normal(1.0, 0.02)
                if days_ago == model.half_rows_days_ago:
                    rows /= 2
                run = build_training_run(
                    model=model.name,
                    version=f"{day:%Y-%m-%d}",
                    trained_at=datetime.combine(day, time(0), tzinfo=UTC),
                    training_data=_training_sample(rng, tablets_as_mobile=broken),
                    training_rows=round(rows),
                    validation=_validation(rng, model, degraded=broken),
                )
                save_run(engine, run, received_at=now)
    finally:
        state.engine.dispose()


def state_path(database_path: Path) -> Path:
    """mlmon's state database next to the demo store: ``mlmon-demo.sqlite`` ->
    ``mlmon-demo-state.sqlite``.

    A file of its own, as in a real deployment, where mlmon only reads the prediction
    store and owns (and migrates) its state database; and the demo's appender, which
    writes the store every few seconds, never holds a lock that a training run reported
    to the demo's API would wait for.
    """
    path = Path(database_path)
    return path.with_name(f"{path.stem}-state{path.suffix}")


def demo_settings(database_path: Path) -> Settings:
    """The mlmon configuration that monitors both demo models in the SQLite file, with its
    state database at :func:`state_path`."""
    source = {"store": "demo"}
    return parse_settings(
        {
            "refresh_interval": "10s",
            "stores": {"demo": {"url": f"sqlite:///{Path(database_path).resolve()}"}},
            "state": {"url": f"sqlite:///{state_path(database_path).resolve()}"},
            # Scores of a CTR model are continuous: 10% of them at one value is already a stuck
            # feature (the default 0.5 suits models with few distinct scores), and it makes
            # the feed's stuck predictions set off MlmonPredictionsDegenerate.
            "alerting": {"mode_share_ratio_max": 0.1},
            "models": [
                {
                    "name": model.name,
                    "predictions": {
                        **source,
                        "table": "predictions",
                        "columns": {"id": "id", "timestamp": "timestamp", "score": "score", "version": "model_version"},
                        "filter": {"model_name": model.name},
                        # rows are written in batches every APPEND_EVERY_SECONDS, after their timestamps
                        "ingestion_delay": f"{int(2 * APPEND_EVERY_SECONDS)}s",
                    },
                    "labels": {
                        **source,
                        "table": "labels",
                        "columns": {"id": "id", "label": "clicked", "timestamp": "timestamp"},
                        "missing": "negative",
                    },
                    "replays": {**source, "table": "replays", "columns": {"id": "id", "score": "score"}},
                    "features": {"numeric": ["user_age_days"], "categorical": ["country", "device"]},
                    "windows": ["1h", "24h"],
                    "label_delay": "1h",
                }
                for model in MODELS
            ],
        }
    )


async def _keep_appending(engine: sa.Engine, since: datetime, carry: dict[str, float]) -> None:
    rng = np.random.default_rng()
    held_from = newest_version_day(since)
    while True:
        await asyncio.sleep(APPEND_EVERY_SECONDS)
        now = utc_now()
        # In a thread: a write may wait on SQLite's lock while a refresh reads.
        try:
            await asyncio.to_thread(append, engine, since, now, rng, held_from=held_from, click_carry=carry)
        except Exception:  # logged, and the next batch tried: the demo keeps growing
            log.exception("demo: appending the predictions from %s to %s failed", since, now)
            continue
        since = now


async def _serve(server, sock: socket.socket, engine: sa.Engine, since: datetime, carry: dict[str, float]) -> None:
    appender = asyncio.create_task(_keep_appending(engine, since, carry))
    try:
        await server.serve(sockets=[sock])
    finally:
        appender.cancel()
        await asyncio.gather(appender, return_exceptions=True)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (with ``SO_REUSEADDR``, as uvicorn binds), so
    that a port in use is found before the demo spends seconds seeding its store.

    Raises:
        OSError: the address cannot be bound (in use, or not an address of this host);
            the message names it.
    """
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def run_demo(database: Path, host: str, port: int, log_level: int = logging.INFO) -> None:
    """Recreate ``database`` with a week of history and its state database with 60 days of
    training runs, then serve mlmon on them at ``host:port`` while appending new
    predictions every few seconds, until interrupted (Ctrl-C). ``log_level`` is the server's
    (``logging`` level; a line per request at ``DEBUG``, as ``mlmon serve``).

    Raises:
        OSError: ``host:port`` cannot be listened on (checked before seeding).
    """
    import uvicorn

    from exporter.server.app import create_app
    from exporter.server.http_server import server_config

    sock = listening_socket(host, port)
    settings = demo_settings(database)
    database.unlink(missing_ok=True)
    # Recreated too: runs of other days would be kept, and a day seeded again conflicts.
    state_path(database).unlink(missing_ok=True)
    engine = sa.create_engine(f"sqlite:///{database.resolve()}")
    # Disposed also when Ctrl-C comes while seeding: an open connection keeps the -wal and -shm files.
    try:
        now = utc_now()
        carry = seed(engine, now)
        seed_training_runs(settings.state.resolved_url(), now)
        half_rows_days_ago = next(m.half_rows_days_ago for m in MODELS if m.half_rows_days_ago is not None)
        half_rows_version = f"{_naive_utc(now) - timedelta(days=half_rows_days_ago):%Y-%m-%d}"
        server = uvicorn.Server(server_config(create_app(settings), settings, host, port, log_level=log_level))
        base = f"http://{host}:{port}"
        print(
            f"mlmon demo: {database}: a week of predictions of {' and '.join(m.name for m in MODELS)}.\n"
            f"  {state_path(database)}: 60 days of their daily training runs.\n"
            f"  open {base}/metrics (what Prometheus scrapes) and {base}/ (the landing page);\n"
            "  ctr_search is healthy; ctr_feed has incidents: stuck predictions (mlmon_prediction_mode_share_ratio),\n"
            "  training/serving skew (mlmon_replay_reproducibility_ratio) and over-prediction\n"
            "  (mlmon_online_calibration_ratio), and it is served user_age_days in hours instead of days\n"
            '  (mlmon_feature_skew_psi{feature="user_age_days"}); in training, its newest version logs tablets as mobile\n'
            '  (mlmon_training_feature_psi{feature="device"}) and regressed offline\n'
            "  (mlmon_offline_logloss_change_ratio about 1.2, so it is not deployed: the previous version serves),\n"
            f"  and version {half_rows_version} was trained on half the rows\n"
            "  (mlmon_version_training_rows; mlmon_training_rows_change_ratio shows such a drop while the version is newest).\n"
            "  New rows are appended every 5 s; Ctrl-C stops.",
            flush=True,
        )
        asyncio.run(_serve(server, sock, engine, now, carry))
    finally:
        engine.dispose()
        sock.close()
