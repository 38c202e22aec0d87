"""Database engines and connections, shared by the prediction stores, the state database
and the loader: engine creation with per-dialect setup, read-only timed connections, and
URLs safe to show."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.default import DefaultDialect

#: Query parameters of a URL that may carry a credential (``?password=`` is honoured by
#: psycopg and libpq, ``sslpassword``, tokens and keys by other drivers): masked when shown.
#: ``pwd`` is ODBC's password keyword, and ``odbc_connect`` a whole ODBC connection string
#: that may hold ``PWD=...``.
_SECRET_QUERY_KEY = re.compile(r"pass|secret|token|key|credential|auth|pwd|odbc_connect", re.IGNORECASE)


def safe_url(url: str | sa.URL) -> str:
    """The URL with its password and every credential-bearing query parameter masked
    (``***``), for logs and error messages.

    A password holding an unencoded ``@`` (``user:S3cr@tPart2@host``) is parsed by
    SQLAlchemy as password ``S3cr`` and host ``tPart2@host``; everything between the
    user name and the last ``@`` of the authority is masked then (``user:***@host``)."""
    try:
        parsed = sa.make_url(url)
        if parsed.host is not None and "@" in parsed.host:
            parsed = parsed.set(password="***", host=parsed.host.rpartition("@")[2])
        masked = {key: "***" for key in parsed.query if _SECRET_QUERY_KEY.search(key)}
        # The URL-encoded mask ("%2A%2A%2A") shown as it is written.
        return parsed.update_query_dict(masked).render_as_string(hide_password=True).replace("%2A%2A%2A", "***")
    except Exception:  # an unparsable URL may hold a secret anywhere: show nothing of it
        return "<unparsable URL>"


def _sqlite_math(dbapi_connection, _record) -> None:
    """Give SQLite ``ln`` and ``floor`` where its build lacks the math functions.

    SQLite ships them only when compiled with SQLITE_ENABLE_MATH_FUNCTIONS (3.35+); probing
    keeps the native ones, which are faster, wherever they exist.
    """
    try:
        dbapi_connection.execute("SELECT ln(1.0), floor(1.5)").fetchone()
    except Exception:
        dbapi_connection.create_function(
            "ln", 1, lambda x: None if x is None or x <= 0 else math.log(x), deterministic=True
        )
        dbapi_connection.create_function(
            "floor", 1, lambda x: None if x is None else float(math.floor(x)), deterministic=True
        )


#: The page cache of each SQLite connection, in KiB (SQLite's default is 2 MiB). mlmon's
#: reads scan by index and aggregate, so a larger cache buys little, while every pooled
#: connection keeps its cache filled for as long as it lives.
SQLITE_CACHE_KIB = 256


def _sqlite_cache(dbapi_connection, _record) -> None:
    dbapi_connection.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")  # negative: KiB, not pages


#: The connections a database's pool may hold when its config sets no ``max_connections``:
#: PostgreSQL allows 100 for all its clients by default.
DEFAULT_MAX_CONNECTIONS = 10


@dataclass(frozen=True)
class PoolSize:
    """How many connections an engine's pool holds, and how long a checkout waits for one.

    ``connections``: as many as threads use the engine at once (each holding one connection
    at a time), at most the database's ``max_connections``. The pool keeps them open and
    opens no others (no overflow): an overflow connection is closed when it is returned, so
    50 refreshes sharing a pool of 5 (+ 10 overflow) opened and closed connections all the
    time, and resident memory grew (docs/reliability.md). With more users than
    connections, the others wait for one in turn.
    ``wait``: seconds a checkout waits for a free connection before raising
    ``sqlalchemy.exc.TimeoutError`` (``reason="timeout"``): the longest deadline of the
    refreshes that use the engine, so that waiting for a connection is never a timeout
    before the refresh is reported stalled at its own deadline.
    """

    connections: int
    wait: float


#: The drivers mlmon's extras install (pyproject.toml), by SQLAlchemy URL scheme.
_DRIVER_EXTRAS = {"postgresql+psycopg": "postgresql", "duckdb": "duckdb"}


def create_store_engine(
    url: str | sa.URL, connect_timeout: float | None = None, pool: PoolSize | None = None
) -> Engine:
    """A pooled engine for one store URL, with per-dialect setup (SQLite math functions and
    a ``SQLITE_CACHE_KIB`` page cache; ``predictions.stores.Stores`` adds the time-zone
    function its time columns use).

    With ``connect_timeout`` (seconds), PostgreSQL connections give up connecting after it,
    use TCP keepalives (so that a server that vanished mid-query is noticed) and carry the
    application name ``mlmon``. With ``pool``, a dialect pooling by queue (SQLite files,
    PostgreSQL, DuckDB) keeps exactly ``pool.connections`` (``PoolSize``); without it, or for
    a database with one connection per thread (in-memory SQLite), SQLAlchemy's default pool.

    Raises:
        sqlalchemy.exc.ArgumentError: the URL is not a SQLAlchemy URL.
        sqlalchemy.exc.NoSuchModuleError: the dialect or its driver is not installed (the
            message says what to install, or which URL schemes mlmon supports).
    """
    connect_args = {}
    if connect_timeout is not None and sa.make_url(url).get_backend_name() == "postgresql":
        connect_args = {
            "connect_timeout": max(1, math.ceil(connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
            # Shows in pg_stat_activity, so that a DBA can tell mlmon's queries apart.
            "application_name": "mlmon",
        }
    try:
        parsed = sa.make_url(url)
        sizing = {}
        dialect = parsed.get_dialect()
        queued = issubclass(dialect, DefaultDialect) and issubclass(dialect.get_pool_class(parsed), sa.QueuePool)
        if pool is not None and queued:
            sizing = {"pool_size": pool.connections, "max_overflow": 0, "pool_timeout": pool.wait}
        engine = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args, **sizing)
    except sa.exc.NoSuchModuleError:  # "Can't load plugin: sqlalchemy.dialects:postgres" names no fix
        raise sa.exc.NoSuchModuleError(_unknown_dialect(sa.make_url(url).drivername)) from None
    except ImportError as exc:  # SQLAlchemy imports the driver here; a bare traceback helps nobody
        driver = sa.make_url(url).drivername
        extra = _DRIVER_EXTRAS.get(driver)
        # mlmon is installed from a clone (README), not from an index: name the editable install.
        hint = (
            f"pip install -e '.[{extra}]' in mlmon's clone"
            if extra
            else f"pip install the package of module {exc.name!r}"
        )
        raise sa.exc.NoSuchModuleError(f"the driver of {driver!r} is not installed: {hint}") from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_math)
        sa.event.listen(engine, "connect", _sqlite_cache)
    return engine


def _unknown_dialect(scheme: str) -> str:
    """The error message for a URL scheme that names no installed SQLAlchemy dialect or driver."""
    suggestion = ""
    if scheme.split("+")[0] in ("postgres", "postgresql", "pg"):
        # libpq and Heroku-style URLs say postgres://, which SQLAlchemy 1.4+ no longer accepts.
        suggestion = "for PostgreSQL write postgresql+psycopg://user@host/db; "
    return (
        f"unknown database type {scheme!r} in the URL: {suggestion}mlmon supports sqlite:///path.db, "
        "postgresql+psycopg://user@host/db and duckdb:///path.duckdb, and other databases through "
        "their SQLAlchemy dialect package (docs/scaling.md)"
    )


def require_existing_sqlite_file(url: str | sa.URL) -> None:
    """Refuse a SQLite URL whose file does not exist, which SQLite would create empty and
    then report as missing tables.

    Raises:
        FileNotFoundError: names the path, resolved against the working directory.
    """
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        if not parsed.database.startswith("file:") and not path.exists():
            raise FileNotFoundError(f"SQLite database file {str(path.resolve())!r} does not exist")


@contextmanager
def timed_connection(
    engine: Engine, timeout_seconds: float, tables: Iterable[sa.Table] = (), jit: bool = True
) -> Iterator[Connection]:
    """A read-only transaction with one snapshot, whose queries are cancelled when they run too long.

    PostgreSQL cancels each statement (each ``DECLARE`` and ``FETCH`` of a streamed read)
    after ``timeout_seconds`` on the server (``statement_timeout``, local to the
    transaction, as ``work_mem`` and ``cursor_tuple_fraction``) and plans without nested loops
    (``enable_nestloop``, local too), so that missing statistics cannot make a join
    quadratic; SQLite is interrupted from a timer
    thread once the whole transaction exceeds it. Other dialects rely on their own limits.
    The cancelled statement raises the driver's error, classified as ``timeout``.

    ``jit=False`` turns PostgreSQL's JIT off for the transaction: for statements whose
    large expressions (bisecting CASEs, per-row index lookups) JIT would compile longer
    than it would take to run them; the callers say how much longer.

    ``tables``: the tables the connection's queries read. Spark SQL (PyHive's dialect
    ``hive``) has no snapshot and each of its sessions caches a table's file listing
    the first time it reads it, so a kept connection would never see the rows written
    since (by another session or application); ``REFRESH TABLE`` drops that cache.
    """
    with engine.connect() as conn:
        timer = None
        if engine.dialect.name == "postgresql":
            # One snapshot for all the queries of a source: counts and sums of one window
            # must not come from two states of a table that is being appended to.
            conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            settings = {
                "statement_timeout": f"{int(timeout_seconds * 1000)}",
                # The default 4 MB makes the per-bucket aggregates of a large window spill to disk.
                "work_mem": "64MB",
                # Without statistics (a table loaded and queried before ANALYZE, or autovacuum
                # off or lagging) PostgreSQL guesses that a window holds a handful of rows and
                # joins predictions to labels, replays and duplicate ids by nested loops:
                # quadratic in the window, 20,000 rows a side already run past 30 s. Every join
                # mlmon sends is an equi-join, which a hash or merge join does in time linear in
                # the rows (plus a sort), whatever the estimates (docs/scaling.md).
                "enable_nestloop": "off",
                # The reads of many slices are streamed through a server-side cursor
                # (``sources._table``), which PostgreSQL plans for its first 10% of rows by
                # default: plan it for the whole result it is read as, as a plain statement.
                "cursor_tuple_fraction": "1",
            }
            if not jit:
                settings["jit"] = "off"
            # Local to the transaction (true), all in one round trip: a steady refresh opens
            # a transaction per source.
            conn.execute(sa.select(*(sa.func.set_config(name, value, True) for name, value in settings.items())))
        elif engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN")  # the driver opens no transaction for reads: ask for one snapshot
            raw = conn.connection.driver_connection
            assert raw is not None  # an open connection always has its sqlite3 connection
            timer = threading.Timer(timeout_seconds, raw.interrupt)
            timer.daemon = True
            timer.start()
        elif engine.dialect.name == "hive":
            for table in tables:  # identifiers from the config, quoted by the dialect
                conn.exec_driver_sql(f"REFRESH TABLE {engine.dialect.identifier_preparer.format_table(table)}")
        try:
            yield conn
        finally:
            if timer is not None:
                timer.cancel()
            conn.rollback()
