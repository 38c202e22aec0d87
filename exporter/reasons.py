"""Why a refresh failed: the bounded ``reason`` label values of ``mlmon_refresh_errors_total``
and ``mlmon_training_refresh_errors_total``, the typed error of a store's schema, and the one
classifier of exceptions into reasons, shared by the prediction sources and the training refresher."""

from __future__ import annotations

import sqlalchemy as sa

#: Bounded set of ``reason`` label values of ``mlmon_refresh_errors_total``.
ERROR_REASONS = ("timeout", "connection", "schema", "query", "internal")


class SchemaError(Exception):
    """Configured tables or columns do not exist or have unusable types, or a store's URL
    read from its ``url_file`` is not a SQLAlchemy URL; ``problems`` holds one
    ``"key.path: message"`` per problem (the message joins them, one a line)."""

    def __init__(self, *problems: str):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def _thrift_status(orig: BaseException | None) -> object | None:
    """The status of the server's answer a Thrift driver (PyHive: Spark SQL, Hive) raises as
    its error's argument, or ``None``: PyHive raises ``OperationalError`` for every failed
    statement, with the response (``status.sqlState``: the SQLSTATE) as its only argument."""
    return getattr(orig.args[0], "status", None) if orig is not None and orig.args else None


def sqlstate(orig: BaseException | None) -> str | None:
    """The SQLSTATE of a driver's error (``DBAPIError.orig``: psycopg's ``sqlstate``, or a
    Thrift server's), if any."""
    return getattr(orig, "sqlstate", None) or getattr(_thrift_status(orig), "sqlState", None)


def classify_error(exc: BaseException) -> str:
    """Map an exception raised by a source refresh to an ``ERROR_REASONS`` value."""
    if isinstance(exc, SchemaError | sa.exc.NoSuchTableError):
        return "schema"
    if isinstance(exc, sa.exc.TimeoutError):  # no pooled connection free in time: the store is saturated
        return "timeout"
    if isinstance(exc, sa.exc.DBAPIError):
        orig = exc.orig
        state = sqlstate(orig)
        message = str(orig).lower()
        if state == "57014" or "interrupted" in message:  # query_canceled / sqlite3 interrupt
            return "timeout"
        # undefined table, column or object (PostgreSQL, Spark SQL); SQLite reports them as messages.
        # 42883 (no operator for these types, e.g. bigint = text) is a column type the checks
        # of check_schema did not know how to classify: the schema, not the query, is at fault.
        if state in ("42P01", "42703", "42704", "42883") or "no such table" in message or "no such column" in message:
            return "schema"
        if _thrift_status(orig) is not None:  # the server answered: the statement failed, not the connection
            return "query"
        if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError) or exc.connection_invalidated:
            return "connection"
        return "query"
    if isinstance(exc, OSError | sa.exc.ArgumentError | sa.exc.NoSuchModuleError):
        return "connection"
    return "internal"
