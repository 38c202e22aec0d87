"""mlmon's state database: the training runs reported by training pipelines, and the
kept time slices of ``mlmon serve``, the predictions' and the labels' online ones
(``predictions.saved_slices``).

Any SQLAlchemy URL (SQLite file by default); the schema is created and upgraded by
Alembic (``migrate``), never by hand. A run is stored once per (model, version): the
same body again is accepted without change, a different one is a conflict.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.ext.compiler import compiles

from exporter.db import PoolSize, create_store_engine
from exporter.training.schema import (
    BASELINE_AGE,
    TrainingRun,
    as_utc,
)  # SQLite reads date-times back naive, written in UTC

metadata = sa.MetaData()
#: Mirrors the table created by migrations/versions; queries use this definition.
training_runs = sa.Table(
    "mlmon_training_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(100), nullable=False),
    sa.Column("version", sa.String(100), nullable=False),
    sa.Column("trained_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("training_rows", sa.BigInteger, nullable=False),
    sa.Column("validation_rows", sa.BigInteger),
    sa.Column("validation_logloss", sa.Double),
    sa.Column("validation_roc_auc", sa.Double),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("body_sha256", sa.String(64), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
)
#: Mirrors migrations/versions/0002: one row per (model, kept time slice), its start in
#: microseconds since the epoch; ``fingerprint`` names what determined its contents.
kept_slices = sa.Table(
    "mlmon_kept_slices",
    metadata,
    sa.Column("model", sa.String(100), primary_key=True),
    sa.Column("slice_start_us", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("hist", sa.LargeBinary, nullable=False),
    sa.Column("top", sa.LargeBinary, nullable=False),
    sa.Column("meta", sa.Text, nullable=False),
)
#: Mirrors migrations/versions/0003: one row per (model, kept online slice), as
#: ``kept_slices``; ``buckets`` the labeled buckets as ``.npy`` bytes, ``meta`` JSON.
kept_online_slices = sa.Table(
    "mlmon_kept_online_slices",
    metadata,
    sa.Column("model", sa.String(100), primary_key=True),
    sa.Column("slice_start_us", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("buckets", sa.LargeBinary, nullable=False),
    sa.Column("meta", sa.Text, nullable=False),
)

#: Mirrors migrations/versions/0004: one row per (model, kept replay slice), as
#: ``kept_slices``; ``meta`` JSON of its form and three numbers (``saved_slices.encode_replays``).
kept_replay_slices = sa.Table(
    "mlmon_kept_replay_slices",
    metadata,
    sa.Column("model", sa.String(100), primary_key=True),
    sa.Column("slice_start_us", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("meta", sa.Text, nullable=False),
)


class RunConflict(Exception):
    """The model version is stored already, with a different body."""


class TooManyModels(Exception):
    """The run is of a new model and the state database holds runs of the most models allowed."""


_MIGRATING = threading.Lock()


def migrate(engine: sa.Engine) -> None:
    """Create or upgrade the state schema to the newest revision, in one transaction.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database cannot be reached or altered.
    """
    config = AlembicConfig()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    # Alembic's ``context`` is one per process: two migrations at once (two state databases,
    # or a refresh thread still running while a new app starts) would run in each other's.
    with _MIGRATING, engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


class StateDatabase:
    """The state database's engine, migrated on first use (and again after a failure).

    With ``timeout`` (seconds), PostgreSQL connections give up connecting after it and every
    statement is cancelled on the server after it (``statement_timeout``): a write waiting on
    a lock must end as an error (a 503 of the API), not hold a thread for ever. ``pool``
    sizes its connection pool (``server.app.state_pool``), as ``db.create_store_engine``.
    """

    def __init__(self, url: sa.URL | str, timeout: float | None = None, pool: PoolSize | None = None):
        self.engine = create_store_engine(url, timeout, pool)
        if timeout is not None and self.engine.dialect.name == "postgresql":
            sa.event.listen(self.engine, "connect", _statement_timeout(timeout))
        self._migrated = False
        self._lock = threading.Lock()

    def ready(self) -> sa.Engine:
        """The engine, once the schema is at the newest revision.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the database cannot be reached or migrated.
        """
        with self._lock:
            if not self._migrated:
                _create_private_sqlite_file(self.engine.url)
                migrate(self.engine)
                self._migrated = True
        return self.engine

    def failed(self) -> None:
        """Check the schema again on next use: the database may have been replaced."""
        with self._lock:
            self._migrated = False


def _create_private_sqlite_file(url: sa.URL) -> None:
    """Create a SQLite state database file readable by its owner only (0600) before SQLite
    creates it with the umask's (usually world-readable) mode; its journals inherit the
    mode. An existing file keeps its mode; a file that cannot be created is left for
    SQLite to report."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:") or url.database.startswith("file:"):
        return
    try:
        os.close(os.open(url.database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:  # it exists (kept as it is), or SQLite reports why it cannot be opened
        pass


def _statement_timeout(seconds: float):
    def on_connect(dbapi_connection, _record) -> None:
        # Session-wide, set once per new pooled connection; committed so that the SET
        # does not leave the connection inside a transaction.
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET statement_timeout = {max(1, int(seconds * 1000))}")
        dbapi_connection.commit()

    return on_connect


def save_run(engine: sa.Engine, run: TrainingRun, received_at: datetime, max_models: int | None = None) -> str:
    """Store a run unless its (model, version) is stored already.

    With ``max_models``, a run of a model without stored runs is refused once runs of that
    many models are stored. The count is read in the insert's transaction; concurrent first
    runs of new models may each see the same count, so the limit can be passed by as many
    models as arrive at the same instant.

    Returns:
        ``"created"``, or ``"unchanged"`` when the same body was stored before.

    Raises:
        RunConflict: that version is stored with a different body (nothing is overwritten).
        TooManyModels: the run is of a new model and ``max_models`` models have runs.
        sqlalchemy.exc.SQLAlchemyError: the database failed; nothing was stored.
    """
    body = run.canonical_json()
    digest = hashlib.sha256(body.encode()).hexdigest()
    try:
        with engine.begin() as conn:
            if max_models is not None:
                _check_model_limit(conn, run.model, max_models)
            conn.execute(
                training_runs.insert().values(
                    model=run.model,
                    version=run.version,
                    trained_at=run.trained_at,
                    training_rows=run.training_rows,
                    validation_rows=run.validation_rows,
                    validation_logloss=run.validation_logloss,
                    validation_roc_auc=run.validation_roc_auc,
                    body=body,
                    body_sha256=digest,
                    received_at=received_at,
                )
            )
        return "created"
    except sa.exc.IntegrityError:
        # The unique (model, version) constraint decides between concurrent writers.
        pass
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(training_runs.c.body_sha256).where(
                training_runs.c.model == run.model, training_runs.c.version == run.version
            )
        ).scalar()
    if stored == digest:
        return "unchanged"
    raise RunConflict(
        f"model {run.model!r} version {run.version!r} is already stored with a different body; "
        "report a new version instead of changing a stored one, "
        f"or delete it first: DELETE /api/v1/models/{run.model}/versions/{run.version}"
    )


def _check_model_limit(conn: sa.Connection, model: str, max_models: int) -> None:
    known = conn.execute(sa.select(training_runs.c.id).where(training_runs.c.model == model).limit(1)).first()
    if known is not None:
        return
    count = conn.execute(sa.select(sa.func.count(sa.distinct(training_runs.c.model)))).scalar_one()
    if count >= max_models:
        raise TooManyModels(
            f"runs of {count} models are stored, the most allowed (training.max_models = {max_models}); "
            f"delete the runs of a model that is gone, or raise the limit, to report model {model!r}"
        )


def delete_run(engine: sa.Engine, model: str, version: str) -> bool:
    """Delete the stored run of ``model`` ``version``; ``False`` when there was none.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database failed; nothing was deleted.
    """
    with engine.begin() as conn:
        deleted = conn.execute(
            training_runs.delete().where(training_runs.c.model == model, training_runs.c.version == version)
        )
    return deleted.rowcount > 0


@dataclass(frozen=True)
class StoredRun:
    """A stored run's headline numbers; ``run`` (the whole body) only where it was loaded."""

    version: str
    trained_at: datetime
    training_rows: int
    validation_rows: int | None
    validation_logloss: float | None
    validation_roc_auc: float | None
    received_at: datetime
    run: TrainingRun | None = None


_HEADLINE = [
    training_runs.c.version,
    training_runs.c.trained_at,
    training_runs.c.training_rows,
    training_runs.c.validation_rows,
    training_runs.c.validation_logloss,
    training_runs.c.validation_roc_auc,
    training_runs.c.received_at,
]
#: Newest first: by training time, then by arrival for runs trained at the same time.
_NEWEST_FIRST = (training_runs.c.trained_at.desc(), training_runs.c.id.desc())


def _stored(row, body: str | None = None) -> StoredRun:
    return StoredRun(
        version=row.version,
        trained_at=as_utc(row.trained_at),
        training_rows=int(row.training_rows),
        validation_rows=None if row.validation_rows is None else int(row.validation_rows),
        validation_logloss=row.validation_logloss,
        validation_roc_auc=row.validation_roc_auc,
        received_at=as_utc(row.received_at),
        run=None if body is None else TrainingRun.model_validate_json(body),
    )


def list_models(engine: sa.Engine) -> list[str]:
    """Names of the models with at least one stored run, sorted."""
    with engine.connect() as conn:
        return list(conn.execute(sa.select(training_runs.c.model).distinct().order_by(training_runs.c.model)).scalars())


def list_versions(engine: sa.Engine, model: str, limit: int | None = None) -> list[StoredRun]:
    """The model's runs, newest first (all, or the newest ``limit``); bodies not loaded."""
    query = sa.select(*_HEADLINE).where(training_runs.c.model == model).order_by(*_NEWEST_FIRST).limit(limit)
    with engine.connect() as conn:
        return [_stored(row) for row in conn.execute(query)]


@dataclass(frozen=True)
class ModelHistory:
    """What the training metrics of one model need: the newest runs (newest first, the
    two newest with their bodies) and the 30-day baseline."""

    recent: list[StoredRun]
    month_ago: StoredRun | None


class _before(sa.sql.expression.FunctionElement):
    """``timestamp - BASELINE_AGE`` in SQL, exact to the microsecond, for the state
    databases mlmon supports: SQLite and PostgreSQL (tested; DuckDB takes the same SQL),
    plus a MySQL/MariaDB form that is compiled in the tests but not run."""

    type = sa.DateTime(timezone=True)
    name = "mlmon_before"
    inherit_cache = True


@compiles(_before)
def _before_interval(element, compiler, **kw) -> str:
    # Hours, not days: a day on a PostgreSQL timestamptz follows the session's DST changes.
    hours = int(BASELINE_AGE.total_seconds() // 3600)
    return f"({compiler.process(element.clauses, **kw)} - INTERVAL '{hours} hours')"


@compiles(_before, "mysql")  # MariaDB compiles with the mysql dialect too
def _before_mysql(element, compiler, **kw) -> str:
    # MySQL has no quoted interval literal ('720 hours'): its unit is a keyword.
    hours = int(BASELINE_AGE.total_seconds() // 3600)
    return f"({compiler.process(element.clauses, **kw)} - INTERVAL {hours} HOUR)"


@compiles(_before, "sqlite")
def _before_sqlite(element, compiler, **kw) -> str:
    # SQLAlchemy stores SQLite date-times as 'YYYY-MM-DD HH:MM:SS.ffffff' text, compared as
    # text; strftime drops the microseconds, which whole hours leave unchanged: append them.
    hours = int(BASELINE_AGE.total_seconds() // 3600)
    column = compiler.process(element.clauses, **kw)
    return f"(strftime('%Y-%m-%d %H:%M:%S', {column}, '-{hours} hours') || substr({column}, 20))"


def load_histories(
    engine: sa.Engine, versions: int, as_of: datetime
) -> tuple[dict[str, ModelHistory], dict[str, Exception]]:
    """Every model's newest ``versions`` runs trained at or before ``as_of`` and its 30-day
    baseline (the newest run trained at least ``BASELINE_AGE`` before the newest one), in
    two queries whatever the number of models.

    Returns:
        (history by model, the exception by model whose stored runs cannot be read back,
        e.g. a body that no longer passes validation): one model's bad data never hides
        the others'.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database failed.
    """
    as_of = as_of.astimezone(UTC)  # SQLite compares date-times as UTC wall-clock text
    runs = training_runs.c
    seen = runs.trained_at <= as_of
    rank = sa.func.row_number().over(partition_by=runs.model, order_by=_NEWEST_FIRST).label("rank")
    ranked = sa.select(runs.model, *_HEADLINE, runs.body, rank).where(seen).subquery()
    recent_query = (
        sa.select(
            ranked.c.model,
            *[ranked.c[c.name] for c in _HEADLINE],
            sa.case((ranked.c.rank <= 2, ranked.c.body)).label("body"),
        )
        .where(ranked.c.rank <= versions)
        .order_by(ranked.c.model, ranked.c.rank)
    )
    newest = (
        sa.select(runs.model, sa.func.max(runs.trained_at).label("newest")).where(seen).group_by(runs.model).subquery()
    )
    older = (
        sa.select(runs.model, *_HEADLINE, rank)
        .join(newest, newest.c.model == runs.model)
        .where(runs.trained_at <= _before(newest.c.newest))
        .subquery()
    )
    baseline_query = sa.select(older.c.model, *[older.c[c.name] for c in _HEADLINE]).where(older.c.rank == 1)
    with engine.connect() as conn:
        recent_rows = conn.execute(recent_query).all()
        baseline_rows = {row.model: row for row in conn.execute(baseline_query)}
    by_model: dict[str, list] = {}
    for row in recent_rows:
        by_model.setdefault(row.model, []).append(row)
    histories, failures = {}, {}
    for model, rows in by_model.items():
        try:
            recent = [_stored(row, row.body) for row in rows]
            month_ago = baseline_rows.get(model)
            histories[model] = ModelHistory(recent, None if month_ago is None else _stored(month_ago))
        except Exception as exc:  # one model's unreadable run, reported by the caller
            failures[model] = exc
    return histories, failures


def load_run(engine: sa.Engine, model: str, version: str | None, as_of: datetime) -> TrainingRun | None:
    """The stored run a model's serving features are compared with: that of ``version``
    when given (whenever it was trained), else the newest run trained at or before
    ``as_of``; ``None`` when there is none.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database failed.
        pydantic.ValidationError: the stored body no longer validates.
    """
    runs = training_runs.c
    query = sa.select(runs.body).where(runs.model == model)
    if version is not None:
        query = query.where(runs.version == version)
    else:
        query = query.where(runs.trained_at <= as_of.astimezone(UTC)).order_by(*_NEWEST_FIRST).limit(1)
    with engine.connect() as conn:
        body = conn.execute(query).scalar()
    return None if body is None else TrainingRun.model_validate_json(body)
