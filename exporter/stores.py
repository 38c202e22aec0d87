"""SQL stores: engines per configured store, table reflection and time binding.

Identifiers come only from the config and reach SQL through SQLAlchemy's reflected
``Table`` objects, which quote them; no SQL string is ever formatted.
"""

from __future__ import annotations

import math
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from exporter.config import Settings, TableSource


class SchemaError(Exception):
    """A configured table or column does not exist or has an unusable type, or a store's
    URL read from its ``url_file`` is not a SQLAlchemy URL; the message names the key."""


#: Query parameters of a URL that may carry a credential (``?password=`` is honoured by
#: psycopg and libpq, ``sslpassword``, tokens and keys by other drivers): masked when shown.
_SECRET_QUERY_KEY = re.compile(r"pass|secret|token|key|credential|auth", re.IGNORECASE)


def safe_url(url: str | sa.URL) -> str:
    """The URL with its password and every credential-bearing query parameter masked
    (``***``), for logs and error messages."""
    try:
        parsed = sa.make_url(url)
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
        dbapi_connection.create_function("ln", 1, lambda x: None if x is None or x <= 0 else math.log(x), deterministic=True)
        dbapi_connection.create_function("floor", 1, lambda x: None if x is None else float(math.floor(x)), deterministic=True)


#: The drivers mlmon's extras install (pyproject.toml), by SQLAlchemy URL scheme.
_DRIVER_EXTRAS = {"postgresql+psycopg": "postgresql", "duckdb": "duckdb"}


def create_store_engine(url: str, connect_timeout: float | None = None) -> Engine:
    """A pooled engine for one store URL, with per-dialect setup (SQLite math functions).

    With ``connect_timeout`` (seconds), PostgreSQL connections give up connecting after it,
    use TCP keepalives (so that a server that vanished mid-query is noticed) and carry the
    application name ``mlmon``.

    Raises:
        sqlalchemy.exc.ArgumentError: the URL is not a SQLAlchemy URL.
        sqlalchemy.exc.NoSuchModuleError: the dialect or its driver is not installed (the
            message says what to install).
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
        engine = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    except ImportError as exc:  # SQLAlchemy imports the driver here; a bare traceback helps nobody
        driver = sa.make_url(url).drivername
        extra = _DRIVER_EXTRAS.get(driver)
        hint = f"pip install 'mlmon[{extra}]'" if extra else f"pip install the package of module {exc.name!r}"
        raise sa.exc.NoSuchModuleError(f"the driver of {driver!r} is not installed: {hint}") from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_math)
    return engine


def require_existing_sqlite_file(url: str) -> None:
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
def timed_connection(engine: Engine, timeout_seconds: float) -> Iterator[Connection]:
    """A read-only transaction with one snapshot, whose queries are cancelled when they run too long.

    PostgreSQL cancels each statement after ``timeout_seconds`` on the server
    (``statement_timeout``, local to the transaction); SQLite is interrupted from a timer
    thread once the whole transaction exceeds it. Other dialects rely on their own limits.
    The cancelled statement raises the driver's error, classified as ``timeout``.
    """
    with engine.connect() as conn:
        timer = None
        if engine.dialect.name == "postgresql":
            # One snapshot for all the queries of a source: counts and sums of one window
            # must not come from two states of a table that is being appended to.
            conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            conn.execute(sa.select(sa.func.set_config("statement_timeout", f"{int(timeout_seconds * 1000)}", True)))
            # The default 4 MB makes the per-bucket aggregates of a large window spill to disk.
            conn.execute(sa.select(sa.func.set_config("work_mem", "64MB", True)))
        elif engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN")  # the driver opens no transaction for reads: ask for one snapshot
            raw = conn.connection.driver_connection
            timer = threading.Timer(timeout_seconds, raw.interrupt)
            timer.daemon = True
            timer.start()
        try:
            yield conn
        finally:
            if timer is not None:
                timer.cancel()
            conn.rollback()


#: SQLite keeps date-times as text in whatever format the writer chose (with or without
#: fraction, ``T`` or space, offset or not); comparing that text with a bound would be
#: wrong at the window edges, so both sides are normalised by SQLite's own strftime, to
#: the millisecond and in UTC where the text carries an offset.
_SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%f"


@dataclass(frozen=True)
class TimeColumn:
    """How to compare a timestamp column with UTC instants.

    ``kind`` is ``"aware"`` (timestamp with time zone), ``"naive"`` (timestamp without time
    zone, read in ``zone``), ``"sqlite"`` (SQLite date-time text, naive parts read in
    ``zone``) or ``"epoch"`` (numeric seconds since 1970-01-01 UTC). ``expr`` is the SQL
    expression that windows compare with ``bind(instant)``.
    """

    expr: sa.ColumnElement
    kind: str
    zone: str

    def bind(self, instant: datetime):
        """The value to compare ``expr`` with for a timezone-aware ``instant``."""
        if self.kind == "epoch":
            return instant.timestamp()
        if self.kind == "aware":
            return instant
        naive = instant.astimezone(ZoneInfo(self.zone)).replace(tzinfo=None)
        if self.kind == "sqlite":
            return f"{naive:%Y-%m-%d %H:%M:%S}.{naive.microsecond // 1000:03d}"
        return naive

    def to_epoch(self, value) -> float | None:
        """Seconds since the epoch of a value of ``expr`` read back (``None`` stays ``None``)."""
        if value is None:
            return None
        if self.kind == "epoch":
            return float(value)
        if self.kind == "sqlite":
            value = datetime.strptime(value, "%Y-%m-%d %H:%M:%S.%f")
        if value.tzinfo is None:
            value = value.replace(tzinfo=ZoneInfo(self.zone))
        return value.timestamp()


def time_column(table: sa.Table, name: str, source: TableSource, key_path: str, dialect: str) -> TimeColumn:
    """Classify a reflected timestamp column.

    Raises:
        SchemaError: the column is neither a date-time nor a number.
    """
    require_type(table, name, (sa.DateTime, *NUMBER_TYPES), key_path, "a timestamp or a number of seconds since the epoch")
    column = table.c[name]
    if not isinstance(column.type, sa.DateTime):
        return TimeColumn(column, "epoch", source.timezone)
    if dialect == "sqlite":
        return TimeColumn(sa.func.strftime(_SQLITE_TIME_FORMAT, column, type_=sa.String), "sqlite", source.timezone)
    return TimeColumn(column, "aware" if column.type.timezone else "naive", source.timezone)


NUMBER_TYPES = (sa.Integer, sa.Numeric, sa.Float)


def require_type(table: sa.Table, name: str, types: tuple[type, ...], key_path: str, expected: str) -> None:
    """Check that a reflected column has one of ``types``.

    Raises:
        SchemaError: it does not; the message names the config key and the type found.
    """
    column_type = table.c[name].type
    if not isinstance(column_type, types):
        raise SchemaError(f"{key_path}: column {name!r} of table {table.name!r} has type {column_type}; expected {expected}")


def reflect_table(engine: Engine, source: TableSource, columns: dict[str, str | None], key_path: str) -> sa.Table:
    """Reflect a configured table and check that every configured column exists.

    Args:
        columns: logical field -> column name (``None`` for unset optional fields).
        key_path: the config path of the source, for error messages.

    Raises:
        SchemaError: the table or a column is missing (names the config key).
        sqlalchemy.exc.OperationalError: the store cannot be reached.
    """
    metadata = sa.MetaData()
    try:
        table = sa.Table(source.table, metadata, schema=source.db_schema, autoload_with=engine)
    except sa.exc.NoSuchTableError:
        where = f"{source.db_schema}.{source.table}" if source.db_schema else source.table
        raise SchemaError(f"{key_path}.table: table {where!r} does not exist in store {source.store!r}") from None
    for field, name in columns.items():
        if name is not None and name not in table.c:
            raise SchemaError(
                f"{key_path}.columns.{field}: column {name!r} does not exist in table {source.table!r} "
                f"(columns: {', '.join(table.c.keys())})"
            )
    for name in getattr(source, "filter", {}):
        if name not in table.c:
            raise SchemaError(f"{key_path}.filter.{name}: column {name!r} does not exist in table {source.table!r}")
    return table


class Stores:
    """The engines of all configured stores, created lazily, disposed together."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()

    def engine(self, name: str) -> Engine:
        """The engine of store ``name`` (created on first use).

        Raises:
            OSError: ``url_file`` cannot be read, or a SQLite file does not exist.
            SchemaError: ``url_file`` does not hold a SQLAlchemy URL (naming the key).
            sqlalchemy.exc.NoSuchModuleError: missing driver.
        """
        with self._lock:
            if name not in self._engines:
                store = self._settings.stores[name]
                try:
                    url = store.resolved_url()
                except ValueError as exc:  # a url_file rewritten since the config was loaded
                    raise SchemaError(f"stores.{name}.{exc}") from None  # "url_file: not a SQLAlchemy URL ..."
                require_existing_sqlite_file(url)  # monitored stores are read, never created
                self._engines[name] = create_store_engine(url, self._settings.query_timeout.total_seconds())
            return self._engines[name]

    def dispose(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(timezone.utc)
