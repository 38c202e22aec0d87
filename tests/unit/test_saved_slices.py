"""The saved form of the kept online and replay slices (``saved_slices.encode_online``,
``decode_online``, ``encode_replays``, ``decode_replays``): a round trip keeps every array
and total, and a row the encoder does not write is refused with what is wrong; the online
and replay fingerprints change with every setting that changes a slice's contents, and
only with those."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from exporter.config import LabelSource, ReplaySource
from exporter.predictions import saved_slices
from exporter.predictions.saved_slices import (
    ONLINE_DTYPE,
    ONLINE_FORMAT,
    REPLAY_FORMAT,
    decode_online,
    decode_replays,
    encode,
    encode_online,
    encode_replays,
    fingerprint,
    online_fingerprint,
    replay_fingerprint,
)
from exporter.predictions.slices import ONLINE_COUNTS, Histogram, OnlineBuckets, ReplayTotals, Sliced, TopCounts
from tests.conftest import model_settings

URL = sa.make_url("postgresql+psycopg://mlmon:secret@db/store")
WIDTH = timedelta(minutes=2)


def _buckets() -> OnlineBuckets:
    """Three labeled buckets (one of several scores), totals of 10 predictions."""
    counts = np.zeros(len(ONLINE_COUNTS), dtype=np.int64)
    at = {name: i for i, name in enumerate(ONLINE_COUNTS)}
    counts[at["predictions"]], counts[at["with_label"]] = 10, 7
    counts[at["positives"]], counts[at["negatives"]], counts[at["conflicting"]] = 3, 4, 1
    return OnlineBuckets(
        np.array([0, 25_000, 99_999], dtype=np.int64),
        np.array([0, 2, 1], dtype=np.int64),
        np.array([1, 3, 0], dtype=np.int64),
        np.array([0.0, 0.25, 0.99999]),
        np.array([0.0, 0.25001, 0.99999]),
        counts,
        np.array([1.2345678901234567, 4.5e-3]),
    )


def _same(a: OnlineBuckets, b: OnlineBuckets) -> None:
    for name in ("key", "positives", "negatives", "low", "high", "counts", "sums"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_round_trip_keeps_every_array_and_total_exactly():
    for buckets in (_buckets(), OnlineBuckets.empty()):
        back = decode_online(*encode_online(buckets))
        _same(back, buckets)
        assert back.totals() == buckets.totals()
        assert all(a.flags.c_contiguous and a.flags.writeable for a in (back.key, back.low, back.positives))
    merged = OnlineBuckets.merge([_buckets(), decode_online(*encode_online(_buckets()))])
    assert merged.totals()[0][ONLINE_COUNTS.index("predictions")] == 20


def _meta(**change) -> str:
    meta = json.loads(encode_online(_buckets())[1])
    meta.update(change)
    return json.dumps(meta)


def _entries(**change) -> bytes:
    b = _buckets()
    entries = np.empty(3, dtype=ONLINE_DTYPE)
    for name in ONLINE_DTYPE.names or ():
        entries[name] = change.get(name, getattr(b, name))
    out = io.BytesIO()
    np.save(out, entries, allow_pickle=False)
    return out.getvalue()


def _counts(**change) -> dict:
    counts = json.loads(encode_online(_buckets())[1])["counts"]
    counts.update(change)
    return counts


def _npz() -> bytes:
    out = io.BytesIO()
    np.savez(out, buckets=np.zeros(3))
    return out.getvalue()


@pytest.mark.parametrize(
    ("buckets", "meta", "match"),
    [
        (None, "{", "Expecting"),  # JSON cut short
        (None, _meta(format=ONLINE_FORMAT + 1), "not of form"),
        (None, _meta(format=True), "not of form"),  # JSON true equals 1 in Python
        (None, json.dumps([1, 2]), "not of form"),
        (None, _meta(counts=_counts(extreme=True)), "not a count"),  # JSON true is no count
        (None, _meta(counts=_counts(extreme=-1)), "not a count"),
        (None, _meta(counts=_counts(extreme=1.0)), "not a count"),
        (None, _meta(counts=_counts(extreme=2**63)), "not a count"),  # beyond int64: OverflowError before
        (None, _meta(counts={k: v for k, v in _counts().items() if k != "bad_timestamp"}), "'counts' does not name"),
        (None, _meta(counts=[10, 7, 3, 4, 0, 1, 0, 0]), "'counts' does not name"),
        (None, _meta(sums={"labeled_score_sum": 1.0}), "'sums' does not name"),
        (None, _meta(sums={"labeled_score_sum": "1", "log_loss_sum": 0.0}), "not a finite number"),
        (None, _meta(sums={"labeled_score_sum": float("nan"), "log_loss_sum": 0.0}), "not a finite number"),
        (None, _meta(counts=_counts(positives=4)), "do not add up"),
        (_entries(key=np.array([0, 99_999, 25_000])), None, "strictly increasing"),
        (_entries(key=np.array([-1, 25_000, 99_999])), None, "negative key"),
        (_entries(positives=np.array([0, 3, 0]), negatives=np.array([0, 3, 1])), None, "without a labeled"),
        (_entries(negatives=np.array([2, 3, -1])), None, "negative count"),
        (b"\x93NUMPY garbage", None, None),
        (b"", None, None),
        (_npz(), None, "not a .npy array"),
        (encode(Sliced(Histogram.empty(), TopCounts.merge([])))[0], None, "not a 1-d array of"),
    ],
)
def test_malformed_rows_are_refused(buckets, meta, match):
    good_buckets, good_meta = encode_online(_buckets())
    with pytest.raises((ValueError, EOFError, OSError), match=match):
        decode_online(good_buckets if buckets is None else buckets, good_meta if meta is None else meta)


def _model(**change):
    labels = dict(change.pop("labels", {}))
    labels["columns"] = {"timestamp": "ts", **labels.get("columns", {})}
    predictions = {"unique_ids": True, **change.pop("predictions", {})}
    model = {"windows": ["7m", "1h"], "label_delay": "5m", "time_slice": "2m", **change}
    return model_settings("sqlite:///unused.sqlite", labels=labels, predictions=predictions, model=model).models[0]


def _online(model, url=URL, dialect="postgresql", width=WIDTH) -> str:
    return online_fingerprint(model, url, dialect, width)


def test_the_online_fingerprint_covers_what_makes_an_online_slice():
    base = _online(_model())
    changed = {
        "missing": _model(labels={"missing": "negative"}),
        "labels timezone": _model(labels={"timezone": "Europe/Paris"}),
        "labels table": _model(labels={"table": "clicks"}),
        "labels schema": _model(labels={"schema": "other"}),
        "labels id": _model(labels={"columns": {"id": "request_id"}}),
        "labels label": _model(labels={"columns": {"label": "clicked"}}),
        "labels timestamp": _model(labels={"columns": {"timestamp": "clicked_at"}}),
        "label_delay": _model(label_delay="6m"),
        "bucket_decimals": _model(bucket_decimals=3),
        "predictions filter": _model(predictions={"filter": {"region": "eu"}}),
        "predictions timezone": _model(predictions={"timezone": "Europe/Paris"}),
        "predictions score": _model(predictions={"columns": {"score": "q"}}),
        "unique_ids": _model(predictions={"unique_ids": False}),
    }
    for what, model in changed.items():
        assert _online(model) != base, what
    assert _online(_model(), url=URL.set(database="other")) != base
    assert _online(_model(), dialect="duckdb") != base
    assert _online(_model(), width=2 * WIDTH) != base
    # What does not change an online slice's contents keeps it: the password, when a
    # slice is settled, how the slices fill and are audited, the predictions' own settings.
    same = [
        _model(predictions={"ingestion_delay": "3m"}),
        _model(slice_fill_refreshes=3, slice_audit_interval="5m"),
        _model(mode_share_decimals=3, windows=["10m", "1h"]),
        _model(predictions={"columns": {"version": "v"}}),
    ]
    for model in same:
        assert _online(model) == base
    assert _online(_model(), url=URL.set(password="another")) == base


def test_the_online_fingerprint_takes_every_setting_of_the_label_source():
    """Each field of ``LabelSource`` (those added later too) changes it; ``store`` is the
    predictions' store, whose URL is in it."""
    model = _model()
    base = _online(model)
    assert model.labels is not None
    values = {"table": "clicks", "db_schema": "other", "timezone": "Europe/Paris", "missing": "negative"}
    columns = model.labels.columns
    for field in LabelSource.model_fields:
        if field == "store":
            continue
        value = columns.model_copy(update={"label": "clicked"}) if field == "columns" else values[field]
        other = model.model_copy(update={"labels": model.labels.model_copy(update={field: value})})
        assert _online(other) != base, field


def test_the_predictions_fingerprint_is_unchanged_but_for_the_form(monkeypatch):
    """The predictions' fingerprint is computed as before the online one shared its
    predictions' part (value from base 989f191, of form 1); the form 2 (the most frequent
    scores kept per key) changes it, so that rows of form 1 are ignored, not misread."""
    model = model_settings(
        "sqlite:///x.sqlite",
        None,
        predictions={"filter": {"a": 1, "b": "x"}, "unique_ids": True},
        model={"time_slice": "2m"},
    ).models[0]
    url = sa.make_url("postgresql://u:pw@h/db")
    now = fingerprint(model, url, "postgresql", WIDTH, 128)
    monkeypatch.setattr(saved_slices, "FORMAT", 1)
    assert fingerprint(model, url, "postgresql", WIDTH, 128) == (
        "ffd5ebf02d10b45cbfdf05354e31fa664d675265c8659fba8f527c93ea4572a5"
    )
    assert now != "ffd5ebf02d10b45cbfdf05354e31fa664d675265c8659fba8f527c93ea4572a5"


def _replays_meta(**change) -> str:
    meta = {"format": REPLAY_FORMAT, "replayed": 5, "reproduced": 3, "abs_error_max": 0.25}
    return json.dumps({**meta, **change})


@pytest.mark.parametrize(
    "totals", [ReplayTotals(5, 3, 0.25), ReplayTotals(2, 0, None), ReplayTotals(), ReplayTotals(1, 1, 0.0)]
)
def test_a_replay_slice_round_trips(totals):
    assert decode_replays(*encode_replays(totals)) == totals


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ("{", "Expecting"),
        (_replays_meta(format=REPLAY_FORMAT + 1), "not of form"),
        (_replays_meta(format=True), "not of form"),  # JSON true equals 1 in Python
        (_replays_meta(format=1.0), "not of form"),
        (json.dumps([5, 3]), "not of form"),
        (_replays_meta(replayed=True), "not counts"),
        (_replays_meta(replayed=5.0), "not counts"),
        (_replays_meta(reproduced=-1), "not counts"),
        (_replays_meta(reproduced=6), "reproduced at most replayed"),
        (_replays_meta(replayed=2**63, reproduced=0), "not counts"),
        (_replays_meta(abs_error_max=float("nan")), "not a finite number"),
        (_replays_meta(abs_error_max="0.25"), "not a finite number"),
        (_replays_meta(abs_error_max=-0.1), "not a finite number"),
        (_replays_meta(abs_error_max=float("inf")), "not a finite number"),
        (_replays_meta(abs_error_max=True), "not a finite number"),
        (_replays_meta(replayed=0, reproduced=0), "without a replay"),
    ],
)
def test_malformed_replay_rows_are_refused(meta, match):
    with pytest.raises(ValueError, match=match):
        decode_replays(meta)


def _replay_model(**change):
    replays = dict(change.pop("replays", {}))
    predictions = {"unique_ids": True, **change.pop("predictions", {})}
    model = {"windows": ["15m", "1h"], "time_slice": "2m", **change}
    return model_settings(
        "sqlite:///unused.sqlite", labels=False, replays=replays or True, predictions=predictions, model=model
    ).models[0]


def test_the_replay_fingerprint_covers_what_makes_a_replay_slice():
    """Every setting of the replay source (those added later too), the tolerance and the
    predictions' part change it; when a slice settles (``replay_delay``,
    ``ingestion_delay``), how slices fill and are audited, and the labels do not."""
    model = _replay_model()
    base = replay_fingerprint(model, URL, "postgresql", WIDTH)
    assert model.replays is not None
    values = {"table": "rescored", "db_schema": "other", "timezone": "Europe/Paris"}
    for field in ReplaySource.model_fields:
        if field == "store":  # the predictions' store, whose URL is in it
            continue
        value = model.replays.columns.model_copy(update={"score": "q"}) if field == "columns" else values[field]
        other = model.model_copy(update={"replays": model.replays.model_copy(update={field: value})})
        assert replay_fingerprint(other, URL, "postgresql", WIDTH) != base, field
    changed = {
        "atol": _replay_model(replay_tolerance={"atol": 1e-3}),
        "rtol": _replay_model(replay_tolerance={"rtol": 0.0}),
        "predictions filter": _replay_model(predictions={"filter": {"region": "eu"}}),
        "unique_ids": _replay_model(predictions={"unique_ids": False}),
    }
    for what, other in changed.items():
        assert replay_fingerprint(other, URL, "postgresql", WIDTH) != base, what
    assert replay_fingerprint(model, URL, "postgresql", 2 * WIDTH) != base
    same = [
        _replay_model(replay_delay="10m"),
        _replay_model(predictions={"ingestion_delay": "3m"}),
        _replay_model(slice_fill_refreshes=3, slice_audit_interval="5m"),
        model.model_copy(update={"labels": _model().labels}),
    ]
    for other in same:
        assert replay_fingerprint(other, URL, "postgresql", WIDTH) == base
    assert replay_fingerprint(model, URL.set(password="another"), "postgresql", WIDTH) == base
