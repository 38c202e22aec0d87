"""One model's stored training runs never stop the training metrics of the others: what
the API accepts every later stage handles, a run it would refuse today (stored by an older
mlmon) is isolated to its model, and operators can delete a bad run. On a SQLite and a
PostgreSQL state database."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import parse_settings
from exporter.monitoring_math import ratio
from exporter.server.app import create_app
from exporter.server.collector import build_registry, render
from exporter.snapshot import SnapshotStore
from exporter.training.metrics import TrainingRefresher
from exporter.training.schema import TrainingRun
from exporter.training.storage import StateDatabase, load_histories, save_run, training_runs
from tests.conftest import stalled_on_a_lock

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
TOKEN = "t0ken-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def settings_for(state_url: str, token: str | None = None, **training):
    api = {"token": token} if token else {}
    return parse_settings({"stores": {}, "models": [], "state": {"url": state_url}, "api": api, "training": training})


def body(model="ctr", version="v1", trained_at="2026-11-28T10:00:00Z", **changes) -> dict:
    run = {
        "model": model,
        "version": version,
        "trained_at": trained_at,
        "training_rows": 1000,
        "validation_rows": 200,
        "validation_logloss": 0.31,
        "validation_roc_auc": 0.74,
    }
    run.update(changes)
    return run


def exposition(refresher: TrainingRefresher, settings, now=NOW) -> dict:
    """(name, frozenset of labels) -> value of the training refresh at ``now``, rendered."""
    store = SnapshotStore([])
    store.put_training(refresher.refresh(now))
    text = render(build_registry(store, settings.thresholds)).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def store_bypassing_validation(engine: sa.Engine, run: dict) -> None:
    """Insert a run as an older mlmon, which validated less, may have stored it."""
    text = json.dumps(run, sort_keys=True, separators=(",", ":"))
    trained_at = datetime.fromisoformat(run["trained_at"])
    with engine.begin() as conn:
        conn.execute(
            training_runs.insert().values(
                model=run["model"],
                version=run["version"],
                trained_at=trained_at,
                training_rows=run["training_rows"],
                validation_rows=run["validation_rows"],
                validation_logloss=run["validation_logloss"],
                validation_roc_auc=run["validation_roc_auc"],
                body=text,
                body_sha256=hashlib.sha256(text.encode()).hexdigest(),
                received_at=NOW,
            )
        )


@pytest.mark.parametrize(
    "trained_at",
    [
        "0001-01-10T00:00:00Z",  # stored before: then 30 days before it overflowed every refresh
        "0001-01-01T00:00:00+01:00",  # its UTC conversion overflows: was a 500
        "9999-12-31T23:59:59-01:00",  # likewise, past the last datetime: was a 500
        "1969-12-31T23:59:59.999999Z",
        "9999-01-01T00:00:00Z",
    ],
)
def test_trained_at_outside_1970_to_9999_is_a_422_naming_the_key(state_url, trained_at):
    with TestClient(create_app(settings_for(state_url))) as client:
        response = client.post("/api/v1/training-runs", json=body(trained_at=trained_at))
        assert response.status_code == 422, response.text
        (problem,) = response.json()["detail"]
        assert problem["loc"] == "trained_at" and "between 1970-01-01" in problem["msg"]
        assert client.get("/api/v1/models").json() == {"models": []}


@pytest.mark.parametrize(
    "trained_at", ["1970-01-01T00:00:00Z", "1970-01-01T01:00:00+01:00", "9998-12-31T23:59:59.999999Z"]
)
def test_the_edges_of_the_trained_at_range_are_stored_and_exported(state_url, trained_at):
    settings = settings_for(state_url)
    with TestClient(create_app(settings)) as client:
        assert client.post("/api/v1/training-runs", json=body(trained_at=trained_at)).status_code == 201
        assert client.post("/api/v1/training-runs", json=body(model="steady", version="s1")).status_code == 201
    database = StateDatabase(state_url)
    got = exposition(
        TrainingRefresher(database, settings.training, settings.refresh_policy),
        settings,
        now=datetime(9999, 1, 1, tzinfo=UTC),
    )
    database.engine.dispose()
    expected = datetime.fromisoformat(trained_at).timestamp()
    assert value(got, "mlmon_model_trained_timestamp_seconds", model="ctr") == expected
    assert value(got, "mlmon_training_errors_total", model="ctr") == 0
    assert value(got, "mlmon_state_up") == 1


def test_a_stored_run_the_api_now_refuses_is_isolated_to_its_model_and_deleted_by_the_operator(state_url, caplog):
    settings = settings_for(state_url, token=TOKEN)
    database = StateDatabase(state_url)
    engine = database.ready()
    save_run(engine, TrainingRun(**body(model="steady", version="s1")), NOW)
    save_run(
        engine,
        TrainingRun(**body(model="ctr", version="older", trained_at="2026-10-01T00:00:00Z", training_rows=800)),
        NOW,
    )
    save_run(engine, TrainingRun(**body(model="ctr", version="good", trained_at="2026-11-01T00:00:00Z")), NOW)
    # the reproduction, as an older mlmon stored it: 30 days before it is before year 1
    store_bypassing_validation(engine, body(model="ancient", version="year-1", trained_at="0001-01-10T00:00:00+00:00"))
    # and a newest run of ctr that today's validation refuses
    store_bypassing_validation(engine, body(model="ctr", version="bad-logloss", validation_logloss=-1.0))
    refresher = TrainingRefresher(database, settings.training, settings.refresh_policy)
    with caplog.at_level(logging.WARNING, logger="exporter.training.metrics"):
        first = exposition(refresher, settings)
        second = exposition(refresher, settings)
    for got in (first, second):
        assert value(got, "mlmon_state_up") == 1
        assert value(got, "mlmon_training_rows", model="steady") == 1000
        assert value(got, "mlmon_training_rows", model="ctr") is None  # no half-made metrics of ctr
        assert value(got, "mlmon_model_trained_timestamp_seconds", model="ancient") is None
    assert value(first, "mlmon_training_errors_total", model="ctr") == 1
    assert value(second, "mlmon_training_errors_total", model="ctr") == 2
    assert value(second, "mlmon_training_errors_total", model="ancient") == 2
    assert value(second, "mlmon_training_errors_total", model="steady") == 0
    for model, key in (("ctr", "validation_logloss"), ("ancient", "trained_at")):
        warnings = [r.getMessage() for r in caplog.records if f"model {model}:" in r.getMessage()]
        assert len(warnings) == 1 and key in warnings[0], warnings  # logged once, naming the key

    with TestClient(create_app(settings)) as client:
        path = "/api/v1/models/ctr/versions/bad-logloss"
        assert client.delete(path).status_code == 401
        assert client.delete(path, headers={"Authorization": "Bearer " + TOKEN[:-1] + "X"}).status_code == 401
        assert client.delete("/api/v1/models/ctr/versions/nope", headers=AUTH).status_code == 404
        assert client.delete("/api/v1/models/nope/versions/bad-logloss", headers=AUTH).status_code == 404
        deleted = client.delete(path, headers=AUTH)
        assert deleted.status_code == 200 and deleted.json() == {
            "status": "deleted",
            "model": "ctr",
            "version": "bad-logloss",
        }
        assert client.delete(path, headers=AUTH).status_code == 404
        listed = client.get("/api/v1/models/ctr/versions", headers=AUTH).json()["versions"]
        assert [v["version"] for v in listed] == ["good", "older"]
        assert client.delete("/api/v1/models/ancient/versions/year-1", headers=AUTH).status_code == 200
    got = exposition(refresher, settings)
    assert value(got, "mlmon_model_info", model="ctr", version="good") == 1  # back, the previous version newest
    assert value(got, "mlmon_training_rows_change_ratio", model="ctr", baseline="previous_version") == 1000 / 800
    assert value(got, "mlmon_training_rows_change_ratio", model="ctr", baseline="30d") == 1000 / 800
    assert value(got, "mlmon_training_errors_total", model="ctr") == 2  # a counter: kept
    assert not [k for k in got if dict(k[1]).get("model") == "ancient"]  # its runs are gone: no series at all
    database.engine.dispose()


def test_a_failing_psi_computation_is_isolated_or_computed(state_url):
    """Two versions of a numeric feature whose values are all missing with only ``min``
    given (the issue's reproduction): the API accepts them, so the refresh exports them
    without an error (PSI 0: all rows in the missing bin on both sides), and the other
    model is exported."""
    settings = settings_for(state_url)
    empty = {"name": "x", "kind": "numeric", "count": 10, "missing_ratio": 1.0, "min": 0.0}
    with TestClient(create_app(settings)) as client:
        for version, day in (("a", "26"), ("b", "27")):
            sent = client.post(
                "/api/v1/training-runs",
                json=body(version=version, trained_at=f"2026-11-{day}T00:00:00Z", features=[empty]),
            )
            assert sent.status_code == 201, sent.text
        assert client.post("/api/v1/training-runs", json=body(model="steady", version="s1")).status_code == 201
    database = StateDatabase(state_url)
    got = exposition(TrainingRefresher(database, settings.training, settings.refresh_policy), settings)
    database.engine.dispose()
    assert value(got, "mlmon_state_up") == 1
    assert value(got, "mlmon_training_rows", model="steady") == 1000
    assert value(got, "mlmon_model_info", model="ctr", version="b") == 1
    assert not value(got, "mlmon_training_errors_total", model="ctr")
    assert value(got, "mlmon_training_feature_psi", model="ctr", feature="x") == 0.0


def test_a_change_ratio_that_overflows_is_absent_not_inf(state_url):
    settings = settings_for(state_url)
    database = StateDatabase(state_url)
    save_run(
        database.ready(),
        TrainingRun(**body(version="a", trained_at="2026-11-27T00:00:00Z", validation_logloss=1e-308)),
        NOW,
    )
    save_run(database.ready(), TrainingRun(**body(version="b", validation_logloss=1e308)), NOW)
    got = exposition(TrainingRefresher(database, settings.training, settings.refresh_policy), settings)
    database.engine.dispose()
    assert math.isinf(1e308 / 1e-308)  # in float arithmetic the ratio is +Inf: undefined
    assert value(got, "mlmon_offline_logloss_change_ratio", model="ctr", baseline="previous_version") is None
    assert value(got, "mlmon_offline_logloss", model="ctr") == 1e308
    assert value(got, "mlmon_training_rows_change_ratio", model="ctr", baseline="previous_version") == 1.0
    assert all(math.isfinite(v) for v in got.values())


@pytest.mark.parametrize(
    "numerator, denominator, expected",
    [
        (1e308, 1e-308, None),
        (-1e308, 1e-308, None),
        (1.0, 3.0, 1 / 3),
        (0.0, 2.0, 0.0),
        (1.0, 0.0, None),
        (None, 1.0, None),
        (10**400, 1, None),
        (2**63 - 1, 1, float(2**63 - 1)),
    ],
)
def test_ratio_is_undefined_when_not_a_finite_float(numerator, denominator, expected):
    assert ratio(numerator, denominator) == expected


def test_a_30d_baseline_exactly_720_hours_older_counts_and_a_microsecond_younger_does_not(state_url):
    """The baseline cutoff is computed in SQL, in the database's session time zone: on
    PostgreSQL that zone is Europe/Paris here, across the end of summer time, where
    '30 days' would be 721 hours."""
    if state_url.startswith("postgresql"):
        state_url += "%20-ctimezone%3DEurope/Paris"
    newest = datetime(2026, 11, 10, 12, 0, 0, 250000, tzinfo=UTC)
    database = StateDatabase(state_url)
    engine = database.ready()
    runs = [
        ("older", newest - timedelta(hours=720, microseconds=1), 500),
        ("exact", newest - timedelta(hours=720), 800),
        ("younger", newest - timedelta(hours=720) + timedelta(microseconds=1), 900),
        ("new", newest, 1000),
    ]
    for version, trained_at, rows in runs:
        save_run(
            engine, TrainingRun(**body(version=version, trained_at=trained_at.isoformat(), training_rows=rows)), NOW
        )
    histories, failures = load_histories(engine, 10, NOW)
    assert failures == {}
    assert histories["ctr"].month_ago.version == "exact"
    assert [r.version for r in histories["ctr"].recent] == ["new", "younger", "exact", "older"]
    save_run(
        engine, TrainingRun(**body(version="newer", trained_at=(newest + timedelta(microseconds=1)).isoformat())), NOW
    )
    histories, _ = load_histories(engine, 10, NOW)
    assert histories["ctr"].month_ago.version == "younger"
    database.engine.dispose()


def test_training_history_is_read_in_two_queries_whatever_the_number_of_models(state_url):
    database = StateDatabase(state_url)
    engine = database.ready()
    for i in range(30):
        for day in (40, 1, 0):
            trained_at = (NOW - timedelta(days=day, minutes=i)).isoformat()
            save_run(
                engine,
                TrainingRun(
                    **body(model=f"m{i}", version=f"d{day}", trained_at=trained_at, training_rows=1000 + i + day)
                ),
                NOW,
            )
    statements = []
    sa.event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    histories, failures = load_histories(engine, 2, NOW)
    assert len(statements) == 2 and failures == {}
    assert sorted(histories) == sorted(f"m{i}" for i in range(30))
    for i in range(30):
        history = histories[f"m{i}"]
        assert [r.version for r in history.recent] == ["d0", "d1"]
        assert [r.run is not None for r in history.recent] == [True, True]
        assert history.month_ago.version == "d40" and history.month_ago.training_rows == 1040 + i
    database.engine.dispose()


def test_runs_of_more_models_than_training_max_models_are_refused_and_counted(state_url):
    settings = settings_for(state_url, max_models=2)
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.post("/api/v1/training-runs", json=body(model="a")).status_code == 201
        assert client.post("/api/v1/training-runs", json=body(model="b")).status_code == 201
        refused = client.post("/api/v1/training-runs", json=body(model="c"))
        assert refused.status_code == 409 and "training.max_models = 2" in refused.json()["detail"]
        assert (
            client.post("/api/v1/training-runs", json=body(model="a", version="v2")).status_code == 201
        )  # known model
        assert client.post("/api/v1/training-runs", json=body(model="b")).status_code == 200  # the same run again
        assert client.get("/api/v1/models").json() == {"models": ["a", "b"]}
        text = render(build_registry(app.state.snapshots, settings.thresholds)).decode()
        assert 'mlmon_training_runs_refused_total{reason="max_models"} 1.0' in text.splitlines()
        assert client.delete("/api/v1/models/b/versions/v1").status_code == 200  # room for one more
        assert client.post("/api/v1/training-runs", json=body(model="c")).status_code == 201


def test_a_hung_training_refresh_counts_one_timeout(postgres_schema, postgres_engine):
    """The state database's table locked: reported stalled twice, then cancelled at the
    statement timeout; one timeout counted, not one per report plus the cancellation."""
    url, schema = postgres_schema
    database = StateDatabase(f"{url}?options=-csearch_path%3D{schema}", timeout=2)
    save_run(database.ready(), TrainingRun(**body()), NOW)
    settings = settings_for(url)
    refresher = TrainingRefresher(database, settings.training, settings.refresh_policy)
    assert refresher.refresh(NOW).up
    with stalled_on_a_lock(
        postgres_engine, schema, "mlmon_training_runs", lambda: refresher.refresh(NOW), "the training refresh"
    ) as result:
        stalled = [refresher.stalled(NOW), refresher.stalled(NOW)]
    assert [s.up for s in stalled] == [False, False] and all("ctr" in s.models for s in stalled)  # kept: staleness
    assert {r: n for r, n in result["result"].errors.items() if n} == {"timeout": 1}
    assert result["result"].up is False
    assert refresher.refresh(NOW).errors["timeout"] == 1  # the next refresh succeeds, nothing more counted
    database.engine.dispose()
