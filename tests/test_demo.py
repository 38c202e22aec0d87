"""The demo store: its history shows a healthy and a broken CTR model through mlmon, and it grows."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import create_app
from exporter.demo import append, demo_settings, seed
from exporter.loop import refresh_once
from exporter.stores import utc_now

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
MODELS = ("ctr_search", "ctr_feed")


def _read(path, table: str) -> pd.DataFrame:
    """A whole demo table through plain sqlite3 and pandas, independent of mlmon and SQLAlchemy."""
    with sqlite3.connect(path) as conn:
        frame = pd.read_sql_query(f"SELECT * FROM {table}", conn)
    if "timestamp" in frame:
        frame["timestamp"] = pd.to_datetime(frame["timestamp"])
    return frame


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "demo.sqlite"
    seed(f"sqlite:///{path}", NOW)
    return path


@pytest.fixture(scope="module")
def samples(seeded) -> dict[tuple[str, str, str | None], float]:
    """(metric, model, window) -> value of the exposition mlmon serves at NOW."""
    text = refresh_once(demo_settings(seeded), NOW).decode()
    return {
        (s.name, s.labels.get("model"), s.labels.get("window")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_week_of_history_at_about_one_prediction_per_10_seconds(seeded):
    predictions = _read(seeded, "predictions")
    start = pd.Timestamp(NOW - timedelta(days=7)).tz_localize(None)
    assert predictions["timestamp"].min() >= start
    assert predictions["timestamp"].max() < pd.Timestamp(NOW).tz_localize(None)
    for model in MODELS:
        rows = predictions[predictions["model_name"] == model]
        assert 0.95 * 7 * 8640 < len(rows) < 1.05 * 7 * 8640
        assert rows["model_version"].nunique() == 8  # a version per calendar day touched by the week
        assert ((rows["score"] > 0) & (rows["score"] < 0.5)).all()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("window", ["1h", "24h"])
def test_window_counts_match_the_rows(seeded, samples, model, window):
    predictions = _read(seeded, "predictions")
    end = pd.Timestamp(NOW).tz_localize(None)
    start = end - pd.Timedelta(window)
    expected = (
        (predictions["model_name"] == model) & (predictions["timestamp"] >= start) & (predictions["timestamp"] < end)
    ).sum()
    assert expected > 100
    assert samples[("mlmon_window_predictions", model, window)] == expected


@pytest.mark.parametrize("window", ["1h", "24h"])
def test_stuck_feed_predictions_show_as_mode_share(samples, window):
    assert samples[("mlmon_prediction_mode_share_ratio", "ctr_feed", window)] > 0.1
    assert samples[("mlmon_prediction_mode_share_ratio", "ctr_search", window)] < 0.05


@pytest.mark.parametrize("window", ["1h", "24h"])
def test_feed_replays_are_not_reproduced(samples, window):
    assert samples[("mlmon_replay_predictions", "ctr_feed", window)] > 0
    assert samples[("mlmon_replay_reproducibility_ratio", "ctr_feed", window)] < 0.9
    assert samples[("mlmon_replay_reproducibility_ratio", "ctr_search", window)] == 1.0


def test_online_accuracy_and_calibration(samples):
    for model in MODELS:
        for window in ("1h", "24h"):
            assert 0 < samples[("mlmon_online_logloss", model, window)] < 1
            assert 0.5 < samples[("mlmon_online_roc_auc", model, window)] <= 1
    # 24h only: an hour holds ~10 clicks, too few for a stable ratio.
    assert samples[("mlmon_online_calibration_ratio", "ctr_feed", "24h")] > 1.2
    assert 0.8 < samples[("mlmon_online_calibration_ratio", "ctr_search", "24h")] < 1.2


def test_append_adds_predictions_replays_and_only_clicks(tmp_path):
    path = tmp_path / "demo.sqlite"
    seed(f"sqlite:///{path}", NOW, days=1)
    before = _read(path, "predictions")
    labels_before = _read(path, "labels")
    end = NOW + timedelta(minutes=30)
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        append(engine, NOW, end, np.random.default_rng(1))
    finally:
        engine.dispose()

    predictions, labels, replays = _read(path, "predictions"), _read(path, "labels"), _read(path, "replays")
    new = predictions[predictions["id"] > before["id"].max()]
    assert len(predictions) == len(before) + len(new)
    naive = [pd.Timestamp(t).tz_localize(None) for t in (NOW, end)]
    assert new["timestamp"].between(*naive, inclusive="left").all()
    assert set(new["model_name"]) == set(MODELS)
    assert predictions["id"].is_unique
    assert replays["id"].is_unique and replays["id"].isin(predictions["id"]).all()
    assert replays["id"].isin(new["id"]).any()

    assert (labels["clicked"] == 1).all()
    assert labels["id"].is_unique
    assert len(labels) > len(labels_before)
    joined = labels.merge(predictions, on="id", suffixes=("_label", "_prediction"), validate="one_to_one")
    delay = joined["timestamp_label"] - joined["timestamp_prediction"]
    assert delay.between(pd.Timedelta(minutes=1), pd.Timedelta(minutes=30)).all()


def test_app_serves_the_demo(tmp_path):
    path = tmp_path / "demo.sqlite"
    seed(f"sqlite:///{path}", utc_now(), days=1)
    with TestClient(create_app(demo_settings(path))) as client:
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the demo models were not refreshed within 10 s"
            time.sleep(0.1)
        response = client.get("/metrics")
    assert response.status_code == 200
    assert 'mlmon_window_predictions{model="ctr_feed",window="1h"}' in response.text
