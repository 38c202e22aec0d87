"""The exposition: catalog in sync with the code, exact text, promtool lint, the ASGI app
and `mlmon once`."""

from __future__ import annotations

import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from exporter.cli import app as cli
from exporter.config import parse_settings
from exporter.predictions import sources
from exporter.server.app import create_app
from exporter.server.collector import METRICS, build_registry, render
from exporter.server.loop import refresh_all
from exporter.server.web_config import REFUSAL_REASONS
from tests.conftest import catalog, model_settings, refresh_once, require

AS_OF = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_catalog_lists_exactly_the_metrics_of_the_code():
    documented = catalog()
    assert set(documented) == set(METRICS)
    for name, spec in METRICS.items():
        assert documented[name] == (spec.type, spec.labels), name


def _store(path: Path) -> str:
    """A small SQLite store: 4 predictions in the last hour (0.1, 0.2, 0.2, 0.5), labels for 3."""
    url = f"sqlite:///{path}"
    _fill(url, None)
    return url


def _fill(url: str, schema: str | None, as_of: datetime = AS_OF) -> None:
    engine = sa.create_engine(url)
    metadata = sa.MetaData(schema=schema)
    predictions = sa.Table(
        "predictions", metadata, sa.Column("id", sa.Integer), sa.Column("ts", sa.DateTime), sa.Column("p", sa.Double)
    )
    labels = sa.Table("labels", metadata, sa.Column("id", sa.Integer), sa.Column("y", sa.Integer))
    replays = sa.Table("replays", metadata, sa.Column("id", sa.Integer), sa.Column("p", sa.Double))
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            predictions.insert(),
            [
                {"id": i, "ts": (as_of - timedelta(minutes=minutes)).replace(tzinfo=None), "p": score}
                for i, (minutes, score) in enumerate([(10, 0.1), (20, 0.2), (30, 0.2), (40, 0.5)])
            ],
        )
        conn.execute(labels.insert(), [{"id": 0, "y": 0}, {"id": 1, "y": 1}, {"id": 3, "y": 1}])
        conn.execute(replays.insert(), [{"id": 0, "p": 0.1}, {"id": 1, "p": 0.25}])
    engine.dispose()


def _settings(url: str, schema: str | None = None, **model):
    return model_settings(url, schema, replays=True, model=model)


def test_exact_exposition_lines(tmp_path):
    text = refresh_once(_settings(_store(tmp_path / "s.sqlite")), AS_OF).decode()
    for line in [
        'mlmon_window_predictions{model="ctr",window="1h"} 4.0',
        'mlmon_prediction_score_mean{model="ctr",window="1h"} 0.25',
        'mlmon_prediction_score_percentile{model="ctr",percentile="50",window="1h"} 0.2',
        'mlmon_prediction_mode_share_ratio{model="ctr",window="1h"} 0.5',
        'mlmon_online_labeled_predictions{model="ctr",window="1h"} 3.0',
        'mlmon_online_positive_ratio{model="ctr",window="1h"} 0.6666666666666666',
        # labeled (0.1, y=0), (0.2, y=1), (0.5, y=1): every positive ranks above the negative
        'mlmon_online_roc_auc{model="ctr",window="1h"} 1.0',
        'mlmon_online_label_coverage_ratio{model="ctr",window="1h"} 0.75',
        'mlmon_replay_predictions{model="ctr",window="1h"} 2.0',
        'mlmon_replay_reproducibility_ratio{model="ctr",window="1h"} 0.5',
        'mlmon_source_up{model="ctr",source="predictions"} 1.0',
        'mlmon_refresh_errors_total{model="ctr",reason="timeout",source="labels"} 0.0',  # present before any error
        'mlmon_predictions_total{model="ctr"} 0.0',
        'mlmon_prediction_score_bucket{le="+Inf",model="ctr"} 0.0',
        'mlmon_build_info{version="0.1.0"} 1.0',
    ]:
        assert line in text.splitlines(), line
    assert "# TYPE mlmon_predictions_total counter" in text
    assert "# TYPE mlmon_prediction_score histogram" in text
    assert "nan" not in text.lower().replace("nan_score", "")


def _report_runs(settings) -> None:
    """Three training runs of ``ctr``: 40 days ago, yesterday and now (relative to AS_OF)."""
    from exporter.training.schema import TrainingRun
    from exporter.training.storage import StateDatabase, save_run

    state = StateDatabase(settings.state.resolved_url())
    feature = {
        "name": "country",
        "kind": "categorical",
        "count": 10,
        "missing_ratio": 0.1,
        "categories": {"fr": 0.6, "__other__": 0.4},
    }
    for days, rows in [(40, 1000), (1, 900), (0, 500)]:
        run = TrainingRun(
            model="ctr",
            version=f"v{40 - days}",
            trained_at=AS_OF - timedelta(days=days),
            training_rows=rows,
            validation_rows=100,
            validation_logloss=0.2,
            validation_roc_auc=0.8,
            features=[
                feature,
                {"name": "device", "kind": "categorical", "count": 10, "missing_ratio": 0.0, "categories": {"a": 1.0}},
                {
                    "name": "age",
                    "kind": "numeric",
                    "count": 10,
                    "missing_ratio": 0.0,
                    "mean": 30.0,
                    "stddev": 5.0,
                    "min": 20.0,
                    "max": 40.0,
                    "percentiles": {"50": 30.0},
                },
            ],
        )
        save_run(state.ready(), run, AS_OF)
    state.engine.dispose()


def _full_exposition(tmp_path) -> str:
    """An exposition holding every mlmon metric: a model with bucketed AUC and one whose
    replay table is missing (so errors and source_up 0 appear), with training runs, and
    basic auth's refusal counters."""
    url = _store(tmp_path / "s.sqlite")
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # 0.25 (negative) shares the 0.2x bucket with 0.2 (positive)
        conn.execute(
            sa.text("INSERT INTO predictions VALUES (4, :ts, 0.25)"),
            {"ts": (AS_OF - timedelta(minutes=45)).replace(tzinfo=None)},
        )
        conn.execute(sa.text("INSERT INTO labels VALUES (4, 0)"))
        for i, (minutes, score) in enumerate([(46, 0.26), (47, 0.27)], start=5):  # a slice of two scores
            conn.execute(
                sa.text("INSERT INTO predictions VALUES (:i, :ts, :p)"),
                {"i": i, "ts": (AS_OF - timedelta(minutes=minutes)).replace(tzinfo=None), "p": score},
            )
        # serving features, compared with the training runs' (the newest version: no version column)
        for column in ("age REAL", "country TEXT", "device TEXT"):
            conn.execute(sa.text(f"ALTER TABLE predictions ADD COLUMN {column}"))
        conn.execute(sa.text("UPDATE predictions SET age = 20 + id, country = 'fr', device = 'b'"))
    engine.dispose()
    features = {"numeric": ["age"], "categorical": ["country", "device"]}
    bucketed = _settings(url, bucket_decimals=1, features=features, time_slice="auto", slice_fill_refreshes=1).models[0]
    broken = bucketed.model_copy(
        update={"name": "broken", "replays": bucketed.replays.model_copy(update={"table": "gone"})}
    )
    settings = _settings(url).model_copy(update={"models": [bucketed, broken]})
    _report_runs(settings)
    # Time slices that keep only their most frequent score: the mode share gets an error bound.
    with mock.patch.object(sources, "TOP_SCORES", 1):
        store = refresh_all(settings, AS_OF)
    store.count_auth_refusals(REFUSAL_REASONS)  # as `mlmon serve` does with basic_auth_users
    return render(build_registry(store, settings.thresholds)).decode()


def test_every_exposed_metric_is_cataloged_and_every_cataloged_one_exposed(tmp_path):
    families = {f.name: f.type for f in text_string_to_metric_families(_full_exposition(tmp_path))}
    exposed = {
        name + ("_total" if kind == "counter" else ""): kind
        for name, kind in families.items()
        if name.startswith("mlmon_")
    }
    documented = catalog()
    assert set(exposed) == set(documented)
    assert all(documented[name][0] == kind for name, kind in exposed.items())


def test_promtool_check_metrics_is_clean(tmp_path):
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool not installed (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=_full_exposition(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stdout + result.stderr


@pytest.fixture(params=["sqlite", "postgresql"])
def live_store(request, tmp_path):
    """(url, schema) of the small store stamped relative to the wall clock (the app
    refreshes at now), in SQLite or in a fresh PostgreSQL schema."""
    url, schema = f"sqlite:///{tmp_path}/s.sqlite", None
    if request.param == "postgresql":
        url, schema = request.getfixturevalue("postgres_schema")
    _fill(url, schema, as_of=datetime.now(UTC))
    return url, schema


def test_asgi_app_serves_metrics_health_and_readiness(live_store):
    url, schema = live_store
    settings = _settings(url, schema)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "no first refresh within 10 s"
            time.sleep(0.05)
        response = client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(response.text)}
        up = {s.labels["source"]: s.value for s in families["mlmon_source_up"].samples}
        assert up == {"predictions": 1.0, "labels": 1.0, "replays": 1.0}
        values = {s.name: s.value for f in families.values() for s in f.samples if s.labels.get("window") == "1h"}
        assert values["mlmon_window_predictions"] == 4
        assert values["mlmon_prediction_mode_share_ratio"] == 0.5
        assert values["mlmon_online_labeled_predictions"] == 3
        assert "process_resident_memory_bytes" in families
        assert 'href="metrics"' in client.get("/").text


def test_readyz_is_503_before_the_first_refresh(tmp_path):
    settings = _settings(_store(tmp_path / "s.sqlite"))
    client = TestClient(create_app(settings))  # no context manager: the lifespan never starts
    assert client.get("/readyz").status_code == 503


def test_once_prints_the_exposition_at_as_of(tmp_path):
    url = _store(tmp_path / "s.sqlite")
    config = tmp_path / "mlmon.yml"
    config.write_text(
        f"""
stores: {{s: {{url: "{url}"}}}}
models:
  - name: ctr
    predictions: {{store: s, table: predictions, columns: {{id: id, timestamp: ts, score: p}}}}
    windows: [1h]
"""
    )
    result = CliRunner().invoke(cli, ["once", "--config", str(config), "--as-of", "2026-03-01T12:00:00Z"])
    assert result.exit_code == 0, result.output
    assert 'mlmon_window_predictions{model="ctr",window="1h"} 4.0' in result.stdout.splitlines()
    later = CliRunner().invoke(cli, ["once", "--config", str(config), "--as-of", "2026-03-01T12:35:00+00:00"])
    assert 'mlmon_window_predictions{model="ctr",window="1h"} 2.0' in later.stdout.splitlines()
    bad = CliRunner().invoke(cli, ["once", "--config", str(config), "--as-of", "yesterday"])
    assert bad.exit_code == 2 and "--as-of" in bad.output
    config.write_text(config.read_text().replace("table: predictions", "table: gone"))
    failed = CliRunner().invoke(cli, ["once", "--config", str(config)])
    assert failed.exit_code == 1 and "failed source(s): ctr/predictions" in failed.output
    assert 'mlmon_source_up{model="ctr",source="predictions"} 0.0' in failed.stdout.splitlines()


def test_mode_share_rounds_half_up_to_the_configured_decimals(tmp_path):
    url = f"sqlite:///{tmp_path}/s.sqlite"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE predictions (id INTEGER, ts TIMESTAMP, p FLOAT)"))
        # to 2 decimals: 0.10, 0.10, 0.11, 0.11, 0.11, 0.20 -> the mode 0.11 holds 3 of 6
        for i, score in enumerate([0.101, 0.104, 0.106, 0.109, 0.1149, 0.2]):
            ts = (AS_OF - timedelta(minutes=i + 1)).replace(tzinfo=None)
            conn.execute(sa.text("INSERT INTO predictions VALUES (:i, :ts, :p)"), {"i": i, "ts": ts, "p": score})
    settings = parse_settings(
        {
            "stores": {"s": {"url": url}},
            "models": [
                {
                    "name": "ctr",
                    "predictions": {
                        "store": "s",
                        "table": "predictions",
                        "columns": {"id": "id", "timestamp": "ts", "score": "p"},
                    },
                    "windows": ["1h"],
                    "mode_share_decimals": 2,
                }
            ],
        }
    )
    text = refresh_once(settings, AS_OF).decode()
    assert 'mlmon_prediction_mode_share_ratio{model="ctr",window="1h"} 0.5' in text.splitlines()
