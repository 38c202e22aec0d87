"""Label maturity by time slice (docs/metrics.md, *Label maturity*): with a label timestamp
and ``label_delay`` above 0, a prediction counts the labels recorded from the start of its
time slice to ``label_delay`` after the slice's end, so a matured slice's online accuracy
no longer changes. Rows placed on every edge, the expected values written out by hand and
the accuracy computed by scikit-learn from them, on SQLite, PostgreSQL and DuckDB; with
both times UTC timestamps, and with wall-clock predictions of another zone beside labels
stamped in seconds since the epoch (the bounds are compared in each column's own terms)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sklearn.metrics import log_loss, roc_auc_score

from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.stores import Stores
from tests.conftest import model_settings

AS_OF = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
#: Window 1h, label_delay 30m: predictions in [10:30, 11:30); slices of 10 minutes.
PREDICTIONS = [  # id, time, score
    (1, "10:35:00", 0.9),  # slice [10:30, 10:40): labels in [10:30, 11:10)
    (2, "10:45:00", 0.2),  # [10:40, 10:50): labels in [10:40, 11:20)
    (3, "10:55:00", 0.7),  # [10:50, 11:00): labels in [10:50, 11:30)
    (4, "11:05:00", 0.6),  # [11:00, 11:10): labels in [11:00, 11:40)
    (5, "11:25:00", 0.4),  # [11:20, 11:30): labels in [11:20, 12:00), AS_OF
    (6, "11:25:00", 0.3),
    (7, "10:31:00", 0.8),
    (8, "11:29:59", 0.1),
    (None, "11:15:00", 0.5),  # no id: never labeled, two alike (grouped, counted twice)
    (None, "11:15:00", 0.5),
    (9, "10:29:59", 0.05),  # outside the window
]
LABELS = [  # id, arrival time, label
    (1, "11:09:59", 1),  # the last instant of its slice's maturity
    (2, "11:20:00", 1),  # one instant too late: no label
    (3, "10:49:59", 1),  # before its slice began (a skewed clock): no label
    (4, "11:00:00", 1),  # its slice's first instant, before the prediction itself
    (5, "11:59:59", 0),
    (6, "12:00:00", 1),  # at AS_OF: not arrived yet
    (7, "10:40:00", 1),
    (7, "11:15:00", 0),  # after its slice matured: not a conflict
    (8, None, 1),  # no instant (text or infinity): bad_timestamp
    (9, "10:35:00", 1),
]
#: By hand, with ``missing: negative``: ids 2, 3 and 6 and the two without id are 0s; 8 is left out.
LABELED = {1: 1, 2: 0, 3: 0, 4: 1, 5: 0, 6: 0, 7: 1, "a": 0, "b": 0}
SCORES = {1: 0.9, 2: 0.2, 3: 0.7, 4: 0.6, 5: 0.4, 6: 0.3, 7: 0.8, "a": 0.5, "b": 0.5}


BERLIN = ZoneInfo("Europe/Berlin")


def _stamp(clock: str | None, dialect: str) -> str:
    if clock is None:
        return "yesterday" if dialect == "sqlite" else "infinity"
    return f"2026-05-04 {clock}"


def _instant(clock: str) -> datetime:
    return datetime.fromisoformat(f"2026-05-04 {clock}+00:00")


def _write(url: str, schema: str | None, dialect: str, labels, epoch: bool) -> None:
    prefix = f'"{schema}".' if schema else ""
    ts = ":ts" if dialect == "sqlite" or epoch else "CAST(:ts AS TIMESTAMP)"
    no_instant = "yesterday" if dialect == "sqlite" else float("inf")

    def stamp(clock: str | None):
        if not epoch:
            return _stamp(clock, dialect)
        return no_instant if clock is None else _instant(clock).timestamp()

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"INSERT INTO {prefix}labels (id, y, ts) VALUES (:id, :y, {ts})"),
            [{"id": i, "ts": stamp(t), "y": y} for i, t, y in labels],
        )
    engine.dispose()


def _tables(url: str, schema: str | None, predicted: type, recorded: type, rows: list[dict]) -> sa.Table:
    """Creates ``predictions`` (id, ts of type ``predicted``, p) holding ``rows`` and an empty
    ``labels`` (id, y, ts of type ``recorded``); returns the label table."""
    engine = sa.create_engine(url)
    metadata = sa.MetaData(schema=schema)
    predictions = sa.Table(
        "predictions", metadata, sa.Column("id", sa.BigInteger), sa.Column("ts", predicted), sa.Column("p", sa.Double)
    )
    labels = sa.Table(
        "labels", metadata, sa.Column("id", sa.BigInteger), sa.Column("y", sa.Integer), sa.Column("ts", recorded)
    )
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(predictions.insert(), rows)
    engine.dispose()
    return labels


def _online(url: str, schema: str | None, as_of: datetime, **settings):
    """The online accuracy of the only window, refreshed at ``as_of`` (``settings``: as
    ``model_settings``'s keyword arguments)."""
    settings = model_settings(url, schema, **settings)
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        snap = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores).refresh(as_of)
    finally:
        stores.dispose()
    assert all(s.up for s in snap.sources.values()), snap.errors
    return snap.online[0]


def _accuracy(url: str, schema: str | None, mixed: bool):
    return _online(
        url,
        schema,
        AS_OF,
        predictions={"timezone": "Europe/Berlin"} if mixed else None,
        labels={"missing": "negative", "columns": {"timestamp": "ts"}},
        model={"label_delay": "30m", "time_slice": "10m"},
    )


@pytest.mark.parametrize("mixed", [False, True], ids=["utc-timestamps", "berlin-wall-clock-and-epoch-seconds"])
def test_each_prediction_counts_the_labels_its_slice_matured_with(store, mixed):
    url, schema, dialect = store

    def made(clock: str) -> datetime:
        instant = _instant(clock)
        return (instant.astimezone(BERLIN) if mixed else instant).replace(tzinfo=None)

    rows = [{"id": i, "ts": made(t), "p": p} for i, t, p in PREDICTIONS]
    _tables(url, schema, sa.DateTime, sa.Double if mixed else sa.DateTime, rows)
    _write(url, schema, dialect, LABELS, mixed)

    online = _accuracy(url, schema, mixed)
    y = list(LABELED.values())
    p = [SCORES[k] for k in LABELED]
    assert (online.predictions, online.labeled, online.positives) == (10, 9, 3)
    assert online.invalid_labels == {"conflicting": 0, "invalid_value": 0, "bad_timestamp": 1}
    assert online.label_coverage == pytest.approx(4 / 10)  # ids 1, 4, 5 and 7 have a usable label row
    assert online.roc_auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert online.roc_auc_error_bound is None
    assert online.logloss == pytest.approx(log_loss(y, p), rel=1e-12)

    # Labels that arrive after their slice matured change nothing, however late they come,
    # but the order of the sums: id 1 now has two label rows, read by a statement of its own.
    _write(url, schema, dialect, [(2, "11:25:00", 1), (3, "11:45:00", 0), (1, "11:10:00", 0)], mixed)
    later = _accuracy(url, schema, mixed)
    sums = {"logloss": online.logloss, "calibration_ratio": online.calibration_ratio}
    assert {name: getattr(later, name) for name in sums} == pytest.approx(sums, rel=1e-12)
    assert replace(later, **sums) == online


def test_slice_edges_of_a_fraction_of_a_second_bound_whole_epoch_seconds_exactly(store):
    """Predictions stamped in whole seconds since the epoch (an integer column), slices of
    1.5 s: the edges between whole seconds are compared as such, not rounded to the
    column's type (PostgreSQL rounded them to a whole second when typed as an integer)."""
    url, schema, dialect = store
    t0 = 1_777_896_000 - 30  # a multiple of 1.5 s: slices [t0, t0 + 1.5), [t0 + 1.5, t0 + 3)
    as_of = datetime.fromtimestamp(t0 + 30, UTC)
    rows = [
        {"id": 1, "ts": t0 + 1, "p": 0.9},
        {"id": 2, "ts": t0 + 2, "p": 0.8},
        {"id": 3, "ts": t0 + 1, "p": 0.2},
        {"id": 4, "ts": t0 + 4, "p": 0.1},  # slice [t0 + 3, t0 + 4.5), matures at t0 + 5.5
        {"id": 5, "ts": t0 + 4, "p": 0.3},
    ]
    labels = _tables(url, schema, sa.BigInteger, sa.Double, rows)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            labels.insert(),
            [
                {"id": 1, "y": 1, "ts": t0 + 2.7},  # its slice matured at t0 + 2.5: too late
                {"id": 2, "y": 1, "ts": t0 + 1.6},  # after its slice began at t0 + 1.5: counts
                {"id": 3, "y": 0, "ts": t0 + 2.4},  # before t0 + 2.5: counts
                # Edges at half seconds that rounding half to even would move down, to t0 + 4:
                {"id": 4, "y": 1, "ts": t0 + 5.6},  # matures for [t0 + 4.5, t0 + 6): too late
                {"id": 5, "y": 0, "ts": t0 + 3.2},  # matures for [t0 + 3, t0 + 4.5): counts
            ],
        )
    engine.dispose()
    online = _online(
        url,
        schema,
        as_of,
        labels={"missing": "ignore", "columns": {"timestamp": "ts"}},
        model={"windows": ["1m"], "label_delay": "1s", "time_slice": "1500ms"},
    )
    assert (online.predictions, online.labeled, online.positives) == (5, 3, 1)
    assert online.roc_auc == 1.0  # id 2 (0.8, positive) above ids 3 and 5 (0.2, 0.3, negative)
