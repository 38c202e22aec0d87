"""Naive local timestamps across daylight-saving changes (docs/metrics.md, "Time zones").

One prediction per real minute for three hours either side of a transition, stored as the
naive wall-clock time of the configured zone: in a repeated hour two rows carry each wall
time, in a skipped hour none does. Whatever the reading of the repeated wall times,
consecutive windows must count every row once, a window in which rows were written is
never empty and the newest prediction never reads an hour old. The expected counts come
from the real instants the rows were generated from, never from exporter code.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.stores import Stores, from_wall_clock, shown_by, to_wall_clock
from tests.conftest import zoned_predictions_settings

SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)


def transition(zone: str, day: datetime) -> datetime:
    """The UTC instant (a whole minute) at which ``zone`` changes its offset on ``day``,
    found by stepping minute by minute through the day."""
    tz = ZoneInfo(zone)
    t = day.replace(tzinfo=UTC)
    previous = t.astimezone(tz).utcoffset()
    for _ in range(2 * 24 * 60):
        t += MINUTE
        if t.astimezone(tz).utcoffset() != previous:
            return t
    raise AssertionError(f"no transition in {zone} on {day:%Y-%m-%d}")


# (zone, a UTC day that holds one of its transitions): both directions, two zones, and a
# 30-minute change (Lord Howe), so that nothing depends on one hour.
CHANGES = [
    ("Europe/Paris", datetime(2024, 10, 27)),  # 03:00 CEST -> 02:00 CET at 01:00Z: 02:00-02:59 twice
    ("Europe/Paris", datetime(2024, 3, 31)),  # 02:00 CET -> 03:00 CEST at 01:00Z: 02:00-02:59 never
    ("America/New_York", datetime(2024, 11, 3)),
    ("America/New_York", datetime(2024, 3, 10)),
    ("Australia/Lord_Howe", datetime(2024, 4, 6)),  # +11:00 -> +10:30
]


def test_the_issue_instants_are_the_paris_change():
    # The issue's example: rows from 2024-10-26T22:00Z to 2024-10-27T04:00Z, clocks back at 01:00Z.
    assert transition("Europe/Paris", datetime(2024, 10, 27)) == datetime(2024, 10, 27, 1, tzinfo=UTC)


def _load(url, schema, zone: str, first: datetime, n: int, as_text: bool) -> None:
    """One row a minute from ``first`` (UTC), stamped with the naive wall-clock time of ``zone``."""
    tz = ZoneInfo(zone)
    wall = [(first + i * MINUTE).astimezone(tz).replace(tzinfo=None) for i in range(n)]
    engine = sa.create_engine(url)
    metadata = sa.MetaData(schema=schema)
    ts_type = sa.Text if as_text else sa.DateTime(timezone=False)
    table = sa.Table(
        "predictions", metadata, sa.Column("id", sa.Integer), sa.Column("ts", ts_type), sa.Column("p", sa.Double)
    )
    metadata.create_all(engine)
    rows = [{"id": i, "ts": w.isoformat(sep="T") if as_text else w, "p": 0.25} for i, w in enumerate(wall)]
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)
    engine.dispose()


def _refresher(url, schema, zone: str, windows: list[str]):
    config = zoned_predictions_settings(url, zone, windows, schema)
    stores = Stores(config.stores, config.query_timeout)
    return ModelRefresher(config.models[0], "models[0]", config.refresh_policy, stores), stores


@pytest.mark.parametrize("zone, day", CHANGES, ids=[f"{z}-{d:%Y-%m-%d}" for z, d in CHANGES])
@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "duckdb"])
@pytest.mark.long
def test_windows_around_a_change(backend, zone, day, tmp_path, request):
    url, schema = f"{backend}:///{tmp_path}/store.{backend}", None
    if backend == "postgresql":  # timestamp without time zone
        url, schema = request.getfixturevalue("postgres_schema")
    t = transition(zone, day)
    first, n = t - 3 * HOUR, 360
    instants = [first + i * MINUTE for i in range(n)]  # the truth
    _load(url, schema, zone, first, n, as_text=False)
    refresher, stores = _refresher(url, schema, zone, ["1h"])
    try:
        as_ofs = [t - 3 * HOUR + k * 10 * MINUTE for k in range(37)]  # every 10 minutes, both edges of the table
        snaps = {as_of: refresher.refresh(as_of) for as_of in as_ofs}  # in time order: also feeds the counter
    finally:
        stores.dispose()
    assert all(s.sources["predictions"].up for s in snaps.values()), [s.errors for s in snaps.values()]

    counts = {as_of: snap.score_stats[0].predictions for as_of, snap in snaps.items()}
    for as_of, count in counts.items():
        written = sum(as_of - HOUR <= i < as_of for i in instants)
        if written:  # a window in which rows were written is never empty ...
            assert count > 0, (as_of, count)
        # ... and, one row a minute, holds what was written (docs/metrics.md: the repeated
        # hour's rows are read at twice their wall-clock pace)
        assert count == written, (as_of, count, written)
    # consecutive windows partition the rows: six hours from the first row hold all 360
    hourly = [counts[first + k * HOUR] for k in range(1, 7)]
    assert sum(hourly) == n, hourly
    # the counter counts each row once through its watermark: rows in [first as_of, last as_of)
    assert snaps[as_ofs[-1]].counter.total == sum(as_ofs[0] <= i < as_ofs[-1] for i in instants) == n

    for as_of, snap in snaps.items():
        if as_of <= first:
            assert snap.last_prediction_timestamp is None
            continue
        age = as_of.timestamp() - snap.last_prediction_timestamp
        true_age = (as_of - max(i for i in instants if i < as_of)).total_seconds()
        # never an hour old while a row arrives every minute: at most twice the true age
        # (in the repeated hour), never in the future
        assert 0 < age <= 2 * true_age <= 120, (as_of, age, true_age)


def test_the_issue_example_on_sqlite_text(tmp_path):
    """The issue's rows as ISO text ('T' separator) in a TEXT column: at 01:00Z and 01:30Z the
    hour window was empty and the newest row read 3660 s old; at 02:00Z it held 120."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    first = datetime(2024, 10, 26, 22, tzinfo=UTC)
    _load(url, None, "Europe/Paris", first, 360, as_text=True)
    refresher, stores = _refresher(url, None, "Europe/Paris", ["1h", "6h"])
    try:
        snaps = {h: refresher.refresh(datetime(2024, 10, 27, h, tzinfo=UTC)) for h in (0, 1, 2, 3, 4)}
        half_past = refresher.refresh(datetime(2024, 10, 27, 1, 30, tzinfo=UTC))
    finally:
        stores.dispose()
    for snap in [*snaps.values(), half_past]:
        assert snap.score_stats[0].predictions == 60  # one a minute in every real hour
        assert snap.score_stats[0].invalid["bad_timestamp"] == 0
    assert snaps[4].score_stats[1].predictions == 360
    for h in (1, 2):
        age = datetime(2024, 10, 27, h, tzinfo=UTC).timestamp() - snaps[h].last_prediction_timestamp
        assert 60 <= age <= 120


# -- the map itself: window edges (instants) to wall-clock bounds -----------------------

ZONES = ["Europe/Paris", "America/New_York", "Australia/Lord_Howe", "Pacific/Apia", "Asia/Kolkata", "UTC"]
# Pacific/Apia skipped 2011-12-30 whole (a 24-hour gap) and had DST before 2021.
NEAR = [
    ("Europe/Paris", datetime(2024, 10, 27, 1)),
    ("Europe/Paris", datetime(2024, 3, 31, 1)),
    ("America/New_York", datetime(2024, 11, 3, 6)),
    ("America/New_York", datetime(2024, 3, 10, 7)),
    ("Australia/Lord_Howe", datetime(2024, 4, 6, 15)),
    ("Pacific/Apia", datetime(2011, 12, 30, 10)),
    ("Asia/Kolkata", datetime(2024, 6, 1)),
    ("UTC", datetime(2024, 6, 1)),
]
around = st.integers(min_value=-26 * 3600 * 10**6, max_value=26 * 3600 * 10**6).map(
    lambda us: timedelta(microseconds=us)
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(NEAR), around, around)
def test_window_edges_and_wall_times_agree(near, a, b):
    """A row stamped with wall time ``w`` is at or after an edge ``s`` exactly when its
    reading is: ``to_wall_clock(s) <= w`` iff ``s <= from_wall_clock(w)``. That makes
    ``[s, e)`` select the rows read in ``[s, e)``, for every edge, so consecutive windows
    partition the rows; the map is also non-decreasing and the plain local time outside
    changes."""
    zone, centre = near
    tz = ZoneInfo(zone)
    s = centre.replace(tzinfo=UTC) + a
    w = centre + b  # a naive wall time
    assert (to_wall_clock(s, tz) <= w) == (s <= from_wall_clock(w, tz))
    s2 = s + abs(b)
    assert to_wall_clock(s, tz) <= to_wall_clock(s2, tz)
    # where the wall time occurs once, both are the usual conversions
    wall = s.astimezone(tz).replace(tzinfo=None, fold=0)
    if tz.utcoffset(wall) == tz.utcoffset(wall.replace(fold=1)):
        assert from_wall_clock(wall, tz) == s
        if (s - timedelta(microseconds=1)).astimezone(tz).utcoffset() == s.astimezone(
            tz
        ).utcoffset():  # not a gap's end
            assert to_wall_clock(s, tz) == wall


def test_the_chosen_readings_of_paris():
    """The convention of docs/metrics.md, by hand: 02:30 on 2024-10-27 occurred at 00:30Z
    and 01:30Z and is read at 01:00Z, half way; 02:30 on 2024-03-31 never occurred and is
    read at the change, 01:00Z."""
    paris = ZoneInfo("Europe/Paris")
    utc = UTC
    assert from_wall_clock(datetime(2024, 10, 27, 2, 30), paris) == datetime(2024, 10, 27, 1, 0, tzinfo=utc)
    assert from_wall_clock(datetime(2024, 10, 27, 2, 0), paris) == datetime(2024, 10, 27, 0, 0, tzinfo=utc)
    assert from_wall_clock(datetime(2024, 10, 27, 2, 59), paris) == datetime(2024, 10, 27, 1, 58, tzinfo=utc)
    assert from_wall_clock(datetime(2024, 10, 27, 3, 0), paris) == datetime(2024, 10, 27, 2, 0, tzinfo=utc)
    assert to_wall_clock(datetime(2024, 10, 27, 1, 30, tzinfo=utc), paris) == datetime(2024, 10, 27, 2, 45)
    assert from_wall_clock(datetime(2024, 3, 31, 2, 30), paris) == datetime(2024, 3, 31, 1, 0, tzinfo=utc)
    assert to_wall_clock(datetime(2024, 3, 31, 1, 0, tzinfo=utc), paris) == datetime(2024, 3, 31, 2, 0)
    assert to_wall_clock(datetime(2024, 3, 31, 1, 0, 0, 1, tzinfo=utc), paris) == datetime(2024, 3, 31, 3, 0, 0, 1)


def test_the_latest_wall_time_shown_in_paris():
    """Paris, 2024-10-27: clocks back from 03:00 CEST to 02:00 CET at 01:00Z. In the first
    pass 02:30 CEST (00:30Z) reads as 01:00Z (``from_wall_clock``); in the second pass the
    clock has shown up to 03:00, which reads as 02:00Z."""
    paris, utc = ZoneInfo("Europe/Paris"), UTC

    def at(hour: int, minute: int) -> datetime:
        return datetime(2024, 10, 27, hour, minute, tzinfo=utc)

    expected = {at(0, 0): at(0, 0), at(0, 30): at(1, 0), at(1, 0): at(2, 0), at(1, 30): at(2, 0), at(2, 30): at(2, 30)}
    assert {instant: shown_by(instant, paris) for instant in expected} == expected
    assert shown_by(at(1, 30), ZoneInfo("UTC")) == at(1, 30)


@pytest.mark.parametrize("zone, day", CHANGES, ids=[f"{z}-{d:%Y-%m-%d}" for z, d in CHANGES])
def test_the_latest_wall_time_shown_never_goes_back(zone, day):
    tz, t = ZoneInfo(zone), transition(zone, day)
    instants = [t - 3 * HOUR + k * MINUTE for k in range(361)]
    shown = [shown_by(i, tz) for i in instants]
    assert all(a <= b for a, b in zip(shown, shown[1:], strict=False))
    # at or after the instant, and at or after the reading of the latest wall time shown
    assert all(s >= i for s, i in zip(shown, instants, strict=True))
    for i, s in zip(instants, shown, strict=True):
        latest = max((i - m * MINUTE).astimezone(tz).replace(tzinfo=None) for m in range(181))  # the clock's own
        assert s >= from_wall_clock(latest, tz), (i, s)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_rows_stamped_in_a_skipped_hour_count_at_the_change(backend, tmp_path, request):
    """02:00-02:59 never occurred in Paris on 2024-03-31 (clocks went from 02:00 to 03:00 at
    01:00Z); a writer that stamps it anyway is read as writing at 01:00Z: in the window that
    holds 01:00Z, in no other, and the newest row from then on."""
    url, schema = f"sqlite:///{tmp_path}/s.sqlite", None
    if backend == "postgresql":
        url, schema = request.getfixturevalue("postgres_schema")
    engine = sa.create_engine(url)
    metadata = sa.MetaData(schema=schema)
    table = sa.Table(
        "predictions", metadata, sa.Column("id", sa.Integer), sa.Column("ts", sa.DateTime), sa.Column("p", sa.Double)
    )
    metadata.create_all(engine)
    walls = [datetime(2024, 3, 31, 1, 50), datetime(2024, 3, 31, 2, 0), datetime(2024, 3, 31, 2, 59, 59)]
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "ts": w, "p": 0.5} for i, w in enumerate(walls)])
    engine.dispose()
    refresher, stores = _refresher(url, schema, "Europe/Paris", ["30m"])
    change = datetime(2024, 3, 31, 1, tzinfo=UTC)
    try:
        before, after, later = (refresher.refresh(change + k * 30 * MINUTE) for k in (0, 1, 2))
    finally:
        stores.dispose()
    # 01:50 CET is 00:50Z: in [00:30Z, 01:00Z); the two skipped times in [01:00Z, 01:30Z)
    assert [s.score_stats[0].predictions for s in (before, after, later)] == [1, 2, 0]
    assert before.last_prediction_timestamp == datetime(2024, 3, 31, 0, 50, tzinfo=UTC).timestamp()
    assert after.last_prediction_timestamp == later.last_prediction_timestamp == change.timestamp()


# Both directions of change on SQLite and PostgreSQL in the default tier (its 5-minute
# budget); every change on every engine (DuckDB's naive timestamps too) in the long tier.
@pytest.mark.parametrize(
    ("backend", "zone", "day"),
    [
        pytest.param(
            backend,
            zone,
            day,
            id=f"{backend}-{zone}-{day:%Y-%m-%d}",
            marks=() if backend != "duckdb" and (zone, day) in CHANGES[:2] else pytest.mark.long,
        )
        for backend in ("sqlite", "postgresql", "duckdb")
        for zone, day in CHANGES
    ],
)
def test_rows_written_on_time_are_never_in_the_future(backend, zone, day, tmp_path, request):
    """A writer whose clock is right stamps one row a minute in local time; at each refresh
    the table holds exactly the rows written by then. None is stamped in the future (a
    repeated hour's first pass shows wall times that the map reads up to ``d`` later: they
    were counted as future rows, and the alert fired twice a year), nor a row of a writer
    45 s fast (the minute's tolerance, also in the compressed first pass), while a row
    stamped ten minutes ahead of the writer's clock is, at every refresh."""
    url, schema = f"{backend}:///{tmp_path}/s.{backend}", None
    if backend == "postgresql":
        url, schema = request.getfixturevalue("postgres_schema")
    tz = ZoneInfo(zone)
    engine = sa.create_engine(url)
    metadata = sa.MetaData(schema=schema)
    table = sa.Table(
        "predictions", metadata, sa.Column("id", sa.Integer), sa.Column("ts", sa.DateTime), sa.Column("p", sa.Double)
    )
    metadata.create_all(engine)
    t = transition(zone, day)
    first = t - 2 * HOUR
    refresher, stores = _refresher(url, schema, zone, ["1h"])
    futures, ahead = {}, {}
    try:
        written = 0
        for k in range(1, 25):  # every 10 minutes for four hours around the change
            as_of = first + k * 10 * MINUTE
            with engine.begin() as conn:
                while first + written * MINUTE < as_of:
                    wall = (first + written * MINUTE).astimezone(tz).replace(tzinfo=None)
                    conn.execute(table.insert(), {"id": written, "ts": wall, "p": 0.5})
                    written += 1
            # Rows of a writer 45 s fast are within the minute's tolerance, one 10 minutes
            # ahead is not (added, counted, removed).
            for row_id, lead, seen in ((-1, 45 * SECOND, futures), (-2, 10 * MINUTE, ahead)):
                with engine.begin() as conn:
                    wall = (as_of + lead).astimezone(tz).replace(tzinfo=None)
                    conn.execute(table.insert(), {"id": row_id, "ts": wall, "p": 0.5})
                seen[as_of] = refresher.refresh(as_of).future_predictions
                with engine.begin() as conn:
                    conn.execute(table.delete().where(table.c.id == row_id))
    finally:
        stores.dispose()
        engine.dispose()
    assert {as_of: n for as_of, n in futures.items() if n} == {}

    # Ten minutes ahead of a wall clock that went back need not be ahead of what it showed
    # before (the repeated hour's first pass): such a row is in no future then.
    def wall(instant: datetime) -> datetime:
        return instant.astimezone(tz).replace(tzinfo=None)

    def shown(as_of: datetime) -> datetime:  # the latest wall time shown by as_of (a bound)
        before = [as_of - m * MINUTE for m in range(1, 181)]
        return max([wall(as_of)] + [wall(x) + MINUTE for x in before if wall(x + MINUTE) < wall(x)])

    # On a 10-minute grid (changes of whole half hours) a row is either ahead of that by 10
    # minutes or more, or not at all.
    assert ahead == {as_of: int(wall(as_of + 10 * MINUTE) > shown(as_of)) for as_of in ahead}


def test_sqlite_text_with_an_offset_is_in_the_future_as_an_instant(tmp_path):
    """SQLite text may mix wall-clock times of the zone with instants that carry an offset
    (docs/metrics.md): across the Paris set-back, naive rows follow the latest wall time
    shown (none of those written on time is in the future), while a row with an offset is in
    the future from a minute after the refresh time, as on any other day."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    paris = ZoneInfo("Europe/Paris")
    engine = sa.create_engine(url)
    table = sa.Table(
        "predictions", sa.MetaData(), sa.Column("id", sa.Integer), sa.Column("ts", sa.Text), sa.Column("p", sa.Double)
    )
    table.metadata.create_all(engine)
    t = transition("Europe/Paris", datetime(2024, 10, 27))
    first = t - 70 * MINUTE
    refresher, stores = _refresher(url, None, "Europe/Paris", ["1h"])
    counted = {}
    try:
        written = 0
        for k in range(1, 15):  # every 10 minutes through the change
            as_of = first + k * 10 * MINUTE
            with engine.begin() as conn:
                while first + written * MINUTE < as_of:
                    wall = (first + written * MINUTE).astimezone(paris).replace(tzinfo=None)
                    conn.execute(table.insert(), {"id": written, "ts": wall.isoformat(sep=" "), "p": 0.5})
                    written += 1
            for lead in (30 * SECOND, 5 * MINUTE, 59 * MINUTE):
                stamp = (as_of + lead).isoformat()  # "+00:00": an instant
                with engine.begin() as conn:
                    conn.execute(table.insert(), {"id": -1, "ts": stamp, "p": 0.5})
                counted[(as_of, lead)] = refresher.refresh(as_of).future_predictions
                with engine.begin() as conn:
                    conn.execute(table.delete().where(table.c.id == -1))
    finally:
        stores.dispose()
        engine.dispose()
    assert counted == {(as_of, lead): int(lead >= MINUTE) for as_of, lead in counted}
