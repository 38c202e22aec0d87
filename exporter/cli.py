"""The ``mlmon`` command line: check-config, serve, once, backfill, load, demo, report-training."""

from __future__ import annotations

import logging
import re
import sys
from datetime import datetime, timedelta
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import sqlalchemy as sa
import typer
from typer.core import TyperCommand

from exporter.config import DEFAULT_PORT, ConfigError, Settings, load_settings
from exporter.db import safe_url, timed_connection
from exporter.errors import first_line
from exporter.predictions.stores import utc_now
from exporter.reasons import SchemaError
from exporter.training.schema import as_utc

if TYPE_CHECKING:
    import click  # annotations only: typer 0.29 and later do not depend on click
    from fastapi import FastAPI  # the server is imported only by the commands that serve

    from exporter.predictions.queries import PredictionQueries

# Command docstrings are the --help text: plain text, no reStructuredText markup.
# Plain help, as click prints it: typer's rich panels show a type placeholder (<str>,
# <bool>) beside every option, whose metavar below already says what to give.
app = typer.Typer(
    help="mlmon: Prometheus exporter for machine-learning model monitoring.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class _Command(TyperCommand):
    """A command whose arguments read ``FILE...`` in the usage line and the help, without
    the type placeholder (``<list[Path]>``) and the braces (``{files}...``) that some typer
    versions add.

    The ``type: ignore`` comments: these methods are typed against click, while typer 0.29
    and later hand them their vendored copy (``typer._click``), whose classes mypy sees as
    different; the objects behave the same, and the private copy is not imported by name."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:  # type: ignore[override]
        pieces = [self.options_metavar] if self.options_metavar else []
        params = self.get_params(ctx)  # type: ignore[arg-type]
        return pieces + [_argument_name(p) for p in params if p.param_type_name == "argument"]  # type: ignore[arg-type]

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:  # type: ignore[override]
        params = self.get_params(ctx)  # type: ignore[arg-type]
        arguments = [
            (_argument_name(p), getattr(p, "help", None) or "")  # type: ignore[arg-type]
            for p in params
            if p.param_type_name == "argument"
        ]
        options = [
            record
            for p in params
            if p.param_type_name == "option" and (record := p.get_help_record(ctx))  # type: ignore[arg-type]
        ]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _argument_name(param: click.Parameter) -> str:
    name = param.metavar or param.name.upper()
    return f"{name}..." if param.nargs != 1 else name


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlmon {package_version('mlmon')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """mlmon: Prometheus exporter for machine-learning model monitoring."""


ConfigOption = Annotated[Path, typer.Option("--config", "-c", metavar="FILE", help="YAML config file.")]
HostOption = Annotated[str, typer.Option(metavar="HOST", help="Address to listen on.")]
PortOption = Annotated[int, typer.Option(metavar="PORT", help="Port to listen on.")]
#: ``--log.level`` as Prometheus exporters name it (exporter-toolkit's promlog levels).
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
LogLevelOption = Annotated[
    str,
    typer.Option(
        "--log.level",
        metavar="LEVEL",
        help="Only log messages at this level or above: debug, info, warn or error. Requests are logged at debug.",
    ),
]


def _log_level(name: str) -> int:
    """The ``logging`` level of a ``--log.level`` value; a usage error (exit 2) otherwise."""
    if name not in LOG_LEVELS:
        _fail(f"--log.level: {name!r} is not one of {', '.join(LOG_LEVELS)}")
    return LOG_LEVELS[name]


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def _settings(path: Path) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        _fail(str(exc))


def _logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Alembic reports each migration step ("Context impl SQLiteImpl.") at INFO on every
    # start: a debugging detail, not news for the operator.
    logging.getLogger("alembic").setLevel(level if level <= logging.DEBUG else logging.WARNING)


def _parse_as_of(text: str | None, settings: Settings, option: str = "--as-of") -> datetime:
    """The refresh time ``option`` gives (default: now), in UTC; a usage error (exit 2)
    when it is no ISO-8601 time or outside ``refresh.as_of_range`` of ``settings``."""
    from exporter.predictions.refresh import as_of_range

    if text is None:
        return utc_now()
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        _fail(f"{option}: {text!r} is not an ISO-8601 time (e.g. 2019-03-01T12:00:00Z)")
    first, last = as_of_range(settings)
    try:
        in_range = first <= as_utc(value) <= last  # naive times are UTC (docs/configuration.md)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before the first datetime in UTC
        in_range = False
    if not in_range:
        _fail(
            f"{option}: {text!r} is outside the times this config can be computed at, {first.isoformat()} to "
            f"{last.isoformat()} (UTC): every window, label_delay and ingestion_delay before it and the minute "
            "after it must lie within 0001-01-02 and 9999-12-31"
        )
    return as_utc(value)


def _filter_matches(engine: sa.Engine, q: PredictionQueries, timeout: timedelta) -> bool:
    """Whether a row of the prediction table matches its filters, or the table is empty
    (nothing to tell yet), or the search failed (for example cancelled after ``timeout``
    on a large table, on SQLite and PostgreSQL: ``db.timed_connection``; other engines
    by their own limits): no warning rather than a guess."""
    rows = sa.select(sa.literal(1)).select_from(q.table)
    try:
        with timed_connection(engine, timeout.total_seconds()) as conn:
            return (
                conn.execute(rows.where(*q.filters).limit(1)).first() is not None
                or conn.execute(rows.limit(1)).first() is None
            )
    except (sa.exc.SQLAlchemyError, OSError):  # as the schema check above
        return True


@app.command("check-config", short_help="Check the config and every configured table and column.")
def check_config(config: ConfigOption) -> None:
    """Validate the config and every configured table and column, without serving.

    Exit code 0 when valid, 2 with one line per problem (naming its key path) otherwise.
    A refresh_timeout shorter than a model's refresh may legitimately take is warned
    about on stderr (exit 0): slow refreshes that work would be reported stalled. So is a
    filter that no row of a non-empty prediction table matches.
    """
    from exporter.predictions.refresh import model_refreshers, worst_case_duration, worst_case_queries
    from exporter.predictions.stores import Stores

    settings = _settings(config)
    stores = Stores(settings.stores, settings.query_timeout)
    problems = []
    unreachable = set()
    try:
        # Each store once, named by the key that holds its URL; models on it are skipped.
        for name in sorted({model.predictions.store for model in settings.models}):
            try:
                with stores.engine(name).connect():
                    pass
            except (sa.exc.SQLAlchemyError, OSError) as exc:
                unreachable.add(name)
                store = settings.stores[name]
                where = f"at {safe_url(store.url)}" if store.url is not None else f"from {store.url_file}"
                key = "url" if store.url is not None else "url_file"
                problems.append(f"stores.{name}.{key}: cannot reach store {name!r} {where}: {first_line(exc)}")
        refreshers = model_refreshers(settings.models, settings.refresh_policy, stores, training=settings.training)
        for i, refresher in enumerate(refreshers):
            model = refresher.model
            work = worst_case_duration(model, settings.query_timeout)
            if refresher.deadline() < work:
                typer.echo(
                    f"warning: refresh_timeout: {refresher.deadline().total_seconds():g} s is shorter than the "
                    f"{work.total_seconds():g} s a refresh of models[{i}] ({model.name!r}) may take without any query "
                    f"timing out ({worst_case_queries(model)} queries and {len(model.sources())} connection(s), each "
                    f"up to query_timeout); a slow refresh would be reported stalled. Raise it, or leave it unset "
                    "to derive it",
                    err=True,
                )
            if model.predictions.store in unreachable:
                continue
            try:
                refresher.check_schema()
            except SchemaError as exc:
                problems.extend(exc.problems)
                continue
            except (sa.exc.SQLAlchemyError, OSError) as exc:  # lost between the two steps
                problems.append(f"stores.{model.predictions.store}: {first_line(exc)}")
                continue
            if model.predictions.filter and not _filter_matches(
                stores.engine(model.predictions.store), refresher.predictions.queries(), settings.query_timeout
            ):
                typer.echo(
                    f"warning: models[{i}].predictions.filter: no row of table {model.predictions.table!r} matches "
                    f"{dict(model.predictions.filter)} (each value is compared as written: check its spelling and "
                    "case); the model would export no predictions",
                    err=True,
                )
    finally:
        stores.dispose()
    if problems:
        _fail("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))
    typer.echo(f"{config}: OK ({len(settings.models)} model(s), {len(settings.stores)} store(s))")


@app.command(short_help="Serve /metrics, refreshing every model in the background.")
def serve(
    config: ConfigOption,
    host: HostOption = "127.0.0.1",
    port: PortOption = DEFAULT_PORT,
    web_config: Annotated[
        Path | None,
        typer.Option(
            "--web.config.file",
            metavar="FILE",
            help="Web config with TLS and basic auth, in the exporter-toolkit format.",
        ),
    ] = None,
    log_level: LogLevelOption = "info",
) -> None:
    """Serve /metrics, /healthz and /readyz, refreshing every model in the background."""
    import uvicorn

    from exporter.server.app import create_app
    from exporter.server.http_server import server_config
    from exporter.server.malloc import limit_malloc_arenas
    from exporter.server.web_config import REFUSAL_REASONS, BasicAuth, load_web_config

    limit_malloc_arenas()  # first: before any thread allocates
    level = _log_level(log_level)
    _logging(level)
    settings = _settings(config)
    fastapi_app = create_app(settings)
    app_: FastAPI | BasicAuth = fastapi_app
    options = {}
    if web_config is not None:
        try:
            web = load_web_config(web_config)
        except ConfigError as exc:
            _fail(f"--web.config.file {web_config}: {exc}")
        options = web.uvicorn_options()
        if web.basic_auth_users:
            snapshots = fastapi_app.state.snapshots
            snapshots.count_auth_refusals(REFUSAL_REASONS)
            app_ = BasicAuth(app_, web.basic_auth_users, snapshots.count_auth_refusal)
    uvicorn.Server(server_config(app_, settings, host, port, log_level=level, **options)).run()


@app.command(short_help="Refresh every model once and print the exposition.")
def once(
    config: ConfigOption,
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", metavar="TIME", help="ISO-8601 time to compute at (default: now); naive means UTC."),
    ] = None,
) -> None:
    """Refresh every model once and print exactly the exposition /metrics would serve.

    Exit code 1 when a source failed (the exposition is printed all the same)."""
    from exporter.server.collector import build_registry, render
    from exporter.server.loop import refresh_all

    _logging()
    settings = _settings(config)
    store = refresh_all(settings, _parse_as_of(as_of, settings))
    sys.stdout.write(render(build_registry(store, settings.thresholds)).decode())
    failed = [
        f"{name}/{source}" for name, snap in store.models.items() for source, s in snap.sources.items() if not s.up
    ]
    if failed:
        _fail(f"failed source(s): {', '.join(failed)} (see the log above)", code=1)


@app.command(short_help="Write Prometheus history of every model from the stores.")
def backfill(
    config: ConfigOption,
    from_: Annotated[str, typer.Option("--from", metavar="TIME", help="ISO-8601 start (inclusive); naive means UTC.")],
    to: Annotated[str, typer.Option("--to", metavar="TIME", help="ISO-8601 end (exclusive); naive means UTC.")],
    output: Annotated[
        Path, typer.Option(metavar="DIR", file_okay=False, help="Directory of the OpenMetrics files (kept to resume).")
    ],
    step: Annotated[str, typer.Option(metavar="DURATION", help="Time between two evaluations.")] = "5m",
    prometheus_data: Annotated[
        Path | None,
        typer.Option(
            "--prometheus-data", metavar="DIR", file_okay=False, help="Prometheus data directory to write blocks into."
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME=VALUE",
            help="Target label of every series, as Prometheus adds when scraping (repeatable; default: job=mlmon).",
        ),
    ] = None,
    time_slices: Annotated[
        bool,
        typer.Option(
            "--time-slices/--no-time-slices",
            help="Models without time_slice use time_slice: auto, so that, once the slices are filled (24 steps), "
            "a step reads what is new since the previous one; --no-time-slices reads every window at every step, "
            "as `mlmon once` does.",
        ),
    ] = True,
) -> None:
    """Evaluate every model at each step in [--from, --to) as `mlmon once --as-of` does and
    write OpenMetrics files for `promtool tsdb create-blocks-from openmetrics`; with
    --prometheus-data, run promtool too. Running it again continues an interrupted run.

    Exit code 0 when done, 1 when a source, the state database or promtool failed, 2 for a
    usage error or data Prometheus already has in the range (docs/backfill.md)."""
    import shlex
    import shutil

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from exporter.durations import parse_duration
    from exporter.tools.backfill import (
        Backfill,
        BackfillError,
        ManifestError,
        OverlapError,
        clashing_label,
        promtool_command,
        with_time_slices,
    )

    _logging(logging.WARNING)  # a line per step would drown the progress bar
    settings = _settings(config)
    if time_slices:
        settings = with_time_slices(settings)
    start, end = _parse_as_of(from_, settings, "--from"), _parse_as_of(to, settings, "--to")
    if start >= end:
        _fail(f"--from {from_!r} must be before --to {to!r}")
    if end > utc_now():  # samples ahead of the clock would collide with the scrapes to come
        _fail(f"--to {to!r} is in the future: backfill the past, up to mlmon's first scrape (docs/backfill.md)")
    try:
        every = parse_duration(step)
    except ValueError as exc:
        _fail(f"--step: {exc}")
    if every.total_seconds() < 1 or every.total_seconds() % 1:
        _fail(f"--step: {step!r} must be a whole number of seconds, at least 1 s")
    labels = {}
    for item in label if label is not None else ["job=mlmon"]:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name) or clashing_label(name):
            _fail(
                f"--label: {item!r} is not NAME=VALUE with a Prometheus label name that is neither reserved (__*) "
                "nor a label of mlmon's own series (model, window, version, le, ...)"
            )
        labels[name] = value
    promtool = shutil.which("promtool")
    if prometheus_data is not None and promtool is None:
        _fail("--prometheus-data needs promtool on the PATH (Debian package prometheus)")
    job = Backfill(settings, start, end, every, output, labels, prometheus_data, promtool)
    output.mkdir(parents=True, exist_ok=True)
    try:
        job.check_manifest()  # before the progress bar: a refused run draws none
    except ManifestError as exc:
        _fail(f"mlmon backfill: {exc}")
    todo = job.pending()
    progress = Progress(
        TextColumn("backfill"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    try:
        with progress:
            task = progress.add_task("backfill", total=len(todo))
            files = job.run(todo, lambda n: progress.advance(task, n))
    except (OverlapError, ManifestError) as exc:
        _fail(f"mlmon backfill: {exc}")
    except BackfillError as exc:
        _fail(f"mlmon backfill: {exc}", code=1)
    done = len(files)
    typer.echo(f"{len(todo)} step(s) evaluated, {done} file(s) in {output}")
    if prometheus_data is not None:
        typer.echo(f"{len(job.imported)} file(s) turned into blocks of {prometheus_data}")
    elif files:
        command = shlex.join(promtool_command("promtool", Path("FILE"), Path("DATA_DIR"))).replace("FILE", '"$f"')
        typer.echo(
            "next, with DATA_DIR the Prometheus data directory (docs/backfill.md):\n"
            f"  for f in {shlex.quote(str(output))}/mlmon-*.om; do {command}; done"
        )


@app.command(cls=_Command, short_help="Load CSV or Parquet files into a table.")
def load(
    files: Annotated[
        list[Path], typer.Argument(metavar="FILE", help="CSV or Parquet files.", exists=True, dir_okay=False)
    ],
    url: Annotated[str, typer.Option(metavar="URL", help="SQLAlchemy URL of the target database.")],
    table: Annotated[str, typer.Option(metavar="TABLE", help="Target table; created if missing, else appended to.")],
    timestamp: Annotated[
        list[str] | None,
        typer.Option(
            metavar="COLUMN", help="Column to parse as a UTC timestamp (repeatable; default: 'timestamp' if present)."
        ),
    ] = None,
    db_schema: Annotated[
        str | None, typer.Option("--schema", metavar="SCHEMA", help="Database schema of the table.")
    ] = None,
    text: Annotated[
        list[str] | None,
        typer.Option(
            metavar="COLUMN",
            help="Column of a new table to create as text although some values are numbers (repeatable; "
            "by default such a mix is refused).",
        ),
    ] = None,
) -> None:
    """Load CSV or Parquet files into a table, one transaction per file."""
    from exporter.tools.loader import LoadError, load_files

    try:
        total = load_files(url, table, files, timestamp_columns=timestamp, schema=db_schema, text_columns=text)
    except LoadError as exc:
        _fail(str(exc))
    typer.echo(f"loaded {total} row(s) into {table} at {safe_url(url)}")


@app.command(short_help="Serve a demo store of two CTR models that keeps growing.")
def demo(
    host: HostOption = "127.0.0.1",
    port: PortOption = DEFAULT_PORT,
    database: Annotated[Path, typer.Option(metavar="FILE", help="SQLite file of the demo store (recreated).")] = Path(
        "mlmon-demo.sqlite"
    ),
    log_level: LogLevelOption = "info",
) -> None:
    """Create a SQLite store with a week of history for two CTR models, keep it growing, and serve it."""
    from exporter.tools.demo import run_demo

    level = _log_level(log_level)
    _logging(level)
    try:
        run_demo(database, host, port, level)
    except OSError as exc:
        _fail(f"mlmon demo: {exc.strerror or exc}")


@app.command("report-training", cls=_Command)
def report_training(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="Training run as JSON (the body of POST /api/v1/training-runs).", dir_okay=False
        ),
    ],
    url: Annotated[str, typer.Option(metavar="URL", help="Base URL of mlmon, e.g. http://127.0.0.1:9847.")],
    token: Annotated[
        str | None,
        typer.Option(
            envvar="MLMON_API_TOKEN",
            metavar="TOKEN",
            show_default=False,
            help="Bearer token (default: $MLMON_API_TOKEN).",
        ),
    ] = None,
) -> None:
    """Validate a training-run JSON file and report it to mlmon.

    Exit code 0 when stored (or identical to the stored run), 2 when the file is invalid
    (one line per problem, naming its key path), 1 when the server rejects the run or
    cannot be reached. A refused or cut connection and a 502/503/504 are retried after
    1, 2, 4 and 8 s (or the server's Retry-After): safe, as a run is stored once."""
    import httpx
    from pydantic import ValidationError

    from exporter.client import ReportError, post_training_run, redact_url
    from exporter.errors import error_lines
    from exporter.training.schema import TrainingRun

    _logging(logging.WARNING)  # the client's retries; not httpx's line per request

    try:
        run = TrainingRun.model_validate_json(file.read_bytes())
    except OSError as exc:
        _fail(f"{file}: cannot read: {exc.strerror or exc}")
    except ValidationError as exc:
        _fail(f"{file}: invalid training run:\n" + "\n".join(f"  {line}" for line in error_lines(exc.errors())))
    try:
        answer = post_training_run(url, run, token=token)
    except ReportError as exc:
        _fail(f"{redact_url(url)}: {exc}", code=1)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        _fail(f"cannot reach mlmon at {redact_url(url)}: {exc}", code=1)
    # An older server's answer has no in_config: say nothing then.
    aside = f" (model {run.model!r} is not in mlmon's config)" if answer.get("in_config") is False else ""
    typer.echo(f"{answer.get('status', 'reported')} {run.model} {run.version}{aside}")
