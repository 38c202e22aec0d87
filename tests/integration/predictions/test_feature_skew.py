"""Training/serving feature skew on SQLite, PostgreSQL and DuckDB: every serving and skew
number of the exposition against pandas/numpy on the same rows (docs/metrics.md,
"Training/serving skew"), with NULLs, NaN, text in a numeric column, categories unseen in
training, a feature missing from the training summary, a version without a training run
and more features than the limit."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from exporter.client import build_training_run
from exporter.config import parse_settings
from exporter.training.storage import StateDatabase, save_run
from tests.conftest import refresh_once

AS_OF = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24)}
DECILES = [10, 20, 30, 40, 50, 60, 70, 80, 90]
PSI_FLOOR = 1e-4  # shares are raised to at least this before the PSI (docs/metrics.md)
NUMERIC = ["age_days", "hour", "extra"]
CATEGORICAL = ["device", "country"]


def _training_frame(rng: np.random.Generator, n: int = 4000) -> pd.DataFrame:
    age = rng.gamma(2.0, 300.0, n)
    age[rng.random(n) < 0.05] = np.nan
    device = rng.choice(["mobile", "desktop", "tablet"], n, p=[0.6, 0.3, 0.1]).astype(object)
    device[rng.random(n) < 0.02] = None
    countries = [f"c{i:02d}" for i in range(30)]
    weights = np.linspace(3, 1, 30) / np.linspace(3, 1, 30).sum()
    return pd.DataFrame(
        {
            "age_days": age,
            "hour": rng.integers(0, 24, n),  # few distinct values: exact value shares
            "device": device,
            "country": rng.choice(countries, n, p=weights),  # top 5 + __other__
        }
    )


def _serving_rows(rng: np.random.Generator, dialect: str) -> list[dict]:
    """Predictions of three days before AS_OF: version v1 (trained), v2 at the end (never
    trained) for the newest rows of a second model ``m2``; age served in hours (x24) in the
    last 6 hours, 'unknown' devices, NULLs, NaN where the engine stores it, text on SQLite."""
    rows = []
    for i in range(3000):
        ts = AS_OF - timedelta(seconds=float(rng.uniform(1, 3 * 86400)))
        recent = AS_OF - ts < timedelta(hours=6)
        age = float(rng.gamma(2.0, 300.0)) * (24 if recent else 1)
        kind = rng.random()
        age_value: object = age
        if kind < 0.04:
            age_value = None
        elif kind < 0.06:
            age_value = float("nan") if dialect != "sqlite" else "abc"  # SQLite stores no NaN
        elif kind < 0.07 and dialect == "sqlite":
            age_value = ""  # what the sqlite3 shell's .import writes for an empty field
        device = str(rng.choice(["mobile", "desktop", "tablet", "unknown"], p=[0.5, 0.25, 0.05, 0.2]))
        rows.append(
            {
                "id": i,
                "ts": ts,
                "p": float(rng.uniform(0, 1)),
                "v": "v1",
                "age_days": age_value,
                "hour": int(rng.integers(0, 24)) if rng.random() > 0.03 else None,
                "extra": float(rng.normal()),
                "device": device if rng.random() > 0.05 else None,
                "country": str(rng.choice([f"c{j:02d}" for j in range(35)])),
            }
        )
    return rows


def _load(url: str, schema: str | None, rows: list[dict]) -> None:
    engine = sa.create_engine(url)
    metadata = sa.MetaData(schema=schema)
    table = sa.Table(
        "predictions",
        metadata,
        sa.Column("id", sa.BigInteger),
        sa.Column("ts", sa.DateTime(timezone=True)),
        sa.Column("p", sa.Double),
        sa.Column("v", sa.String),
        sa.Column("age_days", sa.Double),
        sa.Column("hour", sa.Integer),
        sa.Column("extra", sa.Double),
        sa.Column("device", sa.String),
        sa.Column("country", sa.String),
    )
    metadata.create_all(engine)
    text = {r["id"]: r["age_days"] for r in rows if isinstance(r["age_days"], str)}
    with engine.begin() as conn:
        if rows:
            conn.execute(table.insert(), [dict(r, age_days=None) if r["id"] in text else r for r in rows])
        # Past the Double type's bind processor: SQLite keeps such text as it is in a REAL column.
        for id_, value in text.items():
            conn.execute(sa.text("UPDATE predictions SET age_days = :v WHERE id = :id"), {"v": value, "id": id_})
    engine.dispose()


def _report(state_url: str, train: pd.DataFrame) -> None:
    state = StateDatabase(state_url)
    run = build_training_run(
        model="ctr", version="v1", trained_at=AS_OF - timedelta(days=10), training_data=train, top_k=5
    )
    save_run(state.ready(), run, AS_OF)
    state.engine.dispose()


def _settings(url, schema, state_url, version=True, features=None, windows=tuple(WINDOWS), **training):
    columns = {"id": "id", "timestamp": "ts", "score": "p", **({"version": "v"} if version else {})}
    predictions = {"store": "s", "table": "predictions", "columns": columns, **({"schema": schema} if schema else {})}
    return parse_settings(
        {
            "stores": {"s": {"url": url}},
            "state": {"url": state_url},
            "training": training,
            "models": [
                {
                    "name": "ctr",
                    "predictions": predictions,
                    "windows": list(windows),
                    "features": features or {"numeric": NUMERIC, "categorical": CATEGORICAL},
                }
            ],
        }
    )


def _samples(settings) -> dict:
    text = refresh_once(settings, AS_OF).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(("mlmon_serving_feature", "mlmon_feature_skew", "mlmon_source_up"))
    }


def _psi(expected, actual) -> float:
    e = np.maximum(np.asarray(expected, float), PSI_FLOOR)
    a = np.maximum(np.asarray(actual, float), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def _window(frame: pd.DataFrame, window: timedelta) -> pd.DataFrame:
    return frame[(frame.ts >= AS_OF - window) & (frame.ts < AS_OF)]


def _numeric(series: pd.Series) -> pd.Series:
    """Missing: NULL, NaN, text (pandas coerces it to NaN), ±inf."""
    return pd.to_numeric(series, errors="coerce").replace([np.inf, -np.inf], np.nan).astype(float)


@pytest.fixture
def state_file(tmp_path):
    return f"sqlite:///{tmp_path}/state.sqlite"


def test_serving_and_skew_numbers_match_pandas(store, state_file):
    url, schema, dialect = store
    rng = np.random.default_rng(14)
    train = _training_frame(rng)
    rows = _serving_rows(rng, dialect)
    _load(url, schema, rows)
    _report(state_file, train)
    got = _samples(_settings(url, schema, state_file))
    assert got[("mlmon_source_up", frozenset({"model": "ctr", "source": "features"}.items()))] == 1.0
    frame = pd.DataFrame(rows)

    def value(name, **labels):
        return got.get((name, frozenset({"model": "ctr", **labels}.items())))

    for window, span in WINDOWS.items():
        rows_w = _window(frame, span)
        n = len(rows_w)
        assert value("mlmon_serving_feature_rows", window=window) == n
        for feature in ["age_days", "hour", "extra"]:
            x = _numeric(rows_w[feature])
            present = x.dropna()
            labels = {"window": window, "feature": feature}
            assert value("mlmon_serving_feature_missing_ratio", **labels) == pytest.approx(x.isna().mean(), abs=1e-12)
            assert value("mlmon_serving_feature_mean", **labels) == pytest.approx(present.mean(), rel=1e-9)
            assert value("mlmon_serving_feature_stddev", **labels) == pytest.approx(present.std(ddof=0), rel=1e-7)
        # extra: not in the training summary, so compared with nothing
        assert value("mlmon_feature_skew_psi", window=window, feature="extra") is None

        # age_days: continuous, bins on the training deciles; expected 0.1 of the present share each
        t_age = train.age_days
        t_missing = t_age.isna().mean()
        edges = np.percentile(t_age.dropna(), DECILES)
        x = _numeric(rows_w.age_days)
        counts = pd.cut(x.dropna(), [-np.inf, *edges, np.inf], right=True).value_counts(sort=False).to_numpy()
        actual = [*(counts / n), x.isna().sum() / n]
        expected = [*([0.1 * (1 - t_missing)] * 10), t_missing]
        psi = value("mlmon_feature_skew_psi", window=window, feature="age_days")
        assert psi == pytest.approx(_psi(expected, actual), rel=1e-9)
        t_present = t_age.dropna()
        smd = (x.mean() - t_present.mean()) / math.sqrt((x.std(ddof=0) ** 2 + t_present.std(ddof=0) ** 2) / 2)
        assert value("mlmon_feature_skew_standardized_mean_difference", window=window, feature="age_days") == (
            pytest.approx(smd, rel=1e-7)
        )
        delta = value("mlmon_feature_skew_missing_ratio_delta", window=window, feature="age_days")
        assert delta == pytest.approx(x.isna().mean() - t_missing, abs=1e-12)

        # hour: integer values, exact value shares: one bin per training value
        h = _numeric(rows_w.hour)
        t_shares = train.hour.value_counts(normalize=True).sort_index()
        bins = [-np.inf, *t_shares.index.astype(float), np.inf]
        counts = pd.cut(h.dropna(), bins, right=True).value_counts(sort=False).to_numpy()
        psi = value("mlmon_feature_skew_psi", window=window, feature="hour")
        assert psi == pytest.approx(_psi([*t_shares.to_numpy(), 0.0, 0.0], [*(counts / n), h.isna().mean()]), rel=1e-9)

        # device: the training lists every category, so 'unknown' is unseen
        d = rows_w.device
        present = d.dropna()
        for category in ["mobile", "desktop", "tablet"]:
            share = value(
                "mlmon_serving_feature_category_share_ratio", window=window, feature="device", category=category
            )
            assert share == pytest.approx((present == category).mean(), abs=1e-12)
        unseen = (~present.isin(["mobile", "desktop", "tablet"])).mean()
        assert value("mlmon_serving_feature_unseen_ratio", window=window, feature="device") == pytest.approx(unseen)
        assert value(
            "mlmon_serving_feature_category_share_ratio", window=window, feature="device", category="__other__"
        ) == pytest.approx(unseen)
        t_d = train.device
        t_present = t_d.dropna()
        t_miss = t_d.isna().mean()
        cats = list(t_present.value_counts().index)  # largest first
        expected = [(t_present == c).mean() * (1 - t_miss) for c in cats] + [0.0, t_miss]
        actual = [(d == c).sum() / n for c in cats] + [(~present.isin(cats)).sum() / n, d.isna().sum() / n]
        psi = value("mlmon_feature_skew_psi", window=window, feature="device")
        assert psi == pytest.approx(_psi(expected, actual), rel=1e-9)
        assert value("mlmon_feature_skew_standardized_mean_difference", window=window, feature="device") is None

        # country: top 5 + __other__ in training; unlisted values are __other__, unseen undefined
        c = rows_w.country
        top = list(train.country.value_counts().sort_index().sort_values(ascending=False, kind="stable").index[:5])
        assert value("mlmon_serving_feature_unseen_ratio", window=window, feature="country") is None
        other = value(
            "mlmon_serving_feature_category_share_ratio", window=window, feature="country", category="__other__"
        )
        assert other == pytest.approx((~c.isin(top)).mean(), abs=1e-12)
        t_c = train.country
        expected = [(t_c == k).mean() for k in top] + [(~t_c.isin(top)).mean(), 0.0]
        actual = [(c == k).mean() for k in top] + [(~c.isin(top)).mean(), 0.0]
        psi = value("mlmon_feature_skew_psi", window=window, feature="country")
        assert psi == pytest.approx(_psi(expected, actual), rel=1e-6)  # training shares rounded by the client

    # the incident: age served in hours over the last 6 hours shows in the 1h window
    assert value("mlmon_feature_skew_psi", window="1h", feature="age_days") > 1
    assert value("mlmon_feature_skew_standardized_mean_difference", window="1h", feature="age_days") > 1
    assert value("mlmon_feature_skew_reference_info", version="v1") == 1.0


def test_a_version_without_training_run_has_serving_numbers_only(store, state_file):
    url, schema, dialect = store
    rng = np.random.default_rng(7)
    rows = _serving_rows(rng, dialect)
    rows[-1] |= {"ts": AS_OF - timedelta(seconds=0.5), "v": "v2"}  # the newest prediction: v2, never trained
    rows += [dict(rows[-1], id=10_000 + i, ts=AS_OF - timedelta(seconds=1 + i)) for i in range(9)]
    _load(url, schema, rows)
    _report(state_file, _training_frame(rng))
    got = _samples(_settings(url, schema, state_file))
    frame = pd.DataFrame(rows)
    v2 = frame[frame.v == "v2"]
    for window, span in WINDOWS.items():
        rows_w = _window(v2, span)
        labels = frozenset({"model": "ctr", "window": window, "feature": "age_days"}.items())
        assert got[("mlmon_serving_feature_rows", frozenset({"model": "ctr", "window": window}.items()))] == len(rows_w)
        assert got[("mlmon_serving_feature_mean", labels)] == pytest.approx(_numeric(rows_w.age_days).mean())
        assert ("mlmon_feature_skew_psi", labels) not in got
        assert ("mlmon_feature_skew_missing_ratio_delta", labels) not in got
    assert not any(name == "mlmon_feature_skew_reference_info" for name, _ in got)


def test_without_a_version_column_the_newest_run_is_compared(store, state_file):
    url, schema, dialect = store
    rng = np.random.default_rng(3)
    rows = _serving_rows(rng, dialect)
    _load(url, schema, rows)
    _report(state_file, _training_frame(rng))
    got = _samples(_settings(url, schema, state_file, version=False))
    assert got[("mlmon_feature_skew_reference_info", frozenset({"model": "ctr", "version": "v1"}.items()))] == 1.0
    assert ("mlmon_feature_skew_psi", frozenset({"model": "ctr", "window": "1h", "feature": "device"}.items())) in got


def test_more_features_than_the_limit_are_counted_not_exposed(store, state_file):
    url, schema, dialect = store
    rng = np.random.default_rng(5)
    _load(url, schema, _serving_rows(rng, dialect))
    _report(state_file, _training_frame(rng))
    got = _samples(_settings(url, schema, state_file, max_features=3, max_categories=2))
    features = {dict(labels)["feature"] for name, labels in got if name == "mlmon_serving_feature_missing_ratio"}
    assert features == {"age_days", "country", "device"}  # the first 3 by name
    over = {dict(labels)["kind"]: v for (name, labels), v in got.items() if name.endswith("series_over_limit")}
    # 2 features left out; device lists 3 categories, country 5: 1 + 3 beyond 2
    assert over == {"feature": 2, "category": 4}
    categories = {
        dict(labels)["category"]
        for name, labels in got
        if name == "mlmon_serving_feature_category_share_ratio"
        and dict(labels)["feature"] == "device"
        and dict(labels)["window"] == "1h"
    }
    assert categories == {"mobile", "desktop", "__other__"}


def test_a_joined_feature_table_with_all_columns(store, state_file):
    """Features in a table joined by id, declared ``all``: a prediction without a feature
    row has every feature missing; the id and excluded columns are no features."""
    url, schema, dialect = store
    rng = np.random.default_rng(11)
    rows = _serving_rows(rng, "postgresql")  # no text values: the feature table is typed
    _load(url, schema, [{k: r[k] for k in ("id", "ts", "p", "v")} | {"age_days": None} for r in rows])
    engine = sa.create_engine(url)
    metadata = sa.MetaData(schema=schema)
    table = sa.Table(
        "request_features",
        metadata,
        sa.Column("rid", sa.BigInteger, primary_key=True),
        sa.Column("age_days", sa.Double),
        sa.Column("hour", sa.Integer),
        sa.Column("device", sa.String),
        sa.Column("note", sa.String),
    )
    metadata.create_all(engine)
    kept = [r for r in rows if r["id"] % 7]  # every 7th prediction has no feature row
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            [
                {"rid": r["id"], "age_days": r["age_days"], "hour": r["hour"], "device": r["device"], "note": "x"}
                for r in kept
            ],
        )
    engine.dispose()
    _report(state_file, _training_frame(rng))
    features = {
        "table": "request_features",
        "id": "rid",
        "numeric": "all",
        "categorical": "all",
        "exclude": ["note"],
        **({"schema": schema} if schema else {}),
    }
    got = _samples(_settings(url, schema, state_file, features=features))
    exposed = {dict(labels)["feature"] for name, labels in got if name == "mlmon_serving_feature_missing_ratio"}
    assert exposed == {"age_days", "hour", "device"}
    frame = pd.DataFrame(rows).merge(
        pd.DataFrame(kept)[["id", "age_days", "device"]], on="id", how="left", suffixes=("_all", "")
    )
    for window, span in WINDOWS.items():
        rows_w = _window(frame, span)
        labels = frozenset({"model": "ctr", "window": window, "feature": "age_days"}.items())
        assert got[("mlmon_serving_feature_missing_ratio", labels)] == pytest.approx(
            _numeric(rows_w.age_days).isna().mean(), abs=1e-12
        )
        assert got[("mlmon_serving_feature_mean", labels)] == pytest.approx(_numeric(rows_w.age_days).mean(), rel=1e-9)
        labels = frozenset({"model": "ctr", "window": window, "feature": "device"}.items())
        assert got[("mlmon_serving_feature_missing_ratio", labels)] == pytest.approx(rows_w.device.isna().mean())


def _schema_problems(url: str, tmp_path, features: dict) -> list[str]:
    """The schema errors ``check_schema`` raises for model ``ctr`` with ``features``."""
    from exporter.predictions.refresh import ModelRefresher
    from exporter.predictions.stores import Stores
    from exporter.reasons import SchemaError

    settings = _settings(url, None, f"sqlite:///{tmp_path}/state.sqlite", features=features)
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
        with pytest.raises(SchemaError) as error:
            refresher.check_schema()
    finally:
        stores.dispose()
    return error.value.problems


def test_bad_feature_columns_are_schema_errors_naming_the_key(tmp_path):
    url = f"sqlite:///{tmp_path}/s.sqlite"
    _load(url, None, [])
    features = {"numeric": ["age_days", "device", "gone"], "categorical": ["extra"]}
    assert _schema_problems(url, tmp_path, features) == [
        "models[0].features.numeric: column 'device' of table 'predictions' has type VARCHAR; expected a number",
        "models[0].features.numeric: column 'gone' does not exist in table 'predictions' (columns: id, ts, p, v, "
        "age_days, hour, extra, device, country)",
        "models[0].features.categorical: column 'extra' of table 'predictions' has type DOUBLE; expected text, a "
        "boolean or an integer",
    ]
    # A misspelt exclude would silently keep its column among the features.
    assert _schema_problems(url, tmp_path, {"numeric": "all", "exclude": ["hours"]}) == [
        "models[0].features.exclude: column 'hours' does not exist in table 'predictions' (columns: id, ts, p, v, "
        "age_days, hour, extra, device, country)",
    ]


def test_worst_case_queries_counts_the_features_statements(tmp_path):
    """With a version column: the serving version and one pass in the store, the training
    run in the state database (the deadline counts them)."""
    from exporter.predictions.refresh import ModelRefresher, worst_case_queries
    from exporter.predictions.stores import Stores

    url, state_url = f"sqlite:///{tmp_path}/s.sqlite", f"sqlite:///{tmp_path}/state.sqlite"
    rng = np.random.default_rng(2)
    _load(url, None, _serving_rows(rng, "sqlite"))
    _report(state_url, _training_frame(rng))
    settings = _settings(url, None, state_url)
    model = settings.models[0].model_copy(update={"labels": None, "replays": None, "bucket_decimals": 1})
    stores, state = Stores(settings.stores, settings.query_timeout), StateDatabase(state_url)
    try:
        refresher = ModelRefresher(model, "models[0]", settings.refresh_policy, stores, state=state)
        refresher.refresh(AS_OF - timedelta(minutes=1))  # reflection, the counter's watermark, the migration
        statements: list[str] = []
        for engine in (stores.engine("s"), state.engine):
            sa.event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
        snapshot = refresher.refresh(AS_OF)
    finally:
        stores.dispose()
        state.engine.dispose()
    assert all(s.up for s in snapshot.sources.values()) and snapshot.features
    queries = [s for s in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))]
    # 5 (predictions: newest, duplicate ids, histogram, mode counts as 0.1 buckets hold
    # several scores, counter; every window in one pass) + 3 (features); the predictions'
    # worst case on time slices adds 4 (test_failures.py counts it)
    assert len(queries) == worst_case_queries(model) - 4 == 8


def test_a_single_window(store, state_file):
    """One window: every row ranks in it (no CASE to tell windows apart)."""
    url, schema, dialect = store
    rng = np.random.default_rng(21)
    rows = _serving_rows(rng, dialect)
    _load(url, schema, rows)
    _report(state_file, _training_frame(rng))
    got = _samples(_settings(url, schema, state_file, windows=("24h",)))
    rows_w = _window(pd.DataFrame(rows), WINDOWS["24h"])
    labels = frozenset({"model": "ctr", "window": "24h", "feature": "age_days"}.items())
    assert got[("mlmon_serving_feature_mean", labels)] == pytest.approx(_numeric(rows_w.age_days).mean(), rel=1e-9)
    assert got[("mlmon_serving_feature_rows", frozenset({"model": "ctr", "window": "24h"}.items()))] == len(rows_w)


def test_huge_finite_values_leave_mean_and_stddev_absent_and_other_features_intact(store, state_file):
    """Attack 2026-12-01: PostgreSQL raised on the overflowing Σx² of a value like 2e154 and
    the whole features source went down; SQLite summed +1e308 and -1e308 into inf - inf.
    Values past skew.MOMENT_BOUND keep their bins but are not summed: the feature's mean
    and stddev are absent in the windows that hold one, every other feature is exact."""
    url, schema, dialect = store
    rng = np.random.default_rng(7)
    rows = _serving_rows(rng, dialect)
    recent = sorted((r for r in rows if AS_OF - r["ts"] < timedelta(hours=1)), key=lambda r: r["id"])
    older = sorted(
        (r for r in rows if timedelta(hours=2) < AS_OF - r["ts"] < timedelta(hours=24)), key=lambda r: r["id"]
    )
    recent[0]["age_days"], older[0]["age_days"], older[1]["age_days"] = 2e154, 1e308, -1e308
    _load(url, schema, rows)
    _report(state_file, _training_frame(rng))
    got = _samples(_settings(url, schema, state_file))
    frame = pd.DataFrame(rows)
    assert got[("mlmon_source_up", frozenset({"model": "ctr", "source": "features"}.items()))] == 1.0
    for window, span in WINDOWS.items():
        labels = {"model": "ctr", "window": window}
        age = frozenset({**labels, "feature": "age_days"}.items())
        assert ("mlmon_serving_feature_mean", age) not in got
        assert ("mlmon_feature_skew_standardized_mean_difference", age) not in got
        assert ("mlmon_feature_skew_psi", age) in got  # bins need no sums
        extra = _numeric(_window(frame, span).extra)
        mean = got[("mlmon_serving_feature_mean", frozenset({**labels, "feature": "extra"}.items()))]
        assert mean == pytest.approx(extra.mean(), rel=1e-9)


def test_tiny_values_keep_the_features_source_up_with_exact_means(store, state_file):
    """Attack 2026-12-01: PostgreSQL raised "underflow" on the Σx² of a value of 1e-200 (x * x
    rounds to 0) and the whole features source went down. ``extra`` is missing from the
    training summary, so it is summed unshifted; its means are numpy's."""
    url, schema, dialect = store
    rng = np.random.default_rng(9)
    rows = _serving_rows(rng, dialect)
    recent = sorted((r for r in rows if AS_OF - r["ts"] < timedelta(hours=1)), key=lambda r: r["id"])
    recent[0]["extra"], recent[1]["extra"] = 1e-200, 5e-324
    _load(url, schema, rows)
    _report(state_file, _training_frame(rng))
    got = _samples(_settings(url, schema, state_file))
    frame = pd.DataFrame(rows)
    assert got[("mlmon_source_up", frozenset({"model": "ctr", "source": "features"}.items()))] == 1.0
    for window, span in WINDOWS.items():
        extra = _numeric(_window(frame, span).extra)
        labels = frozenset({"model": "ctr", "window": window, "feature": "extra"}.items())
        assert got[("mlmon_serving_feature_mean", labels)] == pytest.approx(extra.mean(), rel=1e-9)


def test_a_null_serving_version_has_serving_numbers_of_every_version_but_no_skew(store, state_file):
    """Review 2026-12-01: a NULL version named no run but dropped the version filter and was
    compared with the newest run, mixing versions; now it is compared with nothing."""
    url, schema, dialect = store
    rng = np.random.default_rng(8)
    rows = _serving_rows(rng, dialect)
    rows[-1] |= {"ts": AS_OF - timedelta(seconds=0.5), "v": None}  # the newest prediction
    _load(url, schema, rows)
    _report(state_file, _training_frame(rng))
    got = _samples(_settings(url, schema, state_file))
    frame = pd.DataFrame(rows)
    for window, span in WINDOWS.items():
        labels = frozenset({"model": "ctr", "window": window, "feature": "age_days"}.items())
        assert got[("mlmon_serving_feature_rows", frozenset({"model": "ctr", "window": window}.items()))] == len(
            _window(frame, span)
        )
        assert ("mlmon_feature_skew_psi", labels) not in got
    assert not any(name == "mlmon_feature_skew_reference_info" for name, _ in got)


def test_a_binary_version_column_is_compared_as_bytes(postgres_schema, state_file):
    """Review 2026-12-01: PostgreSQL casts bytea to hex text ('\\x7631'), so a bytea version
    'v1' matched no row and every window counted 0 while the skew said it compared v1."""
    url, schema = postgres_schema
    rng = np.random.default_rng(9)
    rows = _serving_rows(rng, "postgresql")
    _load(url, schema, rows)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {schema}.predictions ALTER COLUMN v TYPE bytea USING convert_to(v, 'UTF8')"))
    engine.dispose()
    _report(state_file, _training_frame(rng))
    got = _samples(_settings(url, schema, state_file))
    frame = pd.DataFrame(rows)
    assert got[("mlmon_feature_skew_reference_info", frozenset({"model": "ctr", "version": "v1"}.items()))] == 1.0
    for window, span in WINDOWS.items():
        count = got[("mlmon_serving_feature_rows", frozenset({"model": "ctr", "window": window}.items()))]
        assert count == len(_window(frame, span)) > 0


def test_a_feature_table_id_of_another_kind_names_the_features_id_key(tmp_path):
    """The key is models[i].features.id (features have no columns.id)."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    _load(url, None, [])
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE feats (rid TEXT, age_days REAL)"))
    engine.dispose()
    problems = _schema_problems(url, tmp_path, {"table": "feats", "id": "rid", "numeric": ["age_days"]})
    assert any(p.startswith("models[0].features.id: ") for p in problems), problems


def test_a_postgresql_numeric_past_the_double_range_is_missing_not_a_failed_statement(postgres_schema, state_file):
    """Review 2026-12-01: CAST(1e400::numeric AS double precision) raises, and the features
    of every column were lost while such a row was in the longest window."""
    url, schema = postgres_schema
    rng = np.random.default_rng(10)
    rows = _serving_rows(rng, "postgresql")
    _load(url, schema, rows)
    newest = max(rows, key=lambda r: r["ts"])
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {schema}.predictions ALTER COLUMN extra TYPE numeric"))
        conn.execute(sa.text(f"UPDATE {schema}.predictions SET extra = 1e400 WHERE id = :id"), {"id": newest["id"]})
    engine.dispose()
    _report(state_file, _training_frame(rng))
    got = _samples(_settings(url, schema, state_file))
    frame = pd.DataFrame(rows)
    frame.loc[frame.id == newest["id"], "extra"] = np.nan
    assert got[("mlmon_source_up", frozenset({"model": "ctr", "source": "features"}.items()))] == 1.0
    for window, span in WINDOWS.items():
        extra = _numeric(_window(frame, span).extra)
        labels = frozenset({"model": "ctr", "window": window, "feature": "extra"}.items())
        assert got[("mlmon_serving_feature_missing_ratio", labels)] == pytest.approx(extra.isna().mean())
        assert got[("mlmon_serving_feature_mean", labels)] == pytest.approx(extra.mean(), rel=1e-9)


def _features_source(url: str, schema: str | None, state_url: str):
    """(stores, the features source of model ``ctr``), its schema checked."""
    from exporter.predictions.refresh import ModelRefresher
    from exporter.predictions.stores import Stores

    settings = _settings(url, schema, state_url)
    stores = Stores(settings.stores, settings.query_timeout)
    refresher = ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores)
    try:
        refresher.check_schema()
    except BaseException:
        stores.dispose()
        raise
    return stores, refresher.sources["features"]


def test_the_statement_names_each_cleaned_value_once_however_many_bins(store, state_file):
    """Up to 200 exact values (``value_shares``) make 200 bins: the statement grows by a
    few dozen characters per bin or category, not by the value's cleaning expression at
    each bin, and its counts are those of numpy on the same rows with an edge at served
    values (a value on an edge belongs to the bin it closes)."""
    from exporter.predictions.features import _cleaned
    from exporter.training.skew import Bins

    url, schema, dialect = store
    rows = _serving_rows(np.random.default_rng(15), dialect)
    _load(url, schema, rows)
    stores, source = _features_source(url, schema, state_file)
    try:
        extra = next(f for f in source.queries().features if f.name == "extra")
        device = next(f for f in source.queries().features if f.name == "device")
        engine_dialect = stores.engine("s").dialect

        def length(edges: int, categories: int) -> int:
            numeric = (extra, Bins(edges=tuple(float(e) for e in range(edges))))
            categorical = (device, Bins(categories=tuple(f"d{c}" for c in range(categories))))
            return len(str(source._statement([numeric, categorical], AS_OF, "v1").compile(dialect=engine_dialect)))

        def parameters(edges: int, categories: int) -> int:
            numeric = (extra, Bins(edges=tuple(float(e) / 3 for e in range(edges))))
            categorical = (device, Bins(categories=tuple(f"d{c}" for c in range(categories))))
            return len(source._statement([numeric, categorical], AS_OF, "v1").compile(dialect=engine_dialect).params)

        # Edges are no parameters (SQLite prepares in time quadratic in them; PostgreSQL's
        # protocol takes at most 65,535): one array on PostgreSQL, exact literals elsewhere;
        # PostgreSQL's categories are one array too.
        assert parameters(10, 10) == parameters(1000, 1000 if dialect == "postgresql" else 10)
        cleaning = len(str(_cleaned(dialect, extra).compile(dialect=engine_dialect)))
        per_edge = (length(200, 10) - length(10, 10)) / 190
        per_category = (length(10, 200) - length(10, 10)) / 190
        assert per_edge <= 80 and per_category <= 80, (per_edge, per_category)  # a WHEN, a parameter
        assert per_edge < cleaning / 2, (per_edge, cleaning)

        frame = _window(pd.DataFrame(rows), WINDOWS["24h"])
        served = np.sort(frame.extra.to_numpy(float))
        # Interior edges: rows below the first and above the last land in the open end bins.
        edges = np.unique(served[np.linspace(len(served) // 20, len(served) * 19 // 20, 200).astype(int)])
        with stores.engine("s").connect() as conn:
            groups = conn.execute(source._statement([(extra, Bins(edges=tuple(edges)))], AS_OF, "v1")).all()
    finally:
        stores.dispose()
    got, missing = np.zeros(len(edges) + 1, int), 0
    for g in groups:  # every window rank: the 24h window holds them all
        if int(g.key) == -1:  # a missing value's key
            missing += int(g.n)
        else:
            got[int(g.key)] += int(g.n)
    expected = np.bincount(np.searchsorted(edges, frame.extra.to_numpy(float), side="left"), minlength=len(edges) + 1)
    assert expected[0] > 0 and expected[-1] > 0, "both open end bins hold rows"
    assert missing == frame.extra.isna().sum()
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("engine_name", ["sqlite", "duckdb"])
def test_edges_written_as_sql_read_back_exactly(engine_name):
    """``_exact_double``: bin edges are SQL text, not parameters; every finite double (random
    bit patterns, subnormals, the extremes, decimals SQLite 3.40 misreads as ``repr``) must
    read back as itself, or a value on an edge would change bins."""
    import random
    import struct

    from exporter.predictions.features import _exact_double

    rng = random.Random(4)
    values = [5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -1.7976931348623157e308, 0.29, 1e-200]
    values += [struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0] for _ in range(1500)]
    values += [rng.uniform(-1e3, 1e3) for _ in range(500)]
    values = [v for v in values if math.isfinite(v)]
    engine = sa.create_engine("sqlite://" if engine_name == "sqlite" else "duckdb:///:memory:")
    with engine.connect() as conn:
        got = [
            g for part in (values[:500], values[500:]) for g in conn.execute(sa.select(*map(_exact_double, part))).one()
        ]
    engine.dispose()
    assert [v for v, g in zip(values, got, strict=True) if g != v] == []
