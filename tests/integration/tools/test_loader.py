"""``mlmon load`` (exporter.tools.loader) on SQLite and on the real PostgreSQL.

Every expected instant is computed here with ``datetime`` from the text of the file, not
with pandas, and the data is read back through SQLAlchemy. The process runs in
Asia/Tokyo and PostgreSQL sessions use Asia/Tokyo too, so that any value read or stored
in local time instead of UTC is off by nine hours and fails the comparison.
"""

from __future__ import annotations

import csv
import gzip
import math
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from exporter.cli import app
from exporter.tools.loader import LoadError, load_files
from tests.conftest import TEST_DATA

UTC = UTC
CAR_LOAN = TEST_DATA / "car_loan"


@pytest.fixture(autouse=True)
def local_time_is_not_utc(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@dataclass
class Target:
    """A database to load into: its URL, the schema to pass, and how to read a table back."""

    url: str
    schema: str | None

    @property
    def dialect(self) -> str:
        return sa.make_url(self.url).get_backend_name()

    def _table(self, engine: sa.Engine, name: str) -> sa.Table | None:
        try:
            return sa.Table(name, sa.MetaData(), schema=self.schema, autoload_with=engine)
        except sa.exc.NoSuchTableError:
            return None

    def exists(self, name: str) -> bool:
        engine = sa.create_engine(self.url)
        try:
            return self._table(engine, name) is not None
        finally:
            engine.dispose()

    def rows(self, name: str) -> list[dict]:
        """All rows of table ``name`` ordered by ``id``."""
        engine = sa.create_engine(self.url)
        try:
            table = self._table(engine, name)
            assert table is not None, f"table {name} does not exist"
            with engine.connect() as conn:
                return [dict(row._mapping) for row in conn.execute(sa.select(table).order_by(table.c.id))]
        finally:
            engine.dispose()

    def column_type(self, name: str, column: str) -> sa.types.TypeEngine:
        engine = sa.create_engine(self.url)
        try:
            return self._table(engine, name).c[column].type
        finally:
            engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def target(request, tmp_path) -> Target:
    if request.param == "sqlite":
        return Target(f"sqlite:///{tmp_path / 'load.sqlite'}", None)
    url, schema = request.getfixturevalue("postgres_schema")
    tokyo = sa.make_url(url).update_query_dict({"options": "-c timezone=Asia/Tokyo"})
    return Target(tokyo.render_as_string(hide_password=False), schema)


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def as_utc(value: datetime) -> datetime:
    """A value read back as an aware UTC instant: naive values are stored as UTC by contract."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def assert_stored_kind(target: Target, table: str, column: str, rows: list[dict]) -> None:
    """PostgreSQL stores timestamptz (aware values); the other dialects naive UTC."""
    if target.dialect == "postgresql":
        assert target.column_type(table, column).timezone is True
        assert all(r[column].tzinfo is not None for r in rows)
    else:
        assert all(r[column].tzinfo is None for r in rows)


NAIVE_ROWS = [
    [1, "2018-10-30 18:00:00.000", 0.99],
    [2, "2018-10-30 18:08:43.152", 0.07],
    [3, "2019-03-31T01:30:00", 0.5],  # the night clocks change in Europe: no effect in UTC
]
NAIVE_EXPECTED = [
    datetime(2018, 10, 30, 18, 0, tzinfo=UTC),
    datetime(2018, 10, 30, 18, 8, 43, 152000, tzinfo=UTC),
    datetime(2019, 3, 31, 1, 30, tzinfo=UTC),
]


def test_naive_timestamps_are_read_as_utc(target, tmp_path):
    path = write_csv(tmp_path / "naive.csv", ["id", "timestamp", "y_pred_proba"], NAIVE_ROWS)

    assert load_files(target.url, "predictions", [path], schema=target.schema) == 3

    rows = target.rows("predictions")
    assert [as_utc(r["timestamp"]) for r in rows] == NAIVE_EXPECTED
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert [r["y_pred_proba"] for r in rows] == [0.99, 0.07, 0.5]
    assert_stored_kind(target, "predictions", "timestamp", rows)


def test_offsets_are_converted_to_utc(target, tmp_path):
    texts = [
        "2019-03-01T12:00:00+02:00",
        "2019-03-01 00:30:00.250+02:00",
        "2019-03-01T12:00:00-05:30",
        "2019-03-01T08:00:00Z",
    ]
    path = write_csv(tmp_path / "offsets.csv", ["id", "timestamp"], [[i, t] for i, t in enumerate(texts)])
    plus2, minus530 = timezone(timedelta(hours=2)), timezone(-timedelta(hours=5, minutes=30))
    expected = [
        datetime(2019, 3, 1, 12, 0, tzinfo=plus2).astimezone(UTC),
        datetime(2019, 3, 1, 0, 30, 0, 250000, tzinfo=plus2).astimezone(UTC),
        datetime(2019, 3, 1, 12, 0, tzinfo=minus530).astimezone(UTC),
        datetime(2019, 3, 1, 8, 0, tzinfo=UTC),
    ]
    assert expected[0] == datetime(2019, 3, 1, 10, 0, tzinfo=UTC)  # the arithmetic the test relies on

    load_files(target.url, "predictions", [path], schema=target.schema)

    rows = target.rows("predictions")
    assert [as_utc(r["timestamp"]) for r in rows] == expected
    assert_stored_kind(target, "predictions", "timestamp", rows)


def test_an_existing_column_without_time_zone_gets_naive_utc(target, tmp_path):
    engine = sa.create_engine(target.url)
    columns = [sa.Column("id", sa.BigInteger), sa.Column("timestamp", sa.DateTime(timezone=False))]
    sa.Table("predictions", sa.MetaData(), *columns, schema=target.schema).create(engine)
    engine.dispose()
    path = write_csv(tmp_path / "offsets.csv", ["id", "timestamp"], [[1, "2019-03-01T12:00:00+02:00"]])

    load_files(target.url, "predictions", [path], schema=target.schema)

    # On PostgreSQL an aware value would have been converted to the session's Asia/Tokyo time.
    assert [r["timestamp"] for r in target.rows("predictions")] == [datetime(2019, 3, 1, 10, 0)]


def test_a_header_only_file_creates_no_table_but_is_still_checked(target, tmp_path):
    empty = write_csv(tmp_path / "empty.csv", ["id", "timestamp", "y_pred_proba"], [])
    assert load_files(target.url, "predictions", [empty], schema=target.schema) == 0
    assert not target.exists("predictions")

    load_files(
        target.url,
        "predictions",
        [write_csv(tmp_path / "a.csv", ["id", "timestamp"], [[1, "2019-01-01"]])],
        schema=target.schema,
    )
    with pytest.raises(LoadError, match="extra column"):
        load_files(target.url, "predictions", [empty], schema=target.schema)


def test_a_second_file_appends_whatever_its_column_order(target, tmp_path):
    first = write_csv(tmp_path / "a.csv", ["id", "timestamp", "y_pred_proba"], NAIVE_ROWS)
    second = write_csv(
        tmp_path / "b.csv", ["y_pred_proba", "id", "timestamp"], [[0.25, 4, "2019-01-01T00:00:00+01:00"]]
    )

    assert load_files(target.url, "predictions", [first], schema=target.schema) == 3
    assert load_files(target.url, "predictions", [second], schema=target.schema) == 1

    rows = target.rows("predictions")
    assert [r["id"] for r in rows] == [1, 2, 3, 4]
    assert rows[3]["y_pred_proba"] == 0.25
    assert as_utc(rows[3]["timestamp"]) == datetime(2018, 12, 31, 23, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "header, message",
    [
        (["id", "timestamp", "y_pred_proba", "model"], "extra column(s) 'model'"),
        (["id", "timestamp"], "missing column(s) 'y_pred_proba'"),
    ],
)
def test_a_file_whose_columns_do_not_fit_the_table_is_rejected(target, tmp_path, header, message):
    load_files(
        target.url,
        "predictions",
        [write_csv(tmp_path / "a.csv", ["id", "timestamp", "y_pred_proba"], NAIVE_ROWS)],
        schema=target.schema,
    )
    before = target.rows("predictions")
    rows = [[10 + i, "2019-01-01T00:00:00", 0.5, "m"][: len(header)] for i in range(3)]
    bad = write_csv(tmp_path / "bad.csv", header, rows)

    with pytest.raises(LoadError) as caught:
        load_files(target.url, "predictions", [bad], schema=target.schema)

    assert message in str(caught.value)
    assert str(bad) in str(caught.value)
    assert target.rows("predictions") == before


def bad_third_chunk(tmp_path: Path) -> Path:
    """Seven rows read two at a time: row 5, the first of the third chunk, is not a time."""
    rows = [[i, f"2019-01-0{i}T00:00:00", 0.1 * i] for i in range(1, 8)]
    rows[4][1] = "2019-01-05 25:00:00"
    return write_csv(tmp_path / "bad_chunk.csv", ["id", "timestamp", "y_pred_proba"], rows)


def test_a_bad_timestamp_in_a_later_chunk_loads_nothing_from_the_file(target, tmp_path):
    good = write_csv(tmp_path / "a.csv", ["id", "timestamp", "y_pred_proba"], NAIVE_ROWS)
    load_files(target.url, "predictions", [good], schema=target.schema)
    bad = bad_third_chunk(tmp_path)

    with pytest.raises(LoadError) as caught:
        load_files(target.url, "predictions", [bad], schema=target.schema, chunk_rows=2)

    message = str(caught.value)
    assert str(bad) in message and "'timestamp'" in message and "row 5" in message
    assert "'2019-01-05 25:00:00'" in message
    assert [r["id"] for r in target.rows("predictions")] == [1, 2, 3]


def test_a_failed_first_file_leaves_no_table(target, tmp_path):
    with pytest.raises(LoadError, match="row 5"):
        load_files(target.url, "predictions", [bad_third_chunk(tmp_path)], schema=target.schema, chunk_rows=2)

    assert not target.exists("predictions")


def test_files_loaded_before_a_failing_one_stay_loaded(target, tmp_path):
    good = write_csv(tmp_path / "a.csv", ["id", "timestamp", "y_pred_proba"], NAIVE_ROWS)
    after = write_csv(tmp_path / "c.csv", ["id", "timestamp", "y_pred_proba"], [[9, "2019-02-01T00:00:00", 0.9]])

    with pytest.raises(LoadError) as caught:
        load_files(
            target.url, "predictions", [good, bad_third_chunk(tmp_path), after], schema=target.schema, chunk_rows=2
        )

    assert "3 row(s) from earlier files stay loaded" in str(caught.value)
    assert [r["id"] for r in target.rows("predictions")] == [1, 2, 3]  # and the file after it was not read


def test_parquet_in_batches(target, tmp_path):
    plus2 = timezone(timedelta(hours=2))
    naive = [datetime(2019, 1, 1, 0, 0, 0, 1000 * i) + timedelta(hours=i) for i in range(5)]
    aware = [datetime(2019, 6, 1, 12, i, tzinfo=plus2) for i in range(5)]
    table = pa.table(
        {
            "id": pa.array(range(5), pa.int64()),
            "timestamp": pa.array(naive, pa.timestamp("ms")),
            "label_time": pa.array(aware, pa.timestamp("us", tz="+02:00")),
            "served_at": pa.array([f"2019-06-01T12:0{i}:00+02:00" for i in range(4)] + [None]),
            "clicked": pa.array([True, False, None, True, False]),
            "score": pa.array([0.1, 0.2, None, 0.4, 0.5]),
        }
    )
    path = tmp_path / "predictions.pq"
    pq.write_table(table, path)

    loaded = load_files(
        target.url, "predictions", [path], ["timestamp", "label_time", "served_at"], target.schema, chunk_rows=2
    )

    assert loaded == 5
    rows = target.rows("predictions")
    assert [as_utc(r["timestamp"]) for r in rows] == [t.replace(tzinfo=UTC) for t in naive]
    assert [as_utc(r["label_time"]) for r in rows] == [t.astimezone(UTC) for t in aware]
    assert [as_utc(r["served_at"]) for r in rows[:4]] == [t.astimezone(UTC) for t in aware[:4]]
    assert rows[4]["served_at"] is None
    assert [None if r["clicked"] is None else bool(r["clicked"]) for r in rows] == [True, False, None, True, False]
    assert rows[2]["score"] is None and rows[3]["score"] == 0.4
    for column in ("timestamp", "label_time"):
        assert_stored_kind(target, "predictions", column, rows)


def test_numbers_in_a_timestamp_column_are_rejected(target, tmp_path):
    path = tmp_path / "epoch.parquet"
    pq.write_table(pa.table({"id": [1], "timestamp": [1546300800]}), path)

    with pytest.raises(LoadError, match=r"column 'timestamp' holds int64 values"):
        load_files(target.url, "predictions", [path], schema=target.schema)
    assert not target.exists("predictions")


def gzip_copy(source: Path, directory: Path) -> Path:
    copy = directory / (source.name + ".gz")
    with open(source, "rb") as f, gzip.open(copy, "wb") as out:
        shutil.copyfileobj(f, out)
    return copy


@pytest.mark.parametrize("compressed", [False, True], ids=["csv", "csv.gz"])
def test_the_car_loan_slice(target, tmp_path, compressed):
    predictions = CAR_LOAN / "synthetic_car_loan_analysis.csv"
    labels = CAR_LOAN / "synthetic_car_loan_analysis_target.csv"
    if compressed:
        predictions, labels = gzip_copy(predictions, tmp_path), gzip_copy(labels, tmp_path)
    with open(CAR_LOAN / "synthetic_car_loan_analysis.csv", newline="") as f:
        expected = list(csv.DictReader(f))
    instants = [datetime.fromisoformat(r["timestamp"]).replace(tzinfo=UTC) for r in expected]

    assert load_files(target.url, "predictions", [predictions], schema=target.schema, chunk_rows=1000) == 3000
    assert load_files(target.url, "labels", [labels], schema=target.schema) == 3000

    rows = target.rows("predictions")
    assert [r["id"] for r in rows] == [int(r["id"]) for r in expected]
    assert [as_utc(r["timestamp"]) for r in rows] == instants
    assert math.fsum(r["y_pred_proba"] for r in rows) == pytest.approx(
        math.fsum(float(r["y_pred_proba"]) for r in expected)
    )
    assert [r["salary_range"] for r in rows] == [r["salary_range"] for r in expected]  # non-ASCII "€" survives
    assert sum(r["repaid"] for r in target.rows("labels")) == 1568


def test_unknown_suffix_and_missing_timestamp_column(target, tmp_path):
    text = write_csv(tmp_path / "a.txt", ["id"], [[1]])
    with pytest.raises(LoadError, match=r"a\.txt: unknown file type"):
        load_files(target.url, "t", [text], schema=target.schema)

    path = write_csv(tmp_path / "a.csv", ["id", "ts"], [[1, "2019-01-01"]])
    with pytest.raises(LoadError, match=r"timestamp column\(s\) 'served_at' not in the file"):
        load_files(target.url, "t", [path], ["served_at"], target.schema)
    assert not target.exists("t")


def test_cli_load(target, tmp_path):
    good = write_csv(tmp_path / "good.csv", ["id", "timestamp", "y_pred_proba"], NAIVE_ROWS)
    bad = write_csv(tmp_path / "bad.csv", ["id", "when"], [[4, "2019-01-01"]])
    url = target.url
    if target.dialect == "postgresql":
        url = sa.make_url(url).set(password="s3cret").render_as_string(hide_password=False)  # trust auth ignores it
    schema = ["--schema", target.schema] if target.schema else []
    runner = CliRunner()

    result = runner.invoke(app, ["load", "--url", url, "--table", "predictions", *schema, str(good)])

    assert result.exit_code == 0, result.output
    assert "loaded 3 row(s) into predictions" in result.stdout
    assert "good.csv" in result.stderr  # the progress bar
    assert "s3cret" not in result.output

    result = runner.invoke(app, ["load", "--url", url, "--table", "predictions", *schema, str(bad)])

    assert result.exit_code == 2
    assert "missing column(s) 'timestamp', 'y_pred_proba'; extra column(s) 'when'" in result.stderr
    assert "s3cret" not in result.output
    assert len(target.rows("predictions")) == 3


@pytest.mark.parametrize(
    "column, value, expected",
    [("y_pred_proba", "high", "'high' is not a number"), ("id", "4.5", "4.5 is not an integer")],
)
def test_a_value_that_does_not_fit_a_numeric_column_loads_nothing(target, tmp_path, column, value, expected):
    good = write_csv(tmp_path / "a.csv", ["id", "timestamp", "y_pred_proba"], NAIVE_ROWS)
    load_files(target.url, "predictions", [good], schema=target.schema)
    row = {"id": 7, "timestamp": "2019-02-01T00:00:00", "y_pred_proba": 0.5, column: value}
    bad = write_csv(
        tmp_path / "b.csv", ["id", "timestamp", "y_pred_proba"], [[8, "2019-02-01T00:00:00", 0.4], list(row.values())]
    )

    with pytest.raises(LoadError) as caught:
        load_files(target.url, "predictions", [bad], schema=target.schema)

    message = str(caught.value)
    assert f"column {column!r}, row 2: {expected}" in message
    assert [r["id"] for r in target.rows("predictions")] == [1, 2, 3]


def test_later_chunks_of_a_new_table_are_checked_against_its_first_chunk(target, tmp_path):
    rows = [[1, "2019-01-01T00:00:00", 0.1], [2, "2019-01-01T00:01:00", 0.2], [3, "2019-01-01T00:02:00", "oops"]]
    with pytest.raises(LoadError, match="row 3: 'oops' is not a number"):
        load_files(
            target.url,
            "predictions",
            [write_csv(tmp_path / "a.csv", ["id", "timestamp", "y_pred_proba"], rows)],
            schema=target.schema,
            chunk_rows=2,
        )
    assert not target.exists("predictions")


@pytest.mark.parametrize(
    "lines, row, line, fields",
    [
        # The first row too long: pandas would shift every column by one.
        (["1,2019-01-01T00:00:00,0.5,extra", "2,2019-01-01T00:00:00,0.4"], 1, 2, 4),
        (["1,2019-01-01T00:00:00,0.5", "", "2,2019-01-01T00:00:00,0.4,x,y"], 2, 4, 5),  # a blank line is no row
        (['1,"2019-01-01T00:00:00",0.5', '2,"a\nb",0.4', "3,2019-01-01T00:00:00,0.4,x"], 3, 5, 4),  # quoted newline
    ],
)
def test_a_row_with_too_many_fields_is_named_with_its_field_count(target, tmp_path, lines, row, line, fields):
    path = tmp_path / "a.csv"
    path.write_text("id,timestamp,y_pred_proba\n" + "\n".join(lines) + "\n")
    with pytest.raises(LoadError) as caught:
        load_files(target.url, "predictions", [path], schema=target.schema)
    message = str(caught.value)
    assert message.startswith(
        f"{path}: row {row} (line {line}) has {fields} fields; the header has 3 (id, timestamp, y_pred_proba)"
    ), message
    assert not target.exists("predictions")


@pytest.mark.parametrize(
    "lines, row, line, fields",
    [
        (["1,2019-01-01T00:00:00,0.5", "2,2019-01-01T00:00:00"], 2, 3, 2),  # pandas would store a NULL score
        (["1,2019-01-01T00:00:00,0.5", "", "2"], 2, 4, 1),
    ],
)
def test_a_row_with_too_few_fields_is_refused_like_a_long_one(target, tmp_path, lines, row, line, fields):
    path = tmp_path / "a.csv"
    path.write_text("id,timestamp,y_pred_proba\n" + "\n".join(lines) + "\n")
    with pytest.raises(LoadError) as caught:
        load_files(target.url, "predictions", [path], schema=target.schema)
    message = str(caught.value)
    assert message.startswith(
        f"{path}: row {row} (line {line}) has {fields} fields; the header has 3 (id, timestamp, y_pred_proba)"
    ), message
    assert not target.exists("predictions")


def test_empty_fields_are_not_missing_fields(target, tmp_path):
    """A row with all its fields, some empty, still loads (the empty ones as NULL)."""
    path = tmp_path / "a.csv"
    path.write_text("id,timestamp,y_pred_proba\n1,2019-01-01T00:00:00,\n2,2019-01-01T00:00:00,0.5\n")
    assert load_files(target.url, "predictions", [path], schema=target.schema) == 2
    assert [r["y_pred_proba"] for r in target.rows("predictions")] == [None, 0.5]


@pytest.mark.parametrize("delimiter, named", [(";", "';'"), ("\t", "a tab"), ("|", "'|'")])
def test_a_file_separated_by_another_delimiter_is_refused_naming_it(target, tmp_path, delimiter, named):
    path = tmp_path / "a.csv"
    path.write_text(delimiter.join(["id", "timestamp", "score"]) + "\n" + delimiter.join(["1", "2019-01-01", "0.5"]))
    with pytest.raises(LoadError) as caught:
        load_files(target.url, "predictions", [path], schema=target.schema)
    assert f"the file seems separated by {named}, but mlmon load reads comma-separated files" in str(caught.value)
    assert not target.exists("predictions")


def test_a_repeated_column_name_is_refused_naming_it(target, tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("id,id,score,score,timestamp\n1,2,0.5,0.4,2019-01-01\n")
    with pytest.raises(LoadError) as caught:
        load_files(target.url, "predictions", [path], schema=target.schema)
    assert f"{path}: the header repeats column(s) 'id', 'score' (id, id, score, score, timestamp)" in str(caught.value)
    assert not target.exists("predictions")


@pytest.mark.parametrize("compressed", [False, True])
def test_a_byte_that_is_not_utf8_is_named_with_its_line_and_offset(target, tmp_path, compressed):
    # "\xe9" is Latin-1 for e-acute; line 3 starts at byte 23 + 20 = 43, the byte is its 5th.
    data = b"id,timestamp,y_pred_proba\n1,2019-01-01,0.5\n2,caf\xe9,0.4\n"
    assert data.index(b"\xe9") == len(b"id,timestamp,y_pred_proba\n1,2019-01-01,0.5\n2,caf")
    offset = data.index(b"\xe9")
    path = tmp_path / ("a.csv.gz" if compressed else "a.csv")
    path.write_bytes(gzip.compress(data) if compressed else data)
    with pytest.raises(LoadError) as caught:
        load_files(target.url, "predictions", [path], schema=target.schema)
    where = " of the uncompressed data" if compressed else ""
    assert str(caught.value).startswith(
        f"{path}: line 3 (byte offset {offset}{where}) is not UTF-8: cannot decode byte 0xe9; "
        "re-encode the file to UTF-8"
    ), caught.value
    assert not target.exists("predictions")


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_column_name(target, tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes("\ufeffid,timestamp,y_pred_proba\n1,2019-01-01,0.5\n".encode())
    assert load_files(target.url, "predictions", [path], schema=target.schema) == 1
    assert list(target.rows("predictions")[0]) == ["id", "timestamp", "y_pred_proba"]


@pytest.mark.parametrize("content", [b"", b"\n\n", gzip.compress(b"", mtime=0)])
def test_an_empty_file_is_called_empty(target, tmp_path, content):
    path = tmp_path / ("a.csv.gz" if content.startswith(b"\x1f\x8b") else "a.csv")
    path.write_bytes(content)
    with pytest.raises(LoadError, match=r"a\.csv(\.gz)?: the file is empty \(not even a header line"):
        load_files(target.url, "predictions", [path], schema=target.schema)


def test_a_new_column_mixing_numbers_and_text_is_refused_naming_the_rows(target, tmp_path):
    """'abc' among scores would create a text score column that check-config rejects only later."""
    rows = [[i, "2019-01-01T00:00:00", 0.1 * i] for i in range(1, 11)]
    for i, value in [(2, "abc"), (4, "n/a"), (5, "0,5"), (6, "-"), (7, "x"), (8, "y"), (9, "z")]:
        rows[i - 1][2] = value
    rows[9][2] = ""  # empty is a null, not text; so is pandas' "n/a"
    path = write_csv(tmp_path / "a.csv", ["id", "timestamp", "y_pred_proba"], rows)
    with pytest.raises(LoadError) as caught:
        load_files(target.url, "predictions", [path], schema=target.schema)
    assert (
        "column 'y_pred_proba' would be created as text: 2 row(s) hold numbers but 6 do not "
        "(row 2: 'abc', row 5: '0,5', row 6: '-', row 7: 'x', row 8: 'y' and 1 more); "
        "fix those rows, or pass --text y_pred_proba"
    ) in str(caught.value)
    assert not target.exists("predictions")

    # Declared text: loaded as it is. All-text columns (versions, names) need no declaration.
    version = write_csv(tmp_path / "b.csv", ["id", "version"], [[1, "v1"], [2, "2024-01-01"]])
    assert load_files(target.url, "versions", [version], schema=target.schema) == 2
    assert load_files(target.url, "predictions", [path], schema=target.schema, text_columns=["y_pred_proba"]) == 10
    assert [r["y_pred_proba"] for r in target.rows("predictions")][:3] == ["0.1", "abc", "0.30000000000000004"]


def test_cli_load_progress_never_shows_a_rejected_file_as_done(tmp_path):
    rows = [[1, "2019-01-01T00:00:00", 0.5], [2, "2019-01-01T00:00:00", "abc"]]
    path = write_csv(tmp_path / "a.csv", ["id", "timestamp", "y_pred_proba"], rows)
    result = CliRunner().invoke(app, ["load", "--url", f"sqlite:///{tmp_path}/db.sqlite", "--table", "t", str(path)])
    assert result.exit_code == 2
    assert "row 2: 'abc'" in result.stderr
    assert "100%" not in result.stderr and "1 rows" not in result.stderr, result.stderr

    result = CliRunner().invoke(
        app, ["load", "--url", f"sqlite:///{tmp_path}/db.sqlite", "--table", "t", "--text", "y_pred_proba", str(path)]
    )
    assert result.exit_code == 0, result.output
    assert "100%" in result.stderr and "2 rows" in result.stderr


def test_a_postgres_url_is_refused_with_the_scheme_to_use(tmp_path):
    path = write_csv(tmp_path / "a.csv", ["id", "timestamp", "y_pred_proba"], NAIVE_ROWS)
    with pytest.raises(LoadError) as caught:
        load_files("postgres://mlmon:secret@127.0.0.1/test", "predictions", [path])
    assert str(caught.value).startswith(
        "cannot use database URL postgres://mlmon:***@127.0.0.1/test: unknown database type 'postgres' in the URL: "
        "for PostgreSQL write postgresql+psycopg://user@host/db"
    ), caught.value
