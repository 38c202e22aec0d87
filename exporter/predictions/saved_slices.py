"""The kept time slices of a model saved in the state database, so that a restarted
``mlmon serve`` reads only what changed while it was down rather than its largest window
(docs/metrics.md, "Time slices"): the predictions' (``training.storage.kept_slices``,
``PREDICTIONS``), the labels' online ones (``training.storage.kept_online_slices``,
``ONLINE``) and the replays' (``training.storage.kept_replay_slices``, ``REPLAYS``), one
``SavedSlices`` each.

A saved slice is keyed by model and slice start, and carries the fingerprint of
everything that determines its contents (``fingerprint``, ``online_fingerprint``, ``replay_fingerprint``): slices
saved under another one are ignored and replaced. Its aggregates are stored without
pickle: arrays as ``.npy`` bytes of plain structured arrays (``np.save``,
``allow_pickle=False``), the rest as JSON; a ``Codec`` says how for each kind.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic

import numpy as np
import sqlalchemy as sa

from exporter.config import ModelConfig
from exporter.predictions.slices import (
    EPOCH,
    ONLINE_COUNTS,
    ONLINE_SUMS,
    A,
    Histogram,
    OnlineBuckets,
    ReplayTotals,
    Sliced,
    TopCounts,
)
from exporter.training.storage import StateDatabase, kept_online_slices, kept_replay_slices, kept_slices

log = logging.getLogger(__name__)

#: The version of the saved form and of what a slice holds (its buckets, exclusion reasons,
#: most frequent scores): part of the fingerprint, so that a version of mlmon that saves or
#: computes slices differently ignores the rows of an older one. Bump it with either change.
FORMAT = 2

#: A histogram's entries as saved (``slices.Histogram``'s six arrays, little-endian).
HIST_DTYPE = np.dtype([("key", "<i8"), ("n", "<i8"), ("low", "<f8"), ("high", "<f8"), ("s1", "<f8"), ("s2", "<f8")])
#: The kept most frequent scores of a ``slices.TopCounts``, with their lower and upper counts.
TOP_DTYPE = np.dtype([("key", "<i8"), ("lower", "<i8"), ("upper", "<i8")])

#: As ``FORMAT``, for the kept online slices (``encode_online``): part of their fingerprint.
ONLINE_FORMAT = 1
#: An online slice's labeled buckets as saved (``slices.OnlineBuckets``' five per-bucket
#: arrays, little-endian); its totals are in the row's JSON.
ONLINE_DTYPE = np.dtype([("key", "<i8"), ("positives", "<i8"), ("negatives", "<i8"), ("low", "<f8"), ("high", "<f8")])

#: As ``FORMAT``, for the kept replay slices (``encode_replays``): part of their fingerprint.
REPLAY_FORMAT = 1

#: Slices deleted per statement: SQLite before 3.32 takes at most 999 bound parameters.
_CHUNK = 500

_MICROSECOND = timedelta(microseconds=1)


def _predictions_part(model: ModelConfig, url: sa.URL, dialect: str, width: timedelta) -> dict[str, Any]:
    """What of the predictions' configuration determines the contents of a kept slice of
    ``model``, of the predictions or online: their store (``url``, its password left out)
    and ``dialect``, table, columns, filter, time zone and ``unique_ids``; the bucket
    decimals and the slice ``width``."""
    source = model.predictions
    return {
        "url": url.render_as_string(hide_password=True),
        "dialect": dialect,
        "schema": source.db_schema,
        "table": source.table,
        "columns": [source.columns.id, source.columns.timestamp, source.columns.score],
        "filter": sorted((key, repr(value)) for key, value in source.filter.items()),
        "timezone": source.timezone,
        "unique_ids": source.unique_ids,
        "bucket_decimals": model.bucket_decimals,
        "width_us": width // _MICROSECOND,
    }


def _digest(described: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def fingerprint(model: ModelConfig, url: sa.URL, dialect: str, width: timedelta, top_scores: int) -> str:
    """The SHA-256 (hex) of what determines the contents of a kept slice of ``model``: the
    predictions' store (``url``, its password left out) and ``dialect``, table, columns,
    filter, time zone and ``unique_ids``; the bucket and mode decimals, the slice ``width``,
    how many most frequent scores a slice keeps (``top_scores``) and ``FORMAT``.
    ``ingestion_delay`` is not part of it: it decides when a slice is sealed, not what it
    holds, and a restored slice that is not sealed under the current one is not kept
    (``Source._restore``)."""
    described = {
        **_predictions_part(model, url, dialect, width),
        "format": FORMAT,
        "mode_share_decimals": model.mode_share_decimals,
        "top_scores": top_scores,
    }
    return _digest(described)


def online_fingerprint(model: ModelConfig, url: sa.URL, dialect: str, width: timedelta) -> str:
    """The SHA-256 (hex) of what determines the contents of a kept online slice of
    ``model`` (which has labels): the predictions' part of ``fingerprint`` (store ``url``
    and ``dialect``, table, columns, filter, time zone, ``unique_ids``, bucket decimals,
    slice ``width``), every setting of the label source (store, schema, table, columns,
    time zone, ``missing``, and any added later), ``label_delay`` and ``ONLINE_FORMAT``.
    Not ``mode_share_decimals`` nor the most frequent scores, which online slices do not
    keep, nor ``ingestion_delay``, which decides when a slice is settled, not what it holds."""
    labels = model.labels
    assert labels is not None, "online slices are kept for a model with labels"
    described = {
        "predictions": _predictions_part(model, url, dialect, width),
        "labels": labels.model_dump(mode="json", by_alias=True),
        "label_delay_us": model.label_delay // _MICROSECOND,
        "format": ONLINE_FORMAT,
    }
    return _digest(described)


def replay_fingerprint(model: ModelConfig, url: sa.URL, dialect: str, width: timedelta) -> str:
    """The SHA-256 (hex) of what determines the contents of a kept replay slice of ``model``
    (which has replays): the predictions' part of ``fingerprint`` (store ``url`` and
    ``dialect``, table, columns, filter, time zone, ``unique_ids``, bucket decimals, slice
    ``width``), every setting of the replay source (store, schema, table, columns, and any
    added later), ``replay_tolerance`` and ``REPLAY_FORMAT``. Not ``replay_delay`` nor
    ``ingestion_delay``, which decide when a slice is settled, not what it holds."""
    replays = model.replays
    assert replays is not None, "replay slices are kept for a model with replays"
    described = {
        "predictions": _predictions_part(model, url, dialect, width),
        "replays": replays.model_dump(mode="json", by_alias=True),
        "tolerance": model.replay_tolerance.model_dump(mode="json"),
        "format": REPLAY_FORMAT,
    }
    return _digest(described)


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def _array(data: bytes, dtype: np.dtype, what: str) -> np.ndarray:
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(array, np.ndarray):  # .npz bytes load as an archive of arrays
        raise ValueError(f"{what}: {type(array).__name__}, not a .npy array")
    if array.dtype != dtype or array.ndim != 1:
        raise ValueError(f"{what}: a {array.ndim}-d array of {array.dtype}, not a 1-d array of {dtype}")
    return array


def encode(sliced: Sliced) -> tuple[bytes, bytes, str]:
    """(hist, top, meta) of the row saving ``sliced``: the histogram's entries and the most
    frequent scores' as ``.npy`` bytes (``HIST_DTYPE``, ``TOP_DTYPE``), and as JSON the
    form and the most frequent scores' ``unseen`` count."""
    h = sliced.hist
    hist = np.empty(len(h.key), dtype=HIST_DTYPE)
    for name in HIST_DTYPE.names or ():
        hist[name] = getattr(h, name)
    t = sliced.top
    top = np.empty(len(t.keys), dtype=TOP_DTYPE)
    top["key"], top["lower"], top["upper"] = t.keys, t.lower, t.upper
    meta = json.dumps({"format": FORMAT, "unseen": int(t.unseen)})
    return _npy(hist), _npy(top), meta


def _of_form(meta: str, form: int) -> dict[str, Any]:
    """The JSON object ``meta`` holds, when its ``format`` is ``form``.

    Raises:
        ValueError: ``meta`` is no JSON, or no object of that form (JSON ``true`` and
            ``1.0`` are not the form 1: a row no version of mlmon writes).
    """
    described = json.loads(meta)
    if not isinstance(described, dict) or type(described.get("format")) is not int or described["format"] != form:
        raise ValueError(f"meta: not of form {form}")
    return described


def decode(hist: bytes, top: bytes, meta: str) -> Sliced:
    """The ``Sliced`` a row saved (``encode``).

    Raises:
        ValueError: the row is not one ``encode`` writes (another form, arrays of another
            type, keys not increasing, empty buckets, most frequent scores' counts not
            ``0 < lower <= upper``, ``unseen`` no count), naming what is wrong.
    """
    described = _of_form(meta, FORMAT)
    unseen = described.get("unseen")
    # type(v) is int, not isinstance: JSON true is a bool, which is an int.
    if type(unseen) is not int or unseen < 0:
        raise ValueError("meta: 'unseen' is not a count")
    entries = _array(hist, HIST_DTYPE, "hist")
    if np.any(np.diff(entries["key"]) <= 0) or np.any(entries["n"] <= 0):
        raise ValueError("hist: keys not strictly increasing, or a bucket without rows")
    kept = _array(top, TOP_DTYPE, "top")
    if np.any(np.diff(kept["key"]) <= 0) or np.any(kept["lower"] <= 0) or np.any(kept["upper"] < kept["lower"]):
        raise ValueError("top: keys not strictly increasing, or counts not 0 < lower <= upper")
    histogram = Histogram(*(np.ascontiguousarray(entries[name]) for name in HIST_DTYPE.names or ()))
    keys, lower, upper = (np.ascontiguousarray(kept[name]) for name in ("key", "lower", "upper"))
    return Sliced(histogram, TopCounts(keys, lower, upper, unseen))


def encode_online(buckets: OnlineBuckets) -> tuple[bytes, str]:
    """(buckets, meta) of the row saving an online slice: its labeled buckets as ``.npy``
    bytes (``ONLINE_DTYPE``), and as JSON the form and its totals (each count of
    ``slices.ONLINE_COUNTS`` and sum of ``slices.ONLINE_SUMS``, by name)."""
    entries = np.empty(len(buckets.key), dtype=ONLINE_DTYPE)
    for name in ONLINE_DTYPE.names or ():
        entries[name] = getattr(buckets, name)
    counts, sums = buckets.totals()
    meta = {
        "format": ONLINE_FORMAT,
        "counts": dict(zip(ONLINE_COUNTS, counts, strict=True)),
        "sums": dict(zip(ONLINE_SUMS, sums, strict=True)),
    }
    return _npy(entries), json.dumps(meta)


def decode_online(buckets: bytes, meta: str) -> OnlineBuckets:
    """The ``OnlineBuckets`` a row saved (``encode_online``).

    Raises:
        ValueError: the row is not one ``encode_online`` writes (another form, totals
            missing or not counts and finite sums, an array of another type, keys not
            increasing or negative, a bucket without a labeled prediction, positives and
            negatives not adding up to the totals), naming what is wrong.
    """
    described = _of_form(meta, ONLINE_FORMAT)
    counts, sums = described.get("counts"), described.get("sums")
    # type(v) is int, not isinstance: JSON true is a bool, which is an int.
    if not isinstance(counts, dict) or set(counts) != set(ONLINE_COUNTS):
        raise ValueError(f"meta: 'counts' does not name each of {list(ONLINE_COUNTS)}")
    if not all(type(v) is int and 0 <= v < 2**63 for v in counts.values()):
        raise ValueError("meta: 'counts' holds a value that is not a count")
    if not isinstance(sums, dict) or set(sums) != set(ONLINE_SUMS):
        raise ValueError(f"meta: 'sums' does not name each of {list(ONLINE_SUMS)}")
    if not all(type(v) in (int, float) and math.isfinite(v) for v in sums.values()):
        raise ValueError("meta: 'sums' holds a value that is not a finite number")
    entries = _array(buckets, ONLINE_DTYPE, "buckets")
    key, positives, negatives = entries["key"], entries["positives"], entries["negatives"]
    if np.any(np.diff(key) <= 0) or np.any(key < 0):
        raise ValueError("buckets: keys not strictly increasing, or a negative key")
    if np.any(positives < 0) or np.any(negatives < 0) or np.any(positives + negatives <= 0):
        raise ValueError("buckets: a negative count, or a bucket without a labeled prediction")
    if int(positives.sum()) != counts["positives"] or int(negatives.sum()) != counts["negatives"]:
        raise ValueError("buckets: their positives and negatives do not add up to the totals")
    return OnlineBuckets(
        np.ascontiguousarray(key),
        np.ascontiguousarray(positives),
        np.ascontiguousarray(negatives),
        np.ascontiguousarray(entries["low"]),
        np.ascontiguousarray(entries["high"]),
        np.array([counts[name] for name in ONLINE_COUNTS], dtype=np.int64),
        np.array([float(sums[name]) for name in ONLINE_SUMS], dtype=np.float64),
    )


def encode_replays(totals: ReplayTotals) -> tuple[str]:
    """(meta,) of the row saving a replay slice: JSON of its form and its three numbers."""
    meta = {
        "format": REPLAY_FORMAT,
        "replayed": totals.replayed,
        "reproduced": totals.reproduced,
        "abs_error_max": totals.abs_error_max,
    }
    return (json.dumps(meta),)


def decode_replays(meta: str) -> ReplayTotals:
    """The ``ReplayTotals`` a row saved (``encode_replays``).

    Raises:
        ValueError: the row is not one ``encode_replays`` writes (another form, counts that
            are not counts or more reproduced than replayed, a largest error that is not a
            finite number of at least 0 or without a replay), naming what is wrong.
    """
    described = _of_form(meta, REPLAY_FORMAT)
    # Any, not Any | None: each is checked below before use.
    replayed: Any = described.get("replayed")
    reproduced: Any = described.get("reproduced")
    largest: Any = described.get("abs_error_max")
    # type(v) is int, not isinstance: JSON true is a bool, which is an int.
    if type(replayed) is not int or type(reproduced) is not int or not 0 <= reproduced <= replayed < 2**63:
        raise ValueError("meta: 'replayed' and 'reproduced' are not counts, reproduced at most replayed")
    if largest is not None and not (type(largest) in (int, float) and math.isfinite(largest) and largest >= 0):
        raise ValueError("meta: 'abs_error_max' is not a finite number of at least 0")
    if largest is not None and replayed == 0:
        raise ValueError("meta: a largest error without a replay")
    return ReplayTotals(replayed, reproduced, None if largest is None else float(largest))


@dataclass(frozen=True)
class Codec(Generic[A]):
    """How one kind of kept slice (aggregates ``A``) is saved: its ``table``, keyed by
    ``model`` and ``slice_start_us`` with a ``fingerprint`` column, the ``columns`` holding
    the aggregate, ``encode`` giving their values in that order and ``decode`` reading
    them back as the database returns them (raising ``ValueError``, ``TypeError``,
    ``OSError``, ``EOFError``, ``OverflowError`` or ``RecursionError`` for a row it does
    not write), and ``noun``, how logs name
    one slice; ``of``: the sources whose configuration its fingerprint describes."""

    table: sa.Table
    columns: tuple[str, ...]
    encode: Callable[[A], tuple[Any, ...]]
    decode: Callable[..., A]
    noun: str
    of: str


def _decode_sliced(hist: Any, top: Any, meta: Any) -> Sliced:
    return decode(bytes(hist), bytes(top), str(meta))


def _decode_online(buckets: Any, meta: Any) -> OnlineBuckets:
    return decode_online(bytes(buckets), str(meta))


def _decode_replays(meta: Any) -> ReplayTotals:
    return decode_replays(str(meta))


#: The predictions' kept slices (``kept_slices``, ``encode``).
PREDICTIONS: Codec[Sliced] = Codec(
    kept_slices, ("hist", "top", "meta"), encode, _decode_sliced, "kept time slice", "the predictions"
)
#: The labels' kept online slices (``kept_online_slices``, ``encode_online``).
ONLINE: Codec[OnlineBuckets] = Codec(
    kept_online_slices,
    ("buckets", "meta"),
    encode_online,
    _decode_online,
    "kept online slice",
    "the predictions or the labels",
)


#: The replays' kept slices (``kept_replay_slices``, ``encode_replays``).
REPLAYS: Codec[ReplayTotals] = Codec(
    kept_replay_slices,
    ("meta",),
    encode_replays,
    _decode_replays,
    "kept replay slice",
    "the predictions or the replays",
)


def _start(micros: int) -> datetime:
    return EPOCH + micros * _MICROSECOND


def _micros(start: datetime) -> int:
    return (start - EPOCH) // _MICROSECOND


class SavedSlices(Generic[A]):
    """The kept slices ``A`` of one model in the state database, under one fingerprint,
    saved as ``codec`` says (``PREDICTIONS``, ``ONLINE``, ``REPLAYS``).

    ``load`` reads them back; ``save`` writes what changed since the last load or save:
    the slices kept since, those read again (another object under the same start), and
    deletes the forgotten ones and any saved under another fingerprint. Until a load or a
    save succeeds, what the database holds is unknown, and a save replaces all the
    model's rows.
    """

    def __init__(self, state: StateDatabase, model: str, fingerprint: str, codec: Codec[A]):
        self.state = state
        self.model = model
        self.fingerprint = fingerprint
        self.codec = codec
        #: What the database holds, by start (``None``: a row that could not be read back);
        #: ``None`` while unknown.
        self._saved: dict[datetime, A | None] | None = None

    def load(self, width: timedelta) -> dict[datetime, A]:
        """The saved slices of the model, by start: rows saved under another fingerprint
        are ignored (logged at INFO), and so are rows that cannot be read back or whose
        start is not a boundary of slices of ``width`` (logged at WARNING); both are
        replaced at the next ``save``.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the state database failed (it migrates again
                on next use).
        """
        codec, table = self.codec, self.codec.table
        columns = table.c
        mine = columns.model == self.model
        # The blobs of rows saved under another fingerprint are only counted, never read.
        query = sa.select(columns.slice_start_us, *(columns[name] for name in codec.columns))
        other = sa.select(sa.func.count()).select_from(table).where(mine, columns.fingerprint != self.fingerprint)
        try:
            with self.state.ready().connect() as conn:
                rows = conn.execute(query.where(mine, columns.fingerprint == self.fingerprint)).all()
                others = conn.execute(other).scalar_one()
        except sa.exc.SQLAlchemyError:
            self.state.failed()
            raise
        saved: dict[datetime, A | None] = {}
        for row in rows:
            start = _start(int(row.slice_start_us))
            try:
                if (start - EPOCH) % width:
                    raise ValueError(f"not a boundary of slices of {width.total_seconds():g}s")
                saved[start] = codec.decode(*row[1:])
            except (ValueError, TypeError, OSError, EOFError, OverflowError, RecursionError) as exc:
                log.warning(
                    "model %s: the %s at %s saved in the state database cannot be read back "
                    "(%s); it is read from the store again",
                    self.model,
                    codec.noun,
                    start.isoformat(),
                    exc,
                )
                saved[start] = None
        if others:
            log.info(
                "model %s: %d %ss in the state database were saved with another configuration "
                "of %s; ignored, and replaced",
                self.model,
                others,
                codec.noun,
                codec.of,
            )
            self._saved = None  # the next save replaces every row of the model
        else:
            self._saved = saved
        return {start: aggregate for start, aggregate in saved.items() if aggregate is not None}

    def save(self, slices: Mapping[datetime, A]) -> None:
        """Make the saved slices of the model those of ``slices`` (by start), writing only
        what changed since the last load or save, in one transaction.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the state database failed; nothing was written
                (it migrates again on next use).
        """
        saved = self._saved
        codec, table = self.codec, self.codec.table
        columns = table.c
        if saved is None:
            changed, gone = list(slices), []
        else:
            changed = [start for start, aggregate in slices.items() if saved.get(start) is not aggregate]
            gone = [start for start in saved if start not in slices]
            if not changed and not gone:
                return
        rows: list[dict[str, Any]] = []
        for start in changed:
            values = codec.encode(slices[start])
            rows.append(
                {
                    "model": self.model,
                    "slice_start_us": _micros(start),
                    "fingerprint": self.fingerprint,
                    **dict(zip(codec.columns, values, strict=True)),
                }
            )
        mine = columns.model == self.model
        try:
            with self.state.ready().begin() as conn:
                if saved is None:
                    conn.execute(table.delete().where(mine))
                else:
                    starts = [_micros(start) for start in changed + gone]
                    for i in range(0, len(starts), _CHUNK):
                        conn.execute(table.delete().where(mine, columns.slice_start_us.in_(starts[i : i + _CHUNK])))
                if rows:
                    conn.execute(table.insert(), rows)
        except sa.exc.SQLAlchemyError:
            self.state.failed()
            raise
        self._saved = dict(slices)
