"""The training-run API through the ASGI app, on a SQLite and a PostgreSQL state database."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient

from exporter.client import build_training_run
from exporter.config import parse_settings
from exporter.server.app import create_app
from exporter.training import storage
from exporter.training.schema import TrainingRun
from tests.conftest import table_locked

TOKEN = "t0ken-for-tests-0123456789"


def run(version="v1", **changes) -> dict:
    body = {
        "model": "ctr",
        "version": version,
        "trained_at": "2026-11-28T10:00:00Z",
        "training_rows": 1000,
        "validation_rows": 200,
        "validation_logloss": 0.31,
        "validation_roc_auc": 0.74,
        "features": [
            {
                "name": "country",
                "kind": "categorical",
                "count": 1000,
                "missing_ratio": 0.1,
                "categories": {"fr": 0.7, "__other__": 0.3},
            },
            {
                "name": "age",
                "kind": "numeric",
                "count": 1000,
                "missing_ratio": 0.0,
                "mean": 31.5,
                "stddev": 4.0,
                "min": 18.0,
                "max": 70.0,
                "percentiles": {"50": 30.0},
            },
        ],
    }
    body.update(changes)
    return body


def app_for(state_url: str, token: str | None = None, max_body_bytes: int | None = None):
    api = {"token": token} if token else {}
    if max_body_bytes:
        api["max_body_bytes"] = max_body_bytes
    return create_app(parse_settings({"stores": {}, "models": [], "state": {"url": state_url}, "api": api}))


def versions(client) -> list[dict]:
    """The stored versions of ``ctr``; [] only on the API's own 404 for an unknown model."""
    response = client.get("/api/v1/models/ctr/versions", headers={"Authorization": f"Bearer {TOKEN}"})
    if response.status_code == 404:
        return []
    assert response.status_code == 200, response.text
    return response.json()["versions"]


def test_report_is_idempotent_and_a_changed_body_conflicts(state_url):
    with TestClient(app_for(state_url)) as client:
        first = client.post("/api/v1/training-runs", json=run())
        assert first.status_code == 201 and first.json() == {
            "status": "created",
            "model": "ctr",
            "version": "v1",
            "in_config": False,  # the API serves models from training alone
        }
        # the same run with its keys in another order is the same run
        again = client.post(
            "/api/v1/training-runs",
            content=json.dumps(dict(reversed(run().items()))),
            headers={"content-type": "application/json"},
        )
        assert again.status_code == 200 and again.json()["status"] == "unchanged"
        conflict = client.post("/api/v1/training-runs", json=run(training_rows=999))
        assert conflict.status_code == 409 and "already stored with a different body" in conflict.json()["detail"]
        assert conflict.json()["detail"].endswith("or delete it first: DELETE /api/v1/models/ctr/versions/v1")
        assert [v["training_rows"] for v in versions(client)] == [1000]  # nothing overwritten
        assert client.get("/api/v1/models").json() == {"models": ["ctr"]}
        assert client.get("/api/v1/models/nope/versions").status_code == 404


def test_versions_are_listed_in_training_order_not_text_order(state_url):
    """Issue 11: versions appear in training order wherever a person reads them. Reported
    in an order that is neither their training order nor their text order (v10 < v3 as
    text), with two trained at the same instant: newest trained first, a tie by arrival
    (the later report first)."""
    trained = {  # version -> training day; v9b arrives after v9a, both trained on day 3
        "v3": 1,
        "v9a": 3,
        "v9b": 3,
        "v10": 10,
        "v11": 11,
        "v2-hotfix": 12,
    }
    arrival = ["v11", "v9a", "v2-hotfix", "v3", "v10", "v9b"]
    with TestClient(app_for(state_url)) as client:
        for version in arrival:
            body = run(version, trained_at=f"2026-11-{trained[version]:02d}T10:00:00Z")
            assert client.post("/api/v1/training-runs", json=body).status_code == 201
        listed = [v["version"] for v in versions(client)]
    by_hand = ["v2-hotfix", "v11", "v10", "v9b", "v9a", "v3"]
    assert listed == by_hand
    assert listed != sorted(listed, reverse=True)  # text order would differ


def test_token_required_when_configured(state_url, caplog):
    near_miss = TOKEN[:-1] + "X"
    with TestClient(app_for(state_url, token=TOKEN)) as client:
        assert client.post("/api/v1/training-runs", json=run()).status_code == 401
        assert client.post("/api/v1/training-runs", json=run(), headers={"Authorization": "Bearer "}).status_code == 401
        wrong = client.post("/api/v1/training-runs", json=run(), headers={"Authorization": f"Bearer {near_miss}"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in wrong.text and near_miss not in wrong.text
        assert TOKEN not in caplog.text and near_miss not in caplog.text
        assert client.get("/api/v1/models").status_code == 401
        ok = client.post("/api/v1/training-runs", json=run(), headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 201
        assert [v["version"] for v in versions(client)] == ["v1"]


@pytest.mark.parametrize(
    "changes, loc, message",
    [
        ({"training_rows": -1}, "training_rows", "greater than or equal to 0"),
        ({"training_rows": 2**63}, "training_rows", "less than or equal to 9223372036854775807"),  # over BIGINT
        ({"validation_roc_auc": 1.5}, "validation_roc_auc", "less than or equal to 1"),
        ({"version": "v 1/2"}, "version", "should match pattern"),
        # dot segments: curl and httpx drop them from the DELETE path (issue B4)
        ({"version": "."}, "version", "'.' cannot be a URL path segment"),
        ({"version": ".."}, "version", "'..' cannot be a URL path segment"),
        ({"model": ".."}, "model", "'..' cannot be a URL path segment"),
        ({"model": "ctr/a"}, "model", "should match pattern"),
        ({"trained_at": "yesterday"}, "trained_at", "datetime"),
        ({"colour": "blue"}, "colour", "Extra inputs are not permitted"),
        (
            {
                "features": [
                    {"name": "c", "kind": "categorical", "count": 3, "missing_ratio": 0.0, "categories": {"a": 0.5}}
                ]
            },
            "features[0].categories",
            "shares must sum to 1",
        ),
    ],
)
def test_invalid_run_rejected_whole_with_its_key_path(state_url, changes, loc, message):
    with TestClient(app_for(state_url)) as client:
        response = client.post("/api/v1/training-runs", json=run(**changes))
        assert response.status_code == 422
        (problem,) = response.json()["detail"]
        assert problem["loc"] == loc and message in problem["msg"]
        assert versions(client) == []


def test_the_client_refuses_names_the_api_refuses():
    with pytest.raises(ValueError, match="'..' cannot be a URL path segment"):
        build_training_run(model="ctr", version="..", trained_at="2026-11-28T00:00:00Z", training_rows=1)
    with pytest.raises(ValueError, match="'.' cannot be a URL path segment"):
        build_training_run(model=".", version="v1", trained_at="2026-11-28T00:00:00Z", training_rows=1)
    dotted = build_training_run(model="ctr.v2", version="1.0..2", trained_at="2026-11-28T00:00:00Z", training_rows=1)
    assert (dotted.model, dotted.version) == ("ctr.v2", "1.0..2")


def test_oversized_and_non_json_bodies_rejected(state_url):
    with TestClient(app_for(state_url, max_body_bytes=2048)) as client:
        big = run(extra_metrics={f"metric_number_{i}": 0.5 for i in range(100)})
        assert len(json.dumps(big)) > 2048
        assert client.post("/api/v1/training-runs", json=big).status_code == 413

        def chunks():  # no Content-Length: the limit applies to what is read
            yield json.dumps(big).encode()

        streamed = client.post("/api/v1/training-runs", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert (
            client.post(
                "/api/v1/training-runs", content=json.dumps(run()), headers={"content-type": "text/plain"}
            ).status_code
            == 415
        )
        assert (
            client.post(
                "/api/v1/training-runs", content=b"{not json", headers={"content-type": "application/json"}
            ).status_code
            == 422
        )
        assert versions(client) == []


def test_concurrent_reports_of_different_versions_are_all_stored(state_url):
    app = app_for(state_url)

    async def report_all():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mlmon") as client:
            responses = await asyncio.gather(
                *[client.post("/api/v1/training-runs", json=run(f"v{i}")) for i in range(20)],
                *[client.post("/api/v1/training-runs", json=run("v0")) for _ in range(5)],  # racing duplicates
            )
        return [r.status_code for r in responses]

    statuses = asyncio.run(report_all())
    assert statuses.count(201) == 20 and statuses.count(200) == 5
    with TestClient(app) as client:
        assert sorted(v["version"] for v in versions(client)) == sorted(f"v{i}" for i in range(20))


def test_state_database_down_answers_503_and_stores_nothing():
    with TestClient(app_for("postgresql+psycopg://mlmon@127.0.0.1:1/state")) as client:
        response = client.post("/api/v1/training-runs", json=run())
        assert response.status_code == 503 and "nothing was stored" in response.json()["detail"]
        deadline = time.monotonic() + 10  # the training refresh runs in the background
        while "mlmon_state_up 0.0" not in client.get("/metrics").text.splitlines():
            assert time.monotonic() < deadline, "mlmon_state_up 0 never exported"
            time.sleep(0.1)


@pytest.mark.long
def test_a_locked_state_database_answers_503_and_metrics_keep_refreshing(postgres_schema, postgres_engine, tmp_path):
    """Writes waiting on a lock end at query_timeout (statement_timeout) as 503s, and while
    they wait, more of them than the default executor has threads, /metrics still renders
    new refreshes (they must not queue behind the state database)."""
    url, schema = postgres_schema
    predictions = sa.create_engine(f"sqlite:///{tmp_path}/p.sqlite")
    with predictions.begin() as conn:
        conn.execute(sa.text("CREATE TABLE predictions (id INTEGER, ts TIMESTAMP, p FLOAT)"))
    settings = parse_settings(
        {
            "refresh_interval": "1s",
            "query_timeout": "3s",
            "stores": {"p": {"url": f"sqlite:///{tmp_path}/p.sqlite"}},
            "models": [
                {
                    "name": "ctr",
                    "predictions": {
                        "store": "p",
                        "table": "predictions",
                        "columns": {"id": "id", "timestamp": "ts", "score": "p"},
                    },
                }
            ],
            "state": {"url": f"{url}?options=-csearch_path%3D{schema}"},
        }
    )
    with TestClient(create_app(settings)) as client:
        assert client.post("/api/v1/training-runs", json=run("v0")).status_code == 201  # migrated, then locked
        with table_locked(postgres_engine, schema, "mlmon_training_runs", "EXCLUSIVE"):
            answers = []
            reports = [
                threading.Thread(
                    target=lambda i=i: answers.append(client.post("/api/v1/training-runs", json=run(f"v{i + 1}")))
                )
                for i in range(8)
            ]
            started = time.monotonic()
            for report in reports:
                report.start()
            refreshed = set()
            while any(report.is_alive() for report in reports):
                assert time.monotonic() - started < 30, "reports still waiting on the lock"
                for line in client.get("/metrics").text.splitlines():
                    if line.startswith('mlmon_refresh_last_success_timestamp_seconds{model="ctr"}'):
                        refreshed.add(line)
                time.sleep(0.2)
            waited = time.monotonic() - started
        assert len(refreshed) >= 3  # a new refresh on /metrics about every second meanwhile
        assert [a.status_code for a in answers] == [503] * 8
        assert answers[0].headers["retry-after"] == "5"
        assert waited < 2 * 3 + 3  # two rounds of 4 state-database threads, each cancelled at 3 s
        assert [v["version"] for v in versions(client)] == ["v0"]


def test_state_schema_is_created_by_migrations(state_url):
    with TestClient(app_for(state_url)) as client:
        assert client.post("/api/v1/training-runs", json=run()).status_code == 201
    engine = sa.create_engine(state_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM mlmon_alembic_version")).scalar() == "0004"
        assert conn.execute(sa.text("SELECT count(*) FROM mlmon_kept_slices")).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM mlmon_kept_online_slices")).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM mlmon_kept_replay_slices")).scalar() == 0
    engine.dispose()


def test_a_state_database_of_revision_0001_is_upgraded_keeping_its_runs(state_url):
    """A state database made by a version before the kept time slices (revision 0001, one
    run stored) gets their table on first use, its runs as they were."""
    engine = sa.create_engine(state_url)
    config = AlembicConfig()
    config.set_main_option("script_location", str(Path(storage.__file__).parent / "migrations"))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
    storage.save_run(engine, TrainingRun.model_validate(run()), datetime.now(UTC))
    engine.dispose()
    state = storage.StateDatabase(state_url)
    state.ready()
    with state.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM mlmon_alembic_version")).scalar() == "0004"
        assert conn.execute(sa.text("SELECT count(*) FROM mlmon_kept_slices")).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM mlmon_kept_online_slices")).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM mlmon_kept_replay_slices")).scalar() == 0
    assert [r.version for r in storage.list_versions(state.engine, "ctr")] == ["v1"]
    state.engine.dispose()


def test_a_state_database_of_revision_0002_is_upgraded_keeping_its_kept_slices(state_url):
    """A state database made by a version before the kept online slices (revision 0002, a
    kept time slice saved) gets their table on first use, as ``storage`` declares it, its
    kept slices as they were."""
    engine = sa.create_engine(state_url)
    config = AlembicConfig()
    config.set_main_option("script_location", str(Path(storage.__file__).parent / "migrations"))
    row = {
        "model": "ctr",
        "slice_start_us": 120_000_000,
        "fingerprint": "f" * 64,
        "hist": b"h",
        "top": b"t",
        "meta": "{}",
    }
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0002")
        conn.execute(storage.kept_slices.insert(), row)
    engine.dispose()
    state = storage.StateDatabase(state_url)
    state.ready()
    with state.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM mlmon_alembic_version")).scalar() == "0004"
        assert conn.execute(sa.text("SELECT count(*) FROM mlmon_kept_online_slices")).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM mlmon_kept_replay_slices")).scalar() == 0
        saved = conn.execute(sa.select(storage.kept_slices)).one()
        # The kept slices' tables are as storage.py declares them (it mirrors the migrations).
        context = MigrationContext.configure(conn, opts={"version_table": "mlmon_alembic_version"})
        differences = compare_metadata(context, storage.metadata)
    assert saved._asdict() == row
    assert not [d for d in differences if "kept" in repr(d)], differences
    state.engine.dispose()


def test_deeply_nested_json_is_rejected_cleanly(state_url):
    nested = "[" * 100_000 + "]" * 100_000
    with TestClient(app_for(state_url)) as client:
        response = client.post("/api/v1/training-runs", content=nested, headers={"content-type": "application/json"})
        assert response.status_code == 422
        assert versions(client) == []


def test_a_slow_client_gets_408(tmp_path):
    settings = parse_settings(
        {"stores": {}, "models": [], "state": {"url": f"sqlite:///{tmp_path}/s.sqlite"}, "api": {"body_timeout": "1s"}}
    )
    app = create_app(settings)

    async def slow_body():
        yield b'{"model": "ctr",'
        await asyncio.sleep(3)  # the rest never comes in time
        yield b' "version": "v1"}'

    async def post():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mlmon") as client:
            started = time.monotonic()
            response = await client.post(
                "/api/v1/training-runs", content=slow_body(), headers={"content-type": "application/json"}
            )
            return response, time.monotonic() - started

    response, elapsed = asyncio.run(post())
    assert response.status_code == 408 and "did not arrive within 1 s" in response.json()["detail"]
    assert elapsed < 3  # answered at the timeout, without waiting for the rest
