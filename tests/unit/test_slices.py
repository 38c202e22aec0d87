"""``predictions.slices`` pieces that need no database."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.predictions.queries import grouped
from exporter.predictions.slices import (
    ONLINE_COUNTS,
    ONLINE_SUMS,
    Histogram,
    OnlineBuckets,
    Pass,
    ReplayTotals,
    SliceStore,
    TopCounts,
    float_table,
    slice_starts,
)
from exporter.predictions.stores import from_wall_clock, written_by

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


def _online_rows(rng: np.random.Generator, n: int) -> list[dict]:
    """Per-bucket rows of ``PredictionQueries.online`` (no window suffix) for ``n`` random
    predictions: a score, and a label 0, 1 or none."""
    keys = rng.integers(0, 40, n)
    scores = (keys + rng.random(n)) / 100
    labels = rng.choice([0, 1, -1], n)
    rows = []
    for key in np.unique(keys):
        at = keys == key
        labeled = at & (labels >= 0)
        y, s = labels[labeled], scores[labeled]
        counts = {name: int(rng.integers(0, 3)) for name in ONLINE_COUNTS}
        counts |= {"predictions": int(at.sum()), "positives": int((y == 1).sum()), "negatives": int((y == 0).sum())}
        rows.append(
            {
                "key": int(key),
                **counts,
                "labeled_score_sum": float(s.sum()) if len(s) else None,
                "log_loss_sum": float(rng.random()) if len(s) else None,
                "low": float(s.min()) if len(s) else None,
                "high": float(s.max()) if len(s) else None,
            }
        )
    return rows


def _buckets(rows: list[dict]) -> OnlineBuckets:
    """As ``LabelsSource`` reads them, from rows of one window (suffix ``_0``)."""
    names = ["key", *(f"{name}_0" for name in rows[0] if name != "key")] if rows else ["key"]
    tuples = [(row["key"], *(row[name[:-2]] for name in names[1:])) for row in rows]
    tuples.reverse()  # rows come in no order
    # In two chunks, as a result is read (``CHUNK_ROWS`` at a time).
    (buckets,) = OnlineBuckets.by_window(float_table([tuples[:3], tuples[3:]], len(names)), names, 1)
    return buckets


@pytest.mark.parametrize("seed", range(5))
def test_online_buckets_merge_as_the_union_of_their_rows(seed):
    """Buckets of disjoint sets of predictions, merged, equal those of the union: counts and
    sums added over the buckets a key shares, minima and maxima combined; a part without a
    labeled prediction keeps only its totals."""
    rng = np.random.default_rng(seed)
    parts = [_online_rows(rng, int(rng.integers(0, 30))) for _ in range(4)]
    merged = OnlineBuckets.merge(_buckets(rows) for rows in parts)
    union: dict[int, dict] = {}
    for row in (row for rows in parts for row in rows):
        into = union.setdefault(row["key"], {"key": row["key"]})
        for name in (*ONLINE_COUNTS, *ONLINE_SUMS):
            into[name] = into.get(name, 0) + (row[name] or 0)
        for name, pick in (("low", min), ("high", max)):
            values = [v for v in (into.get(name), row[name]) if v is not None]
            into[name] = pick(values) if values else None
    whole = _buckets(list(union.values()))
    assert merged.totals()[0] == whole.totals()[0]
    assert merged.totals()[1] == pytest.approx(whole.totals()[1], rel=1e-12)
    for name in ("key", "positives", "negatives", "low", "high"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name))
    # Only labeled buckets are kept, with every prediction in the totals.
    assert np.all(merged.positives + merged.negatives > 0)
    assert merged.totals()[0][0] == sum(row["predictions"] for rows in parts for row in rows)
    assert OnlineBuckets.merge([]).totals() == OnlineBuckets.empty().totals()


def test_an_audit_is_due_when_the_refresh_time_goes_back():
    """A clock stepped back a day: the kept slices are audited at once, not a day later."""
    store = SliceStore(timedelta(minutes=5), timedelta(hours=1), lambda parts: list(parts))
    t = datetime(2026, 5, 4, 12, tzinfo=UTC)
    store.slices[t - timedelta(hours=1)] = []
    assert not store.audit_due(t, filling=False)  # starts the audit clock
    store.audit_started(t)
    assert store.audit_due(t - timedelta(days=1), filling=False)


def test_written_by_holds_back_the_repeated_hour():
    """New York falls back at 06:00Z on 2026-11-01: rows read in [05:00Z, 07:00Z) are written
    until (read + 07:00Z) / 2, so nothing read after 05:00Z is complete before 06:00Z."""
    ny = ZoneInfo("America/New_York")
    t = datetime(2026, 11, 1, 6, tzinfo=UTC)
    assert written_by(t - timedelta(minutes=61), ny) == t - timedelta(minutes=61)
    assert written_by(t - timedelta(minutes=30), ny) == t - timedelta(hours=1)
    assert written_by(t + timedelta(minutes=30), ny) == t
    assert written_by(t + timedelta(hours=1), ny) == t + timedelta(hours=1)
    rows = [
        (
            from_wall_clock((t + k * timedelta(seconds=7)).astimezone(ny).replace(tzinfo=None), ny),
            t + k * timedelta(seconds=7),
        )
        for k in range(-1100, 1100)
    ]
    for m in range(-130, 130, 3):
        now = t + timedelta(minutes=m)
        h = written_by(now, ny)
        assert not [read for read, written in rows if read < h and written > now]


def test_replay_totals_merge():
    """Counts add, the largest error is the largest of those known (``None`` when no part
    has a valid replay)."""
    parts = [ReplayTotals(3, 2, 0.25), ReplayTotals(), ReplayTotals(2, 0, None), ReplayTotals(1, 1, 0.5)]
    assert ReplayTotals.merge(parts) == ReplayTotals(6, 3, 0.5)
    assert ReplayTotals.merge([ReplayTotals(2, 0, None)]).abs_error_max is None
    assert ReplayTotals.merge([]) == ReplayTotals()


@given(st.lists(st.integers(0, 10_000), min_size=2, max_size=80, unique=True), st.integers(1, 20))
def test_ranges_are_grouped_at_their_widest_gaps(bounds, most):
    """``queries.grouped``: at most ``most`` groups of consecutive ranges, all ranges in
    order, and every gap inside a group no wider than any gap between two groups."""
    points = sorted(bounds)[: len(bounds) // 2 * 2]
    ranges = [
        (T0 + timedelta(seconds=a), T0 + timedelta(seconds=b)) for a, b in zip(points[::2], points[1::2], strict=True)
    ]
    groups = grouped(ranges, most)
    assert len(groups) == min(most, len(ranges)) and [r for g in groups for r in g] == ranges

    def gaps(rs):
        return [b[0] - a[1] for a, b in pairwise(rs)]

    inner = [gap for g in groups for gap in gaps(g)]
    between = [b[0][0] - a[-1][1] for a, b in pairwise(groups)]
    assert not inner or not between or max(inner) <= min(between)


@given(
    st.lists(st.lists(st.integers(0, 15), min_size=1, max_size=30), min_size=1, max_size=8),
    st.integers(1, 5),
    st.integers(0, 8),
)
def test_top_counts_merge_alike_in_any_grouping(sets, top, cut):
    """``TopCounts`` of sets merged at once, or in two groups merged again (a window's kept
    slices merged once, then with the parts read: ``SliceStore.merge``), give the same
    per-key counts; the bounds are the Misra-Gries ones computed here set by set, and hold
    the union's mode count."""
    summaries = [TopCounts.of_scores(np.array(keys), np.ones(len(keys)), top=top) for keys in sets]
    at_once = TopCounts.merge(summaries)
    regrouped = TopCounts.merge([TopCounts.merge(summaries[:cut]), TopCounts.merge(summaries[cut:])])
    for name in ("keys", "lower", "upper"):
        np.testing.assert_array_equal(getattr(regrouped, name), getattr(at_once, name))
    assert regrouped.unseen == at_once.unseen
    kept, bounds = [], []
    for keys in sets:
        ranked = sorted(Counter(keys).items(), key=lambda kc: (-kc[1], kc[0]))
        kept.append(dict(ranked[:top]))
        bounds.append(ranked[top][1] if len(ranked) > top else 0)
    every = {k for counts in kept for k in counts}
    lower = max(sum(counts.get(k, 0) for counts in kept) for k in every)
    upper = max(sum(counts.get(k, b) for counts, b in zip(kept, bounds, strict=True)) for k in every)
    assert at_once.mode() == (lower, max(upper, sum(bounds)))
    true = max(Counter(k for keys in sets for k in keys).values())
    assert lower <= true <= max(upper, sum(bounds))


def test_a_windows_kept_slices_are_merged_again_only_when_they_change():
    """A 1h window of 5-minute slices refreshed every minute: its 11 kept slices are merged
    when a slice seals or its start passes a boundary, or when a kept slice is another
    object (read again, restored), not at every refresh; the window holds every piece."""
    merges: list[int] = []

    def combine(parts):
        parts = list(parts)
        merges.append(len(parts))
        return frozenset().union(*parts)

    store: SliceStore[frozenset] = SliceStore(timedelta(minutes=5), timedelta(hours=1), combine)

    def refresh(end: datetime) -> frozenset:
        starts = [end - timedelta(hours=1)]
        store.begin(starts, end, timedelta(0))
        plan = store.plan(starts, end, timedelta(0), store.filling(starts, end, timedelta(0)))
        parts = {
            (i, p): frozenset({read.points[p]})
            for i, read in enumerate(plan.passes)
            for p in range(len(read.points) - 1)
        }
        (window,) = store.merge(plan, parts)
        assert window == frozenset().union(*store.slices.values(), *(parts[p] for p in plan.windows[0][1]))
        return window

    def kept_merges() -> int:
        return sum(1 for n in merges if n >= 11)

    refresh(T0 + timedelta(seconds=30))
    assert kept_merges() == 1
    refresh(T0 + timedelta(seconds=90))  # the same kept slices
    assert kept_merges() == 1
    refresh(T0 + timedelta(minutes=5, seconds=30))  # one sealed, the start past a boundary
    assert kept_merges() == 2
    first = min(store.slices)
    store.slices[first] = frozenset({"read again"})
    assert "read again" in refresh(T0 + timedelta(minutes=6, seconds=30))
    assert kept_merges() == 3
    # A forgotten slice is not held by a window's merge either (no merge may come to
    # replace it while the duplicated ids are too many to list).
    store.forget([first])
    assert store._merged == {}


def test_float_table_reads_chunks_into_one_matrix():
    """Chunks of rows (a result's partitions), NULL as NaN, exact below 2**53; none at all."""
    got = float_table([[(1, None), (2**53, 0.5)], [], [(3, 0.25)]], 2)
    np.testing.assert_array_equal(got, np.array([[1, np.nan], [2.0**53, 0.5], [3, 0.25]]))
    assert float_table([], 7).shape == (0, 7)
    np.testing.assert_array_equal(float_table([[(4, 1.5)]], 2), np.array([[4, 1.5]]))  # one chunk


def test_kept_parts_are_their_own_rows_in_arrays_of_their_own():
    """A read cut into parts (rows of several parts in any order, some with no prediction):
    each part keeps exactly its rows with a prediction, keys ascending, in arrays that own
    their memory: a kept slice holds no view of the read, nor of any copy of all of it, which
    would keep that alive as long as the slice."""
    rng = np.random.default_rng(7)
    part, key = rng.integers(0, 5, 200), rng.permutation(200) - 7
    n = rng.integers(0, 3, 200)
    histograms = np.column_stack([part, key, n, rng.random((200, 4))])
    names = ["part", "key", *ONLINE_COUNTS, *ONLINE_SUMS, "low", "high"]
    counts = rng.integers(0, 3, (200, len(ONLINE_COUNTS)))
    counts[:, 0] = n  # predictions
    online = np.column_stack([part, key, counts, rng.random((200, len(ONLINE_SUMS) + 2))])
    for table, parts in (
        (histograms, Histogram.by_part(histograms)),
        (online, OnlineBuckets.by_part(online, names)),
    ):
        for p, kept in parts.items():
            rows = (part == p) & (n > 0)
            if isinstance(kept, OnlineBuckets):
                assert kept.counts[0] == n[rows].sum()
                rows &= (counts[:, names.index("positives") - 2] + counts[:, names.index("negatives") - 2]) > 0
            order = np.argsort(key[rows])
            np.testing.assert_array_equal(kept.key, key[rows][order])
            # The values of each row stay with its key.
            if isinstance(kept, Histogram):
                for i, name in enumerate(("n", "low", "high", "s1", "s2"), start=2):
                    np.testing.assert_array_equal(getattr(kept, name), table[rows][order, i], err_msg=name)
            else:
                for i, name in ((names.index("positives"), "positives"), (names.index("negatives"), "negatives")):
                    np.testing.assert_array_equal(getattr(kept, name), table[rows][order, i], err_msg=name)
                for i, name in ((-2, "low"), (-1, "high")):
                    np.testing.assert_array_equal(getattr(kept, name), table[rows][order, i], err_msg=name)
            for name, array in vars(kept).items():
                assert array.flags.owndata and not np.shares_memory(array, table), (p, name)
        assert set(parts) == set(part[n > 0].tolist())
