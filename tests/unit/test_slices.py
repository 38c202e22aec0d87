"""``predictions.slices`` pieces that need no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from exporter.predictions.slices import Pass

T0 = datetime(2026, 1, 1, tzinfo=UTC)
seconds = st.integers(-5, 55).map(lambda s: T0 + timedelta(seconds=s))


@given(st.sets(st.integers(0, 50), min_size=1, max_size=12), seconds, seconds)
def test_parts_in_are_the_parts_inside_the_range(offsets, start, end):
    points = tuple(T0 + timedelta(seconds=s) for s in sorted(offsets))
    inside = tuple(p for p in range(len(points) - 1) if start <= points[p] and points[p + 1] <= end)
    assert Pass(points, ()).parts_in(start, end) == inside
