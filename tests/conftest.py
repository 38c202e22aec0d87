"""Shared fixtures: the real PostgreSQL on 127.0.0.1:5432 (database ``test``).

A test that needs PostgreSQL skips with the reason on a laptop without it, and fails
in CI (``CI`` set), where it must be there.
"""

import os
import re
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import settings as hypothesis_settings

from exporter.config import Settings, parse_settings
from exporter.predictions.slices import SliceStore
from exporter.server.collector import build_registry, render
from exporter.server.loop import refresh_all

# In CI, Hypothesis draws the same examples every run, so a failure there can be replayed
# and a landing is not decided by luck; locally it keeps exploring new ones.
hypothesis_settings.register_profile("ci", derandomize=True)
#: Whether the tests run in CI (``CI`` set to 1, true or yes, as CI services set it).
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
if IN_CI:
    hypothesis_settings.load_profile("ci")

#: The repository root and the tests' data, for tests at any depth of tests/.
REPO = Path(__file__).resolve().parent.parent
TEST_DATA = REPO / "tests" / "data"
CATALOG = REPO / "docs" / "metrics.md"
POSTGRES_URL = os.environ.get("MLMON_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    """A TCP port free on loopback now, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(condition: bool, reason: str) -> None:
    """Skip when a real component is missing, except in CI, where that is a failure."""
    if not condition:
        if IN_CI:
            pytest.fail(f"{reason} (required in CI)")
        pytest.skip(reason)


def start_process(
    args: list[str], log_path: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start a server a test talks to, its stdout and stderr appended to ``log_path``: a
    file, never a pipe that nobody drains while the test runs (a full pipe blocks the server).
    Its stdin is /dev/null, not the test runner's (which CI may hold open)."""
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)


def log_tail(log_path: Path, chars: int = 3000) -> str:
    """The end of a process's log, for a failure message."""
    try:
        return Path(log_path).read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


def wait_until_answers(
    url: str,
    process: subprocess.Popen,
    log_path: Path,
    timeout: float = 30,
    verify: ssl.SSLContext | bool | None = None,
    ready: Callable[[httpx.Response], bool] | None = None,
) -> None:
    """Wait until ``url`` answers 200 (or satisfies ``ready``); fail with the end of the log
    when ``process`` exits first or ``timeout`` seconds pass. ``verify``: as httpx's, for
    https with a test's own certificate."""
    ready = ready or (lambda response: response.status_code == 200)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{url}: process exited with {process.returncode}:\n{log_tail(log_path)}"
        try:
            if ready(httpx.get(url, timeout=1, verify=True if verify is None else verify)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready within {timeout} s:\n{log_tail(log_path)}")


def like_pattern(text: str) -> str:
    """A LIKE pattern matching any string that contains ``text`` (whose ``_`` and ``%``
    are taken literally)."""
    return "%" + re.sub(r"([\\%_])", r"\\\1", text) + "%"


def open_transactions(engine: sa.Engine, schema: str) -> list[tuple]:
    """(pid, last query) of mlmon's sessions left inside a transaction on tables of this
    test's schema (such a transaction holds a lock on them: that tells them apart from
    sessions of other tests, or other test runs, on the same server)."""
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT DISTINCT a.pid, a.query FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
                "JOIN pg_class c ON c.oid = l.relation WHERE c.relnamespace = CAST(:schema AS regnamespace) "
                "AND a.application_name = 'mlmon' AND a.state LIKE 'idle in transaction%'"
            ),
            {"schema": schema},
        ).all()


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


@pytest.fixture(params=["sqlite", "postgresql", "duckdb"])
def store(request, tmp_path):
    """(url, schema, dialect) of an empty store: a SQLite file, a fresh PostgreSQL schema
    or a DuckDB file."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.sqlite", None, "sqlite"
    elif request.param == "duckdb":
        yield f"duckdb:///{tmp_path}/store.duckdb", None, "duckdb"
    else:
        yield request.getfixturevalue("postgres_schema") + ("postgresql",)


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


def model_settings(
    url: str,
    schema: str | None = None,
    *,
    labels: bool | dict = True,
    replays: bool | dict = False,
    predictions: dict | None = None,
    model: dict | None = None,
    **top,
) -> Settings:
    """Settings of one model ``ctr`` over the tests' standard tables in store ``s`` at
    ``url`` (in ``schema`` when given): ``predictions`` (id, ts, p), ``labels`` (id, y) and
    ``replays`` (id, p), with a ``1h`` window and no label delay.

    ``labels``, ``replays``: ``True`` for the standard source, ``False`` for none, or a dict
    of its keys to change; ``predictions``: keys of its source to change (``columns`` are
    merged with the standard ones); ``model``: keys of the model (``name``, ``windows``...);
    ``top``: top-level keys (``refresh_interval``, ``state``...).
    """
    where = {"store": "s", **({"schema": schema} if schema else {})}

    def source(table: str, columns: dict, change: bool | dict | None) -> dict:
        change = dict(change) if isinstance(change, dict) else {}
        return {**where, "table": table, **change, "columns": {**columns, **change.get("columns", {})}}

    config = {
        "name": "ctr",
        "predictions": source("predictions", {"id": "id", "timestamp": "ts", "score": "p"}, predictions),
        "windows": ["1h"],
        "label_delay": "0s",
    }
    if labels:
        config["labels"] = source("labels", {"id": "id", "label": "y"}, labels)
    if replays:
        config["replays"] = source("replays", {"id": "id", "score": "p"}, replays)
    return parse_settings({"stores": {"s": {"url": url}}, **top, "models": [{**config, **(model or {})}]})


class AuditClock:
    """When a refresher keeping time slices must equal a cold one in a random sequence: a
    change written into kept slices (``changed = True``) is taken in at the next audit, due
    ``interval`` after the first refresh or the last audit (``SliceStore.audit_due``)."""

    def __init__(self, interval: timedelta):
        self.interval = interval
        self.last: datetime | None = None  # the first refresh starts the audit clock
        self.changed = False

    def comparable(self, as_of: datetime) -> bool:
        """Whether the refresh at ``as_of`` (the next, times increasing) shows every change:
        none since the last audit, or an audit due now."""
        self.last = self.last or as_of
        if self.changed and as_of - self.last < self.interval:
            return False  # the change may not be seen before the next audit
        if as_of - self.last >= self.interval:
            self.last, self.changed = as_of, False
        return True

    def restart(self) -> None:
        """A new process restored the saved slices: it audits them at its first refresh,
        which shows every change, and its audit clock starts there."""
        self.last, self.changed = None, False


def zoned_predictions_settings(url: str, zone: str = "UTC", windows=("1h", "24h"), schema: str | None = None):
    """Settings of one model ``m`` whose predictions (``predictions``: id, ts, p) are in store
    ``s`` at ``url``, their timestamps wall-clock time of ``zone`` (daylight saving, text
    timestamps)."""
    return model_settings(
        url, schema, labels=False, predictions={"timezone": zone}, model={"name": "m", "windows": list(windows)}
    )


@contextmanager
def table_locked(engine: sa.Engine, schema: str, table: str, mode: str = "ACCESS EXCLUSIVE"):
    """Hold a lock on ``schema.table`` in a session of the test's own until the block ends
    (then rolled back): mlmon's queries on it wait meanwhile."""
    with engine.connect() as conn:
        conn.execute(sa.text(f'LOCK TABLE "{schema}".{table} IN {mode} MODE'))
        yield
        conn.rollback()


def waiting_on_a_lock(engine: sa.Engine, schema: str) -> bool:
    """Whether a session waits for a lock on a table of ``schema`` (e.g. one that
    ``table_locked`` holds)."""
    with engine.connect() as conn:
        return bool(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                    "WHERE NOT l.granted AND c.relnamespace = CAST(:schema AS regnamespace)"
                ),
                {"schema": schema},
            ).scalar()
        )


@contextmanager
def stalled_on_a_lock(engine: sa.Engine, schema: str, table: str, refresh: Callable[[], object], what: str):
    """Run ``refresh`` in a thread while ``table_locked`` holds ``schema.table``; the block
    runs once the refresh waits on the lock (at most 10 s, else the test fails naming
    ``what``). After the block the lock is held until the refresh ends (within 10 s, by
    its own timeout). Yields a dict whose ``"result"`` is the refresh's return value then."""
    result: dict = {}
    with table_locked(engine, schema, table):
        running = threading.Thread(target=lambda: result.update(result=refresh()))
        running.start()
        deadline = time.monotonic() + 10
        while not waiting_on_a_lock(engine, schema):
            assert time.monotonic() < deadline, f"{what} never waited on the lock"
            time.sleep(0.05)
        yield result
        running.join(10)  # still locked: the refresh ends by its own timeout, not by the release
    assert not running.is_alive()


def refresh_once(settings: Settings, as_of: datetime) -> bytes:
    """The exposition ``/metrics`` would serve after one refresh of every model at ``as_of``
    (what ``mlmon once`` prints)."""
    return render(build_registry(refresh_all(settings, as_of), settings.thresholds))


def statements_by_source(refresher, stores) -> dict[str, list[str]]:
    """The queries (SELECT, WITH) each source of ``refresher`` (a ``ModelRefresher``) runs
    from now on through ``stores`` (its ``Stores``), by source name, recorded while its
    ``run`` runs; reflection (SQLite's ``sqlite_master``) is not counted, as
    ``refresh.worst_case_queries`` does not count it."""
    by_source: dict[str, list[str]] = {}
    running: list[str] = []
    for name, source in refresher.sources.items():

        def run(as_of, name=name, run=source.run):
            running.append(name)
            try:
                return run(as_of)
            finally:
                running.pop()

        source.run = run
    query = ("SELECT", "WITH")

    def record(*args) -> None:
        if running and args[2].lstrip().upper().startswith(query) and "sqlite_master" not in args[2]:
            by_source.setdefault(running[-1], []).append(args[2])

    sa.event.listen(stores.engine("s"), "before_cursor_execute", record)
    return by_source


@pytest.fixture
def slices_read_by_store(monkeypatch):
    """The starts of the settled slices each store's refreshes read (``SliceStore.merge``
    keeps them), by ``id`` of the store."""
    read: dict[int, list[datetime]] = {}
    original = SliceStore.merge

    def recorded(self, plan, parts):
        read.setdefault(id(self), []).extend(plan.new_slices)
        return original(self, plan, parts)

    monkeypatch.setattr(SliceStore, "merge", recorded)
    return read
