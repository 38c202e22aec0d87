"""Timestamps as ISO-8601 text in SQLite, and timestamps that are no instant at all
(docs/metrics.md, "Time zones" and reason ``bad_timestamp``).

SQLite has no date type: tables made by hand or by other tools hold ISO-8601 text in a
TEXT column. Every form SQLite's date functions read is placed in its window; text that is
no date-time is counted as ``bad_timestamp`` over the whole table. Expected instants come
from ``datetime.fromisoformat``, never from exporter code.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import sqlalchemy as sa
from sklearn.metrics import log_loss, roc_auc_score

from exporter.predictions import stores as stores_module
from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.stores import Stores
from exporter.reasons import SchemaError
from tests.conftest import model_settings, zoned_predictions_settings

AS_OF = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24)}

# Forms SQLite's date functions read: date only (midnight), 'T' or space, minutes or
# seconds, fractions (to the millisecond), 'Z', '±HH:MM' with or without a space before.
READABLE = [
    "2024-06-01",
    "2024-06-01 11:00",
    "2024-06-01T11:00:00",  # the 1h window's start: in
    "2024-06-01 11:15:30.5",
    "2024-06-01T11:59:59.999",
    "2024-06-01T11:59:59.123456",
    "2024-06-01T12:00:00",  # the end: out
    "2024-06-01 12:30:00",
    "2024-06-01T11:30:00Z",
    "2024-06-01 11:45:00.250Z",
    "2024-06-01T13:30:00+02:00",
    "2024-06-01T13:59:59.999+02:00",  # 11:59:59.999Z: in
    "2024-06-01T14:00:00+02:00",  # 12:00Z: out
    "2024-06-01T06:45:00-05:00",
    "2024-06-01 17:00:00+05:30",
    "2024-06-01T10:59:59.999Z",
    "2024-05-31T23:30:00-12:00",  # 11:30Z on the next day
    "2024-06-01T12:45:00+00:00",  # 45 minutes after the refresh: future
    "2024-06-01 11:20:00 +01:00",
    "2024-05-31 09:00:00",
]
# No instant: words, empty text, impossible dates and hours (SQLite itself would read
# 2024-02-30 as March 1 and 24:00 as the next day), a time without a date (SQLite: on
# 2000-01-01), 'now' (SQLite: the current time), a Julian day number, forms SQLite does
# not read (offset without colon, compact ISO, one-digit month, a leading space), NULL.
UNREADABLE = [
    "yesterday",
    "",
    "2024-13-45",
    "2024-02-30 11:30:00",
    "2024-06-01 24:00:00",
    "11:30",
    "now",
    "2460462.5",
    "2024-06-01T11:30:00+0200",
    "20240601T113000",
    "2024-6-1 11:30",
    " 2024-06-01 11:30",
    # Hour 24 however it is separated, and separators other than one T or space (SQLite
    # reads any run of spaces, tabs and Ts).
    "2024-06-01  24:00:00",
    "2024-06-01T 24:00:00",
    "2024-06-01\t11:30:00",
    "2024-06-01  11:30:00",
    "2024-06-01TT11:30:00",
    # Outside 0001-01-02 to 9999-12-30 as written: year 0, the first and last days (sentinels)
    "0000-06-01 12:00:00",
    "0001-01-01T00:30:00+01:00",
    "0001-01-01 12:00:00",
    "9999-12-31 12:00:00",
    None,
]


def _instant(text: str, zone: str) -> datetime:
    """The instant a readable text stands for: its offset, else wall-clock time of ``zone``."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=ZoneInfo(zone))


def _refresh(settings, *as_ofs):
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
        return [refresher.refresh(as_of) for as_of in as_ofs]
    finally:
        stores.dispose()


def _sqlite(tmp_path, column_type: str, values) -> str:
    url = f"sqlite:///{tmp_path}/s.sqlite"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE predictions (id INTEGER, ts {column_type}, p REAL)"))
        for i, value in enumerate(values):
            conn.execute(sa.text("INSERT INTO predictions VALUES (:i, :ts, 0.5)"), {"i": i, "ts": value})
    engine.dispose()
    return url


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris", "America/New_York"])
@pytest.mark.parametrize("column_type", ["TEXT", "VARCHAR(40)", "DATETIME"])
def test_sqlite_iso_text_in_every_form(tmp_path, zone, column_type):
    url = _sqlite(tmp_path, column_type, READABLE + UNREADABLE)
    (snap,) = _refresh(zoned_predictions_settings(url, zone), AS_OF)
    assert snap.sources["predictions"].up, snap.errors
    instants = [_instant(text, zone) for text in READABLE]
    for stats in snap.score_stats:
        start = AS_OF - WINDOWS[stats.window]
        assert stats.predictions == sum(start <= t < AS_OF for t in instants), stats.window
        # in no window, so counted over the whole table: the same in every window
        assert stats.invalid["bad_timestamp"] == len(UNREADABLE)
    assert snap.last_prediction_timestamp == pytest.approx(max(t for t in instants if t < AS_OF).timestamp(), abs=1e-3)
    assert snap.future_predictions == sum(t >= AS_OF + timedelta(minutes=1) for t in instants)


#: Text whose written date lies furthest from its instant: the largest offsets SQLite reads
#: (±14:59) and naive text in the zones of the largest offsets, each just inside or just
#: outside a window (the 1h window is 11:00-12:00Z, the 24h one from 12:00Z the day before).
FAR_DATES = [
    "2024-05-31T21:00:00-14:59",  # 11:59Z: in
    "2024-05-31T21:01:00-14:59",  # 12:00Z: out
    "2024-06-02T01:58:59+14:59",  # 10:59:59Z: in the 24h window only
    "2024-06-02T02:00:00+14:59",  # 11:01Z: in
    "2024-05-30T21:01:00-14:59",  # 12:00Z on May 31: the 24h window's first instant
    "2024-05-30T21:00:00-14:59",  # 11:59Z on May 31: out
    "2024-06-02 01:30:00",
    "2024-06-01 00:30:00",
    "2024-05-31 01:59:00",
]


@pytest.mark.parametrize("zone", ["Pacific/Kiritimati", "Pacific/Pago_Pago", "UTC"])
def test_sqlite_text_whose_date_is_days_from_its_instant(tmp_path, zone):
    """SQLite text is first narrowed by its written date, which an index serves, then read
    exactly: no row whose date lies up to two days from its instant is lost by the narrowing
    (UTC+14 and UTC-11, with offsets of 14:59 written the other way)."""
    url = _sqlite(tmp_path, "TEXT", FAR_DATES)
    (snap,) = _refresh(zoned_predictions_settings(url, zone), AS_OF)
    instants = [_instant(text, zone) for text in FAR_DATES]
    for stats in snap.score_stats:
        start = AS_OF - WINDOWS[stats.window]
        assert stats.predictions == sum(start <= t < AS_OF for t in instants), (stats.window, instants)
    assert {s.window: s.predictions for s in snap.score_stats}["1h"] >= 2


@pytest.mark.parametrize(
    ("text", "zone", "as_of"),
    [
        # Read as 1844-12-18 17:04:52 in Manila (local mean time -15:56:08 then), before its written date.
        ("1844-12-20 00:00:00+14:59", "Asia/Manila", datetime(1844, 12, 19, 9, 30, tzinfo=UTC)),
        # Read as 1867-10-03 06:01:18 in Juneau (+15:02:19 then), two days after its written date.
        ("1867-10-01 23:59:59-14:59", "America/Juneau", datetime(1867, 10, 2, 15, 30, tzinfo=UTC)),
    ],
    ids=["Manila-1844", "Juneau-1867"],
)
def test_sqlite_text_in_the_widest_offsets_ever_used(tmp_path, text, zone, as_of):
    """The written date furthest from the wall clock it reads as: the largest offset SQLite
    reads, the other way from the largest offset a zone has had (review finding): still in
    its window after the narrowing by the stored dates."""
    url = _sqlite(tmp_path, "TEXT", [text])
    (snap,) = _refresh(zoned_predictions_settings(url, zone, windows=["1h"]), as_of)
    assert as_of - timedelta(hours=1) <= datetime.fromisoformat(text) < as_of
    assert snap.score_stats[0].predictions == 1, snap.errors


def test_sqlite_timestamp_under_a_collation_only_its_writer_defines(tmp_path):
    """A timestamp column declared with a collation that only the writer's connections
    define is still read (review finding: the stored dates compared under the column's
    collation failed every statement with "no such collation sequence")."""
    path = tmp_path / "s.sqlite"
    conn = sqlite3.connect(path)
    conn.create_collation("APPCOLL", lambda a, b: (a > b) - (a < b))
    conn.execute("CREATE TABLE predictions (id INTEGER PRIMARY KEY, ts TEXT COLLATE APPCOLL, p REAL)")
    conn.execute("CREATE TABLE labels (id INTEGER PRIMARY KEY, y INTEGER, ts TEXT COLLATE APPCOLL)")
    conn.execute("INSERT INTO predictions VALUES (1, '2024-06-01 11:30:00', 0.5), (2, '2024-05-01 11:30:00', 0.5)")
    conn.execute("INSERT INTO labels VALUES (1, 1, '2024-06-01 11:40:00')")
    conn.commit()
    conn.close()
    settings = model_settings(f"sqlite:///{path}", labels={"columns": {"timestamp": "ts"}})
    (snap,) = _refresh(settings, AS_OF)
    assert all(source.up for source in snap.sources.values()), snap.errors
    assert (snap.score_stats[0].predictions, snap.online[0].labeled) == (1, 1)


@pytest.mark.parametrize("time_slice", [None, "5m"], ids=["one-pass", "sliced"])
def test_sqlite_text_is_read_once_a_row_per_statement(tmp_path, monkeypatch, time_slice):
    """A statement normalises a row's date-time text at most once to place it and once per
    window it tells apart, however many aggregates read the row: SQLite evaluates an
    expression at every use, and a subquery it flattens into the statement reading it
    repeats its expressions in every aggregate there (the load test's refreshes spent most
    of their time normalising each row's text again and again). Counted by the calls of
    ``mlmon_wall_clock``, which maps text with an offset to the zone's wall clock, once per
    normalisation of such a row: 4,669 for these 300 rows before, 1,720 since."""
    calls = []
    real = stores_module._sqlite_wall_clock

    def counted(text, zone):
        calls.append(text)
        return real(text, zone)

    monkeypatch.setattr(stores_module, "_sqlite_wall_clock", counted)
    texts = [(AS_OF - timedelta(minutes=7 * i)).isoformat() for i in range(300)]  # '+00:00': instants
    url = _sqlite(tmp_path, "TEXT", texts)
    model = {"name": "m", "windows": ["1h", "24h"]} | ({"time_slice": time_slice} if time_slice else {})
    settings = model_settings(url, labels=False, predictions={"timezone": "Europe/Paris"}, model=model)
    stores = Stores(settings.stores, settings.query_timeout)
    reads = []
    sa.event.listen(
        stores.engine("s"),
        "before_cursor_execute",
        lambda c, cur, statement, *_: reads.append("FROM predictions" in statement),
    )
    try:
        refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
        snap = refresher.refresh(AS_OF)
    finally:
        stores.dispose()
    assert snap.sources["predictions"].up, snap.errors
    assert snap.score_stats[1].predictions == sum(
        AS_OF - timedelta(hours=24) <= datetime.fromisoformat(t) < AS_OF for t in texts
    )
    # Per statement at most every row, once to place it and once per window (the windows'
    # reads fewer rows: the stored dates narrow them).
    assert 0 < len(calls) <= sum(reads) * (1 + len(WINDOWS)) * len(texts), (len(calls), sum(reads))


def test_sqlite_text_counts_move_with_the_zone(tmp_path):
    """The same naive text in the 1h window in one zone and not in another: the zone applies
    to text without an offset only."""
    url = _sqlite(tmp_path, "TEXT", ["2024-06-01 13:30:00", "2024-06-01 07:30", "2024-06-01T11:30:00Z"])
    counts = {}
    for zone in ("UTC", "Europe/Paris", "America/New_York"):
        (snap,) = _refresh(zoned_predictions_settings(url, zone, windows=["1h"]), AS_OF)
        counts[zone] = snap.score_stats[0].predictions
    assert counts == {"UTC": 1, "Europe/Paris": 2, "America/New_York": 2}


def test_offset_and_naive_text_mixed_across_a_change(tmp_path):
    """One row a minute over Paris's 2024-10-27 change (clocks back from 03:00 to 02:00 at
    01:00Z), every other one written with its offset (an exact instant) and the others as
    naive Paris time: both kinds compare with the same window bounds. Expected: offset rows
    at their instant; naive rows by the documented reading, by hand: outside 02:00-02:59
    the only one, inside it 00:00Z + twice the time past 02:00."""
    paris = ZoneInfo("Europe/Paris")
    first = datetime(2024, 10, 26, 22, tzinfo=UTC)
    instants = [first + timedelta(minutes=i) for i in range(360)]
    texts, readings = [], []
    for i, t in enumerate(instants):
        local = t.astimezone(paris)
        if i % 2:
            texts.append(local.isoformat())
            readings.append(t)
        else:
            wall = local.replace(tzinfo=None)
            texts.append(wall.isoformat(sep=" "))
            if datetime(2024, 10, 27, 2) <= wall < datetime(2024, 10, 27, 3):
                readings.append(datetime(2024, 10, 27, tzinfo=UTC) + 2 * (wall - datetime(2024, 10, 27, 2)))
            else:
                readings.append(wall.replace(tzinfo=paris))
    url = _sqlite(tmp_path, "TEXT", texts)
    as_ofs = [first + timedelta(minutes=10 * k) for k in range(6, 37)]
    snaps = _refresh(zoned_predictions_settings(url, "Europe/Paris", windows=["1h"]), *as_ofs)
    for as_of, snap in zip(as_ofs, snaps, strict=False):
        window = [r for r in readings if as_of - timedelta(hours=1) <= r < as_of]
        assert snap.score_stats[0].predictions == len(window) > 0, as_of
        assert snap.last_prediction_timestamp == max(window).timestamp()
        assert as_of.timestamp() - snap.last_prediction_timestamp <= 120
    hourly = [s.score_stats[0].predictions for a, s in zip(as_ofs, snaps, strict=False) if a.minute == 0]
    assert sum(hourly) == 360  # the six hours from 22:00Z to 04:00Z partition the rows
    assert snaps[-1].counter.total == 300  # every row from the first refresh (23:00Z) on, once


def test_sqlite_epoch_column_with_text(tmp_path):
    """Seconds since the epoch in a REAL column that also holds text (SQLite stores what it
    is given): the text is no instant, neither in a window nor in the future."""
    base = AS_OF.timestamp()
    url = _sqlite(
        tmp_path, "REAL", [base - 60, base - 7200, "", "soon", "2024-06-01 11:30:00", None, 1e400, base + 600]
    )
    (snap,) = _refresh(zoned_predictions_settings(url), AS_OF)
    stats = {s.window: s for s in snap.score_stats}
    assert stats["1h"].predictions == 1 and stats["24h"].predictions == 2
    assert stats["1h"].invalid["bad_timestamp"] == 5  # '', 'soon', the ISO text, NULL, infinity
    assert snap.future_predictions == 1
    assert snap.last_prediction_timestamp == base - 60


@pytest.mark.parametrize("aware", [True, False])
def test_postgresql_null_timestamps_are_counted(postgres_schema, aware):
    url, schema = postgres_schema
    engine = sa.create_engine(url)
    metadata = sa.MetaData(schema=schema)
    table = sa.Table(
        "predictions",
        metadata,
        sa.Column("id", sa.Integer),
        sa.Column("ts", sa.DateTime(timezone=aware)),
        sa.Column("p", sa.Double),
    )
    metadata.create_all(engine)
    stamp = AS_OF - timedelta(minutes=5)
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            [{"id": i, "ts": stamp if aware else stamp.replace(tzinfo=None), "p": 0.5} for i in range(3)],
        )
        conn.execute(table.insert(), [{"id": 10 + i, "ts": None, "p": 0.5} for i in range(2)])
    engine.dispose()
    (snap,) = _refresh(zoned_predictions_settings(url, schema=schema), AS_OF)
    for stats in snap.score_stats:
        assert stats.predictions == 3 and stats.invalid["bad_timestamp"] == 2


def test_postgresql_epoch_nan_is_no_instant(postgres_schema):
    url, schema = postgres_schema
    engine = sa.create_engine(url)
    metadata = sa.MetaData(schema=schema)
    table = sa.Table(
        "predictions", metadata, sa.Column("id", sa.Integer), sa.Column("ts", sa.Double), sa.Column("p", sa.Double)
    )
    metadata.create_all(engine)
    base = AS_OF.timestamp()
    with engine.begin() as conn:
        values = [base - 60, float("nan"), float("inf"), float("-inf"), None]
        conn.execute(table.insert(), [{"id": i, "ts": v, "p": 0.5} for i, v in enumerate(values)])
    engine.dispose()
    (snap,) = _refresh(zoned_predictions_settings(url, schema=schema), AS_OF)
    assert snap.score_stats[0].predictions == 1 and snap.score_stats[0].invalid["bad_timestamp"] == 4
    assert snap.future_predictions == 0  # PostgreSQL sorts NaN above every number
    assert snap.last_prediction_timestamp == base - 60


@pytest.mark.parametrize("backend", ["postgresql", "duckdb"])
def test_text_timestamp_refused_where_it_cannot_be_compared(backend, tmp_path, request):
    """PostgreSQL and DuckDB compare text as text ('2024-06-01T09:00:00+02:00' would sort after
    '2024-06-01 08:00:00Z'): a text column is a schema error naming the key."""
    url, schema = f"duckdb:///{tmp_path}/s.duckdb", None
    if backend == "postgresql":
        url, schema = request.getfixturevalue("postgres_schema")
    engine = sa.create_engine(url)
    metadata = sa.MetaData(schema=schema)
    sa.Table("predictions", metadata, sa.Column("id", sa.Integer), sa.Column("ts", sa.Text), sa.Column("p", sa.Double))
    metadata.create_all(engine)
    engine.dispose()
    settings = zoned_predictions_settings(url, schema=schema)
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
        with pytest.raises(SchemaError) as error:
            refresher.check_schema()
        message = str(error.value)
        assert message.startswith(
            "models[0].predictions.columns.timestamp: column 'ts' of table 'predictions' has type"
        )
        assert "text" in message.lower() and "models[0].predictions.table" in message
        snap = refresher.refresh(AS_OF)
        assert not snap.sources["predictions"].up and snap.errors[("predictions", "schema")] == 1
    finally:
        stores.dispose()


#: Text that is no instant but that SQLite's strftime reads, each of which, as the only row
#: before the refresh time, used to be read back as the newest timestamp and fail every
#: refresh (Python has no year 0 nor hour 24).
NEWEST_NO_INSTANT = [
    "0001-01-01T00:30:00+01:00",  # 0000-12-31T23:30Z
    "0000-06-01 12:00:00",
    "0000-01-01",
    "2024-06-01  24:00:00",
    "2024-06-01T 24:00:00",
]


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kathmandu"])
@pytest.mark.parametrize("text", NEWEST_NO_INSTANT)
def test_sqlite_text_that_is_no_instant_is_bad_timestamp_even_as_the_only_row(tmp_path, text, zone):
    url = _sqlite(tmp_path, "TEXT", [text])
    (snap,) = _refresh(zoned_predictions_settings(url, zone), AS_OF + timedelta(days=2))
    assert snap.sources["predictions"].up, snap.errors
    assert not any(snap.errors.values())
    assert [(s.predictions, s.invalid["bad_timestamp"]) for s in snap.score_stats] == [(0, 1), (0, 1)]
    assert snap.last_prediction_timestamp is None
    assert snap.future_predictions == 0


def test_sqlite_text_at_the_edges_of_the_instant_range(tmp_path):
    """0001-01-02 and 9999-12-30 as written are instants (read back exactly); the days
    before and after are not."""
    first, last = "0001-01-02 00:00:00", "9999-12-30T23:59:59.999"
    url = _sqlite(tmp_path, "TEXT", [first, "0001-01-01T23:59:59.999", "9999-12-31"])
    (snap,) = _refresh(zoned_predictions_settings(url), AS_OF)
    assert snap.last_prediction_timestamp == datetime.fromisoformat(first).replace(tzinfo=UTC).timestamp()
    assert snap.score_stats[0].invalid["bad_timestamp"] == 2
    (tmp_path / "last").mkdir()
    url = _sqlite(tmp_path / "last", "TEXT", [last])
    (snap,) = _refresh(zoned_predictions_settings(url), datetime(9999, 12, 31, tzinfo=UTC))
    assert snap.last_prediction_timestamp == pytest.approx(
        datetime.fromisoformat(last).replace(tzinfo=UTC).timestamp(), abs=1e-3
    )
    assert snap.score_stats[0].invalid["bad_timestamp"] == 0


#: Date-time values of PostgreSQL and DuckDB outside the instants mlmon reads (years 1 to
#: 9999 but their first and last day): psycopg refuses to read ±infinity, BC dates and years
#: past 9999, DuckDB returns them as text or as datetime.min/max.
#: Written without an offset: a timestamptz reads them in the session's zone, outside the range in every zone.
NO_INSTANT_DATETIMES = [
    "infinity",
    "-infinity",
    "0044-03-15 00:00:00 BC",
    "10000-01-01 00:00:00",
    "0001-01-01 00:00:00",
]


@pytest.mark.parametrize("with_valid_rows", [True, False], ids=["with-valid-rows", "only-no-instants"])
@pytest.mark.parametrize("aware", [True, False], ids=["timestamptz", "timestamp"])
@pytest.mark.parametrize("backend", ["postgresql", "duckdb"])
def test_datetime_infinities_and_out_of_range_dates_are_bad_timestamps(
    backend, aware, with_valid_rows, tmp_path, request
):
    url, schema = f"duckdb:///{tmp_path}/s.duckdb", None
    if backend == "postgresql":
        url, schema = request.getfixturevalue("postgres_schema")
    table = f'"{schema}".predictions' if schema else "predictions"
    sql_type = "TIMESTAMP WITH TIME ZONE" if aware else "TIMESTAMP"
    stamps = [AS_OF - timedelta(minutes=5), AS_OF - timedelta(hours=2)] if with_valid_rows else []
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {table} (id INTEGER, ts {sql_type}, p DOUBLE PRECISION)"))
        for i, value in enumerate(NO_INSTANT_DATETIMES):
            if backend == "duckdb":  # DuckDB writes BC dates as "YYYY-MM-DD (BC) HH:MM:SS"
                value = value.replace(" 00:00:00 BC", " (BC) 00:00:00")
            conn.execute(sa.text(f"INSERT INTO {table} VALUES ({i}, CAST(:ts AS {sql_type}), 0.5)"), {"ts": value})
        for i, stamp in enumerate(stamps):
            conn.execute(
                sa.text(f"INSERT INTO {table} VALUES (:i, :ts, 0.5)"),
                {"i": 100 + i, "ts": stamp if aware else stamp.replace(tzinfo=None)},
            )
    engine.dispose()
    (snap,) = _refresh(zoned_predictions_settings(url, schema=schema), AS_OF)
    assert snap.sources["predictions"].up, snap.errors
    by_window = {s.window: (s.predictions, s.invalid["bad_timestamp"]) for s in snap.score_stats}
    bad = len(NO_INSTANT_DATETIMES)
    assert by_window == {"1h": (len(stamps) and 1, bad), "24h": (len(stamps), bad)}
    assert snap.future_predictions == 0  # infinity is no instant, not one in the future
    assert snap.last_prediction_timestamp == (stamps[0].timestamp() if stamps else None)


def test_epoch_seconds_at_the_edges_of_the_instant_range(tmp_path):
    """Seconds of 0001-01-02T00:00Z and of one second before 9999-12-31T00:00Z are
    instants; those of 0001-01-01T00:00Z and 9999-12-31T00:00Z are not (by hand, datetime)."""
    first = datetime(1, 1, 2, tzinfo=UTC).timestamp()
    end = datetime(9999, 12, 31, tzinfo=UTC).timestamp()
    url = _sqlite(tmp_path, "REAL", [first, datetime(1, 1, 1, tzinfo=UTC).timestamp(), end, end - 1])
    (snap,) = _refresh(zoned_predictions_settings(url), AS_OF)
    assert snap.last_prediction_timestamp == first
    assert snap.future_predictions == 1  # end - 1
    assert snap.score_stats[0].invalid["bad_timestamp"] == 2


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris"])
def test_sqlite_iso_text_label_timestamps(tmp_path, zone):
    """Labels with their arrival time as ISO-8601 text in a TEXT column, in every readable
    form and some unreadable ones, predictions stamped 11:30Z: a label counts when it arrived
    in [window start, refresh time) = [11:00Z, 12:00Z), read with the labels' own zone; an
    unreadable arrival time is an invalid label (``bad_timestamp``), a NULL one a label
    that has not arrived. Expected from ``datetime.fromisoformat``."""
    stamps = READABLE + UNREADABLE
    url = f"sqlite:///{tmp_path}/s.sqlite"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE predictions (id INTEGER, ts TEXT, p REAL)"))
        conn.execute(sa.text("CREATE TABLE labels (id INTEGER, y INTEGER, ts TEXT)"))
        for i, stamp in enumerate(stamps):
            conn.execute(sa.text("INSERT INTO predictions VALUES (:i, '2024-06-01T11:30:00Z', 0.5)"), {"i": i})
            conn.execute(sa.text("INSERT INTO labels VALUES (:i, :y, :ts)"), {"i": i, "y": i % 2, "ts": stamp})
    engine.dispose()
    settings = model_settings(url, labels={"timezone": zone, "columns": {"timestamp": "ts"}})
    (snap,) = _refresh(settings, AS_OF)
    assert all(s.up for s in snap.sources.values()), snap.errors
    arrived = [i for i, text in enumerate(READABLE) if AS_OF - WINDOWS["1h"] <= _instant(text, zone) < AS_OF]
    assert 0 < len(arrived) < len(READABLE)
    online = snap.online[0]
    assert online.predictions == len(stamps)
    assert online.labeled == len(arrived)
    assert online.positives == sum(i % 2 for i in arrived)
    assert online.label_coverage == pytest.approx(len(arrived) / len(stamps))
    written = [text for text in UNREADABLE if text is not None]
    assert dict(online.invalid_labels) == {"conflicting": 0, "invalid_value": 0, "bad_timestamp": len(written)}


#: Label arrival times that are written but no instant, per (dialect kind, column kind):
#: SQLite text (naive or with an offset) and SQLite epoch seconds, which may hold text and
#: infinities; PostgreSQL and DuckDB date-times and epoch seconds. Cast from text on the
#: typed engines, inserted as given on SQLite.
NO_ARRIVAL_INSTANTS = {
    ("sqlite", "naive"): ["", "yesterday", "2024-02-30 11:30:00", "0000-06-01 12:00:00", "2024-06-01T11:30:00+0200"],
    ("sqlite", "aware"): ["now", "2024-13-45T11:30:00Z", "2024-06-01\t11:30:00Z", "20240601T113000Z", " "],
    ("sqlite", "epoch"): ["", "abc", 1e400, -1e400, "2024-06-01 11:30:00"],
    ("typed", "naive"): ["infinity", "-infinity", "10000-01-01 00:00:00", "0001-01-01 00:00:00", "infinity"],
    ("typed", "aware"): ["-infinity", "infinity", "0001-01-01 00:00:00+00", "10000-01-01 00:00:00+00", "infinity"],
    ("typed", "epoch"): ["NaN", "Infinity", "-Infinity", "1e300", "NaN"],
}
#: Predictions (id, score) stamped at 11:00 + id minutes, and their label rows (id, label,
#: arrival): minutes after 11:00 (negative: before), "bad" (written but no instant, the
#: next of NO_ARRIVAL_INSTANTS) or None (NULL: not arrived).
LABEL_CASES_PREDICTIONS = [(i, p) for i, p in enumerate([0.2, 0.4, 0.6, 0.8, 0.9, 0.1, 0.7, 0.3, 0.5, 0.35, 0.65], 1)]
LABEL_CASES_LABELS = [
    (1, 0, 30),
    (2, 0, 40),
    (3, 1, 50),
    (4, 1, 55),
    (5, 1, "bad"),  # a positive of unknown arrival: bad_timestamp, never a 0
    (6, 0, "bad"),
    (7, 1, None),  # NULL arrival time: a label to come; with missing: negative, a 0
    (8, 1, 20),  # a label that arrived beside a row of unknown arrival: used
    (8, 0, "bad"),
    (9, 2, 30),  # an invalid value beside a row of unknown arrival: invalid_value first
    (9, 1, "bad"),
    # id 10: no label row
    (11, 1, -30),  # recorded at 10:30, before the 1h window: seen in the 24h one only
    (11, 0, "bad"),
]


@pytest.mark.parametrize("missing", ["ignore", "negative"])
@pytest.mark.parametrize("column", ["naive", "aware", "epoch"])
def test_label_arrival_times_that_are_no_instant_are_bad_timestamp_labels(store, column, missing):
    """A label row whose arrival time is written but no instant is an invalid label
    (``bad_timestamp``), in every window's range: its prediction is left out as one whose
    labels are invalid values is (neither labeled nor a 0 with ``missing: negative``); a
    valid label that arrived beside it is used; a NULL arrival time is a label not arrived
    yet. Expected by hand (below) and scikit-learn on the rows it leaves."""
    url, schema, dialect = store
    bad = iter(NO_ARRIVAL_INSTANTS[("sqlite" if dialect == "sqlite" else "typed", column)])
    eleven = datetime(2024, 6, 1, 11, 0, tzinfo=UTC)
    sql_type = {"naive": "TIMESTAMP", "aware": "TIMESTAMP WITH TIME ZONE", "epoch": "DOUBLE PRECISION"}[column]
    if dialect == "sqlite":
        sql_type = "REAL" if column == "epoch" else "TEXT"

    def arrival(minutes):
        if minutes is None:
            return None
        if minutes == "bad":
            return next(bad)
        instant = eleven + timedelta(minutes=minutes)
        if column == "epoch":
            return instant.timestamp()
        text = instant.replace(tzinfo=None).isoformat(sep=" ")
        return text + ("Z" if dialect == "sqlite" else "+00") if column == "aware" else text

    p_table, l_table = (f'"{schema}".{t}' if schema else t for t in ("predictions", "labels"))

    def cast(name: str, to: str) -> str:  # SQLite keeps what it is given; CAST would make the text a number
        return f":{name}" if dialect == "sqlite" else f"CAST(:{name} AS {to})"

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {p_table} (id INTEGER, ts TIMESTAMP, p DOUBLE PRECISION)"))
        conn.execute(sa.text(f"CREATE TABLE {l_table} (id INTEGER, y INTEGER, ts {sql_type})"))
        for i, p in LABEL_CASES_PREDICTIONS:
            conn.execute(
                sa.text(f"INSERT INTO {p_table} VALUES (:i, {cast('ts', 'TIMESTAMP')}, :p)"),
                {"i": i, "ts": f"2024-06-01 11:{i:02d}:00", "p": p},
            )
        for i, y, minutes in LABEL_CASES_LABELS:
            value = arrival(minutes)
            conn.execute(
                sa.text(f"INSERT INTO {l_table} VALUES (:i, :y, {cast('ts', sql_type)})"),
                {"i": i, "y": y, "ts": value if dialect == "sqlite" or value is None else str(value)},
            )
    engine.dispose()
    settings = model_settings(
        url, schema, labels={"missing": missing, "columns": {"timestamp": "ts"}}, model={"windows": ["1h", "24h"]}
    )
    (snap,) = _refresh(settings, AS_OF)
    assert all(s.up for s in snap.sources.values()), snap.errors

    scores = dict(LABEL_CASES_PREDICTIONS)
    # By hand, per window: the labels used (id -> 0/1), then those read as 0 with
    # missing: negative (ids 7 and 10, no label row arrived), and the left-out ids by reason.
    used = {"1h": {1: 0, 2: 0, 3: 1, 4: 1, 8: 1}, "24h": {1: 0, 2: 0, 3: 1, 4: 1, 8: 1, 11: 1}}
    left_out = {
        "1h": {"conflicting": 0, "invalid_value": 1, "bad_timestamp": 3},  # 9; 5, 6, 11
        "24h": {"conflicting": 0, "invalid_value": 1, "bad_timestamp": 2},  # 9; 5, 6
    }
    for online in snap.online:
        labeled = dict(used[online.window])
        if missing == "negative":
            labeled |= {7: 0, 10: 0}
        y = np.array(list(labeled.values()))
        p = np.array([scores[i] for i in labeled])
        assert online.predictions == len(scores) == 11
        assert dict(online.invalid_labels) == left_out[online.window], online.window
        assert online.labeled == len(labeled) and online.positives == int(y.sum())
        assert online.label_coverage == pytest.approx(len(used[online.window]) / 11, rel=1e-12)
        assert online.roc_auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert online.logloss == pytest.approx(log_loss(y, p), rel=1e-12)
