"""Text in a numeric column is not a number (issue 11, section 2).

SQLite stores what it is given: the sqlite3 shell's ``.import`` writes an empty CSV field
as the text ``''`` into a REAL column, and ``CAST('' AS REAL)`` is 0.0. Such a score is an
invalid prediction (``non_numeric_score``), such a replay is never reproduced and stays
out of the max error, and such an epoch timestamp puts its row in no window, as a label
stored as text is no label. PostgreSQL and DuckDB cannot hold text in a numeric column:
their queries carry no such check and their numbers are unchanged."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
import sqlalchemy as sa
from sklearn.metrics import log_loss, roc_auc_score

from tests.conftest import refresh_once
from tests.integration.predictions.test_bad_data import _qualified, _refresh, _samples, _settings
from tests.integration.predictions.test_portability import _dialects, _statements

AS_OF = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
W = frozenset({("model", "ctr"), ("window", "1h")})

#: Issue 11's rows: (id, score, label); the scores of ids 5 and 6 are the text ''.
ISSUE_ROWS = [(1, 0.2, 0), (2, 0.4, 0), (3, 0.6, 1), (4, 0.8, 1), (5, "", 1), (6, "", 0)]


def _tables(url, schema, score_type: str, rows, replays=None, ts_type="TIMESTAMP", stamp=None) -> None:
    """``predictions(id, ts, p)`` and ``labels(id, y)`` from (id, score, label) rows stamped
    11:01, 11:02, ... (or ``stamp(id)``), and ``replays(id, p)`` from (id, score) pairs;
    values are inserted as given, so SQLite keeps text as text."""
    engine = sa.create_engine(url)
    p, lab, rep = (_qualified(schema, t) for t in ("predictions", "labels", "replays"))
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {p} (id INTEGER, ts {ts_type}, p {score_type})"))
        conn.execute(sa.text(f"CREATE TABLE {lab} (id INTEGER, y INTEGER)"))
        conn.execute(sa.text(f"CREATE TABLE {rep} (id INTEGER, p {score_type})"))
        for i, score, label in rows:
            ts = stamp(i) if stamp else f"2024-06-01 11:{i:02d}:00"  # naive UTC
            conn.execute(sa.text(f"INSERT INTO {p} VALUES (:i, :ts, :p)"), {"i": i, "ts": ts, "p": score})
            conn.execute(sa.text(f"INSERT INTO {lab} VALUES (:i, :y)"), {"i": i, "y": label})
        for i, score in replays or []:
            conn.execute(sa.text(f"INSERT INTO {rep} VALUES (:i, :p)"), {"i": i, "p": score})
    engine.dispose()


def _expected(rows):
    """(scores, labels) of the rows whose score is a number."""
    valid = [(s, y) for _, s, y in rows if isinstance(s, float | int) and not isinstance(s, bool)]
    return np.array([s for s, _ in valid], dtype=float), np.array([y for _, y in valid])


@pytest.mark.parametrize("score_type", ["REAL", "DOUBLE PRECISION", "NUMERIC", "FLOAT"])
def test_text_scores_are_invalid_predictions_on_sqlite(tmp_path, score_type):
    """The issue's case, in every numeric type SQLite reads: 4 valid predictions, 2
    ``non_numeric_score``; mean 0.5, ROC AUC 1.0, log loss 0.366985 on the 4."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    _tables(url, None, score_type, ISSUE_ROWS)
    settings = _settings(url)
    got = _samples(refresh_once(settings, AS_OF).decode())
    scores, y = _expected(ISSUE_ROWS)
    assert len(scores) == 4
    assert got[("mlmon_window_predictions", W)] == 4
    assert got[("mlmon_invalid_predictions", W | {("reason", "non_numeric_score")})] == 2
    assert got[("mlmon_invalid_predictions", W | {("reason", "null_score")})] == 0
    assert got[("mlmon_prediction_score_mean", W)] == pytest.approx(np.mean(scores), abs=1e-15)
    assert got[("mlmon_prediction_score_mean", W)] == pytest.approx(0.5, abs=1e-15)
    assert got[("mlmon_prediction_score_stddev", W)] == pytest.approx(np.std(scores), rel=1e-12)
    for q in (1, 25, 50, 75, 99):
        assert got[("mlmon_prediction_score_percentile", W | {("percentile", str(q))})] == pytest.approx(
            np.percentile(scores, q), abs=1e-15
        )
    assert got[("mlmon_online_predictions", W)] == 4
    assert got[("mlmon_online_labeled_predictions", W)] == 4
    assert got[("mlmon_online_roc_auc", W)] == roc_auc_score(y, scores) == 1.0
    assert got[("mlmon_online_logloss", W)] == pytest.approx(log_loss(y, scores), abs=1e-12)
    assert got[("mlmon_online_logloss", W)] == pytest.approx(0.366985, abs=1e-6)
    assert got[("mlmon_online_positive_ratio", W)] == pytest.approx(y.mean())

    # the counter of new predictions: only numbers, once each
    _, snap = _refresh(settings, datetime(2024, 6, 1, 11, 0, tzinfo=UTC), AS_OF)
    assert snap.counter.total == 4
    assert snap.counter.score_sum == pytest.approx(scores.sum(), rel=1e-12)
    assert snap.counter.cumulative_buckets == tuple(int(np.sum(scores <= b)) for b in snap.counter.bounds)


def test_every_kind_of_non_number_and_numbers_sqlite_stores_as_numbers(tmp_path):
    """Text ('', 'abc', ' ', 'NaN', '0.5x') and blobs are not numbers; text that the
    column's affinity turns into a number ('0.7', '1') is that number; integers 0 and 1
    are numbers; the mode share and the counter agree."""
    rows = [
        (1, 0.1, 0),
        (2, "0.7", 1),
        (3, 1, 1),
        (4, 0, 0),
        (5, 0.7, 1),
        (6, "", 1),
        (7, "abc", 0),
        (8, " ", 1),
        (9, "NaN", 0),
        (10, "0.5x", 1),
        (11, b"\x00\x01", 0),
    ]
    url = f"sqlite:///{tmp_path}/store.sqlite"
    _tables(url, None, "REAL", rows)
    settings = _settings(url)
    _, snap = _refresh(settings, datetime(2024, 6, 1, 11, 0, tzinfo=UTC), AS_OF)
    stats, online = snap.score_stats[0], snap.online[0]
    scores = np.array([0.1, 0.7, 1.0, 0.0, 0.7])
    y = np.array([0, 1, 1, 0, 1])
    assert stats.predictions == 5
    assert dict(stats.invalid) == {
        "null_score": 0,
        "non_numeric_score": 6,
        "nan_score": 0,
        "out_of_range": 0,
        "duplicate_id": 0,
        "bad_timestamp": 0,
    }
    assert stats.mean == pytest.approx(scores.mean(), abs=1e-15)
    assert stats.mode_share == 2 / 5  # 0.7 twice; 0.0 once, not the six texts read as 0.0
    assert online.predictions == 5 and online.labeled == 5
    assert online.roc_auc == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert online.logloss == pytest.approx(log_loss(y, np.clip(scores, 1e-15, 1 - 1e-15)), abs=1e-9)
    assert online.extreme_scores == 2  # 1 and 0, none of the texts
    assert snap.counter.total == 5 and snap.counter.score_sum == pytest.approx(scores.sum())


def test_a_replay_that_is_not_a_number_is_never_reproduced(tmp_path):
    """Replays '' and 'abc' of valid predictions count as replayed, never as reproduced,
    and stay out of the max error (read as 0.0 they would make it 0.6); a replay of a
    prediction whose score is text is no replay of a valid prediction."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    _tables(url, None, "REAL", ISSUE_ROWS, replays=[(1, 0.2), (2, ""), (3, "abc"), (4, 0.75), (5, 0.3), (6, "")])
    got = _samples(refresh_once(_settings(url, replays=True), AS_OF).decode())
    online = np.array([0.2, 0.4, 0.6, 0.8])
    offline = np.array([0.2, np.nan, np.nan, 0.75])  # not numbers: NaN, which no comparison passes
    diff = np.abs(online - offline)
    reproduced = diff <= 1e-6 + 1e-6 * np.maximum(online, offline)  # the default replay_tolerance
    assert got[("mlmon_replay_predictions", W)] == 4
    assert got[("mlmon_replay_reproducibility_ratio", W)] == pytest.approx(reproduced.mean()) == 0.25
    assert got[("mlmon_replay_abs_error_max", W)] == pytest.approx(np.nanmax(diff), abs=1e-15)


def test_text_in_an_epoch_timestamp_puts_the_row_in_no_window(tmp_path):
    """A numeric (epoch seconds) timestamp column holding '' or 'abc': those rows are in
    no window, not the newest, and not stamped in the future (SQLite orders text above
    every number), but counted as ``bad_timestamp``; a label's epoch timestamp that is text
    makes it an invalid label (``bad_timestamp``), never a label not yet arrived."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    stamps = {1: 660, 2: 720, 3: 780, 4: 840, 5: "", 6: "abc", 7: 3600 + 600}  # seconds after 11:00, or text
    rows = [(i, s, y) for i, s, y in ISSUE_ROWS[:4]] + [(5, 0.9, 1), (6, 0.1, 0), (7, 0.5, 1)]
    eleven = datetime(2024, 6, 1, 11, 0, tzinfo=UTC).timestamp()
    _tables(
        url,
        None,
        "REAL",
        rows,
        ts_type="REAL",
        stamp=lambda i: stamps[i] if isinstance(stamps[i], str) else eleven + stamps[i],
    )
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # labels with an epoch timestamp: id 4's is text
        conn.execute(sa.text("DROP TABLE labels"))
        conn.execute(sa.text("CREATE TABLE labels (id INTEGER, y INTEGER, ts INTEGER)"))
        for i, _, label in rows:
            conn.execute(
                sa.text("INSERT INTO labels VALUES (:i, :y, :ts)"),
                {"i": i, "y": label, "ts": "" if i == 4 else eleven + 900},
            )
    engine.dispose()
    settings = _settings(url)
    model = settings.models[0]
    labels = model.labels.model_copy(update={"columns": model.labels.columns.model_copy(update={"timestamp": "ts"})})
    settings = settings.model_copy(update={"models": [model.model_copy(update={"labels": labels})]})
    snap = _refresh(settings, AS_OF)[0]
    assert all(s.up for s in snap.sources.values()), snap.errors
    stats, online = snap.score_stats[0], snap.online[0]
    assert stats.predictions == 4  # ids 1-4; 5 and 6 have no time, 7 is at 12:10
    assert stats.mean == pytest.approx(0.5)
    assert stats.invalid["bad_timestamp"] == 2  # ids 5 and 6
    assert snap.future_predictions == 1  # id 7 only
    assert snap.last_prediction_timestamp == eleven + 840
    # labels of ids 1-3 arrived; id 4's label time is text: left out, as an invalid label
    assert online.labeled == 3 and online.label_coverage == pytest.approx(3 / 4)
    assert dict(online.invalid_labels) == {"conflicting": 0, "invalid_value": 0, "bad_timestamp": 1}


def test_postgresql_and_duckdb_need_no_check_and_keep_their_numbers(store):
    """The same rows with NULL where SQLite held text (a typed numeric column cannot
    hold ''): 4 valid, 2 ``null_score``, the same numbers; and no typeof() in their SQL."""
    url, schema, dialect = store
    rows = [(i, None if s == "" else s, y) for i, s, y in ISSUE_ROWS]
    _tables(url, schema, "DOUBLE PRECISION", rows)
    got = _samples(refresh_once(_settings(url, schema), AS_OF).decode())
    scores, y = _expected(rows)
    assert got[("mlmon_window_predictions", W)] == 4
    assert got[("mlmon_invalid_predictions", W | {("reason", "null_score")})] == 2
    assert got[("mlmon_invalid_predictions", W | {("reason", "non_numeric_score")})] == 0
    assert got[("mlmon_online_roc_auc", W)] == 1.0
    assert got[("mlmon_online_logloss", W)] == pytest.approx(log_loss(y, scores), abs=1e-12)
    sql = " ".join(str(s.compile(dialect=_dialects()[dialect])) for s in _statements(dialect)[1].values())
    assert ("typeof(" in sql) == (dialect == "sqlite")
