"""``predictions.slices`` pieces that need no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.predictions.slices import Pass, SliceStore, slice_starts

T0 = datetime(2026, 1, 1, tzinfo=UTC)
seconds = st.integers(-5, 55).map(lambda s: T0 + timedelta(seconds=s))


@given(st.sets(st.integers(0, 50), min_size=1, max_size=12), seconds, seconds)
def test_parts_in_are_the_parts_inside_the_range(offsets, start, end):
    points = tuple(T0 + timedelta(seconds=s) for s in sorted(offsets))
    inside = tuple(p for p in range(len(points) - 1) if start <= points[p] and points[p + 1] <= end)
    assert Pass(points, ()).parts_in(start, end) == inside


@pytest.mark.parametrize("step", [timedelta(minutes=1), timedelta(hours=1), timedelta(hours=2), timedelta(hours=6)])
def test_the_store_fills_within_its_refreshes_however_far_they_step(step):
    """Windows 1h and 24h of 5-minute slices, 12 read a refresh (1/24) besides those sealed
    since the refresh before: filled after at most 24 filling refreshes, whatever the step
    (reading only the newest missing slices, a 2-hour step never filled)."""
    store: SliceStore[tuple] = SliceStore(timedelta(minutes=5), timedelta(hours=1), tuple, fill=12)
    end, filling_refreshes = T0, 0
    while True:
        starts = [end - timedelta(hours=1), end - timedelta(hours=24)]
        store.begin(starts, end, timedelta(0))
        filling = store.filling(starts, end, timedelta(0))
        plan = store.plan(starts, end, timedelta(0), filling)
        store.merge(plan, {})
        if not filling:
            break
        filling_refreshes += 1
        assert filling_refreshes <= 24
        end += step
    assert store.filled and sorted(store.slices) == slice_starts(end - timedelta(hours=24), end, timedelta(minutes=5))
