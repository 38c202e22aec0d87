"""The Python client's summaries against pandas/numpy/scikit-learn computed here, and the
``mlmon report-training`` command's local validation."""

import json
import math
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss, roc_auc_score
from typer.testing import CliRunner

from exporter.cli import app
from exporter.client import build_training_run, summarize_features, validation_metrics
from exporter.errors import error_lines
from exporter.training.schema import FEATURE_PERCENTILES, OTHER, FeatureSummary, TrainingRun


def _by_name(summaries):
    return {s.name: s for s in summaries}


@pytest.fixture
def frame():
    rng = np.random.default_rng(7)
    n = 1000
    income = rng.lognormal(10, 1, n)
    income[rng.random(n) < 0.1] = np.nan
    city = rng.choice([f"city_{i:02d}" for i in range(30)], n, p=np.arange(1, 31) / np.arange(1, 31).sum()).astype(
        object
    )
    city[rng.random(n) < 0.05] = None
    return pd.DataFrame(
        {
            "income": income,
            "age": rng.integers(18, 80, n),
            "city": city,
            "grade": pd.Categorical(rng.choice(["A", "B", "C"], n), categories=["A", "B", "C", "D"]),
            "default_before": rng.random(n) < 0.2,
            "segment": rng.integers(0, 4, n),
        }
    )


def test_numeric_summary_matches_numpy(frame):
    income = _by_name(summarize_features(frame))["income"]
    values = frame["income"].dropna().to_numpy()
    assert income.kind == "numeric"
    assert income.count == len(frame)
    # NaN rows stay in the denominator.
    assert income.missing_ratio == pytest.approx(frame["income"].isna().sum() / len(frame))
    assert 0.05 < income.missing_ratio < 0.15
    assert income.mean == pytest.approx(values.mean(), rel=1e-12)
    assert income.stddev == pytest.approx(np.std(values, ddof=0), rel=1e-12)
    assert income.stddev != pytest.approx(np.std(values, ddof=1), rel=1e-6)  # population, not sample
    assert (income.min, income.max) == (values.min(), values.max())
    assert list(income.percentiles) == [str(q) for q in FEATURE_PERCENTILES]
    for q in FEATURE_PERCENTILES:
        assert income.percentiles[str(q)] == pytest.approx(np.percentile(values, q), rel=1e-12)
    assert income.categories == {}


def test_integer_column_is_numeric_without_missing(frame):
    age = _by_name(summarize_features(frame))["age"]
    assert age.kind == "numeric"
    assert age.missing_ratio == 0.0
    assert age.mean == pytest.approx(frame["age"].mean())
    assert age.percentiles["50"] == pytest.approx(frame["age"].quantile(0.5))  # pandas: linear too


def test_low_cardinality_numeric_column_reports_its_value_shares(frame):
    summaries = _by_name(summarize_features(frame, top_k=20))
    segment = summaries["segment"]  # 4 distinct integers
    expected = frame["segment"].value_counts(normalize=True).sort_index()
    assert [v for v, _ in segment.value_shares] == [float(v) for v in expected.index]
    assert [s for _, s in segment.value_shares] == pytest.approx(expected.to_list(), rel=1e-12)
    assert segment.percentiles["50"] == pytest.approx(frame["segment"].quantile(0.5))  # still reported
    assert len(summaries["age"].value_shares) == 62  # 62 distinct values: over top_k, within max_exact_values
    assert summaries["income"].value_shares is None


@pytest.mark.parametrize(("distinct", "given"), [(5, True), (6, False)])
def test_value_shares_up_to_max_exact_values_distinct_values_over_non_missing_rows(distinct, given):
    values = [0.5 * i for i in range(distinct)] * 3 + [0.0, np.nan, np.nan]
    x = summarize_features(pd.DataFrame({"x": values}), max_exact_values=5)[0]
    assert x.missing_ratio == pytest.approx(2 / len(values))
    if not given:
        assert x.value_shares is None
        return
    shares = pd.Series(values).value_counts(normalize=True, dropna=True).sort_index()
    assert [v for v, _ in x.value_shares] == shares.index.to_list()
    assert [s for _, s in x.value_shares] == pytest.approx(shares.to_list(), rel=1e-12)
    assert x.value_shares[0][1] == pytest.approx(4 / 16)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"value_shares": [(1.0, 0.5), (0.0, 0.5)]}, "distinct and ascending"),
        ({"value_shares": [(0.0, 0.5), (0.0, 0.5)]}, "distinct and ascending"),
        ({"value_shares": [(0.0, 0.5), (1.0, 0.4)]}, "sum to 1"),
        ({"value_shares": [(0.0, 0.5), (0.5, 0.5)]}, "from min to max"),
        ({"value_shares": [(0.0, 1.5)]}, "less than or equal to 1"),
        ({"value_shares": [(0.0, 0.5), (float("nan"), 0.5)]}, "finite"),
        ({"value_shares": []}, "at least 1"),
        ({"missing_ratio": 1.0, "mean": None, "stddev": None, "max": None}, "non-missing values"),
        ({"kind": "categorical", "mean": None, "stddev": None, "min": None, "max": None}, "only for numeric"),
    ],
)
def test_invalid_value_shares_are_refused_naming_the_field(change, message):
    feature = {
        "name": "x",
        "kind": "numeric",
        "count": 10,
        "missing_ratio": 0.0,
        "mean": 0.5,
        "stddev": 0.5,
        "min": 0.0,
        "max": 1.0,
        "value_shares": [(0.0, 0.5), (1.0, 0.5)],
    }
    with pytest.raises(ValueError, match=message):
        FeatureSummary(**{**feature, **change})


def test_a_run_without_value_shares_keeps_its_earlier_body():
    """Runs stored before value_shares existed: same JSON, same digest, no conflict."""
    run = TrainingRun(
        model="m",
        version="v1",
        trained_at="2026-01-01T00:00:00Z",
        training_rows=3,
        features=[
            {
                "name": "x",
                "kind": "numeric",
                "count": 3,
                "missing_ratio": 0.0,
                "mean": 1.0,
                "stddev": 0.0,
                "min": 1.0,
                "max": 1.0,
            }
        ],
    )
    body = json.loads(run.canonical_json())
    assert "value_shares" not in body["features"][0]
    assert TrainingRun.model_validate_json(run.canonical_json()) == run


def test_category_shares_with_other_when_more_than_top_k(frame):
    city = _by_name(summarize_features(frame, top_k=20))["city"]
    expected = frame["city"].value_counts(normalize=True)  # over non-missing values
    assert frame["city"].nunique() == 30
    assert city.kind == "categorical"
    assert city.count == len(frame)
    assert city.missing_ratio == pytest.approx(frame["city"].isna().sum() / len(frame))
    assert len(city.categories) == 21 and OTHER in city.categories
    named = {k: v for k, v in city.categories.items() if k != OTHER}
    assert set(named) == set(expected.index[:20])  # the 20 most frequent (no ties at the edge here)
    for category, share in named.items():
        assert share == pytest.approx(expected[category], rel=1e-12)
    assert city.categories[OTHER] == pytest.approx(expected.iloc[20:].sum(), rel=1e-12)
    assert math.fsum(city.categories.values()) == pytest.approx(1.0, abs=1e-12)
    assert city.mean is None and city.percentiles == {}


def test_no_other_when_at_most_top_k_categories(frame):
    city = _by_name(summarize_features(frame, top_k=30))["city"]
    expected = frame["city"].value_counts(normalize=True)
    assert OTHER not in city.categories
    assert city.categories == pytest.approx(expected.to_dict(), rel=1e-12)
    assert math.fsum(city.categories.values()) == pytest.approx(1.0, abs=1e-12)


def test_category_dtype_counts_only_seen_categories(frame):
    grade = _by_name(summarize_features(frame))["grade"]
    assert grade.kind == "categorical"
    # "D" is a declared category with no row: no zero-share key.
    assert grade.categories == pytest.approx(frame["grade"].astype(str).value_counts(normalize=True).to_dict())
    assert set(grade.categories) == {"A", "B", "C"}


def test_bool_column_is_categorical_with_text_keys(frame):
    flag = _by_name(summarize_features(frame))["default_before"]
    expected = frame["default_before"].value_counts(normalize=True)
    assert flag.kind == "categorical"
    assert flag.categories == pytest.approx({"True": expected[True], "False": expected[False]})


def test_numeric_column_forced_categorical(frame):
    summaries = _by_name(summarize_features(frame, categorical=["segment"]))
    segment = summaries["segment"]
    assert segment.kind == "categorical"
    expected = frame["segment"].value_counts(normalize=True)
    assert segment.categories == pytest.approx({str(k): v for k, v in expected.items()})
    assert summaries["age"].kind == "numeric"


def test_unknown_forced_categorical_column_is_an_error(frame):
    with pytest.raises(ValueError, match="segmnet"):
        summarize_features(frame, categorical=["segmnet"])


def test_ties_broken_by_category_text():
    frame = pd.DataFrame({"c": ["b", "a", "c", "b", "a", "c", "d"]})
    c = summarize_features(frame, top_k=2)[0]
    # a, b, c are tied at 2 rows: a and b are kept, c and d go to __other__.
    assert c.categories == pytest.approx({"a": 2 / 7, "b": 2 / 7, OTHER: 3 / 7})


def test_nullable_and_missing_kinds_in_denominator():
    frame = pd.DataFrame(
        {
            "n": pd.array([1, None, 3, None], dtype="Int64"),
            "s": pd.array(["x", None, "y", "x"], dtype="string"),
            "t": pd.to_datetime(["2024-01-01", None, "2024-01-01", "2024-01-02"]),
        }
    )
    s = _by_name(summarize_features(frame))
    assert s["n"].kind == "numeric" and s["n"].missing_ratio == 0.5 and s["n"].mean == 2.0
    assert s["s"].kind == "categorical" and s["s"].missing_ratio == 0.25
    assert s["s"].categories == pytest.approx({"x": 2 / 3, "y": 1 / 3})
    assert s["t"].kind == "categorical" and s["t"].missing_ratio == 0.25  # NaT is missing


def test_all_missing_columns():
    frame = pd.DataFrame({"x": [np.nan] * 3, "c": pd.Series([None] * 3, dtype=object)})
    x, c = summarize_features(frame)
    assert (x.kind, x.count, x.missing_ratio) == ("numeric", 3, 1.0)
    assert (x.mean, x.stddev, x.min, x.max, x.percentiles) == (None, None, None, None, {})
    assert (c.kind, c.count, c.missing_ratio, c.categories) == ("categorical", 3, 1.0, {})


def test_empty_frame():
    frame = pd.DataFrame({"x": pd.Series([], dtype=float), "c": pd.Series([], dtype=object)})
    x, c = summarize_features(frame)
    assert (x.kind, x.count, x.missing_ratio, x.mean, x.percentiles) == ("numeric", 0, 0.0, None, {})
    assert (c.kind, c.count, c.missing_ratio, c.categories) == ("categorical", 0, 0.0, {})


def test_infinite_value_is_an_error_naming_the_row():
    frame = pd.DataFrame({"x": [0.5, np.inf, 1.0]}, index=[10, 11, 12])
    with pytest.raises(ValueError, match=r"'x'.*row 11.*inf"):
        summarize_features(frame)


def test_unreportable_category_is_an_error():
    with pytest.raises(ValueError, match="category ''"):
        summarize_features(pd.DataFrame({"c": ["", "", "a"]}))


# ---------------------------------------------------------------------------------------
# validation metrics


@pytest.mark.parametrize("seed", range(3))
def test_validation_metrics_match_sklearn_with_ties_and_extremes(seed):
    rng = np.random.default_rng(seed)
    score = np.round(rng.beta(2, 5, 3000), 2)  # many ties
    score[:20] = 0.0  # exact 0 and 1: clipped in the log loss, ordinary in the AUC
    score[20:40] = 1.0
    y = (rng.random(3000) < score).astype(int)
    y[0], y[20] = 1, 0  # a confident miss on each side: only the clipping keeps it finite
    rows, loss, auc = validation_metrics(y, score)
    assert rows == 3000
    clipped = np.clip(score, 1e-15, 1 - 1e-15)
    assert loss == pytest.approx(log_loss(y, clipped, labels=[0, 1]), rel=1e-12)
    assert auc == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_validation_metrics_accept_bools_float_labels_and_float32_scores():
    y = pd.Series([True, False, True, False])
    score = np.array([0.9, 0.2, 0.6, 0.7], dtype=np.float32)
    rows, loss, auc = validation_metrics(y, score)
    assert rows == 4
    assert loss == pytest.approx(log_loss(y, score.astype(np.float64)), rel=1e-12)
    assert auc == pytest.approx(roc_auc_score(y, score))
    assert validation_metrics([1.0, 0.0, 1.0, 0.0], score) == (rows, loss, auc)


@pytest.mark.parametrize("y", [[0, 0, 0], [1, 1, 1]])
def test_single_class_has_no_auc(y):
    score = [0.1, 0.4, 0.8]
    rows, loss, auc = validation_metrics(y, score)
    assert (rows, auc) == (3, None)
    assert loss == pytest.approx(log_loss(y, score, labels=[0, 1]), rel=1e-12)


def test_empty_validation_set():
    assert validation_metrics([], []) == (0, None, None)


@pytest.mark.parametrize(
    ("y", "score", "message"),
    [
        ([0, 1, 2, 1], [0.1] * 4, r"y_true\[2\] = .*2.* not a label"),
        ([0, 1, np.nan], [0.1] * 3, r"y_true\[2\] = .*nan"),
        (["0", "1"], [0.1] * 2, r"y_true\[0\] = .*'0'"),
        ([0, 1, 1], [0.1, np.nan, 0.2], r"y_score\[1\] = .*nan.* not a probability"),
        ([0, 1, 1], [0.1, 0.2, 1.5], r"y_score\[2\] = .*1\.5"),
        ([0, 1, 1], [-0.1, 0.2, 0.5], r"y_score\[0\] = .*-0\.1"),
        ([0, 1, 1], [0.1, None, 0.5], r"y_score\[1\] = None"),
        ([0, 1, 1], [0.1, "high", 0.5], r"y_score\[1\] = 'high'"),
        ([0, 1, 1], [0.1, 0.2], r"y_true has 3 values but y_score has 2"),
    ],
)
def test_invalid_validation_inputs(y, score, message):
    with pytest.raises(ValueError, match=message):
        validation_metrics(y, score)


# ---------------------------------------------------------------------------------------
# the run


def test_build_training_run_validates_and_round_trips(frame):
    y = np.array([0, 1, 1, 0, 1])
    score = np.array([0.2, 0.8, 0.4, 0.4, 1.0])
    run = build_training_run(
        model="car_loan",
        version="2026-11-28",
        trained_at="2026-11-28T03:00:00",
        training_data=frame,
        validation=(y, score),
        extra_metrics={"epochs": 12},
    )
    assert run.training_rows == len(frame)
    assert run.validation_rows == 5
    assert run.validation_logloss == pytest.approx(log_loss(y, np.clip(score, 1e-15, 1 - 1e-15)))
    assert run.validation_roc_auc == pytest.approx(roc_auc_score(y, score))
    assert [f.name for f in run.features] == list(frame.columns)
    assert run.trained_at.utcoffset().total_seconds() == 0  # naive means UTC
    assert TrainingRun.model_validate_json(run.canonical_json()) == run


def test_build_training_run_rows_override_and_requirements(frame):
    run = build_training_run(
        model="m", version="v1", trained_at="2026-01-01", training_data=frame.head(10), training_rows=10_000
    )
    assert run.training_rows == 10_000 and run.features[0].count == 10
    bare = build_training_run(model="m", version="v1", trained_at="2026-01-01", training_rows=5)
    assert (bare.features, bare.validation_rows, bare.validation_roc_auc) == ([], None, None)
    with pytest.raises(ValueError, match="training_data or training_rows"):
        build_training_run(model="m", version="v1", trained_at="2026-01-01")


def test_error_lines_name_key_paths():
    errors = [
        {"loc": ("body", "features", 2, "missing_ratio"), "msg": "Input should be less than or equal to 1"},
        {"loc": ("extra_metrics", "my metric"), "msg": "Value error, must be a finite number, got nan"},
        {"loc": (), "msg": "Invalid JSON"},
    ]
    assert error_lines(errors) == [
        "features[2].missing_ratio: Input should be less than or equal to 1",
        "extra_metrics['my metric']: must be a finite number, got nan",
        "(top level): Invalid JSON",
    ]


# ---------------------------------------------------------------------------------------
# mlmon report-training


def _valid_run() -> dict:
    return {"model": "car_loan", "version": "2026-11-28", "trained_at": "2026-11-28T00:00:00Z", "training_rows": 100}


def test_cli_invalid_file_exits_2_naming_key_paths(tmp_path):
    body = _valid_run() | {
        "training_rows": -1,
        "features": [{"name": "x", "kind": "numeric", "count": 10, "missing_ratio": 1.5}],
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(body))
    result = CliRunner().invoke(app, ["report-training", "--url", "http://127.0.0.1:9", str(path)])
    assert result.exit_code == 2, result.output
    assert "training_rows: Input should be greater than or equal to 0" in result.output
    assert "features[0].missing_ratio: Input should be less than or equal to 1" in result.output


def test_cli_malformed_json_exits_2(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("{not json")
    result = CliRunner().invoke(app, ["report-training", "--url", "http://127.0.0.1:9", str(path)])
    assert result.exit_code == 2
    assert "(top level): Invalid JSON" in result.output


def test_cli_unreachable_server_exits_1_naming_the_url(tmp_path, monkeypatch):
    monkeypatch.setattr("exporter.client.RETRY_DELAYS", (0.0,))  # retried once, at once
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_valid_run()))
    # Port 9 (discard) on loopback: nothing listens there on the test machines.
    result = CliRunner().invoke(app, ["report-training", "--url", "http://127.0.0.1:9", str(path)])
    assert result.exit_code == 1
    assert "cannot reach mlmon at http://127.0.0.1:9" in result.output


# ---------------------------------------------------------------------------------------
# reporting to the server (exporter.server.app's POST /api/v1/training-runs)

TOKEN = "s3cret-token-0123456789"


def _settings(tmp_path, **extra):
    from exporter.config import parse_settings

    model = {
        "name": "ctr",
        "predictions": {"store": "s", "table": "p", "columns": {"id": "id", "timestamp": "ts", "score": "p"}},
    }
    state = {"url": f"sqlite:///{tmp_path / 'state.sqlite'}"}
    return parse_settings({"stores": {"s": {"url": "sqlite://"}}, "models": [model], "state": state, **extra})


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A TestClient of the app with an open API (no token)."""
    from fastapi.testclient import TestClient

    from exporter.server.app import create_app

    monkeypatch.delenv("MLMON_API_TOKEN", raising=False)
    return TestClient(create_app(_settings(tmp_path)))


def _report(http, frame, **overrides):
    from exporter.client import report_training_run

    arguments = {
        "model": "car_loan",
        "version": "2026-11-28",
        "trained_at": "2026-11-28T03:00:00Z",
        "training_data": frame,
        "validation": ([0, 1, 1, 0], [0.1, 0.8, 0.35, 0.4]),
        "http": http,
    }
    return report_training_run("http://testserver/", **(arguments | overrides))


def test_report_created_then_unchanged_then_conflict(server, frame):
    from exporter.client import ReportError

    assert _report(server, frame) == {
        "status": "created",
        "model": "car_loan",
        "version": "2026-11-28",
        "in_config": False,  # the config has only 'ctr': stored all the same
    }
    assert _report(server, frame, model="ctr")["in_config"] is True
    assert _report(server, frame)["status"] == "unchanged"  # the same summary again: idempotent
    with pytest.raises(ReportError) as info:
        _report(server, frame, training_rows=5)
    assert info.value.status_code == 409
    assert "already stored with a different body" in str(info.value)
    stored = server.get("/api/v1/models/car_loan/versions").json()["versions"]
    assert [v["training_rows"] for v in stored] == [len(frame)]  # nothing overwritten
    assert stored[0]["validation_roc_auc"] == pytest.approx(roc_auc_score([0, 1, 1, 0], [0.1, 0.8, 0.35, 0.4]))


def test_report_with_token(tmp_path, frame, monkeypatch):
    from fastapi.testclient import TestClient

    from exporter.client import ReportError
    from exporter.server.app import create_app

    monkeypatch.delenv("MLMON_API_TOKEN", raising=False)
    http = TestClient(create_app(_settings(tmp_path, api={"token": TOKEN})))
    with pytest.raises(ReportError) as info:
        _report(http, frame)
    assert info.value.status_code == 401 and "bearer token" in info.value.detail
    assert str(info.value).endswith("; pass the token (token=, or --token) or set $MLMON_API_TOKEN"), info.value
    assert _report(http, frame, token=TOKEN)["status"] == "created"
    monkeypatch.setenv("MLMON_API_TOKEN", TOKEN)  # the default token
    assert _report(http, frame)["status"] == "unchanged"


def test_server_validation_errors_are_reported_by_key_path(server):
    from exporter.client import ReportError, post_training_run

    # Built without validation, to see the server's own 422 through the client.
    run = TrainingRun.model_construct(
        model="m",
        version="v",
        trained_at=datetime(2026, 1, 1, tzinfo=UTC),
        training_rows=-1,
        validation_rows=None,
        validation_logloss=None,
        validation_roc_auc=None,
        extra_metrics={},
        features=[],
    )
    with pytest.raises(ReportError) as info:
        post_training_run("http://testserver", run, http=server)
    assert info.value.status_code == 422
    assert "training_rows: Input should be greater than or equal to 0" in info.value.detail


def test_unreachable_server_raises_httpx_error():
    import httpx

    from exporter.client import post_training_run

    run = TrainingRun.model_validate(_valid_run())
    with pytest.raises(httpx.ConnectError):
        post_training_run("http://127.0.0.1:9", run, timeout=2.0, retry_delays=(0.0,))


def _answering(*answers):
    """An ``httpx.Client`` whose n-th request gets ``answers[n]``: a status, or an
    exception class to raise; ``sent`` collects the request bodies."""
    import httpx

    sent = []

    def handle(request):
        answer = answers[len(sent)]
        sent.append(request.content)
        if isinstance(answer, type):
            raise answer("simulated", request=request)
        return httpx.Response(
            answer, json={"status": "created", "model": "m", "version": "v"} if answer == 201 else {"detail": "no"}
        )

    return httpx.Client(transport=httpx.MockTransport(handle)), sent


def test_connection_errors_and_503_are_retried_with_the_same_body(monkeypatch):
    import httpx

    from exporter.client import RETRY_DELAYS, ReportError, post_training_run

    slept = []
    monkeypatch.setattr("exporter.client.time.sleep", slept.append)
    http, sent = _answering(httpx.ConnectError, httpx.RemoteProtocolError, 503, httpx.ReadTimeout, 502, 201)
    run = TrainingRun.model_validate(_valid_run())
    with pytest.raises(ReportError) as info:  # the default retries run out before the 201
        post_training_run("http://testserver", run, http=http)
    assert info.value.status_code == 502
    assert slept == list(RETRY_DELAYS) == [1.0, 2.0, 4.0, 8.0]
    http, sent = _answering(httpx.ConnectError, 503, 201)
    assert post_training_run("http://testserver", run, http=http, retry_delays=(0.5, 0.5))["status"] == "created"
    assert sent == [run.canonical_json().encode()] * 3  # identical bodies: the server stores the run once


def test_retry_after_is_honoured_and_credentials_stay_out_of_the_log(monkeypatch, caplog):
    import httpx

    from exporter.client import post_training_run

    slept = []
    monkeypatch.setattr("exporter.client.time.sleep", slept.append)
    answers = iter(
        [
            httpx.Response(503, headers={"Retry-After": "5"}, json={"detail": "busy"}),
            httpx.Response(503, headers={"Retry-After": "3600"}, json={"detail": "busy"}),
            httpx.Response(201, json={"status": "created"}),
        ]
    )
    http = httpx.Client(transport=httpx.MockTransport(lambda request: next(answers)))
    run = TrainingRun.model_validate(_valid_run())
    with caplog.at_level("WARNING"):
        post_training_run("http://user:s3cret@testserver", run, http=http, retry_delays=(1.0, 1.0))
    assert slept == [5.0, 60.0]  # the server's wait when longer, capped at a minute
    assert "retrying" in caplog.text and "s3cret" not in caplog.text and "user" not in caplog.text


@pytest.mark.parametrize("status", [401, 404, 409, 413, 422, 500])
def test_rejections_are_not_retried(monkeypatch, status):
    from exporter.client import ReportError, post_training_run

    monkeypatch.setattr("exporter.client.time.sleep", lambda _: pytest.fail("slept"))
    http, sent = _answering(status)
    with pytest.raises(ReportError) as info:
        post_training_run("http://testserver", TrainingRun.model_validate(_valid_run()), http=http)
    assert info.value.status_code == status and len(sent) == 1


def test_exhausted_retries_raise_the_last_connection_error(monkeypatch):
    import httpx

    from exporter.client import post_training_run

    monkeypatch.setattr("exporter.client.time.sleep", lambda _: None)
    http, sent = _answering(httpx.ConnectError, httpx.ConnectError)
    with pytest.raises(httpx.ConnectError):
        post_training_run("http://testserver", TrainingRun.model_validate(_valid_run()), http=http, retry_delays=(1.0,))
    assert len(sent) == 2


@pytest.fixture
def live_url(tmp_path, monkeypatch):
    """mlmon served by uvicorn on a free loopback port (the CLI opens its own connection)."""
    import socket
    import threading
    import time

    import uvicorn

    from exporter.server.app import create_app

    monkeypatch.delenv("MLMON_API_TOKEN", raising=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # lifespan off: no refresh loop against the empty prediction store, only the API.
    server = uvicorn.Server(
        uvicorn.Config(create_app(_settings(tmp_path)), port=port, lifespan="off", log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_cli_reports_to_a_live_server(tmp_path, live_url, frame):
    run = build_training_run(model="car_loan", version="2026-11-28", trained_at="2026-11-28", training_data=frame)
    path = tmp_path / "run.json"
    path.write_text(run.canonical_json())
    runner = CliRunner()
    first = runner.invoke(app, ["report-training", "--url", live_url, str(path)])
    aside = " (model 'car_loan' is not in mlmon's config)"  # the config has only 'ctr'
    assert (first.exit_code, first.output) == (0, f"created car_loan 2026-11-28{aside}\n")
    again = runner.invoke(app, ["report-training", "--url", live_url, str(path)])
    assert (again.exit_code, again.output) == (0, f"unchanged car_loan 2026-11-28{aside}\n")
    path.write_text(json.dumps(json.loads(run.canonical_json()) | {"training_rows": 1}))
    conflict = runner.invoke(app, ["report-training", "--url", live_url, str(path)])
    assert conflict.exit_code == 1
    assert f"{live_url}: mlmon rejected the training run (HTTP 409)" in conflict.output


#: What a pipeline that only reports runs must not need installed (the service's stack, the loader's).
SERVICE_ONLY_MODULES = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "pyarrow", "rich", "typer")


def test_client_does_not_pull_the_service_in():
    """``import exporter.client`` loads none of the service's packages, and it still builds and
    serializes a run when they are absent: each is made unimportable, as if not installed
    (pandas imports pyarrow and httpx imports rich when they are installed, and both carry on
    without them)."""
    code = f"""
import sys
names = {SERVICE_ONLY_MODULES!r}

class Absent:
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in names:
            raise ImportError(f"{{fullname}} is not installed")
        return None

sys.meta_path.insert(0, Absent())
import pandas as pd
from datetime import datetime, timezone
from exporter.client import build_training_run
run = build_training_run(
    model="m", version="v1", trained_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
    training_data=pd.DataFrame({{"x": [1.0, 2.0, 3.0]}}), validation=([0, 1, 1], [0.2, 0.7, 0.9]),
)
print(run.model_dump_json())
print(sorted(n for n in names if n in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    run_json, loaded = done.stdout.splitlines()
    assert json.loads(run_json)["training_rows"] == 3
    assert loaded == "[]"

    plain = "import sys, exporter.client; print(sorted(m for m in ('fastapi', 'uvicorn', 'sqlalchemy', 'alembic') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
