"""Secrets and defaults: credentials in URLs masked wherever mlmon prints one, a bad
``url_file`` is a config error naming its key, an open API warns and refuses browser
writes from elsewhere, and the SQLite state database is private to its owner."""

from __future__ import annotations

import logging
import os
import stat
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from exporter.cli import app as cli
from exporter.config import ConfigError, parse_settings
from exporter.db import safe_url
from exporter.server.app import create_app
from tests.conftest import refresh_once

SECRETS = ("s3cret", "k3y-pass", "t0ken")
RUN = {"model": "ctr", "version": "v1", "trained_at": "2026-11-28T10:00:00Z", "training_rows": 1000}
CONFIG = """
stores:
  s: {store}
models:
  - name: ctr
    predictions:
      store: s
      table: predictions
      columns: {{id: id, timestamp: ts, score: p}}
"""


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql+psycopg://mlmon@db/serving?password=s3cret", "postgresql+psycopg://mlmon@db/serving?password=***"),
        (
            "postgresql+psycopg://mlmon:s3cret@db:5432/serving?sslmode=require&sslpassword=k3y-pass",
            "postgresql+psycopg://mlmon:***@db:5432/serving?sslmode=require&sslpassword=***",
        ),
        (
            "snowflake://u@acct/db?private_key_file_pwd=s3cret&token=t0ken&authenticator=oauth",
            "snowflake://u@acct/db?authenticator=***&private_key_file_pwd=***&token=***",
        ),
        (
            "postgresql+psycopg://mlmon@db/serving?options=-csearch_path%3Dx",
            "postgresql+psycopg://mlmon@db/serving?options=-csearch_path%3Dx",
        ),
        ("postgresql://u:s3cret@host:notaport/db", "<unparsable URL>"),
        # issue B3: an unencoded '@' in the password; SQLAlchemy takes 'tPart2@host' as the host
        ("postgresql+psycopg://postgres:S3cr@tPart2@host/db", "postgresql+psycopg://postgres:***@host/db"),
        ("postgresql+psycopg://postgres:a@b@c@host:5432/db", "postgresql+psycopg://postgres:***@host:5432/db"),
        (
            "mssql+pyodbc://u@dsn/db?pwd=s3cret&odbc_connect=DRIVER%3Dx%3BPWD%3Ds3cret",
            "mssql+pyodbc://u@dsn/db?odbc_connect=***&pwd=***",
        ),
    ],
)
def test_safe_url_masks_every_credential_bearing_part(url, shown):
    assert safe_url(url) == shown
    assert safe_url(sa.make_url(url) if shown != "<unparsable URL>" else url) == shown


def test_check_config_masks_a_password_in_the_query_string(tmp_path):
    url = "postgresql+psycopg://mlmon@127.0.0.1:1/test?password=s3cret&sslpassword=k3y-pass"
    path = tmp_path / "mlmon.yml"
    path.write_text(CONFIG.format(store=f'{{url: "{url}"}}'))
    result = CliRunner().invoke(cli, ["check-config", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "cannot reach store 's' at postgresql+psycopg://mlmon@127.0.0.1:1/test?password=***" in result.output
    assert not [s for s in SECRETS if s in result.output], result.output


def test_mlmon_load_masks_a_password_in_the_query_string(postgres_schema, tmp_path):
    url, schema = postgres_schema
    csv = tmp_path / "rows.csv"
    csv.write_text("id,timestamp,score\n1,2026-11-28T10:00:00Z,0.5\n")
    with_password = f"{url}?password=s3cret"  # the test server trusts local connections: ignored
    result = CliRunner().invoke(cli, ["load", "--url", with_password, "--table", "t", "--schema", schema, str(csv)])
    assert result.exit_code == 0, result.output
    assert "loaded 1 row(s) into t at" in result.output and "password=***" in result.output
    assert "s3cret" not in result.output
    failing = CliRunner().invoke(
        cli, ["load", "--url", "postgresql+psycopg://u@127.0.0.1:1/x?password=s3cret", "--table", "t", str(csv)]
    )
    assert failing.exit_code == 2 and "s3cret" not in failing.output, failing.output


@pytest.mark.parametrize(
    "content",
    ["postgresql+psycopg://u:s3cret@db:notaport/x", "postgresql+psycopg://u:s3cret@db:70000/x", "not a url s3cret"],
)
def test_a_url_file_that_is_not_a_url_is_a_config_error_naming_the_key(tmp_path, content):
    secret = tmp_path / "url"
    secret.write_text(content + "\n")
    with pytest.raises(ConfigError) as info:
        parse_settings({"stores": {"s": {"url_file": str(secret)}}, "models": []})
    (error,) = info.value.errors
    assert error.startswith("stores.s.url_file: not a SQLAlchemy URL") and "s3cret" not in error
    path = tmp_path / "mlmon.yml"
    path.write_text(CONFIG.format(store=f"{{url_file: {secret}}}"))
    result = CliRunner().invoke(cli, ["check-config", "--config", str(path)])
    assert result.exit_code == 2 and "stores.s.url_file: not a SQLAlchemy URL" in result.output
    assert "Traceback" not in result.output and "s3cret" not in result.output
    missing = tmp_path / "missing.yml"
    missing.write_text(CONFIG.format(store=f"{{url_file: {tmp_path / 'nope'}}}"))
    result = CliRunner().invoke(cli, ["check-config", "--config", str(missing)])
    assert result.exit_code == 2 and "stores.s.url_file: cannot read" in result.output


def test_a_url_file_broken_after_start_is_a_schema_error_not_internal(tmp_path, caplog):
    secret = tmp_path / "url"
    secret.write_text(f"sqlite:///{tmp_path}/store.sqlite\n")
    settings = parse_settings(
        {
            "stores": {"s": {"url_file": str(secret)}},
            "models": [
                {
                    "name": "ctr",
                    "predictions": {
                        "store": "s",
                        "table": "p",
                        "columns": {"id": "id", "timestamp": "ts", "score": "p"},
                    },
                }
            ],
            "state": {"url": f"sqlite:///{tmp_path}/state.sqlite"},
        }
    )
    secret.write_text("postgresql+psycopg://u:s3cret@db:notaport/x\n")  # rewritten while mlmon runs
    with caplog.at_level(logging.WARNING):
        text = refresh_once(settings, datetime(2026, 11, 28, tzinfo=UTC)).decode()
    assert 'mlmon_refresh_errors_total{model="ctr",reason="schema",source="predictions"} 1.0' in text.splitlines()
    assert 'mlmon_refresh_errors_total{model="ctr",reason="internal",source="predictions"} 0.0' in text.splitlines()
    assert "stores.s.url_file: not a SQLAlchemy URL" in caplog.text
    assert not [r for r in caplog.records if r.exc_info] and "s3cret" not in caplog.text


def _app(tmp_path, **api):
    return create_app(
        parse_settings({"stores": {}, "models": [], "state": {"url": f"sqlite:///{tmp_path}/state.sqlite"}, "api": api})
    )


def test_an_open_api_is_warned_about_at_start(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="exporter.server.app"), TestClient(_app(tmp_path)):
        pass
    assert [r.getMessage() for r in caplog.records if "api.token is not set" in r.getMessage()]
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, logger="exporter.server.app"),
        TestClient(_app(tmp_path, token="a-token-of-16-chars")),
    ):
        pass
    assert "api.token" not in caplog.text


@pytest.mark.parametrize(
    "method, path, headers, status",
    [
        # DNS rebinding: evil.example resolves to mlmon's address, the page is same-origin to the browser
        ("POST", "/api/v1/training-runs", {"host": "evil.example:9847", "origin": "http://evil.example:9847"}, 403),
        (
            "DELETE",
            "/api/v1/models/ctr/versions/v1",
            {"host": "evil.example:9847", "origin": "http://evil.example:9847"},
            403,
        ),
        # a cross-site page posting to the loopback address
        ("POST", "/api/v1/training-runs", {"host": "127.0.0.1:9847", "origin": "https://evil.example"}, 403),
        ("POST", "/api/v1/training-runs", {"host": "127.0.0.1:9847", "origin": "http://127.0.0.1:8080"}, 403),
        ("POST", "/api/v1/training-runs", {"host": "127.0.0.1:9847", "origin": "null"}, 403),  # a sandboxed frame
        # mlmon's own /docs, opened at an address or localhost
        ("POST", "/api/v1/training-runs", {"host": "127.0.0.1:9847", "origin": "http://127.0.0.1:9847"}, 201),
        ("POST", "/api/v1/training-runs", {"host": "[::1]:9847", "origin": "http://[::1]:9847"}, 201),
        ("POST", "/api/v1/training-runs", {"host": "localhost:9847", "origin": "http://localhost:9847"}, 201),
        # clients that are not browsers send no Origin
        ("POST", "/api/v1/training-runs", {"host": "mlmon.internal:9847"}, 201),
        # reads are not refused (a browser does not let the page read the answer cross-site anyway)
        ("GET", "/api/v1/models", {"host": "evil.example:9847", "origin": "http://evil.example:9847"}, 200),
    ],
)
def test_browser_writes_from_elsewhere_are_refused_without_a_token(tmp_path, method, path, headers, status):
    with TestClient(_app(tmp_path)) as client:
        response = client.request(method, path, json=RUN if method == "POST" else None, headers=headers)
        assert response.status_code == status, response.text
        if status == 403:
            assert "api.token" in response.json()["detail"]
            assert client.get("/api/v1/models").json() == {"models": []}  # nothing stored


def test_with_a_token_the_token_decides_whatever_the_origin(tmp_path):
    token = "a-token-of-16-chars"
    with TestClient(_app(tmp_path, token=token)) as client:
        headers = {"host": "evil.example:9847", "origin": "http://evil.example:9847"}
        assert client.post("/api/v1/training-runs", json=RUN, headers=headers).status_code == 401
        assert (
            client.post(
                "/api/v1/training-runs", json=RUN, headers={**headers, "Authorization": f"Bearer {token}"}
            ).status_code
            == 201
        )


def test_the_sqlite_state_database_is_created_readable_by_its_owner_only(tmp_path):
    previous = os.umask(0o022)  # the usual umask, with which SQLite creates files 0644
    try:
        with TestClient(_app(tmp_path, token="a-token-of-16-chars")) as client:
            client.post("/api/v1/training-runs", json=RUN, headers={"Authorization": "Bearer a-token-of-16-chars"})
    finally:
        os.umask(previous)
    created = [p for p in tmp_path.iterdir() if p.name.startswith("state.sqlite")]
    assert created and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in created), [
        (p.name, oct(p.stat().st_mode)) for p in created
    ]
    # an existing file keeps the mode its owner gave it
    existing = tmp_path / "shared"
    existing.mkdir()
    (existing / "state.sqlite").touch(mode=0o640)
    os.chmod(existing / "state.sqlite", 0o640)
    with TestClient(_app(existing)):
        pass
    assert stat.S_IMODE((existing / "state.sqlite").stat().st_mode) == 0o640


def test_an_unencoded_at_in_the_password_is_a_config_error_saying_how_to_encode_it(tmp_path):
    """Issue B3: SQLAlchemy would take 'tPart2@host' as the host and fail to resolve it."""
    url = "postgresql+psycopg://postgres:S3cr@tPart2@host/db"
    with pytest.raises(ConfigError) as info:
        parse_settings({"stores": {"s": {"url": url}}, "models": []})
    (error,) = info.value.errors
    assert error.startswith("stores.s.url: ") and "percent-encode '@' in the password as %40" in error
    assert "S3cr" not in error and "tPart2" not in error
    path = tmp_path / "mlmon.yml"
    path.write_text(CONFIG.format(store=f"{{url: '{url}'}}"))
    result = CliRunner().invoke(cli, ["check-config", "--config", str(path)])
    assert result.exit_code == 2 and "percent-encode '@' in the password as %40" in result.output
    assert "S3cr" not in result.output and "tPart2" not in result.output
    encoded = url.replace("S3cr@tPart2", "S3cr%40tPart2")
    assert parse_settings({"stores": {"s": {"url": encoded}}, "models": []}).stores["s"].resolved_url().host == "host"
