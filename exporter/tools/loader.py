"""Load CSV and Parquet files into a SQL table (``mlmon load``).

Each file is read in chunks of ``CHUNK_ROWS`` rows, so memory does not grow with the
file, and loaded in one transaction: either all of its rows are committed or none.
The first file creates the table when it does not exist (column types inferred by
pandas from its first chunk); every later file, and every file loaded into an existing
table, must have exactly the table's columns, in any order. On PostgreSQL and SQLite
each file's transaction ends with ANALYZE of the table, so that mlmon's queries are
planned with its statistics. A column of the first chunk
that holds numbers and also other values is refused rather than created as text (a score
or label column with one stray ``n/a`` would otherwise become a text column that mlmon
cannot read); ``text_columns`` names the columns where such a mix is meant.

Timestamp columns are parsed as ISO-8601 and stored as UTC instants: naive values mean
UTC, values with an offset are converted. PostgreSQL
stores them in ``timestamp with time zone`` columns; the other dialects (SQLite, MySQL,
DuckDB, ...) get naive UTC values, which is what mlmon reads naive columns as by default.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine

from exporter.db import create_store_engine, safe_url
from exporter.errors import first_line

#: Rows read, parsed and inserted at a time.
CHUNK_ROWS = 50_000

#: Dialects whose timestamp columns can hold a time zone, and that pandas creates as such.
_AWARE_DIALECTS = frozenset({"postgresql"})

#: Errors of reading a file or writing to the database that mean "this file did not load".
#: pandas' ParserError and UnicodeDecodeError are ValueErrors.
_LOAD_FAILURES = (sa.exc.SQLAlchemyError, OSError, ValueError, pa.ArrowException)


class LoadError(Exception):
    """A file could not be loaded; the message names the file and the offending column, row or value.

    Nothing from that file is in the table; files loaded before it stay loaded.
    """


def load_files(
    url: str,
    table: str,
    files: list[Path],
    timestamp_columns: list[str] | None = None,
    schema: str | None = None,
    *,
    chunk_rows: int = CHUNK_ROWS,
    text_columns: list[str] | None = None,
) -> int:
    """Load CSV (``.csv``, ``.csv.gz``) and Parquet (``.parquet``, ``.pq``) files into ``table``, in order.

    Shows a progress bar per file on stderr (bytes read for CSV, rows for Parquet).

    Args:
        url: SQLAlchemy URL of the target database (only ever shown through ``safe_url``).
        table: the target table; created from the first file's columns if missing, else appended to.
        files: the files, each loaded in its own transaction.
        timestamp_columns: columns to parse as UTC timestamps. ``None`` means ``["timestamp"]``
            for a file that has a ``timestamp`` column and none otherwise.
        schema: database schema of ``table`` (``None``: the connection's default).
        chunk_rows: rows per chunk read and inserted.
        text_columns: columns of a new table to create as text even when some of their
            values are numbers (others are refused then).

    Returns:
        The number of rows loaded, over all files.

    Raises:
        LoadError: the URL is unusable, or a file has an unknown suffix, cannot be read,
            is empty or not UTF-8, has a single header column holding another delimiter
            (``;``, tab, ``|``), repeats a column name, has a row with more or fewer fields
            than its header, lacks a named timestamp
            column, has an unparsable timestamp (row numbers count data rows from 1, header
            excluded), has columns other than the existing table's, would create a column
            that mixes numbers and other values (outside ``text_columns``), or the database
            rejects its rows. Nothing from that file is loaded;
            the files before it stay loaded and the files after it are not read.
    """
    try:
        engine = create_store_engine(url)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ValueError) as exc:  # ValueError: e.g. a bad port
        raise LoadError(f"cannot use database URL {safe_url(url)}: {exc}") from None
    target = f"{schema}.{table}" if schema else table
    total = 0
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rows]:,} rows"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    try:
        with progress:
            for path in files:
                try:
                    total += _load_file(
                        engine, path, table, schema, timestamp_columns, chunk_rows, progress, text_columns or []
                    )
                except LoadError as exc:
                    earlier = f"; {total:,} row(s) from earlier files stay loaded" if total else ""
                    raise LoadError(f"{exc} (nothing from this file was loaded into {target}{earlier})") from exc
    finally:
        engine.dispose()
    return total


def _load_file(
    engine: Engine,
    path: Path,
    table: str,
    schema: str | None,
    timestamp_columns: list[str] | None,
    chunk_rows: int,
    progress: Progress,
    text_columns: list[str],
) -> int:
    """Load one file in one transaction; drop the table again if this file created it and failed.

    Raises:
        LoadError: as ``load_files``; the table is as it was before the file.
    """
    created = loaded = False
    try:
        source = _open_source(path, timestamp_columns)
        with engine.begin() as conn:
            existing = _existing_columns(conn, table, schema)
            if existing is not None:
                _check_columns(path, source.columns, existing, table)
            dialect = conn.dialect.name
            aware = {name: _stores_aware(dialect, existing, name) for name in source.timestamps}
            # Explicit types matter only when pandas creates the table: a timestamp column
            # that is empty in the first chunk would otherwise get a type guessed from nulls,
            # and MySQL's plain DATETIME would drop the fractional seconds.
            types = {name: _timestamp_type(dialect, aware[name]) for name in source.timestamps}
            task = progress.add_task(path.name, total=source.total, rows=0)
            rows = 0
            for chunk, done in source.chunks(chunk_rows):
                if chunk.empty:
                    continue  # a header-only file must not create a table of guessed types
                _parse_timestamps(chunk, aware, path, rows)
                if existing is not None:
                    _check_values(chunk, existing, path, rows)
                else:
                    _check_new_columns(chunk, set(source.timestamps) | set(text_columns), path, rows)
                # Set before inserting: a failing first insert may already have created the table.
                created = created or existing is None
                chunk.to_sql(table, con=conn, schema=schema, if_exists="append", index=False, dtype=types)
                if existing is None:  # check later chunks against the types the table got
                    existing = _existing_columns(conn, table, schema)
                rows += len(chunk)
                # Only once the chunk is in: a rejected chunk must not show as done.
                progress.update(task, completed=done, rows=rows)
            if rows:
                _analyze(conn, table, schema)
            progress.update(task, completed=source.total)
        loaded = True
        return rows
    except _LOAD_FAILURES as exc:
        raise LoadError(f"{path}: {first_line(exc)}") from exc
    finally:
        # Also on KeyboardInterrupt: an interrupted first load must not leave a table behind.
        if created and not loaded:
            _drop_created(engine, path, table, schema)


def _analyze(conn: Connection, table: str, schema: str | None) -> None:
    """Refresh the planner statistics of the loaded table, in the load's transaction.

    PostgreSQL plans by them: a table queried before autovacuum gets to it looks empty
    to the planner (docs/performance.md); its ANALYZE reads a sample of the table. SQLite
    records the row count (and index statistics) in ``sqlite_stat1``, which its planner
    reads; its ANALYZE reads every index whole unless ``PRAGMA analysis_limit`` is set, so
    it is set to 1000 rows per index, SQLite's suggested value
    (https://sqlite.org/lang_analyze.html#approx): the statistics are then estimates,
    which is all the planner needs. Other dialects keep their statistics up to date themselves.
    """
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("PRAGMA analysis_limit=1000")
    if conn.dialect.name in ("postgresql", "sqlite"):
        conn.exec_driver_sql("ANALYZE " + conn.dialect.identifier_preparer.format_table(sa.table(table, schema=schema)))


def _drop_created(engine: Engine, path: Path, table: str, schema: str | None) -> None:
    """Drop the table a failed file created, so that a failed first file leaves no table.

    PostgreSQL has already rolled the CREATE TABLE back with the rest of the transaction;
    pysqlite commits DDL outside the transaction, so on SQLite the table is still there.

    Raises:
        LoadError: the table could not be dropped (caused by the drop's error).
    """
    try:
        with engine.begin() as conn:
            sa.Table(table, sa.MetaData(), schema=schema).drop(conn, checkfirst=True)
    except sa.exc.SQLAlchemyError as exc:
        raise LoadError(
            f"{path}: the load failed, and dropping the table {table!r} it had created failed too: {first_line(exc)}"
        ) from exc


def _open_source(path: Path, timestamp_columns: list[str] | None) -> _CsvSource | _ParquetSource:
    """The reader for ``path``, chosen by its suffix, with its columns and timestamp columns resolved.

    Raises:
        LoadError: unknown suffix, or a named timestamp column is missing.
        OSError, ValueError, pyarrow.ArrowException: the file cannot be read.
    """
    name = path.name.lower()
    if name.endswith(".csv"):
        return _CsvSource(path, None, timestamp_columns)
    if name.endswith(".csv.gz"):
        return _CsvSource(path, "gzip", timestamp_columns)
    if name.endswith((".parquet", ".pq")):
        return _ParquetSource(path, timestamp_columns)
    raise LoadError(f"{path}: unknown file type; expected .csv, .csv.gz, .parquet or .pq")


def _timestamp_columns(path: Path, columns: list[str], requested: list[str] | None) -> list[str]:
    """The columns to parse as timestamps: ``requested``, or ``timestamp`` if the file has one.

    Raises:
        LoadError: a requested column is not in the file.
    """
    if requested is None:
        return ["timestamp"] if "timestamp" in columns else []
    missing = [name for name in requested if name not in columns]
    if missing:
        raise LoadError(
            f"{path}: timestamp column(s) {', '.join(map(repr, missing))} not in the file "
            f"(columns: {', '.join(columns)})"
        )
    return list(requested)


class _CsvSource:
    """A CSV file, optionally gzip-compressed.

    ``total`` is the file size: progress counts the (compressed) bytes read so far, since
    the number of rows is not known without reading the whole file first.
    """

    def __init__(self, path: Path, compression: str | None, timestamp_columns: list[str] | None):
        self.path = path
        self.compression = compression
        # One pass of Python's csv module over the whole file before pandas reads it: pandas
        # would load a short row with NULLs, mangle a duplicate column name into "id.1",
        # report an undecodable byte without its line, and take a first row with one field
        # too many as the header of an index column (shifting every column by one).
        self.columns = self._check_rows()
        self.timestamps = _timestamp_columns(path, self.columns, timestamp_columns)
        self.total = path.stat().st_size

    def chunks(self, rows: int) -> Iterator[tuple[pd.DataFrame, int]]:
        """(DataFrame of up to ``rows`` rows, bytes of the file read so far); timestamp
        columns still text.

        Raises:
            LoadError: pandas cannot parse the file (the rows were checked before, so rarely).
        """
        with open(self.path, "rb") as raw:
            # Timestamp columns stay text here: pandas' own type guess could turn them
            # into numbers before the ISO-8601 parser sees them.
            text = {name: str for name in self.timestamps}
            try:
                with pd.read_csv(raw, chunksize=rows, compression=self.compression, dtype=text) as reader:
                    for chunk in reader:
                        yield chunk, raw.tell()
            except pd.errors.ParserError as exc:
                raise LoadError(f"{self.path}: {first_line(exc)}") from None

    def _lines(self) -> Iterator[str]:
        """The file's lines decoded as UTF-8 (a BOM on the first line dropped), ends kept.

        Raises:
            LoadError: a line is not valid UTF-8 (names the line, byte offset and byte).
        """
        opener = gzip.open if self.compression == "gzip" else open
        offset = 0
        with opener(self.path, "rb") as raw:
            for number, line in enumerate(raw, 1):
                try:
                    yield line.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    where = " of the uncompressed data" if self.compression else ""
                    raise LoadError(
                        f"{self.path}: line {number} (byte offset {offset + exc.start}{where}) is not UTF-8: "
                        f"cannot decode byte 0x{line[exc.start]:02x}; re-encode the file to UTF-8, "
                        f"e.g. iconv -f latin1 -t utf-8 {self.path.name} > fixed.csv"
                    ) from None
                offset += len(line)

    def _check_rows(self) -> list[str]:
        """The header's column names, once every row of the file is known to fit it.

        Blank lines are no rows (pandas skips them too); rows count data rows from 1.

        Raises:
            LoadError: the file is empty, is not UTF-8, has a single header column holding
                ``;``, a tab or ``|`` (another delimiter), repeats a column name, or has a
                row with more or fewer fields than the header.
        """
        reader = csv.reader(self._lines())
        header = next(reader, None)
        while header == []:  # leading blank lines
            header = next(reader, None)
        if header is None:
            raise LoadError(f"{self.path}: the file is empty (not even a header line with the column names)")
        if len(header) == 1:
            for delimiter, name in ((";", "';'"), ("\t", "a tab"), ("|", "'|'")):
                if delimiter in header[0]:
                    raise LoadError(
                        f"{self.path}: the header {header[0]!r} is a single column; the file seems separated by "
                        f"{name}, but mlmon load reads comma-separated files: convert it to commas"
                    )
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise LoadError(
                f"{self.path}: the header repeats column(s) {', '.join(map(repr, repeated))} "
                f"({', '.join(header)}); every column needs its own name"
            )
        rows = (fields for fields in reader if fields)
        for row, fields in enumerate(rows, 1):
            if len(fields) != len(header):
                raise LoadError(
                    f"{self.path}: row {row} (line {reader.line_num}) has {len(fields)} fields; "
                    f"the header has {len(header)} ({', '.join(header)})"
                )
        return header


class _ParquetSource:
    """A Parquet file, read in record batches; ``total`` and progress count rows."""

    def __init__(self, path: Path, timestamp_columns: list[str] | None):
        self.file = pq.ParquetFile(path)
        self.columns = list(self.file.schema_arrow.names)
        self.timestamps = _timestamp_columns(path, self.columns, timestamp_columns)
        self.total = self.file.metadata.num_rows

    def chunks(self, rows: int) -> Iterator[tuple[pd.DataFrame, int]]:
        """(DataFrame of up to ``rows`` rows, rows of the file read so far)."""
        done = 0
        for batch in self.file.iter_batches(batch_size=rows):
            done += batch.num_rows
            # ignore_metadata: load the columns stored in the file as they are, rather than
            # let pandas metadata turn some into an index that to_sql(index=False) would drop.
            yield batch.to_pandas(ignore_metadata=True), done


def _existing_columns(conn: Connection, table: str, schema: str | None) -> dict[str, sa.types.TypeEngine] | None:
    """The existing table's column types by name, or ``None`` if the table does not exist."""
    inspector = sa.inspect(conn)
    if not inspector.has_table(table, schema=schema):
        return None
    return {column["name"]: column["type"] for column in inspector.get_columns(table, schema=schema)}


def _check_columns(path: Path, columns: list[str], existing: dict[str, sa.types.TypeEngine], table: str) -> None:
    """Require the file's column set to equal the table's (order free).

    Raises:
        LoadError: listing the table's columns missing from the file and the file's extra ones.
    """
    missing = [name for name in existing if name not in columns]
    extra = [name for name in columns if name not in existing]
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"missing column(s) {', '.join(map(repr, missing))}")
        if extra:
            problems.append(f"extra column(s) {', '.join(map(repr, extra))}")
        raise LoadError(
            f"{path}: columns do not match table {table!r}: {'; '.join(problems)} "
            f"(table columns: {', '.join(existing)})"
        )


def _check_values(frame: pd.DataFrame, existing: dict[str, sa.types.TypeEngine], path: Path, first_row: int) -> None:
    """Require every value of a numeric or boolean table column to be a number (an integer
    for integer columns; 0/1 or true/false for booleans). SQLite would store any text in
    such a column, where it would later read as 0 or be silently skipped.

    Raises:
        LoadError: names the column, the row (data rows from 1) and the value.
    """
    for name, column_type in existing.items():
        raw = frame[name]
        if isinstance(column_type, sa.Boolean):
            ok = raw.isna() | raw.isin([True, False, 0, 1])
            expected = "a boolean (true/false or 0/1)"
        elif isinstance(column_type, sa.Integer | sa.Numeric | sa.Float):
            numbers = pd.to_numeric(raw, errors="coerce")
            ok = raw.isna() | numbers.notna()
            expected = "a number"
            if isinstance(column_type, sa.Integer):
                ok &= raw.isna() | (numbers == np.floor(numbers))
                expected = "an integer"
        else:
            continue
        bad = np.flatnonzero(~ok.to_numpy())
        if bad.size:
            i = int(bad[0])
            value = raw.iloc[i]
            value = value.item() if isinstance(value, np.generic) else value  # 4.5, not np.float64(4.5)
            raise LoadError(
                f"{path}: column {name!r}, row {first_row + i + 1}: {value!r} is not {expected} "
                f"(the table's column is {column_type})"
            )


#: Rows named in an error about values, at most.
_ROWS_SHOWN = 5


def _check_new_columns(frame: pd.DataFrame, exempt: set[str], path: Path, first_row: int) -> None:
    """Refuse a column of a new table's first chunk that holds numbers and other values:
    pandas would create it as text, and a score or label column of text type is what
    check-config and every refresh reject later, far from the load that caused it.

    Args:
        exempt: timestamp columns (parsed already) and the columns the user declared text.

    Raises:
        LoadError: names the column, how many rows hold numbers, and the first rows (data
            rows from 1) that do not, with their values.
    """
    for name in frame.columns:
        raw = frame[name]
        if name in exempt or not (pd.api.types.is_object_dtype(raw.dtype) or pd.api.types.is_string_dtype(raw.dtype)):
            continue
        numbers = pd.to_numeric(raw, errors="coerce")
        others = np.flatnonzero((raw.notna() & numbers.isna()).to_numpy())
        if others.size and numbers.notna().any():
            shown = ", ".join(f"row {first_row + i + 1}: {raw.iloc[i]!r}" for i in others[:_ROWS_SHOWN])
            more = f" and {others.size - _ROWS_SHOWN} more" if others.size > _ROWS_SHOWN else ""
            raise LoadError(
                f"{path}: column {name!r} would be created as text: {int(numbers.notna().sum())} row(s) hold numbers "
                f"but {others.size} do not ({shown}{more}); fix those rows, or pass --text {name} to load the column "
                "as text"
            )


def _stores_aware(dialect: str, existing: dict[str, sa.types.TypeEngine] | None, name: str) -> bool:
    """Whether timestamp column ``name`` receives timezone-aware values (else naive UTC).

    An existing date-time column decides by its own type: giving an aware value to a
    PostgreSQL ``timestamp without time zone`` column would convert it to the session's
    time zone, not to UTC. A new column is aware only where the dialect can store it.
    """
    column_type = None if existing is None else existing[name]
    if isinstance(column_type, sa.DateTime):
        return bool(column_type.timezone)
    return dialect in _AWARE_DIALECTS


def _timestamp_type(dialect: str, aware: bool) -> sa.types.TypeEngine:
    """The column type pandas creates a timestamp column with."""
    if dialect in ("mysql", "mariadb"):
        return mysql.DATETIME(fsp=6)  # plain DATETIME would round away the fractional seconds
    return sa.DateTime(timezone=aware)


def _parse_timestamps(frame: pd.DataFrame, aware: dict[str, bool], path: Path, first_row: int) -> None:
    """Replace each timestamp column of ``frame`` by UTC instants, in place.

    Args:
        aware: column name -> keep the values timezone-aware (else naive UTC).
        first_row: data rows of the file before this chunk, for error messages.

    Raises:
        LoadError: a column holds numbers, or a value is not ISO-8601 (names row and value).
    """
    for name, keep_zone in aware.items():
        raw = frame[name]
        if pd.api.types.is_numeric_dtype(raw.dtype):
            raise LoadError(f"{path}: column {name!r} holds {raw.dtype} values, not ISO-8601 text or timestamps")
        # utc=True reads naive values as UTC and converts values with an offset to UTC.
        parsed = pd.to_datetime(raw, utc=True, format="ISO8601", errors="coerce")
        bad = np.flatnonzero((parsed.isna() & raw.notna()).to_numpy())
        if bad.size:
            i = int(bad[0])
            raise LoadError(
                f"{path}: column {name!r}, row {first_row + i + 1}: "
                f"cannot parse {raw.iloc[i]!r} as an ISO-8601 timestamp"
            )
        frame[name] = parsed if keep_zone else parsed.dt.tz_localize(None)
