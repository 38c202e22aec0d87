"""Shared fixtures: the real PostgreSQL on 127.0.0.1:5432 (database ``test``).

A test that needs PostgreSQL skips with the reason on a laptop without it, and fails
in CI (``CI`` set), where it must be there.
"""

import os
import re
import socket
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

CATALOG = Path(__file__).parent.parent / "docs" / "metrics.md"
POSTGRES_URL = os.environ.get("MLMON_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    """A TCP port free on loopback now, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(condition: bool, reason: str) -> None:
    """Skip when a real component is missing, except in CI, where that is a failure."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (required in CI)")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_engine():
    engine = sa.create_engine(POSTGRES_URL)
    try:
        with engine.connect():
            pass
    except Exception as exc:  # any failure to connect means: no PostgreSQL here
        require(False, f"PostgreSQL not reachable at {POSTGRES_URL}: {str(exc).splitlines()[0]}")
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_schema(postgres_engine):
    """(url, schema): a fresh schema in the test database, dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with postgres_engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    yield POSTGRES_URL, schema
    with postgres_engine.begin() as conn:
        conn.execute(sa.schema.DropSchema(schema, cascade=True))


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request, tmp_path):
    """URL of an empty state database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state.sqlite"
    url, schema = request.getfixturevalue("postgres_schema")
    return f"{url}?options=-csearch_path%3D{schema}"


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    """Run every test in its own directory: the default state database
    (``sqlite:///mlmon-state.sqlite``) and other relative paths land there."""
    monkeypatch.chdir(tmp_path)


def catalog() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (type, labels) from the table in docs/metrics.md."""
    rows = {}
    for line in CATALOG.read_text().splitlines():
        match = re.match(r"\| `(mlmon_\w+)` \| (\w+) \|([^|]*)\|", line)
        if match:
            rows[match.group(1)] = (match.group(2), tuple(re.findall(r"`(\w+)`", match.group(3))))
    return rows
