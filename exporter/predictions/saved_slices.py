"""The kept time slices of a model's predictions saved in the state database
(``training.storage.kept_slices``), so that a restarted ``mlmon serve`` reads only what
changed while it was down rather than its largest window (docs/metrics.md, "Time slices").

A saved slice is keyed by model and slice start, and carries the ``fingerprint`` of
everything that determines its contents (``fingerprint``): slices saved under another one
are ignored and replaced. Its aggregates are stored without pickle: the histogram and the
most frequent scores as ``.npy`` bytes of plain structured arrays (``np.save``,
``allow_pickle=False``), the rest as JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import sqlalchemy as sa

from exporter.config import ModelConfig
from exporter.predictions.slices import EPOCH, Histogram, Sliced, TopCounts
from exporter.training.storage import StateDatabase, kept_slices

log = logging.getLogger(__name__)

#: The version of the saved form and of what a slice holds (its buckets, exclusion reasons,
#: most frequent scores): part of the fingerprint, so that a version of mlmon that saves or
#: computes slices differently ignores the rows of an older one. Bump it with either change.
FORMAT = 1

#: A histogram's entries as saved (``slices.Histogram``'s six arrays, little-endian).
HIST_DTYPE = np.dtype([("key", "<i8"), ("n", "<i8"), ("low", "<f8"), ("high", "<f8"), ("s1", "<f8"), ("s2", "<f8")])
#: The kept most frequent scores of every set of a ``slices.TopCounts``, one after the other.
TOP_DTYPE = np.dtype([("key", "<i8"), ("count", "<i8")])

#: Slices deleted per statement: SQLite before 3.32 takes at most 999 bound parameters.
_CHUNK = 500

_MICROSECOND = timedelta(microseconds=1)


def fingerprint(model: ModelConfig, url: sa.URL, dialect: str, width: timedelta, top_scores: int) -> str:
    """The SHA-256 (hex) of what determines the contents of a kept slice of ``model``: the
    predictions' store (``url``, its password left out) and ``dialect``, table, columns,
    filter, time zone and ``unique_ids``; the bucket and mode decimals, the slice ``width``,
    how many most frequent scores a slice keeps (``top_scores``) and ``FORMAT``.
    ``ingestion_delay`` is not part of it: it decides when a slice is sealed, not what it
    holds, and a restored slice that is not sealed under the current one is not kept
    (``PredictionsSource._restore``)."""
    source = model.predictions
    described = {
        "format": FORMAT,
        "url": url.render_as_string(hide_password=True),
        "dialect": dialect,
        "schema": source.db_schema,
        "table": source.table,
        "columns": [source.columns.id, source.columns.timestamp, source.columns.score],
        "filter": sorted((key, repr(value)) for key, value in source.filter.items()),
        "timezone": source.timezone,
        "unique_ids": source.unique_ids,
        "bucket_decimals": model.bucket_decimals,
        "mode_share_decimals": model.mode_share_decimals,
        "width_us": width // _MICROSECOND,
        "top_scores": top_scores,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


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
    frequent scores of every set as ``.npy`` bytes (``HIST_DTYPE``, ``TOP_DTYPE``), and as
    JSON the form and each set's (number of keys, bound)."""
    h = sliced.hist
    hist = np.empty(len(h.key), dtype=HIST_DTYPE)
    for name in HIST_DTYPE.names or ():
        hist[name] = getattr(h, name)
    sets = sliced.top.sets
    top = np.empty(sum(len(keys) for keys, _, _ in sets), dtype=TOP_DTYPE)
    top["key"] = np.concatenate([keys for keys, _, _ in sets]) if sets else []
    top["count"] = np.concatenate([counts for _, counts, _ in sets]) if sets else []
    meta = json.dumps({"format": FORMAT, "sets": [[len(keys), int(bound)] for keys, _, bound in sets]})
    return _npy(hist), _npy(top), meta


def decode(hist: bytes, top: bytes, meta: str) -> Sliced:
    """The ``Sliced`` a row saved (``encode``).

    Raises:
        ValueError: the row is not one ``encode`` writes (another form, arrays of another
            type, keys not increasing, empty buckets, set lengths not matching the keys),
            naming what is wrong.
    """
    described = json.loads(meta)
    if not isinstance(described, dict) or described.get("format") != FORMAT:
        raise ValueError(f"meta: not of form {FORMAT}")
    sets = described.get("sets")
    # type(v) is int, not isinstance: JSON true is a bool, which is an int.
    if not isinstance(sets, list) or not all(
        isinstance(s, list) and len(s) == 2 and all(type(v) is int and v >= 0 for v in s) for s in sets
    ):
        raise ValueError("meta: 'sets' is not a list of [keys, bound] pairs of counts")
    entries = _array(hist, HIST_DTYPE, "hist")
    if np.any(np.diff(entries["key"]) <= 0) or np.any(entries["n"] <= 0):
        raise ValueError("hist: keys not strictly increasing, or a bucket without rows")
    kept = _array(top, TOP_DTYPE, "top")
    if sum(length for length, _ in sets) != len(kept):
        raise ValueError(f"top: {len(kept)} keys, the sets name {sum(length for length, _ in sets)}")
    cuts = np.cumsum([0, *(length for length, _ in sets)])
    top_sets = tuple(
        (kept["key"][a:b].copy(), kept["count"][a:b].copy(), bound)
        for a, b, (_, bound) in zip(cuts[:-1], cuts[1:], sets, strict=True)
    )
    histogram = Histogram(*(np.ascontiguousarray(entries[name]) for name in HIST_DTYPE.names or ()))
    return Sliced(histogram, TopCounts(top_sets))


def _start(micros: int) -> datetime:
    return EPOCH + micros * _MICROSECOND


def _micros(start: datetime) -> int:
    return (start - EPOCH) // _MICROSECOND


class SavedSlices:
    """The kept slices of one model in the state database, under one fingerprint.

    ``load`` reads them back; ``save`` writes what changed since the last load or save:
    the slices kept since, those read again (another object under the same start), and
    deletes the forgotten ones and any saved under another fingerprint. Until a load or a
    save succeeds, what the database holds is unknown, and a save replaces all the
    model's rows.
    """

    def __init__(self, state: StateDatabase, model: str, fingerprint: str):
        self.state = state
        self.model = model
        self.fingerprint = fingerprint
        #: What the database holds, by start (``None``: a row that could not be read back);
        #: ``None`` while unknown.
        self._saved: dict[datetime, Sliced | None] | None = None

    def load(self, width: timedelta) -> dict[datetime, Sliced]:
        """The saved slices of the model, by start: rows saved under another fingerprint
        are ignored (logged at INFO), and so are rows that cannot be read back or whose
        start is not a boundary of slices of ``width`` (logged at WARNING); both are
        replaced at the next ``save``.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the state database failed (it migrates again
                on next use).
        """
        columns = kept_slices.c
        mine = columns.model == self.model
        # The blobs of rows saved under another fingerprint are only counted, never read.
        query = sa.select(columns.slice_start_us, columns.hist, columns.top, columns.meta)
        other = sa.select(sa.func.count()).where(mine, columns.fingerprint != self.fingerprint)
        try:
            with self.state.ready().connect() as conn:
                rows = conn.execute(query.where(mine, columns.fingerprint == self.fingerprint)).all()
                others = conn.execute(other).scalar_one()
        except sa.exc.SQLAlchemyError:
            self.state.failed()
            raise
        saved: dict[datetime, Sliced | None] = {}
        for row in rows:
            start = _start(int(row.slice_start_us))
            try:
                if (start - EPOCH) % width:
                    raise ValueError(f"not a boundary of slices of {width.total_seconds():g}s")
                saved[start] = decode(bytes(row.hist), bytes(row.top), str(row.meta))
            except (ValueError, TypeError, OSError, EOFError) as exc:
                log.warning(
                    "model %s: the kept time slice at %s saved in the state database cannot be read back "
                    "(%s); it is read from the store again",
                    self.model,
                    start.isoformat(),
                    exc,
                )
                saved[start] = None
        if others:
            log.info(
                "model %s: %d kept time slices in the state database were saved with another configuration "
                "of the predictions; ignored, and replaced",
                self.model,
                others,
            )
            self._saved = None  # the next save replaces every row of the model
        else:
            self._saved = saved
        return {start: sliced for start, sliced in saved.items() if sliced is not None}

    def save(self, slices: Mapping[datetime, Sliced]) -> None:
        """Make the saved slices of the model those of ``slices`` (by start), writing only
        what changed since the last load or save, in one transaction.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the state database failed; nothing was written
                (it migrates again on next use).
        """
        saved = self._saved
        columns = kept_slices.c
        if saved is None:
            changed, gone = list(slices), []
        else:
            changed = [start for start, sliced in slices.items() if saved.get(start) is not sliced]
            gone = [start for start in saved if start not in slices]
            if not changed and not gone:
                return
        rows: list[dict[str, Any]] = []
        for start in changed:
            hist, top, meta = encode(slices[start])
            rows.append(
                {
                    "model": self.model,
                    "slice_start_us": _micros(start),
                    "fingerprint": self.fingerprint,
                    "hist": hist,
                    "top": top,
                    "meta": meta,
                }
            )
        mine = columns.model == self.model
        try:
            with self.state.ready().begin() as conn:
                if saved is None:
                    conn.execute(kept_slices.delete().where(mine))
                else:
                    starts = [_micros(start) for start in changed + gone]
                    for i in range(0, len(starts), _CHUNK):
                        conn.execute(
                            kept_slices.delete().where(mine, columns.slice_start_us.in_(starts[i : i + _CHUNK]))
                        )
                if rows:
                    conn.execute(kept_slices.insert(), rows)
        except sa.exc.SQLAlchemyError:
            self.state.failed()
            raise
        self._saved = dict(slices)
