"""The training-run API when something real breaks: every accepted run is stored exactly
once, every rejected one not at all.

- The state database (the real PostgreSQL behind a loopback proxy the test cuts and
  reopens) away while one app keeps running: reports get a clean 503 with
  ``Retry-After`` and store nothing, reads fail cleanly too; once it is back the same
  report is stored once without restarting mlmon, and again answers 200 and stores
  nothing more. A restart between two requests costs no failed request: the pool
  notices its dead connections (pre-ping) instead of handing them out.
- ``mlmon serve`` SIGKILLed while its insert waits on a lock: the uncommitted insert is
  rolled back by PostgreSQL, no session is left in a transaction, the client (``mlmon
  report-training``, as a pipeline runs it) sees no success, and its retry stores the run
  once on the next server.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from exporter.config import parse_settings
from exporter.server.app import create_app
from exporter.training.api import RETRY_AFTER_SECONDS
from exporter.training.storage import migrate
from tests.conftest import free_port, open_transactions, start_process, wait_until_answers
from tests.integration.training.test_training_api import run
from tests.pg_proxy import Proxy

pytestmark = pytest.mark.postgres

UNAVAILABLE = "the state database is unavailable; nothing was stored, retry later"

# The training refresh reads the state database on its own only every hour here, so that
# the requests of the test are what meets a dead or a restarted database first.
REFRESH_INTERVAL = "1h"


def _state_url(url: str, schema: str, port: int = 5432) -> str:
    return f"{url.replace('127.0.0.1:5432', f'127.0.0.1:{port}')}?options=-csearch_path%3D{schema}"


def _stored(engine: sa.Engine, schema: str) -> dict[str, int]:
    """version -> rows stored, read on the real server (not through mlmon or the proxy)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f'SELECT version, count(*) FROM "{schema}".mlmon_training_runs GROUP BY version'))
        return dict(rows.all())


def _wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.05)


def _wait_trained(client: TestClient, version: str) -> None:
    """Wait for the training refresh that follows a stored run: then nothing but the test's
    own requests uses the state database (the next refresh is an hour away)."""
    line = f'mlmon_version_training_rows{{model="ctr",version="{version}"}} 1000.0'
    _wait_until(lambda: line in client.get("/metrics").text.splitlines(), 10, f"{line} on /metrics")


def test_state_database_away_then_back_while_mlmon_runs(postgres_schema, postgres_engine, caplog):
    url, schema = postgres_schema
    proxy = Proxy()
    proxy.start()
    state = {"url": _state_url(url, schema, proxy.port)}
    settings = parse_settings({"refresh_interval": REFRESH_INTERVAL, "stores": {}, "models": [], "state": state})
    caplog.set_level(logging.INFO)
    try:
        with TestClient(create_app(settings)) as client:
            # The pool now holds a connection.
            assert client.post("/api/v1/training-runs", json=run("v0")).status_code == 201
            _wait_trained(client, "v0")

            proxy.stop()  # the database goes away: pooled connections cut, new ones refused
            for attempt in range(3):
                response = client.post("/api/v1/training-runs", json=run("v1"))
                assert response.status_code == 503, (attempt, response.text)
                assert response.json() == {"detail": UNAVAILABLE}
                assert response.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
            for path in ("/api/v1/models", "/api/v1/models/ctr/versions"):
                response = client.get(path)
                assert response.status_code == 503 and response.headers["retry-after"] == str(RETRY_AFTER_SECONDS), path
                assert set(response.json()) == {"detail"}
            assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200
            assert _stored(postgres_engine, schema) == {"v0": 1}
            assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
            assert "state database failed" in caplog.text  # logged as one line

            proxy.start()  # back; the same app, never restarted
            first = client.post("/api/v1/training-runs", json=run("v1"))
            assert first.status_code == 201 and first.json()["status"] == "created", first.text
            again = client.post("/api/v1/training-runs", json=run("v1"))
            assert again.status_code == 200 and again.json()["status"] == "unchanged", again.text
            assert _stored(postgres_engine, schema) == {"v0": 1, "v1": 1}
            assert [v["version"] for v in client.get("/api/v1/models/ctr/versions").json()["versions"]] == ["v1", "v0"]
            _wait_trained(client, "v1")  # the training metrics recovered too

            # A restart between two requests: every pooled connection is dead when the
            # next request comes. Pre-ping replaces them; the request itself succeeds.
            proxy.stop()
            proxy.start()
            response = client.post("/api/v1/training-runs", json=run("v2"))
            assert response.status_code == 201, response.text
            assert _stored(postgres_engine, schema) == {"v0": 1, "v1": 1, "v2": 1}
            assert client.get("/api/v1/models").json() == {"models": ["ctr"]}
            _wait_trained(client, "v2")  # a refresh in flight is briefly "idle in transaction"
            assert open_transactions(postgres_engine, schema) == []
    finally:
        proxy.stop()


def _serve(config: Path, port: int, log: Path) -> subprocess.Popen:
    return start_process([sys.executable, "-m", "exporter", "serve", "--config", str(config), "--port", str(port)], log)


@pytest.mark.long
def test_a_crash_between_request_and_commit_stores_nothing_and_the_retry_stores_once(
    postgres_schema, postgres_engine, tmp_path
):
    url, schema = postgres_schema
    state_url = _state_url(url, schema)
    engine = sa.create_engine(state_url)
    migrate(engine)  # the table must exist to be locked before the first request
    engine.dispose()
    config = tmp_path / "mlmon.yml"
    config.write_text(
        f'refresh_interval: {REFRESH_INTERVAL}\nstores: {{}}\nmodels: []\nstate: {{url: "{state_url}"}}\n'
    )
    (tmp_path / "run.json").write_text(json.dumps(run("v1")))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_log, client_out, client_err = tmp_path / "server.log", tmp_path / "client.out", tmp_path / "client.err"
    env = {k: v for k, v in os.environ.items() if k != "MLMON_API_TOKEN"}
    report = [sys.executable, "-m", "exporter", "report-training", "--url", base, str(tmp_path / "run.json")]

    servers: list[subprocess.Popen] = [_serve(config, port, server_log)]
    holder = postgres_engine.connect()
    lock = holder.begin()
    client = None
    try:
        wait_until_answers(f"{base}/healthz", servers[0], server_log, timeout=15)
        # EXCLUSIVE blocks inserts but not reads: mlmon's training refresh is not held up.
        holder.execute(sa.text(f'LOCK TABLE "{schema}".mlmon_training_runs IN EXCLUSIVE MODE'))
        with client_out.open("wb") as out, client_err.open("wb") as err:
            client = subprocess.Popen(report, stdout=out, stderr=err, env=env)

        def waiting_insert() -> int | None:
            with postgres_engine.connect() as conn:
                return conn.execute(
                    sa.text(
                        "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
                        "WHERE l.relation = CAST(:table AS regclass) AND NOT l.granted "
                        "AND a.application_name = 'mlmon' AND a.query LIKE 'INSERT INTO mlmon_training_runs%'"
                    ),
                    {"table": f'"{schema}".mlmon_training_runs'},
                ).scalar()

        _wait_until(lambda: waiting_insert() is not None, 10, "mlmon's insert waiting on the lock")
        backend = waiting_insert()

        servers[0].kill()  # SIGKILL: no shutdown handler, no rollback sent by mlmon
        servers[0].wait(5)
        # The client saw its connection cut, not an answer, and is retrying.
        _wait_until(lambda: "retrying in" in client_err.read_text(), 5, "the client's retry")
        seen = client_err.read_text()
        assert "RemoteProtocolError" in seen or "ReadError" in seen, seen
        assert client.poll() is None and client_out.read_text() == ""

        lock.rollback()  # the orphaned insert may now run; its session has no client left to commit
        holder.close()

        def backend_gone() -> bool:
            with postgres_engine.connect() as conn:
                alive = conn.execute(
                    sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": backend}
                )
                return alive.scalar() == 0

        _wait_until(backend_gone, 10, f"the killed server's backend {backend} ending")
        assert _stored(postgres_engine, schema) == {}  # rolled back by PostgreSQL
        assert open_transactions(postgres_engine, schema) == []

        servers.append(_serve(config, port, server_log))  # the same port: the client's URL
        client.wait(20)
        outcome = (client.returncode, client_out.read_text())
        aside = " (model 'ctr' is not in mlmon's config)"  # models: [] in this config
        assert outcome == (0, f"created ctr v1{aside}\n"), client_err.read_text() + server_log.read_text()
        assert _stored(postgres_engine, schema) == {"v1": 1}

        again = subprocess.run(report, capture_output=True, text=True, env=env, timeout=20)
        assert (again.returncode, again.stdout) == (0, f"unchanged ctr v1{aside}\n"), again.stderr
        assert _stored(postgres_engine, schema) == {"v1": 1}
        assert "Traceback" not in server_log.read_text()
    finally:
        if holder.in_transaction():
            lock.rollback()
        holder.close()
        for process in [*servers, *([client] if client else [])]:
            if process.poll() is None:
                process.kill()
                process.wait(5)
