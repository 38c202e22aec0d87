"""``queries.bisected``: the slice a row's time falls in, by a CASE tree of comparisons,
against Python's ``bisect_right`` on the same points, with and without the ranges the rows
are known to lie in (which leave most points uncompared)."""

from __future__ import annotations

from bisect import bisect_right
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from exporter.predictions.queries import bisected, union
from exporter.predictions.stores import TimeColumn

T0 = datetime(2026, 5, 4, tzinfo=UTC)


@pytest.mark.parametrize("seed", range(20))
def test_bisected_counts_the_points_at_or_before_each_time(seed):
    rng = np.random.default_rng(seed)
    minute = timedelta(minutes=1)
    points = sorted({T0 + int(m) * minute for m in rng.integers(0, 300, int(rng.integers(1, 60)))})
    ranges = union(
        (T0 + int(a) * minute, T0 + int(a + n) * minute)
        for a, n in zip(rng.integers(-10, 310, 4), rng.integers(1, 40, 4), strict=True)
    )
    # Times in the ranges, on their starts, on the points inside them and just before their ends.
    times = [a + (b - a) * float(f) for a, b in ranges for f in rng.random(10)]
    times += [a for a, _ in ranges] + [b - timedelta(seconds=1) for _, b in ranges]
    times += [p for p in points if any(a <= p < b for a, b in ranges)]
    engine = sa.create_engine("sqlite://")
    table = sa.Table("rows", sa.MetaData(), sa.Column("t", sa.Double))
    with engine.begin() as conn:
        table.create(conn)
        conn.execute(table.insert(), [{"t": t.timestamp()} for t in times] + [{"t": None}])
        time = TimeColumn(table.c.t, "epoch", "UTC", table.c.t)

        def leaf(k):
            return sa.literal(k)

        full = bisected(time, points, leaf)
        pruned = bisected(time, points, leaf, within=ranges)
        got = conn.execute(sa.select(table.c.t, full, pruned)).all()
    for t, whole, narrowed in got:
        expected = 0 if t is None else bisect_right(points, datetime.fromtimestamp(t, UTC))
        assert (whole, narrowed) == (expected, expected), (t, points, ranges)
