"""Training metrics from stored runs, on SQLite and PostgreSQL state databases: newest
version, baselines (previous version, 30 days), history, features and PSI."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from exporter.client import build_training_run, summarize_features
from exporter.config import parse_settings
from exporter.monitoring_math import PSI_MIN_SHARE
from exporter.training.metrics import TrainingRefresher, feature_psi
from exporter.training.schema import OTHER, FeatureSummary, TrainingRun
from exporter.training.storage import StateDatabase, save_run
from tests.conftest import TEST_DATA, refresh_once

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
CAR_LOAN = TEST_DATA / "car_loan"


def settings_for(state_url, models=(), **training):
    return parse_settings({"stores": {}, "models": list(models), "state": {"url": state_url}, "training": training})


def report(state_url, *runs: TrainingRun) -> None:
    state = StateDatabase(state_url)
    for run in runs:
        save_run(state.ready(), run, NOW)
    state.engine.dispose()


def simple_run(
    version: str, days_ago: float, rows: int, logloss: float, auc: float, model="ctr", **fields
) -> TrainingRun:
    return TrainingRun(
        model=model,
        version=version,
        trained_at=NOW - timedelta(days=days_ago),
        training_rows=rows,
        validation_rows=rows // 10,
        validation_logloss=logloss,
        validation_roc_auc=auc,
        **fields,
    )


def samples(state_url, **training) -> dict:
    """(metric name, frozenset of labels) -> value, from the exposition at NOW."""
    text = refresh_once(settings_for(state_url, **training), NOW).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples_, name, **labels):
    return samples_.get((name, frozenset(labels.items())))


def test_newest_version_baselines_and_history(state_url):
    runs = [  # (version, days ago, rows, logloss, auc); a 30-day baseline is v31, trained 31 days before v0
        ("v45", 45, 2000, 0.30, 0.80),
        ("v31", 31, 1800, 0.31, 0.79),
        ("v29", 29, 1700, 0.29, 0.81),
        ("v2", 2, 1600, 0.28, 0.82),
        ("v1", 1, 1500, 0.27, 0.83),
        ("v0", 0, 750, 0.36, 0.75),
    ]
    report(state_url, *[simple_run(*r) for r in runs])
    got = samples(state_url, history_versions=4)
    assert value(got, "mlmon_model_info", model="ctr", version="v0") == 1
    assert [k for k in got if k[0] == "mlmon_model_info"] == [
        ("mlmon_model_info", frozenset({("model", "ctr"), ("version", "v0")}))
    ]
    assert value(got, "mlmon_model_trained_timestamp_seconds", model="ctr") == NOW.timestamp()
    assert value(got, "mlmon_training_rows", model="ctr") == 750
    assert value(got, "mlmon_validation_rows", model="ctr") == 75
    assert value(got, "mlmon_offline_logloss", model="ctr") == 0.36
    assert value(got, "mlmon_offline_roc_auc", model="ctr") == 0.75
    assert value(got, "mlmon_training_rows_change_ratio", model="ctr", baseline="previous_version") == 750 / 1500
    assert value(got, "mlmon_training_rows_change_ratio", model="ctr", baseline="30d") == 750 / 1800
    assert value(got, "mlmon_offline_logloss_change_ratio", model="ctr", baseline="previous_version") == 0.36 / 0.27
    assert value(got, "mlmon_offline_roc_auc_change_ratio", model="ctr", baseline="30d") == 0.75 / 0.79
    history = {dict(k[1])["version"]: v for k, v in got.items() if k[0] == "mlmon_version_training_rows"}
    assert history == {"v0": 750, "v1": 1500, "v2": 1600, "v29": 1700}  # the newest 4 only
    assert value(got, "mlmon_state_up") == 1


def test_a_single_version_has_no_change_ratios(state_url):
    report(state_url, simple_run("only", 0, 1000, 0.3, 0.8))
    got = samples(state_url)
    assert value(got, "mlmon_training_rows", model="ctr") == 1000
    assert not [k for k in got if k[0].endswith("_change_ratio")]  # absent, not 1
    assert not [k for k in got if k[0] == "mlmon_training_feature_psi"]


def test_30d_baseline_absent_until_a_version_is_old_enough(state_url):
    report(state_url, simple_run("a", 29.9, 1000, 0.3, 0.8), simple_run("b", 0, 900, 0.3, 0.8))
    got = samples(state_url)
    assert value(got, "mlmon_training_rows_change_ratio", model="ctr", baseline="previous_version") == 0.9
    assert value(got, "mlmon_training_rows_change_ratio", model="ctr", baseline="30d") is None


def test_runs_trained_after_as_of_are_not_seen(state_url):
    report(state_url, simple_run("past", 1, 1000, 0.3, 0.8), simple_run("future", -1, 10, 0.9, 0.5))
    got = samples(state_url)
    assert value(got, "mlmon_model_info", model="ctr", version="past") == 1
    assert value(got, "mlmon_model_info", model="ctr", version="future") is None


def test_categorical_feature_breakdown_and_psi(state_url):
    def feature(shares, missing):
        return {"name": "device", "kind": "categorical", "count": 100, "missing_ratio": missing, "categories": shares}

    report(
        state_url,
        simple_run("old", 1, 100, 0.3, 0.8, features=[feature({"ios": 0.5, "android": 0.5}, 0.0)]),
        simple_run("new", 0, 100, 0.3, 0.8, features=[feature({"ios": 0.8, "__other__": 0.2}, 0.5)]),
    )
    got = samples(state_url)
    assert value(got, "mlmon_training_feature_missing_ratio", model="ctr", feature="device") == 0.5
    assert (
        value(got, "mlmon_training_feature_category_share_ratio", model="ctr", feature="device", category="ios") == 0.8
    )
    assert (
        value(got, "mlmon_training_feature_category_share_ratio", model="ctr", feature="device", category="__other__")
        == 0.2
    )
    # "android" may hide in the new version's __other__: bins ios, __other__ (android with
    # it), missing; shares of all rows; a share of 0 counts as 1e-4
    expected = np.array([0.5, 0.5, 1e-4])
    actual = np.array([0.4, 0.1, 0.5])
    psi = float(np.sum((actual - expected) * np.log(actual / expected)))
    assert value(got, "mlmon_training_feature_psi", model="ctr", feature="device") == pytest.approx(psi, rel=1e-12)


def test_online_logloss_against_the_offline_logloss_of_the_serving_version(tmp_path):
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path}/store.sqlite"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE predictions (id INTEGER, ts TIMESTAMP, p FLOAT, v TEXT)"))
        conn.execute(sa.text("CREATE TABLE labels (id INTEGER, y INTEGER)"))
        rows = [
            (i, (NOW - timedelta(minutes=10 + i)).replace(tzinfo=None), 0.2 + 0.1 * (i % 2), "v1" if i < 5 else "v0")
            for i in range(10)
        ]
        for row in rows:
            conn.execute(
                sa.text("INSERT INTO predictions VALUES (:i, :ts, :p, :v)"),
                dict(zip("i ts p v".split(), row, strict=False)),
            )
        for i in range(10):
            conn.execute(sa.text("INSERT INTO labels VALUES (:i, :y)"), {"i": i, "y": i % 2})
    engine.dispose()
    state = f"sqlite:///{tmp_path}/state.sqlite"
    report(
        state,
        simple_run("v0", 2, 100, 0.5, 0.8),
        simple_run("v1", 1, 100, 0.25, 0.8),
        simple_run("v2", 0, 100, 0.2, 0.8),
    )
    model = {
        "name": "ctr",
        "predictions": {
            "store": "s",
            "table": "predictions",
            "columns": {"id": "id", "timestamp": "ts", "score": "p", "version": "v"},
        },
        "labels": {"store": "s", "table": "labels", "columns": {"id": "id", "label": "y"}},
        "windows": ["1h"],
        "label_delay": "0s",
    }
    settings = parse_settings({"stores": {"s": {"url": url}}, "models": [model], "state": {"url": state}})
    text = refresh_once(settings, NOW).decode()
    got = {(s.name, s.labels.get("window")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    y = np.array([i % 2 for i in range(10)])
    p = np.array([0.2 + 0.1 * (i % 2) for i in range(10)])
    online = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert got[("mlmon_online_logloss", "1h")] == pytest.approx(online)
    # the newest prediction (10 minutes ago, id 0) was served by v1: offline log loss 0.25, not the newest v2's
    assert got[("mlmon_online_logloss_vs_offline_ratio", "1h")] == pytest.approx(online / 0.25)


def test_state_database_failing_keeps_then_drops_training_metrics(tmp_path):
    import sqlalchemy as sa

    state = f"sqlite:///{tmp_path}/state.sqlite"
    report(state, simple_run("v0", 0, 100, 0.3, 0.8))
    settings = settings_for(state, staleness="5m")
    database = StateDatabase(state)
    refresher = TrainingRefresher(database, settings.training, settings.refresh_policy)
    assert "ctr" in refresher.refresh(NOW).models

    def rename(old, new):
        with database.engine.begin() as conn:
            conn.execute(sa.text(f"ALTER TABLE {old} RENAME TO {new}"))

    rename("mlmon_training_runs", "moved")
    failing = refresher.refresh(NOW + timedelta(minutes=4))
    assert failing.up is False and "ctr" in failing.models and failing.errors["schema"] == 1
    dropped = refresher.refresh(NOW + timedelta(minutes=6))
    assert dropped.up is False and dropped.models == {}
    rename("moved", "mlmon_training_runs")
    recovered = refresher.refresh(NOW + timedelta(minutes=7))
    assert recovered.up is True and "ctr" in recovered.models
    database.engine.dispose()


def test_high_cardinality_category_from_the_same_distribution_is_stable():
    from exporter.client import summarize_features
    from exporter.training.metrics import feature_psi

    rng = np.random.default_rng(5)
    weights = 1 / np.arange(1, 41)  # 40 categories, many near the top-20 cut

    def draw():
        return pd.DataFrame({"site": rng.choice([f"s{i}" for i in range(40)], 20_000, p=weights / weights.sum())})

    (a,), (b,) = summarize_features(draw(), top_k=20), summarize_features(draw(), top_k=20)
    assert feature_psi(a, b) < 0.01


def test_car_loan_reference_against_a_shifted_copy(state_url):
    reference = pd.read_csv(CAR_LOAN / "synthetic_car_loan_reference.csv")
    features = reference[
        [
            "car_value",
            "salary_range",
            "debt_to_income_ratio",
            "loan_length",
            "repaid_loan_on_prev_car",
            "size_of_downpayment",
            "driver_tenure",
        ]
    ]
    # version B: another sample of the same population (a bootstrap of A's rows), with one feature changed
    resampled = features.sample(frac=1.0, replace=True, random_state=1).reset_index(drop=True)
    shifted = resampled.assign(car_value=resampled["car_value"] * 1.5)
    validation = (reference["repaid"].astype(int), reference["y_pred_proba"])
    a = build_training_run(
        model="car_loan", version="A", trained_at=NOW - timedelta(days=1), training_data=features, validation=validation
    )
    b = build_training_run(model="car_loan", version="B", trained_at=NOW, training_data=shifted, validation=validation)
    report(state_url, a, b)
    got = samples(state_url)
    psi = {dict(k[1])["feature"]: v for k, v in got.items() if k[0] == "mlmon_training_feature_psi"}
    assert set(psi) == set(features.columns)
    assert psi["car_value"] > 0.25  # a large shift
    assert all(v < 0.05 for name, v in psi.items() if name != "car_value"), psi  # sampling noise only
    assert value(got, "mlmon_training_feature_mean", model="car_loan", feature="car_value") == pytest.approx(
        1.5 * resampled["car_value"].mean(), rel=1e-12
    )
    assert value(got, "mlmon_offline_logloss_change_ratio", model="car_loan", baseline="previous_version") == 1.0
    assert math.isclose(value(got, "mlmon_training_rows", model="car_loan"), len(reference))


def test_as_of_with_an_offset_is_an_instant(state_url):
    report(state_url, simple_run("v0", 0, 100, 0.3, 0.8))  # trained at 12:00 UTC
    plus2 = timezone(timedelta(hours=2))
    before = refresh_once(settings_for(state_url), datetime(2026, 11, 28, 13, 30, tzinfo=plus2)).decode()  # 11:30 UTC
    after = refresh_once(
        settings_for(state_url), datetime(2026, 11, 28, 10, 30, tzinfo=timezone(-timedelta(hours=2)))
    ).decode()  # 12:30 UTC
    assert "mlmon_model_info" not in before
    assert 'mlmon_model_info{model="ctr",version="v0"} 1.0' in after


def test_the_migrated_schema_is_the_one_the_queries_use(state_url):
    """exporter.training.storage mirrors the table the migrations create: both must agree."""
    import sqlalchemy as sa

    from exporter.training.storage import training_runs

    state = StateDatabase(state_url)
    migrated = sa.Table("mlmon_training_runs", sa.MetaData(), autoload_with=state.ready())
    assert [c.name for c in migrated.columns] == [c.name for c in training_runs.columns]
    for column in training_runs.columns:
        assert type(migrated.c[column.name].type)._type_affinity == type(column.type)._type_affinity or (
            column.type.python_type == migrated.c[column.name].type.python_type
        ), column.name
        assert migrated.c[column.name].nullable == column.nullable, column.name
    state.engine.dispose()


def test_feature_and_category_series_are_bounded(state_url):
    features = [
        {
            "name": f"f{i:02d}",
            "kind": "categorical",
            "count": 10,
            "missing_ratio": 0.0,
            "categories": {f"c{j}": 0.1 for j in range(10)},
        }
        for i in range(5)
    ]
    report(state_url, simple_run("v0", 0, 100, 0.3, 0.8, features=features))
    got = samples(state_url, max_features=3, max_categories=4)
    exposed = {dict(k[1])["feature"] for k in got if k[0] == "mlmon_training_feature_missing_ratio"}
    assert exposed == {"f00", "f01", "f02"}
    shares = [k for k in got if k[0] == "mlmon_training_feature_category_share_ratio"]
    assert len(shares) == 3 * 4
    assert value(got, "mlmon_training_series_over_limit", model="ctr", kind="feature") == 2
    assert value(got, "mlmon_training_series_over_limit", model="ctr", kind="category") == 3 * 6


# --- PSI of discrete numeric features and of top-k categories ---------------------------------


def raw_psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """PSI from two share vectors with the documented floor of 1e-4 (docs/metrics.md)."""
    e, a = np.maximum(expected, 1e-4), np.maximum(actual, 1e-4)
    return float(np.sum((a - e) * np.log(a / e)))


def raw_value_psi(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI on the raw rows, one bin per distinct value (NaN: the missing bin)."""
    values = np.union1d(reference[~np.isnan(reference)], current[~np.isnan(current)])

    def shares(x):
        return np.append([np.mean(x == v) for v in values], np.mean(np.isnan(x)))

    return raw_psi(shares(reference), shares(current))


def summaries(reference: np.ndarray, current: np.ndarray, top_k: int = 20) -> tuple[FeatureSummary, FeatureSummary]:
    """The client's summaries of two versions of one column."""
    (ref,), (cur,) = (summarize_features(pd.DataFrame({"x": x}), top_k=top_k) for x in (reference, current))
    return ref, cur


def discrete_cases():
    rng = np.random.default_rng(11)
    binary_70 = np.array([0.0] * 700 + [1.0] * 300)
    binary_50 = np.array([0.0] * 500 + [1.0] * 500)
    poisson_a, poisson_b = rng.poisson(2, 5000).astype(float), rng.poisson(2, 5000).astype(float)
    with_missing = np.where(rng.random(2000) < 0.1, np.nan, rng.integers(0, 3, 2000).astype(float))
    new_code = np.where(rng.random(2000) < 0.15, 7.0, rng.integers(0, 3, 2000).astype(float))  # a value never seen
    return {
        "binary 70% -> 50% zeros": (binary_70, binary_50, 0.2 * np.log(0.7 / 0.5) + 0.2 * np.log(0.5 / 0.3)),
        "unchanged Poisson(2)": (poisson_a, poisson_b, None),
        "missing values": (with_missing, rng.integers(0, 3, 2000).astype(float), None),
        "a new value": (rng.integers(0, 3, 2000).astype(float), new_code, None),
        "ratings 1-5, shifted": (rng.integers(1, 6, 3000) * 1.0, np.minimum(rng.integers(2, 7, 3000), 5) * 1.0, None),
    }


@pytest.mark.parametrize("case", list(discrete_cases()))
def test_psi_of_a_discrete_numeric_feature_is_the_raw_data_value(case):
    """Issue 11: percentiles of a binary feature coincide (0.243 instead of 0.169); with
    value shares the summary PSI is the raw-data PSI with one bin per value."""
    reference, current, by_hand = discrete_cases()[case]
    expected = raw_value_psi(reference, current)
    if by_hand is not None:
        assert expected == pytest.approx(by_hand, rel=1e-12)  # 0.1695
    got = feature_psi(*summaries(reference, current))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_unchanged_poisson_feature_reads_stable():
    reference, current, _ = discrete_cases()["unchanged Poisson(2)"]
    assert feature_psi(*summaries(reference, current)) < 0.01  # was 0.022


def test_discrete_reference_against_a_continuous_current_uses_the_reference_values_as_edges():
    """Only the reference is low-cardinality: its distinct values are the bin edges, read
    exactly on its side and through the current's percentiles on the other."""
    rng = np.random.default_rng(3)
    reference = rng.integers(0, 4, 4000).astype(float)  # 0, 1, 2, 3
    current = rng.uniform(-0.5, 3.5, 4000)
    ref, cur = summaries(reference, current)
    assert ref.value_shares is not None and cur.value_shares is None
    # raw data over the bins (-inf, 0], (0, 1], (1, 2], (2, 3], (3, inf) and missing; the
    # current's side is read through its interpolated percentiles: close, not exact
    edges = np.array([0.0, 1.0, 2.0, 3.0])

    def shares(x):
        return np.append(np.bincount(np.searchsorted(edges, x, side="left"), minlength=5) / len(x), 0.0)

    expected = raw_psi(shares(reference), shares(current))
    assert expected > 0.25
    assert feature_psi(ref, cur) == pytest.approx(expected, rel=0.05)


def test_discrete_feature_psi_through_the_training_refresh(state_url):
    reference, current, _ = discrete_cases()["binary 70% -> 50% zeros"]
    a, b = (
        build_training_run(
            model="ctr", version=v, trained_at=NOW - timedelta(days=d), training_data=pd.DataFrame({"f": x})
        )
        for v, d, x in (("a", 1, reference), ("b", 0, current))
    )
    report(state_url, a, b)
    got = samples(state_url)
    assert value(got, "mlmon_training_feature_psi", model="ctr", feature="f") == pytest.approx(
        0.2 * np.log(0.7 / 0.5) + 0.2 * np.log(0.5 / 0.3), rel=1e-9
    )


def test_all_missing_numeric_feature_with_only_min_does_not_stop_the_training_refresh(state_url):
    """Issue 13: two versions of {"name":"x","kind":"numeric","count":10,"missing_ratio":1.0,
    "min":0.0} made the PSI code sort None against floats, and the whole training refresh
    failed (mlmon_state_up 0, every model's training series gone)."""
    x = {"name": "x", "kind": "numeric", "count": 10, "missing_ratio": 1.0, "min": 0.0}
    y = {**x, "name": "y", "missing_ratio": 0.0, "mean": 1.0, "stddev": 0.0, "min": 1.0, "max": 1.0}
    with_values = {**x, "missing_ratio": 0.5, "mean": 2.0, "stddev": 1.0, "max": 3.0}
    report(
        state_url,
        simple_run("v1", 1, 100, 0.3, 0.8, features=[x, y]),
        simple_run("v2", 0, 100, 0.3, 0.8, features=[x, y]),
        simple_run("v1", 1, 100, 0.3, 0.8, model="other", features=[x]),
        simple_run("v2", 0, 100, 0.3, 0.8, model="other", features=[with_values]),
        simple_run("v1", 1, 100, 0.3, 0.8, model="third", features=[with_values]),
        simple_run("v2", 0, 100, 0.3, 0.8, model="third", features=[x]),
    )
    got = samples(state_url)
    assert value(got, "mlmon_state_up") == 1
    # every row missing on both sides: all in the missing bin, identical distributions
    assert value(got, "mlmon_training_feature_psi", model="ctr", feature="x") == 0.0
    assert value(got, "mlmon_training_feature_psi", model="ctr", feature="y") == 0.0
    assert value(got, "mlmon_training_feature_missing_ratio", model="ctr", feature="x") == 1.0
    # all missing -> half missing, values in one bin: expected (0, 1), actual (0.5, 0.5)
    expected = raw_psi(np.array([0.0, 1.0]), np.array([0.5, 0.5]))
    assert value(got, "mlmon_training_feature_psi", model="other", feature="x") == pytest.approx(expected, rel=1e-12)
    # half missing -> all missing: the reference's deciles are absent, one value bin
    assert value(got, "mlmon_training_feature_psi", model="third", feature="x") == pytest.approx(expected, rel=1e-12)
    assert value(got, "mlmon_training_rows", model="third") == 100


def categorical(shares: dict, missing: float = 0.0):
    return FeatureSummary(name="c", kind="categorical", count=1000, missing_ratio=missing, categories=shares)


def top_k(p: np.ndarray, names: list[str], k: int) -> dict:
    """The top-k summary of shares ``p`` (ties by name, as the client), with __other__."""
    order = sorted(range(len(p)), key=lambda i: (-p[i], names[i]))
    shares = {names[i]: float(p[i]) for i in order[:k]}
    if len(p) > k:
        shares[OTHER] = float(sum(p[i] for i in order[k:]))
    return shares


def union_bins_psi(reference: np.ndarray, current: np.ndarray, ref: dict, cur: dict) -> float:
    """Raw-data PSI over the bins of docs/metrics.md: every category either summary lists,
    one bin for all others, one for missing (None)."""
    listed = sorted((set(ref) | set(cur)) - {OTHER})

    def shares(x):
        present = np.array([v is not None for v in x])
        known = [np.mean(x == c) for c in listed]
        return np.array(known + [present.mean() - sum(known), 1 - present.mean()])

    return raw_psi(shares(reference), shares(current))


def least_consistent_psi(ref: dict, cur: dict) -> float:
    """The smallest PSI over the union bins among all share vectors consistent with the two
    summaries (no missing values), by scipy's SLSQP from several starts: a category a
    summary does not list holds at most its smallest listed share and all of them together
    its __other__ share."""
    from scipy.optimize import minimize

    r = {c: s for c, s in ref.items() if c != OTHER}
    c_ = {c: s for c, s in cur.items() if c != OTHER}
    r_other, c_other = ref.get(OTHER, 0.0), cur.get(OTHER, 0.0)
    only_ref, only_cur, both = sorted(set(r) - set(c_)), sorted(set(c_) - set(r)), sorted(set(r) & set(c_))
    x_cap, y_cap = min([c_other, *c_.values()]), min([r_other, *r.values()])
    n = len(only_ref)

    def psi(z):
        x, y = z[:n], z[n:]
        e = [r[k] for k in both] + [r[k] for k in only_ref] + list(y) + [r_other - y.sum()]
        a = [c_[k] for k in both] + list(x) + [c_[k] for k in only_cur] + [c_other - x.sum()]
        return raw_psi(np.maximum(e, 0), np.maximum(a, 0))

    bounds = [(0, x_cap)] * n + [(0, y_cap)] * len(only_cur)
    if not bounds:
        return psi(np.zeros(0))
    constraints = [
        {"type": "ineq", "fun": lambda z: c_other - z[:n].sum()},
        {"type": "ineq", "fun": lambda z: r_other - z[n:].sum()},
    ]
    rng = np.random.default_rng(0)
    results = []
    for _ in range(10):
        start = np.array([rng.uniform(0, hi) for _, hi in bounds]) / len(bounds)
        options = {"ftol": 1e-14, "maxiter": 500}
        z = minimize(psi, start, bounds=bounds, constraints=constraints, method="SLSQP", options=options).x
        if z[:n].sum() <= c_other + 1e-12 and z[n:].sum() <= r_other + 1e-12:
            results.append(psi(np.clip(z, 0, None)))
    return min(results)


def test_new_category_hidden_in_the_previous_versions_other_reads_the_least_consistent_psi():
    """Issue 11: the previous version lists its top 20 of 25 categories; the newest holds a
    new category with 22% of the rows. Folding it into __other__ read 0.193; every pair of
    distributions consistent with the two summaries has a PSI of at least 0.432."""
    names = [f"c{i:02d}" for i in range(25)]
    weights = 1 / np.arange(1, 26) ** 0.4
    p = weights / weights.sum()
    ref, cur = top_k(p, names, 20), top_k(np.append(0.78 * p, 0.22), names + ["new"], 20)
    assert "new" in cur and "new" not in ref and ref[OTHER] > 0.1
    # today's reading: the categories both list, everything else in one bin
    both = sorted((set(ref) & set(cur)) - {OTHER})
    folded = raw_psi(
        np.array([ref[c] for c in both] + [1 - sum(ref[c] for c in both)]),
        np.array([cur[c] for c in both] + [1 - sum(cur[c] for c in both)]),
    )
    assert folded < 0.2
    least = least_consistent_psi(ref, cur)
    assert least > 0.4
    got = feature_psi(categorical(ref), categorical(cur))
    assert got == pytest.approx(least, abs=1e-6)
    # the true distributions are consistent with the summaries: they read at least as much
    full = np.append(p, 0.0), np.append(0.78 * p, 0.22)
    assert got <= raw_psi(*full)


def test_new_category_hidden_in_other_through_the_client_and_the_training_refresh(state_url):
    """The same case end to end: raw rows summarized by the client (top 20 of 25, then 26
    categories), reported, read back by the training refresh from the state database; the
    exported PSI is the least PSI scipy finds among distributions consistent with the two
    summaries, and at most the raw rows' PSI over the same bins."""
    names = [f"c{i:02d}" for i in range(25)]
    weights = 1 / np.arange(1, 26) ** 0.4
    p = weights / weights.sum()

    def rows(shares: np.ndarray, categories: list[str], n: int = 10_000) -> np.ndarray:
        counts = np.round(shares * n).astype(int)
        return np.resize(np.repeat(np.array(categories, dtype=object), counts), n)

    reference, current = rows(p, names), rows(np.append(0.78 * p, 0.22), [*names, "new"])
    a, b = (
        build_training_run(
            model="ctr", version=v, trained_at=NOW - timedelta(days=d), training_data=pd.DataFrame({"f": x})
        )
        for v, d, x in (("a", 1, reference), ("b", 0, current))
    )
    (ref,), (cur,) = a.features, b.features
    assert "new" in cur.categories and "new" not in ref.categories and OTHER in ref.categories
    report(state_url, a, b)
    got = value(samples(state_url), "mlmon_training_feature_psi", model="ctr", feature="f")
    least = least_consistent_psi(ref.categories, cur.categories)
    assert least > 0.4
    assert got == pytest.approx(least, abs=1e-6)
    assert got <= union_bins_psi(reference, current, ref.categories, cur.categories) + 1e-12


@pytest.mark.parametrize("seed", range(40))
def test_top_k_psi_is_at_most_that_of_any_data_consistent_with_the_summaries(seed):
    """Random raw data (categories, missing values), summarized by the client with a small
    top_k: the PSI mlmon reports is at most the raw data's PSI over the same bins and at most
    the least PSI scipy finds among consistent distributions, and equal to it up to the
    optimizer's tolerance when nothing is missing."""
    rng = np.random.default_rng(seed)
    categories = np.array([f"k{i}" for i in range(rng.integers(2, 10))], dtype=object)

    def draw():
        p = rng.dirichlet(np.full(len(categories), 0.6))
        x = rng.choice(categories, rng.integers(50, 400), p=p)
        x[rng.random(len(x)) < rng.choice([0.0, 0.2])] = None
        return x

    reference, current = draw(), draw()
    k = int(rng.integers(1, len(categories) + 1))
    ref, cur = summaries(reference, current, top_k=k)
    got = feature_psi(ref, cur)
    assert got <= union_bins_psi(reference, current, ref.categories, cur.categories) + 1e-9
    if ref.missing_ratio == cur.missing_ratio == 0.0:
        least = least_consistent_psi(ref.categories, cur.categories)
        assert got <= least + 1e-7
        assert got == pytest.approx(least, rel=1e-3, abs=1e-6)


def test_complete_category_lists_give_the_exact_raw_psi():
    """Neither version cut to top k: each category its own bin, the raw-data PSI."""
    reference = np.array(["a"] * 50 + ["b"] * 30 + ["c"] * 20 + [None] * 10, dtype=object)
    current = np.array(["a"] * 20 + ["b"] * 30 + ["d"] * 40 + [None] * 20, dtype=object)
    ref, cur = summaries(reference, current)
    shares = lambda x: np.array([np.mean(x == c) for c in "abcd"] + [np.mean([v is None for v in x])])  # noqa: E731
    assert feature_psi(ref, cur) == pytest.approx(raw_psi(shares(reference), shares(current)), rel=1e-12)


@st.composite
def feature_summaries(draw, kind: str) -> FeatureSummary:
    """Any valid summary of one kind: empty, all missing (min alone allowed), percentiles in
    any subset, value shares or not, extreme magnitudes, top-k categories with __other__."""
    count = draw(st.integers(0, 10))
    missing = draw(st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0.0, 1.0))
    fields = {"name": "f", "kind": kind, "count": count, "missing_ratio": missing}
    if count == 0 or missing == 1.0:
        if kind == "numeric" and draw(st.booleans()):
            fields["min"] = draw(st.floats(-1e308, 1e308))
        return FeatureSummary(**fields)
    if kind == "categorical":
        names = draw(st.lists(st.sampled_from(["a", "b", "c", "d", OTHER]), min_size=1, max_size=5, unique=True))
        weights = [draw(st.floats(0.0, 1.0)) for _ in names]
        if sum(weights) == 0:
            weights[0] = 1.0
        return FeatureSummary(**fields, categories={n: w / sum(weights) for n, w in zip(names, weights, strict=False)})
    magnitude = draw(st.sampled_from([1.0, 1e-300, 1e300]))
    values = sorted(draw(st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=12)))
    values = [v * magnitude for v in values]
    fields.update(mean=values[0], stddev=0.0, min=values[0], max=values[-1])
    quantiles = draw(st.lists(st.sampled_from([1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99]), unique=True))
    fields["percentiles"] = {str(q): v for q, v in zip(sorted(quantiles), values[1:-1], strict=False)}
    distinct = sorted(set(values))
    if draw(st.booleans()):
        shares = [draw(st.integers(1, 5)) for _ in distinct]
        fields["value_shares"] = [(v, n / sum(shares)) for v, n in zip(distinct, shares, strict=False)]
    return FeatureSummary(**fields)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["numeric", "categorical"]))
def test_feature_psi_never_raises_and_is_finite_or_absent(data, kind):
    """Whatever two valid summaries hold, PSI is a finite number >= 0 or None (issue 13:
    one odd feature must never stop the training refresh)."""
    reference, current = data.draw(feature_summaries(kind)), data.draw(feature_summaries(kind))
    got = feature_psi(reference, current)
    if reference.count == 0 or current.count == 0:
        assert got is None
    else:
        assert got is not None and math.isfinite(got) and got >= -1e-12
        assert feature_psi(reference, reference) == pytest.approx(0.0, abs=1e-9)


def test_feature_psi_of_values_closer_than_the_smallest_normal_float():
    """Found by the test above: a summary from 0 to 1e-309 (subnormal) without
    percentiles made np.interp's slope overflow, and PSI infinite. Its CDF is the line from
    (0, 0) to (1e-309, 1): a 1/11 share at each of the reference's 11 values but the
    first two, which fall in the same bins as 0 and as 1e-309 (2.2e-311 is 2.2% of the way)."""
    tiny = 2.225073858507e-311
    values = [0.0, tiny, *(k / 8 for k in (1, 2, 2.5, 3, 4, 5, 6, 7, 8))]
    reference = FeatureSummary(
        name="f", kind="numeric", count=1, missing_ratio=0.0, mean=0.0, stddev=0.0, min=0.0, max=1.0,
        percentiles={}, categories={}, value_shares=[(v, 1 / 11) for v in values],
    )  # fmt: skip
    current = FeatureSummary(
        name="f", kind="numeric", count=1, missing_ratio=0.0, mean=0.0, stddev=0.0, min=0.0, max=1e-309,
        percentiles={}, categories={}, value_shares=None,
    )  # fmt: skip
    cdf = np.array([0.0, tiny / 1e-309, *[1.0] * 9])
    actual = np.append(np.diff(np.concatenate([[0.0], cdf, [1.0]])), 0.0)
    expected = np.array([*[1 / 11] * 11, 0.0, 0.0])
    e, a = np.maximum(expected, PSI_MIN_SHARE), np.maximum(actual, PSI_MIN_SHARE)
    assert feature_psi(reference, current) == pytest.approx(float(np.sum((a - e) * np.log(a / e))), rel=1e-6)


def count_like_cases():
    """Issue B1: count-like features with more than top_k distinct values (the given
    inputs: mlmon read 0.055, 0.381 and 0.377 where the raw data gives 0.002, 0.248, 0.295)."""
    rng = np.random.default_rng(5)
    twenty = np.arange(20.0)
    return {
        "unchanged Poisson(15)": (rng.poisson(15, 20000) * 1.0, rng.poisson(15, 20000) * 1.0),
        "Poisson(15) -> Poisson(17)": (rng.poisson(15, 20000) * 1.0, rng.poisson(17, 20000) * 1.0),
        "Poisson(30) -> Poisson(32)": (rng.poisson(30, 20000) * 1.0, rng.poisson(32, 20000) * 1.0),
        "20 distinct values -> 21": (np.repeat(twenty, 50), np.append(np.repeat(twenty, 40), [20.0] * 200)),
    }


@pytest.mark.parametrize("case", list(count_like_cases()))
def test_psi_of_a_count_like_feature_beyond_top_k_is_the_raw_data_value(case):
    reference, current = count_like_cases()[case]
    assert len(np.unique(current)) > 20
    ref, cur = summaries(reference, current)
    assert ref.value_shares is not None and cur.value_shares is not None
    assert feature_psi(ref, cur) == pytest.approx(raw_value_psi(reference, current), rel=1e-9, abs=1e-12)


def test_a_feature_crossing_the_exact_limit_falls_back_to_its_interpolated_cdf():
    reference, current = np.arange(10.0).repeat(10), np.arange(12.0).repeat(10)
    (ref,), (cur,) = (summarize_features(pd.DataFrame({"x": x}), max_exact_values=10) for x in (reference, current))
    assert ref.value_shares is not None and cur.value_shares is None
    with pytest.raises(ValueError, match="max_exact_values must be 0 to 1000, got 1001"):
        summarize_features(pd.DataFrame({"x": reference}), max_exact_values=1001)
