"""The bucket grid of ``bucket_decimals`` (issue 11, section 1): a score with at most k
decimals is the lower edge of its own bucket on SQLite, PostgreSQL and DuckDB, so every
number of a window of such scores is exact; with continuous scores the AUC stays within
its exported error bound and the percentiles within one bucket of numpy's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from exporter.monitoring_math import (
    grid_index,
    percentiles_from_buckets,
    roc_auc_bucket_error_bound,
    roc_auc_from_counts,
    round_half_up_index,
)
from exporter.predictions.queries import DuplicateIds, Windows
from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.stores import Stores
from tests.conftest import refresh_once
from tests.integration.predictions.test_bad_data import _predictions_table, _qualified, _samples, _settings

AS_OF = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def _with(settings, **model_fields):
    """``settings`` with fields of its only model replaced."""
    return settings.model_copy(update={"models": [settings.models[0].model_copy(update=model_fields)]})


def _labels_table(engine, schema, labels: dict[int, int]) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {_qualified(schema, 'labels')} (id BIGINT, y INTEGER)"))
        conn.execute(
            sa.text(f"INSERT INTO {_qualified(schema, 'labels')} VALUES (:i, :y)"),
            [{"i": i, "y": y} for i, y in labels.items()],
        )


# -- the promise itself, in SQL ------------------------------------------------------------

N5 = 10**5


@pytest.mark.long
def test_every_value_with_at_most_k_decimals_is_the_lower_edge_of_its_own_bucket(store):
    """All 10^5 + 1 values 0.00000 .. 1.00000, as a driver stores them (the float64 of the
    decimal text), through the histogram query at each k: bucket m holds exactly the values
    m/10^k .. (m+1)/10^k - 10^-5, so its lowest is the edge m/10^k and no two k-decimal
    values share a bucket."""
    url, schema, _ = store
    engine = sa.create_engine(url)
    values = [float(f"{i // N5}.{i % N5:05d}") for i in range(N5 + 1)]  # parsed from the decimal text
    _predictions_table(
        engine, schema, [{"id": i, "ts": AS_OF - timedelta(minutes=30), "p": v} for i, v in enumerate(values)]
    )
    engine.dispose()
    settings = _settings(url, schema, labels=False)
    for k in range(1, 6):
        model = settings.models[0].model_copy(update={"bucket_decimals": k})
        stores = Stores(settings.stores, settings.query_timeout)
        try:
            q = ModelRefresher(model, "models[0]", settings.refresh_policy, stores).predictions.queries()
            with stores.engine("s").connect() as conn:
                window = Windows.ending(AS_OF, [timedelta(hours=1)])
                histogram = q.histogram(window, DuplicateIds.none(1))
                rows = sorted(conn.execute(histogram).all(), key=lambda r: r.key)
        finally:
            stores.dispose()
        step = 10 ** (5 - k)  # values per bucket
        assert [int(r.key) for r in rows] == list(range(10**k + 1)), k
        for r in rows:
            m = int(r.key)
            assert float(r.low_0) == values[m * step], (k, m)  # the k-decimal value itself is the edge
            assert float(r.high_0) == values[min((m + 1) * step - 1, N5)], (k, m)
            assert int(r.n_0) == (step if m < 10**k else 1), (k, m)
            assert float(r.s1_0) >= 0.0  # no value below its bucket's edge
            if k == 5:
                assert float(r.s1_0) == 0.0 and float(r.s2_0) == 0.0  # deviation from the edge exactly 0


def test_neighbours_of_the_edges_fall_on_the_right_side(store):
    """The float64 just below and just above each edge, and random continuous scores:
    SQL puts each in the bucket numpy's ``grid_index`` gives, and that bucket's edges
    (the float64 of m/10^k and (m+1)/10^k) enclose it."""
    url, schema, _ = store
    rng = np.random.default_rng(11)
    k = 3
    edges = np.arange(10**k + 1) / 10**k
    values = np.concatenate([np.nextafter(edges[1:], 0.0), edges, np.nextafter(edges[:-1], 1.0), rng.random(2000)])
    engine = sa.create_engine(url)
    _predictions_table(
        engine, schema, [{"id": i, "ts": AS_OF - timedelta(minutes=30), "p": float(v)} for i, v in enumerate(values)]
    )
    engine.dispose()
    settings = _with(_settings(url, schema, labels=False), bucket_decimals=k)
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        q = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores).predictions.queries()
        keyed = sa.select(q.rows(Windows.ending(AS_OF, [timedelta(hours=1)]), DuplicateIds.none(1))).subquery()
        stmt = sa.select(keyed.c.id, q._key(keyed.c.score))
        with stores.engine("s").connect() as conn:
            got = dict(conn.execute(stmt).all())
    finally:
        stores.dispose()
    keys = grid_index(values, 10**k)
    assert [int(got[i]) for i in range(len(values))] == [int(m) for m in keys]
    assert np.all(keys / 10**k <= values) and np.all(values < (keys + 1) / 10**k)
    assert np.array_equal(keys[: 10**k], np.arange(10**k))  # just below edge m + 1: bucket m


def test_scores_in_a_decimal_column_land_in_the_bucket_of_their_digits(store):
    """Scores stored as NUMERIC(7, 5) (PostgreSQL and DuckDB keep the decimal; SQLite's
    NUMERIC affinity keeps a REAL, and an INTEGER for 0 and 1): each of 0.000 .. 1.000 and
    random 5-decimal scores is in bucket floor(digits / 10^(5 - k)) of its written digits,
    integer arithmetic, at k = 2 and 3; and the 3-decimal value is its bucket's lowest."""
    url, schema, _ = store
    rng = np.random.default_rng(11)
    digits = np.concatenate([np.arange(0, N5 + 1, 100), rng.integers(0, N5 + 1, 2000)])  # score * 10^5
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"CREATE TABLE {_qualified(schema, 'predictions')} (id BIGINT, ts TIMESTAMP, p NUMERIC(7, 5))")
        )
        conn.execute(
            sa.text(f"INSERT INTO {_qualified(schema, 'predictions')} VALUES (:id, :ts, :p)"),
            [
                {"id": i, "ts": datetime(2024, 6, 1, 11, 30), "p": f"{d // N5}.{d % N5:05d}"}  # the text as written
                for i, d in enumerate(digits.tolist())
            ],
        )
    engine.dispose()
    settings = _settings(url, schema, labels=False)
    for k in (2, 3):
        stores = Stores(settings.stores, settings.query_timeout)
        try:
            model = settings.models[0].model_copy(update={"bucket_decimals": k})
            q = ModelRefresher(model, "models[0]", settings.refresh_policy, stores).predictions.queries()
            window = Windows.ending(AS_OF, [timedelta(hours=1)])
            keyed = sa.select(q.rows(window, DuplicateIds.none(1))).subquery()
            with stores.engine("s").connect() as conn:
                got = dict(conn.execute(sa.select(keyed.c.id, q._key(keyed.c.score))).all())
                lows = {int(r.key): float(r.low_0) for r in conn.execute(q.histogram(window, DuplicateIds.none(1)))}
        finally:
            stores.dispose()
        step = 10 ** (5 - k)
        assert [int(got[i]) for i in range(len(digits))] == (digits // step).tolist(), k
        if k == 3:  # every 3-decimal value is present: it is its bucket's lowest score
            assert lows == {m: float(f"{m // 1000}.{m % 1000:03d}") for m in range(1001)}


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=50), st.integers(1, 5))
def test_grid_index_cell_encloses_every_float(values, k):
    keys = grid_index(np.array(values), 10**k)
    assert np.all(keys / 10**k <= values) and np.all(values < (keys + 1) / 10**k)


@given(st.integers(0, 10**8), st.integers(0, 6), st.integers(1, 3))
def test_round_half_up_is_on_the_written_decimals(j, decimals, extra):
    """A score written with ``decimals + extra`` decimals rounds half up as the decimal it
    was written as: 0.285 -> 0.29 at 2 decimals although the float64 0.285 is below 0.285."""
    digits = decimals + extra
    j %= 10**digits + 1
    text = f"{j // 10**digits}.{j % 10**digits:0{digits}d}"
    expected = Decimal(text).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP).scaleb(decimals)
    assert round_half_up_index(np.array([float(text)]), decimals)[0] == int(expected)


@pytest.mark.parametrize("bucket_decimals", [1, 5], ids=["impure-buckets-sql", "pure-buckets-numpy"])
def test_halves_round_up_in_the_mode_share(tmp_path, bucket_decimals):
    """0.285 rounds to 0.29 at 2 decimals, 0.284999 to 0.28: counted in SQL when the
    buckets are impure, from the buckets in numpy when each holds one score."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    scores = [0.285, 0.29, 0.29, 0.284999, 0.1, 0.7]
    _predictions_table(
        sa.create_engine(url),
        None,
        [{"id": i, "ts": AS_OF - timedelta(minutes=5 + i), "p": s} for i, s in enumerate(scores)],
    )
    settings = _with(_settings(url, labels=False), mode_share_decimals=2, bucket_decimals=bucket_decimals)
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        stats = (
            ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
            .refresh(AS_OF)
            .score_stats[0]
        )
    finally:
        stores.dispose()
    assert stats.bucketed == (bucket_decimals == 1)
    assert stats.mode_share == 3 / 6  # 0.285, 0.29, 0.29; floor(p * 100 + 0.5) would give 2 / 6


# -- the issue's case, end to end ----------------------------------------------------------

ISSUE_ROWS = [(0.28, 0), (0.28, 0), (0.29, 1), (0.29, 1), (0.29, 1), (0.30, 0)]


def test_two_decimal_scores_keep_every_number_exact(store):
    """Issue 11's rows at ``bucket_decimals: 2``: AUC 0.6667 with no error bound, p25
    0.2825, p50 and p75 0.29, as scikit-learn and numpy compute them."""
    url, schema, _ = store
    engine = sa.create_engine(url)
    start = datetime(2024, 6, 1, 11, 1, tzinfo=UTC)
    _predictions_table(
        engine, schema, [{"id": i, "ts": start + timedelta(minutes=i), "p": p} for i, (p, _) in enumerate(ISSUE_ROWS)]
    )
    _labels_table(engine, schema, {i: y for i, (_, y) in enumerate(ISSUE_ROWS)})
    engine.dispose()
    settings = _with(_settings(url, schema), bucket_decimals=2)
    samples = _samples(refresh_once(settings, AS_OF).decode())
    w = frozenset({("model", "ctr"), ("window", "1h")})
    scores = np.array([p for p, _ in ISSUE_ROWS])
    y = np.array([y for _, y in ISSUE_ROWS])
    assert samples[("mlmon_online_roc_auc", w)] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert samples[("mlmon_online_roc_auc", w)] == pytest.approx(2 / 3, abs=1e-12)
    assert not any(name == "mlmon_online_roc_auc_error_bound" for name, _ in samples)
    assert samples[("mlmon_online_logloss", w)] == pytest.approx(log_loss(y, scores), abs=1e-12)
    for q, expected in [(25, 0.2825), (50, 0.29), (75, 0.29)]:
        got = samples[("mlmon_prediction_score_percentile", w | {("percentile", str(q))})]
        assert got == np.percentile(scores, q, method="linear")  # the very float numpy gives
        assert got == pytest.approx(expected, abs=1e-15)
    assert samples[("mlmon_prediction_score_mean", w)] == pytest.approx(np.mean(scores), abs=1e-15)
    assert samples[("mlmon_prediction_score_stddev", w)] == pytest.approx(np.std(scores), rel=1e-12)
    assert samples[("mlmon_prediction_mode_share_ratio", w)] == 3 / 6


# -- continuous scores: the bound is a true bound -------------------------------------------


def _bucketed(scores: np.ndarray, y: np.ndarray, k: int):
    """(positives, negatives, pure, lows, highs, counts) per bucket of the grid, ascending,
    as the online and histogram queries aggregate them."""
    keys = grid_index(scores, 10**k)
    buckets, inverse = np.unique(keys, return_inverse=True)
    positives = np.bincount(inverse, weights=y, minlength=len(buckets))
    negatives = np.bincount(inverse, weights=1 - y, minlength=len(buckets))
    lows = np.array([scores[inverse == b].min() for b in range(len(buckets))])
    highs = np.array([scores[inverse == b].max() for b in range(len(buckets))])
    return positives, negatives, lows == highs, lows, highs, np.bincount(inverse)


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.0, 1.0), st.booleans()), min_size=2, max_size=80),
    st.integers(1, 5),
    st.integers(0, 6),
)
def test_bucketed_auc_within_its_bound_and_percentiles_within_a_bucket(rows, k, snap):
    """Any scores (continuous, or snapped to ``snap`` decimals to make ties and exact
    buckets), any labels: |AUC(buckets) - roc_auc_score| <= the exported bound, and each
    percentile within the widest impure bucket of numpy's."""
    scores = np.array([s for s, _ in rows])
    if snap < 6:
        scores = np.round(scores, snap)
    y = np.array([float(label) for _, label in rows])
    positives, negatives, pure, lows, highs, counts = _bucketed(scores, y, k)
    if 0 < y.sum() < len(y):
        auc = roc_auc_from_counts(positives, negatives)
        bound = roc_auc_bucket_error_bound(positives, negatives, pure)
        assert 0.0 <= bound <= 0.5
        assert abs(auc - roc_auc_score(y, scores)) <= bound + 1e-12
    width = float(np.max(highs - lows))
    for q, value in percentiles_from_buckets(lows, highs, counts).items():
        assert abs(value - np.percentile(scores, q)) <= width + 1e-12, q
        if width == 0:
            assert value == np.percentile(scores, q), q


@pytest.mark.parametrize("seed", range(20))
def test_bound_of_many_continuous_scores(seed):
    rng = np.random.default_rng(seed)
    scores = rng.beta(1, 20, 3000)
    y = (rng.random(3000) < scores * 5).astype(float)
    positives, negatives, pure, *_ = _bucketed(scores, y, 3)
    bound = roc_auc_bucket_error_bound(positives, negatives, pure)
    assert 0 < bound < 0.05
    assert abs(roc_auc_from_counts(positives, negatives) - roc_auc_score(y, scores)) <= bound
