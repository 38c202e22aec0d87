"""Time slices: the aggregates a refresh keeps between refreshes, so that each refresh reads
only the rows that can still change (issue 12, docs/metrics.md "Time slices"): the plan of
what to read (``SliceStore``, ``Plan``), the mergeable aggregates of the predictions
(``Histogram``, ``TopCounts``, ``Sliced``), of the online accuracy (``OnlineBuckets``) and of
the replays (``ReplayTotals``), and the rows of duplicated ids added back per
window (``DuplicateRows``).

Slice ``j`` of width ``w`` holds the rows stamped in ``[epoch + j w, epoch + (j + 1) w)``
(UTC). At a refresh time ``as_of`` a slice is *sealed* when it ends at or before
``as_of - ingestion_delay``: no row is expected to be written into it any more, so its
histogram, read once, is kept. A window ``[a, as_of)`` is then the merge of the kept slices
inside it and of two stretches read again at every refresh: its head ``[sealed end, as_of)``
(at most one slice plus ``ingestion_delay``) and its tail ``[a, first slice boundary at or
after a)`` (less than one slice). Every stretch a refresh reads is one part of a
statement grouped by (part, bucket) (``PredictionQueries.sliced_histogram``); one
statement, or two when a window's tail lies in a slice read at the same time (``Plan``).

Histograms merge exactly (counts and sums add, minima and maxima combine), so a window
merged from slices has the buckets a single pass over it gives; only the sums of
deviations may differ in the last bits, as any change of summation order does.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import numpy as np

from exporter.monitoring_math import grid_index, round_half_up_index
from exporter.predictions.queries import INVALID_LABEL_REASONS, SQUARE_FLOOR, DuplicateIds, union

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def floor_to(instant: datetime, width: timedelta) -> datetime:
    """The start of the slice of ``width`` holding ``instant`` (exact: integer microseconds)."""
    return EPOCH + ((instant - EPOCH) // width) * width


def ceil_to(instant: datetime, width: timedelta) -> datetime:
    """The first slice boundary at or after ``instant``."""
    start = floor_to(instant, width)
    return start if start == instant else start + width


def boundaries(start: datetime, end: datetime, width: timedelta) -> tuple[datetime, ...]:
    """The slice boundaries from the start of the slice holding ``start`` to the first at or
    after ``end`` (``start < end``): the slices covering ``[start, end)``."""
    first = floor_to(start, width)
    return tuple(first + k * width for k in range((ceil_to(end, width) - first) // width + 1))


def slice_starts(start: datetime, end: datetime, width: timedelta) -> list[datetime]:
    """The starts of the slices of ``width`` lying wholly inside ``[start, end)``."""
    first = ceil_to(start, width)
    return [first + k * width for k in range(max(0, (end - first) // width))]


#: Result rows turned into numbers at a time (``float_table``).
CHUNK_ROWS = 50_000


def float_table(chunks: Iterable[Sequence[Sequence[Any]]], width: int) -> np.ndarray:
    """The rows of ``chunks`` (a result's ``partitions(CHUNK_ROWS)``), each of
    ``width`` numbers or NULL, as one float64 matrix (rows, ``width``), NULL as NaN. Python
    holds one chunk of rows at a time: a cold read of every slice returns one row per
    (slice, bucket), 0.77M rows at 1e6 predictions a day, which as SQLAlchemy rows took
    most of a gigabyte (docs/performance.md, *Memory*). Made from plain tuples: numpy reads
    a SQLAlchemy row through the sequence protocol, 20x slower (816,849 rows: 28.7 s
    against 1.5 s under load). Integers below 2**53 (parts, keys, counts) are exact in
    float64. A streamed result's row count is not known before its last chunk, so the
    chunks' arrays are concatenated at the end (the matrix is held twice for that moment);
    one chunk is returned as it is.

    Raises:
        ValueError, TypeError: a value is no number (numpy's conversion to float64).
    """
    tables = [np.array([tuple(row) for row in chunk], dtype=np.float64).reshape(len(chunk), width) for chunk in chunks]
    if len(tables) == 1:
        return tables[0]
    return np.concatenate(tables) if tables else np.empty((0, width))


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """The ``[a, b)`` index ranges of the runs of equal ``values`` (sorted: one run per
    part), in order; none when ``values`` is empty."""
    cuts = np.flatnonzero(np.diff(values)) + 1
    return [(int(a), int(b)) for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(values)], strict=True) if b > a]


@dataclass(frozen=True)
class Histogram:
    """Bucket aggregates of some predictions, one entry per key, keys ascending: ``key`` is
    the bucket ``grid_index(score, 10**k)`` of valid scores, or minus the code of the
    reason an excluded row has (``queries.INVALID_REASONS``); per key ``n`` rows and, over
    the valid ones, ``low``/``high`` (min, max score) and ``s1``/``s2`` (sum of deviations
    from the bucket's lower edge and of their squares); NaN for excluded keys.
    Shapes: five arrays of one length, ``key`` and ``n`` int64, the others float64.
    Memory: 48 bytes per key."""

    key: np.ndarray
    n: np.ndarray
    low: np.ndarray
    high: np.ndarray
    s1: np.ndarray
    s2: np.ndarray

    @classmethod
    def empty(cls) -> Histogram:
        floats = np.empty(0, dtype=np.float64)
        ints = np.empty(0, dtype=np.int64)
        return cls(ints, ints, floats, floats, floats, floats)

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[Any]]) -> Histogram:
        """From (key, n, low, high, s1, s2) rows with distinct keys in any order (SQL NULL:
        ``None``, read as NaN), leaving out keys with ``n == 0``."""
        rows = [row for row in rows if row[1]]
        if not rows:
            return cls.empty()
        columns = list(zip(*rows, strict=True))

        def floats(i: int) -> np.ndarray:
            return np.array([np.nan if v is None else float(v) for v in columns[i]], dtype=np.float64)

        key = np.array([int(k) for k in columns[0]], dtype=np.int64)
        order = np.argsort(key, kind="stable")
        n = np.array([int(v) for v in columns[1]], dtype=np.int64)
        return cls(key[order], n[order], *(floats(i)[order] for i in range(2, 6)))

    @classmethod
    def by_part(cls, table: np.ndarray) -> dict[int, Histogram]:
        """From the (part, key, n, low, high, s1, s2) rows of
        ``PredictionQueries.sliced_histogram`` as a (rows, 7) matrix (``float_table``), with
        distinct (part, key) in any order, each part's histogram; read column-wise in numpy
        (a cold refresh reads slices x buckets rows: millions at 10^7 predictions a day).
        Keys with ``n == 0`` are left out; NULL (NaN) stays NaN."""
        if not len(table):
            return {}
        part = table[:, 0].astype(np.int64)
        order = np.argsort(part * 2**24 + table[:, 1].astype(np.int64) + 8)  # keys lie in [-7, 10**5]
        order = order[table[order, 2] > 0]
        part = part[order]
        out = {}
        for a, b in _runs(part):
            # Each part's rows taken from the read (fancy indexing copies): a kept slice holds
            # no array of the whole read, and no sorted copy of it is made first.
            rows = order[a:b]
            out[int(part[a])] = cls(
                table[rows, 1].astype(np.int64), table[rows, 2].astype(np.int64), *(table[rows, i] for i in range(3, 7))
            )
        return out

    @classmethod
    def merge(cls, parts: Iterable[Histogram]) -> Histogram:
        """The histogram of the union of the rows of ``parts`` (disjoint sets of rows).

        Accumulated in dense arrays over the keys' range (at most 10**k + 7 keys: buckets
        and reason codes), one vectorized update per part (its keys are distinct, so
        fancy-indexed updates are exact): a window of 288 slices of 20,000 buckets merges
        in about 0.1 s, where grouping the concatenation (``np.unique``, ``np.fmin.at``)
        took several seconds.
        """
        parts = [p for p in parts if len(p.key)]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        lowest = min(int(p.key[0]) for p in parts)
        size = max(int(p.key[-1]) for p in parts) - lowest + 1
        n = np.zeros(size, dtype=np.int64)
        low, high = np.full(size, np.nan), np.full(size, np.nan)
        s1, s2 = np.zeros(size), np.zeros(size)
        for p in parts:
            at = p.key - lowest
            n[at] += p.n
            low[at] = np.fmin(low[at], p.low)  # NaN (an excluded key) stays NaN
            high[at] = np.fmax(high[at], p.high)
            s1[at] += p.s1
            s2[at] += p.s2
        held = np.flatnonzero(n)
        return cls(held + lowest, n[held], low[held], high[held], s1[held], s2[held])

    @classmethod
    def _grouped(
        cls, key: np.ndarray, n: np.ndarray, low: np.ndarray, high: np.ndarray, s1: np.ndarray, s2: np.ndarray
    ) -> Histogram:
        """The histogram of entries whose keys may repeat: counts and sums added, minima and
        maxima combined per key (NaN, of excluded keys, stays NaN: a key's entries are all
        excluded or none is)."""
        keys, inverse = np.unique(key, return_inverse=True)
        size = len(keys)
        lows = np.full(size, np.inf)
        np.fmin.at(lows, inverse, low)
        highs = np.full(size, -np.inf)
        np.fmax.at(highs, inverse, high)
        lows[np.isinf(lows)], highs[np.isinf(highs)] = np.nan, np.nan
        return cls(
            keys,
            np.bincount(inverse, weights=n, minlength=size).astype(np.int64),
            lows,
            highs,
            np.bincount(inverse, weights=s1, minlength=size),
            np.bincount(inverse, weights=s2, minlength=size),
        )

    @classmethod
    def from_scores(cls, bases: Sequence[int], scores: Sequence[float | None], bucket_decimals: int) -> Histogram:
        """Of single rows, each with its ``base`` (``OK`` = 0, or the code of the reason its
        score is excluded) and its score as a double (read only when valid), bucketed and
        summed exactly as ``PredictionQueries.sliced_histogram`` does in SQL
        (``monitoring_math.grid_index``, ``queries.square``)."""
        if not len(bases):
            return cls.empty()
        base = np.asarray(bases, dtype=np.int64)
        valid = base == 0
        score = np.array([np.nan if v is None or not ok else float(v) for v, ok in zip(scores, valid, strict=True)])
        key = np.where(valid, grid_index(np.where(valid, score, 0.0), 10**bucket_decimals), -base).astype(np.int64)
        deviation = score - key / float(10**bucket_decimals)
        square = np.where(np.abs(deviation) < SQUARE_FLOOR, 0.0, deviation * deviation)
        return cls._grouped(key, np.ones(len(base), dtype=np.int64), score, score, deviation, square)

    def valid(self) -> Histogram:
        """The buckets of valid scores only."""
        keep = self.key >= 0
        return Histogram(*(a[keep] for a in (self.key, self.n, self.low, self.high, self.s1, self.s2)))

    def fingerprint(self, bucket_decimals: int) -> tuple[dict[int, int], int, float, float]:
        """(rows per reason code, ``0`` for valid; the sum of the valid scores' buckets, an
        exact integer; the sum of the valid scores and of their squares), what the audit
        compares with the store (``PredictionQueries.part_counts``). The bucket sum sees any
        score moved to another bucket, which a float sum of a large slice does not (a change
        below 1e-9 of it); the squares see a rewrite that keeps the sum (0.1 and 0.5 to 0.3
        and 0.3). A score p = e + d in the bucket of lower edge e gives p² = e² + 2ed + d²."""
        counts = {int(-k) if k < 0 else 0: 0 for k in self.key}
        for k, n in zip(self.key, self.n, strict=True):
            counts[int(-k) if k < 0 else 0] += int(n)
        valid = self.key >= 0
        n, s1, s2 = self.n[valid], self.s1[valid], self.s2[valid]
        edge = self.key[valid] / 10.0**bucket_decimals
        keys = int(np.sum(n * self.key[valid]))  # below 10**5 * rows: exact in int64
        total = float(np.sum(n * edge + s1))
        squares = float(np.sum(n * edge * edge + 2 * edge * s1 + s2))  # sum of (edge + deviation)**2
        return counts, keys, total, squares

    def excluded(self) -> dict[int, int]:
        """Rows per reason code of the excluded keys (``-key``)."""
        return {int(-k): int(n) for k, n in zip(self.key, self.n, strict=True) if k < 0}


#: How many of a slice's most frequent rounded scores it keeps (``TopCounts``).
TOP_SCORES = 128


@dataclass(frozen=True)
class TopCounts:
    """The most frequent rounded scores of some disjoint sets of rows, a bounded summary
    from which the mode count of their union is known within a bound (the Misra-Gries
    argument). Each set keeps its ``TOP_SCORES`` most frequent keys with their counts (all
    keys when it has no more) and ``bound``, the count of the next one (0 when none is left
    out), which no left-out key exceeds in that set.

    Over the union, a key's count is at least the sum of its kept counts (``lower``) and at
    most that sum plus the bound of every set that left it out (``upper``); a key no set
    kept has at most the sum of all bounds (``unseen``). Kept per key (``keys`` ascending),
    so that merging adds per key and is exact and associative: a window's summary merged
    once from its kept slices merges again with the parts read at each refresh
    (``SliceStore.merge``). Shapes: ``keys``, ``lower``, ``upper`` (n,) int64. Memory: 24
    bytes a key, at most ``TOP_SCORES`` keys a set.
    """

    keys: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    unseen: int = 0

    @classmethod
    def empty(cls) -> TopCounts:
        ints = np.empty(0, dtype=np.int64)
        return cls(ints, ints, ints)

    @classmethod
    def of(cls, keys: np.ndarray, counts: np.ndarray, top: int = TOP_SCORES) -> TopCounts:
        """Of one set given by its keys with their counts (each key once; all of them, or at
        least its ``top + 1`` most frequent), keeping the ``top`` most frequent (ties by key)."""
        keys, counts = np.asarray(keys, dtype=np.int64), np.asarray(counts, dtype=np.int64)
        order = np.lexsort((keys, -counts))
        bound = int(counts[order[top]]) if len(order) > top else 0
        kept = order[:top]
        kept = kept[np.argsort(keys[kept])]  # keys ascending (each key once)
        exact = counts[kept]  # one set: lower and upper counts are its counts (one array, read-only)
        exact.flags.writeable = False
        return cls(keys[kept], exact, exact, bound)

    @classmethod
    def of_scores(cls, rounded: np.ndarray, counts: np.ndarray, top: int = TOP_SCORES) -> TopCounts:
        """Of one set given as rounded keys that may repeat, each with a count."""
        keys, inverse = np.unique(np.asarray(rounded, dtype=np.int64), return_inverse=True)
        return cls.of(keys, np.bincount(inverse, weights=counts).astype(np.int64), top)

    @classmethod
    def merge(cls, parts: Iterable[TopCounts]) -> TopCounts:
        """The summary of the union of disjoint sets: per key, the lower counts add, and so
        do the upper ones, a part that has not the key giving its ``unseen``."""
        parts = list(parts)
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        unseen = sum(p.unseen for p in parts)
        every = np.concatenate([p.keys for p in parts])
        keys = np.unique(every)
        at = np.searchsorted(keys, every)
        # Counts below 2**53 a key: exact in bincount's float64.
        lower = np.bincount(at, weights=np.concatenate([p.lower for p in parts]), minlength=len(keys))
        # upper = the parts' unseen summed, plus for each part holding the key (its upper - its unseen).
        above = np.concatenate([p.upper - p.unseen for p in parts])
        upper = unseen + np.bincount(at, weights=above, minlength=len(keys))
        return cls(keys, lower.astype(np.int64), upper.astype(np.int64), unseen)

    def mode(self) -> tuple[int, int]:
        """(lower, upper): bounds of the count of the most frequent key of the union; equal
        when exact. Lower: the largest ``lower``; upper: the largest ``upper``, and ``unseen``
        (a key no set kept)."""
        return int(self.lower.max(initial=0)), int(max(self.upper.max(initial=0), self.unseen))


@dataclass(frozen=True)
class Sliced:
    """What a time slice (or a part of one) keeps: its bucket histogram and the most
    frequent rounded scores (``TopCounts``), which give the mode share when buckets hold
    several scores."""

    hist: Histogram
    top: TopCounts

    @classmethod
    def merge(cls, parts: Iterable[Sliced]) -> Sliced:
        parts = list(parts)
        return cls(Histogram.merge(p.hist for p in parts), TopCounts.merge(p.top for p in parts))


#: The counts ``OnlineBuckets`` keeps over all its predictions (``PredictionQueries.online``'s columns).
ONLINE_COUNTS = ("predictions", "with_label", "positives", "negatives", "extreme", *INVALID_LABEL_REASONS)
#: The sums it keeps over all its predictions.
ONLINE_SUMS = ("labeled_score_sum", "log_loss_sum")


@dataclass(frozen=True)
class OnlineBuckets:
    """The online accuracy aggregates of some predictions with their labels
    (``PredictionQueries.online``, ``sliced_online``): ``counts`` and ``sums``, the totals
    ``ONLINE_COUNTS`` and ``ONLINE_SUMS`` over all of them, and per score bucket holding a
    labeled prediction (``key``, ascending) its ``positives``, ``negatives`` and its
    smallest and largest labeled score (``low``/``high``): all that ROC AUC and its error
    bound need. Shapes: ``key``, ``positives``, ``negatives`` (n,) int64, ``low``,
    ``high`` (n,) float64, ``counts`` (8,) int64, ``sums`` (2,) float64. Memory: 40 bytes
    per labeled bucket, plus 0.1 KiB.

    They merge exactly over disjoint sets of predictions (counts and sums add, minima and
    maxima combine), so a window merged from slices has the buckets and totals one pass
    gives, up to the summation order of the sums."""

    key: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray
    low: np.ndarray
    high: np.ndarray
    counts: np.ndarray
    sums: np.ndarray

    @classmethod
    def empty(cls) -> OnlineBuckets:
        ints, floats = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
        return cls(ints, ints, ints, floats, floats, np.zeros(len(ONLINE_COUNTS), dtype=np.int64), np.zeros(2))

    @classmethod
    def by_window(cls, table: np.ndarray, columns: Sequence[str], windows: int) -> list[OnlineBuckets]:
        """From the rows of ``PredictionQueries.online`` as a matrix (``float_table``;
        ``columns``: their names, ``key`` and each aggregate suffixed ``_i`` for window
        ``i``; distinct keys, any order), each of the ``windows`` windows' aggregates, read
        column-wise in numpy (a window of continuous scores holds up to ``10**k + 1``
        buckets). A count the rows lack (``bad_timestamp`` without a label timestamp) is 0;
        NULL as in ``by_part``."""
        rows = len(table)
        at = {name: i for i, name in enumerate(columns)}
        out = []
        for i in range(windows):
            picked = [np.zeros(rows), table[:, at["key"]]]
            for name in (*ONLINE_COUNTS, *ONLINE_SUMS, "low", "high"):
                column = at.get(f"{name}_{i}")
                picked.append(table[:, column] if column is not None else np.zeros(rows))
            stacked = np.column_stack(picked)
            out.append(cls._of(stacked, range(stacked.shape[1])).get(0, cls.empty()))
        return out

    @classmethod
    def by_part(cls, table: np.ndarray, columns: Sequence[str]) -> dict[int, OnlineBuckets]:
        """From the rows of ``PredictionQueries.sliced_online`` (by bucket) as a matrix
        (``float_table``; ``columns``: their names; distinct (part, key), any order), each
        part's aggregates; a NULL sum is 0, a NULL ``low``/``high`` (no labeled score) NaN."""
        at = {name: i for i, name in enumerate(columns)}
        return cls._of(table, [at[name] for name in ("part", "key", *ONLINE_COUNTS, *ONLINE_SUMS, "low", "high")])

    @classmethod
    def _of(cls, table: np.ndarray, columns: Sequence[int]) -> dict[int, OnlineBuckets]:
        """From the ``columns`` of ``table``, (part, key, counts, sums, low, high) in this
        order, NULL as NaN, by part; parts without a prediction are left out."""
        part, key, n = (table[:, columns[i]] for i in range(3))
        kept = np.flatnonzero(n > 0)
        order = kept[np.lexsort((key[kept], part[kept]))]
        part = part[order].astype(np.int64)
        picked = np.asarray(columns, dtype=np.int64)
        first = 2 + len(ONLINE_COUNTS)
        out = {}
        for a, b in _runs(part):
            # One part's rows at a time (fancy indexing copies): no copy of all the kept rows
            # is made first, and a kept slice holds no array of the read.
            rows = table[np.ix_(order[a:b], picked)]
            counts = rows[:, 2:first].astype(np.int64)
            sums = np.nan_to_num(rows[:, first : first + len(ONLINE_SUMS)])
            positives, negatives = (counts[:, ONLINE_COUNTS.index(name)] for name in ("positives", "negatives"))
            labeled = np.flatnonzero(positives + negatives)
            out[int(part[a])] = cls(
                rows[labeled, 1].astype(np.int64),
                positives[labeled],
                negatives[labeled],
                rows[labeled, -2],
                rows[labeled, -1],
                counts.sum(axis=0),
                np.array([math.fsum(column) for column in sums.T]),
            )
        return out

    @classmethod
    def merge(cls, parts: Iterable[OnlineBuckets]) -> OnlineBuckets:
        """The aggregates of the union of the predictions of ``parts`` (disjoint sets); the
        buckets accumulated in dense arrays over the keys' range (at most ``10**k + 1``
        buckets), as ``Histogram.merge``."""
        parts = list(parts)
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        counts = np.sum([p.counts for p in parts], axis=0)
        sums = np.array([math.fsum(p.sums[i] for p in parts) for i in range(len(ONLINE_SUMS))])
        labeled = [p for p in parts if len(p.key)]
        if not labeled:
            return replace(cls.empty(), counts=counts, sums=sums)
        lowest = min(int(p.key[0]) for p in labeled)
        size = max(int(p.key[-1]) for p in labeled) - lowest + 1
        positives, negatives = np.zeros(size, dtype=np.int64), np.zeros(size, dtype=np.int64)
        low, high = np.full(size, np.nan), np.full(size, np.nan)
        for p in labeled:
            at = p.key - lowest
            positives[at] += p.positives
            negatives[at] += p.negatives
            low[at] = np.fmin(low[at], p.low)
            high[at] = np.fmax(high[at], p.high)
        held = np.flatnonzero(positives + negatives)
        return cls(held + lowest, positives[held], negatives[held], low[held], high[held], counts, sums)

    def totals(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(each count of ``ONLINE_COUNTS``, each sum of ``ONLINE_SUMS``): what the audit
        compares with the store (``sliced_online(..., by_bucket=False)``)."""
        return tuple(int(c) for c in self.counts), tuple(float(v) for v in self.sums)


@dataclass(frozen=True)
class ReplayTotals:
    """The replay aggregates of some predictions (``PredictionQueries.replays``,
    ``sliced_replays``): ``replayed`` (prediction, replay row) pairs, how many
    ``reproduced`` the served score, and the largest ``|online - offline|`` over the
    replays that are valid probabilities (``None`` without one). Memory: about 0.3 KiB a
    kept slice with its key, whatever its rows.

    They merge exactly over disjoint sets of predictions (counts add, maxima combine)."""

    replayed: int = 0
    reproduced: int = 0
    abs_error_max: float | None = None

    @classmethod
    def of(cls, mapping: Any, suffix: str = "") -> ReplayTotals:
        """From a result row's mapping (``replayed``, ``reproduced``, ``abs_error_max``, each
        with ``suffix``, such as ``_0`` for window 0 of ``replays``); a NULL count (no
        row) is 0."""
        largest = mapping[f"abs_error_max{suffix}"]
        return cls(
            int(mapping[f"replayed{suffix}"] or 0),
            int(mapping[f"reproduced{suffix}"] or 0),
            None if largest is None else float(largest),
        )

    @classmethod
    def by_part(cls, rows: Iterable[Any]) -> dict[int, ReplayTotals]:
        """From the rows of ``PredictionQueries.sliced_replays``, each part's totals."""
        return {int(row.part): cls.of(row._mapping) for row in rows}

    @classmethod
    def merge(cls, parts: Iterable[ReplayTotals]) -> ReplayTotals:
        """The totals of the union of the predictions of ``parts`` (disjoint sets)."""
        parts = list(parts)
        maxima = [p.abs_error_max for p in parts if p.abs_error_max is not None]
        return cls(sum(p.replayed for p in parts), sum(p.reproduced for p in parts), max(maxima, default=None))


@dataclass(frozen=True)
class Pass:
    """One statement of a plan: ``points`` are sorted instants cutting what it reads into
    parts (part ``p`` is ``[points[p], points[p + 1])``), ``reads`` the disjoint ranges it
    reads, each a union of parts."""

    points: tuple[datetime, ...]
    reads: tuple[tuple[datetime, datetime], ...]

    @classmethod
    def over(cls, stretches: Sequence[tuple[datetime, datetime]]) -> Pass:
        """The pass reading ``stretches``, cut at each of their ends."""
        points = tuple(sorted({p for r in stretches for p in r}))
        return cls(points, tuple(union(stretches)))

    def parts_in(self, start: datetime, end: datetime) -> tuple[int, ...]:
        """The parts inside ``[start, end)``: ``p`` with ``start <= points[p]`` and
        ``points[p + 1] <= end``, found by bisection (a cold plan of 1,440 slices asks once
        per slice; a scan took 0.26 s)."""
        return tuple(range(bisect_left(self.points, start), bisect_right(self.points, end) - 1))


@dataclass(frozen=True)
class Plan:
    """What one refresh reads and how it merges it into windows.

    ``passes``: the statements to run (``Pass``), each read part named (pass, part);
    ``new_slices``: the starts of the sealed slices read this time, each one part of the
    first pass, to keep; ``windows[i]``: (the kept slice starts, the read parts) that make
    window ``i``, none while the store is filling (``SliceStore.filling``). A window's tail inside a slice read this time is read again by a second
    pass rather than cutting that slice: a slice's aggregate is then the same whenever it
    is read (``TopCounts`` depends on how rows are grouped into sets).
    """

    passes: tuple[Pass, ...]
    new_slices: tuple[datetime, ...]
    windows: tuple[tuple[tuple[datetime, ...], tuple[tuple[int, int], ...]], ...]


A = TypeVar("A")


class SliceStore(Generic[A]):
    """The aggregates ``A`` of the sealed slices of one source, kept between refreshes; at
    each refresh, ``begin``, then ``filling`` (and ``audit_due``) decide how it reads,
    ``plan`` says what it reads, ``merge`` makes its windows.

    ``combine`` merges the aggregates of disjoint sets of rows (``Histogram.merge``).
    Memory: the kept aggregates, at most ``largest window / width`` of them; for
    ``Histogram``, 48 bytes per (kept slice, bucket holding rows), at most
    ``min(rows of a slice, 10**bucket_decimals + 7)`` buckets a slice (docs/scaling.md).
    """

    def __init__(
        self, width: timedelta, audit_interval: timedelta, combine: Callable[[Iterable[A]], A], fill: int | None = None
    ):
        """``width``: the slice width (> 0); ``audit_interval``: how often ``audit_due`` is
        true; ``fill``: how many missing slices a refresh reads while the store fills, besides
        those sealed since the refresh before (``filling``; ``None``: every one at once)."""
        self.width = width
        self.fill = fill
        self.audit_interval = audit_interval
        self.combine = combine
        self.slices: dict[datetime, A] = {}
        #: Per window's kept slice starts at the last ``merge``: (those slices' aggregates,
        #: their merge). A window's kept slices change once a slice width (one seals, its
        #: start passes a boundary), not at every refresh: merging 288 slices per window and
        #: source was a tenth of a steady refresh at 1e6 (docs/performance.md, *A steady
        #: refresh's fixed cost*). The aggregates are compared by identity: a slice read
        #: again or restored is another object.
        self._merged: dict[tuple[datetime, ...], tuple[tuple[A, ...], A]] = {}
        #: The last ``filling`` answered no: the refresh merges its windows from slices.
        self.filled = False
        self._first: datetime | None = None  # the largest window's first slice at the last ``begin``
        self._last_sealed: datetime | None = None  # the sealed end at the last ``begin``
        self._fresh_from: datetime | None = None  # slices from here on sealed since the refresh before
        self._audited: datetime | None = None
        self._audit_now = False  # slices kept by another process (``restore``) are audited first
        #: Maps ``end - delay`` to the instant before which every row read is written
        #: (``stores.written_by``: naive timestamps across a clock set back); identity by default.
        self.horizon: Callable[[datetime], datetime] = lambda instant: instant

    def _bounds(self, starts: Sequence[datetime], end: datetime, delay: timedelta) -> tuple[datetime, datetime]:
        """(start of the first slice wholly inside the largest window, end of its last sealed
        slice) for the windows ``[starts[i], end)`` whose rows may be written ``delay`` late."""
        return ceil_to(min(starts), self.width), floor_to(min(end - delay, self.horizon(end - delay)), self.width)

    def begin(self, starts: Sequence[datetime], end: datetime, delay: timedelta) -> None:
        """Start a refresh of the windows ``[starts[i], end)``, whose rows may still be
        written ``delay`` after their timestamp: forget every kept slice that is not a sealed
        slice of the largest window (before its start, or past its sealed end when ``end``
        went back: a slice kept while out of the window would not be probed for the
        duplicated ids it shares with rows read meanwhile, ``PredictionsSource._sliced``),
        and note which slices are sealed since the refresh before (``filling``). Called
        first at every refresh, failed ones included: slices sealed while the store was
        down then count as missing ones, read ``fill`` a refresh, rather than as sealed
        since the refresh before, which are all read at once."""
        first, sealed = self._bounds(starts, end, delay)
        self._first, self._fresh_from, self._last_sealed = first, self._last_sealed, sealed
        self.forget([s for s in self.slices if s < first or s + self.width > sealed])

    def filling(self, starts: Sequence[datetime], end: datetime, delay: timedelta) -> bool:
        """Whether this refresh (after ``begin``) only fills the store, reading
        ``plan(..., filling=True)``: more than ``fill`` of the largest window's sealed slices
        are missing besides those sealed since the refresh before (always read, so that the
        store fills however far refreshes step). A cold start, an audit that found many
        slices changed, an outage of the store or ``end`` going back so fill the store
        again over refreshes whose numbers are those of one pass; fewer missing slices are
        read at once. Asked again after anything forgets slices (an audit, the duplicated
        ids), before ``plan``: the answer only turns from no to yes."""
        first, sealed = self._bounds(starts, end, delay)
        self.filled = self.fill is None or len(self._older_missing(first, sealed)) <= self.fill
        return not self.filled

    def _older_missing(self, first: datetime, sealed: datetime) -> list[datetime]:
        """The starts of the slices in ``[first, sealed)`` neither kept nor sealed since the
        last refresh, ascending."""
        fresh = self._fresh_from if self._fresh_from is not None else sealed
        return [s for s in slice_starts(first, min(fresh, sealed), self.width) if s not in self.slices]

    def plan(self, starts: Sequence[datetime], end: datetime, delay: timedelta, filling: bool = False) -> Plan:
        """What to read for the windows ``[starts[i], end)`` (after ``begin``), whose rows
        may still be written ``delay`` after their timestamp: the sealed slices (ending at or
        before ``end - delay``) wholly inside the largest window that are not kept yet, and
        each window's head and tail (module docstring).

        While ``filling`` (``SliceStore.filling``), the plan reads the missing slices sealed
        since the last refresh and the ``fill`` newest of the others (kept the
        longest), and makes no window (``Plan.windows`` is empty): the caller reads the
        windows in one pass this time."""
        width = self.width
        first, sealed = self._bounds(starts, end, delay)
        missing = [s for s in slice_starts(first, sealed, width) if s not in self.slices]
        if filling and self.fill is not None:
            older = self._older_missing(first, sealed)
            chosen = sorted({*older[max(0, len(older) - self.fill) :], *(s for s in missing if s not in older)})
            return Plan((Pass.over([(s, s + width) for s in chosen]),), tuple(chosen), ())
        raw: list[list[tuple[datetime, datetime]]] = []
        for a in starts:
            c = ceil_to(a, width)
            # A window starting in the last sealed slice (c == sealed) is cut at ``sealed``
            # too: read whole, it would be one set of rows when that slice is read this time
            # and two when it is kept, and TopCounts depends on how rows are grouped.
            raw.append([(a, c), (sealed, end)] if c <= sealed else [(a, end)])

        def overlaps(stretch: tuple[datetime, datetime]) -> bool:
            return any(stretch[0] < s + width and s < stretch[1] for s in missing)

        stretches = [r for ranges in raw for r in ranges if r[0] < r[1]]
        first_pass = Pass.over([r for r in stretches if not overlaps(r)] + [(s, s + width) for s in missing])
        passes = [first_pass]
        second = [r for r in stretches if overlaps(r)]
        if second:
            passes.append(Pass.over(second))
        windows = []
        for a, ranges in zip(starts, raw, strict=True):
            kept = slice_starts(a, sealed, width)
            own = []
            for r in ranges:
                if r[0] < r[1]:
                    pass_index = 1 if overlaps(r) else 0
                    own += [(pass_index, p) for p in passes[pass_index].parts_in(*r)]
            windows.append((tuple(kept), tuple(own)))
        return Plan(tuple(passes), tuple(missing), tuple(windows))

    def merge(self, plan: Plan, parts: dict[tuple[int, int], A]) -> list[A]:
        """Keep the new sealed slices of ``plan`` from the ``parts`` read for it (by (pass,
        part); a part without rows may be absent), and return each window's aggregate (none
        while filling): the merge of its kept slices, made again only when they changed
        since the last ``merge``, merged with its parts read. ``combine`` must be
        associative (the float sums only up to their rounding)."""
        for start in plan.new_slices:
            (p,) = plan.passes[0].parts_in(start, start + self.width)
            self.slices[start] = parts[(0, p)] if (0, p) in parts else self.combine([])
        merged: dict[tuple[datetime, ...], tuple[tuple[A, ...], A]] = {}
        windows = []
        for kept, own in plan.windows:
            held = tuple(self.slices[s] for s in kept)
            known = merged.get(kept) or self._merged.get(kept)
            if known is None or any(a is not b for a, b in zip(known[0], held, strict=True)):
                known = (held, self.combine(held))
            merged[kept] = known
            windows.append(self.combine([known[1], *(parts[p] for p in own if p in parts)]))
        self._merged = merged
        return windows

    def restore(self, slices: dict[datetime, A]) -> int:
        """Keep those of ``slices`` (by start), read by an earlier process, that are sealed
        slices of the largest window (after ``begin``); returns how many. The store may have
        changed since, so the next ``audit_due`` is true."""
        assert self._first is not None and self._last_sealed is not None, "restore after begin"
        first, sealed = self._first, self._last_sealed
        kept = {start: a for start, a in slices.items() if first <= start and start + self.width <= sealed}
        self.slices.update(kept)
        self._audit_now = bool(kept)
        return len(kept)

    def audit_due(self, as_of: datetime, filling: bool) -> bool:
        """Whether the kept slices should be compared with the store now: when slices were
        restored since the last audit, or, unless this refresh only fills the store
        (``filling``: it reads the windows in one pass, exact whatever the kept slices hold,
        and no audit keeps its statements within those of a filled refresh), when
        ``audit_interval`` has passed since the first refresh or the last audit."""
        if self._audited is None:
            self._audited = as_of
        # A refresh time before the last audit (the clock stepped back): audit now rather
        # than wait until the refresh time passes the last audit again (a day for a day).
        late = as_of < self._audited or as_of - self._audited >= self.audit_interval
        due = not filling and late
        return bool(self.slices) and (self._audit_now or due)

    def audit_started(self, as_of: datetime) -> Pass:
        """Record an audit begun at ``as_of``, before its statement runs: a periodic audit
        that fails (a timeout on a large window) is then tried again an ``audit_interval``
        later, not at every refresh, which it would keep failing; one of restored slices is
        tried again at the next refresh. Returns the pass reading each kept slice as one part."""
        self._audited = as_of
        kept = sorted(self.slices)
        return Pass(
            tuple(sorted({*kept, *(start + self.width for start in kept)})),
            tuple(union((start, start + self.width) for start in kept)),
        )

    def audited(self, changed: Callable[[datetime, A], bool]) -> list[datetime]:
        """Forget the kept slices for which ``changed(start, aggregate)`` is true (their rows
        in the store differ from what was read), so that the next plan reads them again;
        returns their starts."""
        self._audit_now = False
        gone = [start for start, aggregate in self.slices.items() if changed(start, aggregate)]
        self.forget(gone)
        return gone

    def forget(self, starts: Iterable[datetime]) -> None:
        """Read the slices of ``starts`` again at the next plan; the windows' merges that
        hold them are dropped too, so that those merges do not keep a forgotten slice alive
        (while the duplicated ids are too many to list, no ``merge`` comes to replace them)."""
        gone = {start for start in starts if self.slices.pop(start, None) is not None}
        if gone:
            self._merged = {kept: known for kept, known in self._merged.items() if gone.isdisjoint(kept)}


#: The one id all NaN ids are (``same_id``).
NAN_ID = object()


def same_id(ident: Any) -> Any:
    """``ident`` as a key equal for the ids the engine's ``GROUP BY`` puts together: NaN ids
    (a floating or numeric id column on PostgreSQL or DuckDB) are one id there, but no NaN
    equals another in Python."""
    return NAN_ID if ident != ident else ident


@dataclass(frozen=True)
class DuplicateRows:
    """The rows of the ids carried by several rows of the largest window, read at a refresh
    on time slices (``PredictionQueries.duplicate_rows``): every other statement leaves
    those ids out, and their rows are added back here, per window, as a single pass over
    the window would count them (``queries.INVALID_REASONS``: a valid score of an id that
    several rows of the window carry is a ``duplicate_id``; an excluded score keeps its own
    reason; a row whose id only one row of the window carries counts as any other).

    ``points`` cut the window into parts, every slice boundary and window start among
    them; ``rows`` are (part, id, base, score).
    """

    points: tuple[datetime, ...]
    rows: tuple[tuple[int, Any, int, float | None], ...]

    def window(self, start: datetime, bucket_decimals: int, mode_decimals: int) -> tuple[Sliced, int, tuple[Any, ...]]:
        """For the window starting at ``start`` (one of the points): what the rows to add back
        hold (their histogram, and all their rounded scores: an exact ``TopCounts``), the
        number of valid scores excluded as ``duplicate_id``, and the ids carried by several
        of its rows."""
        mine, counts = self._of_window(start)
        back = [row for row in mine if counts[same_id(row[1])] == 1 or row[2] != 0]
        duplicated = sum(1 for row in mine if counts[same_id(row[1])] > 1 and row[2] == 0)
        ids = self._duplicated(start)
        hist = Histogram.from_scores([r[2] for r in back], [r[3] for r in back], bucket_decimals)
        valid = np.array([r[3] for r in back if r[2] == 0], dtype=np.float64)
        rounded = round_half_up_index(valid, mode_decimals)
        top = TopCounts.of_scores(rounded, np.ones(len(valid)), top=len(valid))
        return Sliced(hist, top), duplicated, ids

    def per_window(self, starts: Sequence[datetime]) -> DuplicateIds:
        """The ids carried by several rows of each window starting at one of ``starts`` (points)."""
        return DuplicateIds(tuple(self._duplicated(start) for start in starts))

    def _duplicated(self, start: datetime) -> tuple[Any, ...]:
        mine, counts = self._of_window(start)
        return tuple({same_id(row[1]): row[1] for row in mine if counts[same_id(row[1])] > 1}.values())

    def _of_window(self, start: datetime) -> tuple[list[tuple[int, Any, int, float | None]], Counter[Any]]:
        """The rows of the window starting at ``start`` and how many of them carry each id."""
        mine = [row for row in self.rows if self.points[row[0]] >= start]
        return mine, Counter(same_id(row[1]) for row in mine)

    def by_slice(self, width: timedelta) -> dict[datetime, frozenset[Any]]:
        """The ids with rows in each slice (by start): what a kept slice must have left out."""
        out: dict[datetime, set[Any]] = {}
        for part, ident, _, _ in self.rows:
            out.setdefault(floor_to(self.points[part], width), set()).add(same_id(ident))
        return {start: frozenset(ids) for start, ids in out.items()}
