"""The training-run API fuzzed from its own OpenAPI document (schemathesis): whatever the
body, path or headers, it answers with a client error or success, never a server error.
And runs near every edge (hypothesis), each followed by a training refresh: what the API
accepts, the refresh handles, and no run stops the other models' metrics."""

from __future__ import annotations

import math
import tempfile
from datetime import UTC, datetime, timedelta, timezone

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import parse_settings
from exporter.server.app import create_app
from exporter.server.collector import build_registry, render
from exporter.snapshot import SnapshotStore
from exporter.training.metrics import TrainingRefresher
from exporter.training.schema import TrainingRun
from exporter.training.storage import StateDatabase, save_run

# The app is built at import, for schemathesis to read its schema; its state directory is
# removed when the test process exits (a bare mkdtemp left one per run and worker).
_STATE_DIR = tempfile.TemporaryDirectory(prefix="mlmon-api-fuzz-")
STATE = f"sqlite:///{_STATE_DIR.name}/state.sqlite"
app = create_app(parse_settings({"stores": {}, "models": [], "state": {"url": STATE}}))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=60, deadline=None)
@pytest.mark.long
def test_no_server_error(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.text[:300])


# Runs near and past every edge the API checks, posted one after another to one state
# database (so versions pile up and are compared), each followed by a training refresh.
_EXTREME = st.one_of(
    st.sampled_from([0.0, -0.0, 1e-308, 5e-324, 1e308, -1e308, 1.0, 0.5]),
    st.floats(allow_nan=False, allow_infinity=False),
)
_FEATURE = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y"]),
        "kind": st.sampled_from(["numeric", "categorical"]),
        "count": st.sampled_from([0, 1, 10, 2**63 - 1]),
        "missing_ratio": st.sampled_from([0.0, 0.5, 1.0]),
    },
    optional={
        "mean": _EXTREME,
        "stddev": _EXTREME,
        "min": _EXTREME,
        "max": _EXTREME,
        "percentiles": st.dictionaries(st.sampled_from(["1", "10", "50", "90", "99"]), _EXTREME, max_size=5),
        "categories": st.dictionaries(
            st.sampled_from(["a", "b", "__other__"]), st.sampled_from([0.0, 0.5, 1.0]), max_size=3
        ),
    },
)
_TIMES = st.datetimes(
    min_value=datetime(1, 1, 1),
    max_value=datetime(9999, 12, 31, 23, 59, 59),
    timezones=st.sampled_from(
        [None, UTC, timezone(timedelta(hours=1)), timezone(timedelta(hours=-1)), timezone(timedelta(hours=14))]
    ),
)
_RUN = st.fixed_dictionaries(
    {
        "model": st.just("fuzzed"),
        "version": st.text("abv1", min_size=1, max_size=3),
        "trained_at": st.one_of(_TIMES, st.sampled_from([datetime(1, 1, 10, tzinfo=UTC), datetime(1970, 1, 1)])).map(
            datetime.isoformat
        ),
        "training_rows": st.sampled_from([0, 1, 1000, 2**63 - 1]),
    },
    optional={
        "validation_rows": st.sampled_from([0, 1, 2**63 - 1]),
        "validation_logloss": _EXTREME,
        "validation_roc_auc": st.sampled_from([0.0, 0.5, 1.0]),
        "extra_metrics": st.dictionaries(st.sampled_from(["m"]), _EXTREME, max_size=1),
        "features": st.lists(_FEATURE, max_size=2),
    },
)


def test_every_run_the_api_accepts_is_refreshed_and_never_stops_other_models(tmp_path_factory):
    state = f"sqlite:///{tmp_path_factory.mktemp('refresh-fuzz')}/state.sqlite"
    # the test refreshes itself; the app's own loop only every hour
    config = parse_settings({"stores": {}, "models": [], "state": {"url": state}, "refresh_interval": "1h"})
    database = StateDatabase(state)
    steady = TrainingRun(
        model="steady", version="s1", trained_at="2026-11-01T00:00:00Z", training_rows=1000, validation_logloss=0.3
    )
    save_run(database.ready(), steady, datetime.now(UTC))
    refresher = TrainingRefresher(database, config.training, config.refresh_policy)
    as_of = datetime(9999, 1, 1, tzinfo=UTC)  # every stored run is trained by then

    @given(run=_RUN)
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def posted_then_refreshed(client, run):
        answer = client.post("/api/v1/training-runs", json=run)
        assert answer.status_code in (200, 201, 409, 422), (answer.status_code, answer.text[:300])
        training = refresher.refresh(as_of)
        assert training.up, run
        store = SnapshotStore([])
        store.put_training(training)
        text = render(build_registry(store, config.thresholds)).decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }
        assert samples[("mlmon_training_rows", (("model", "steady"),))] == 1000
        assert samples[("mlmon_offline_logloss", (("model", "steady"),))] == 0.3
        assert all(math.isfinite(v) for v in samples.values()), [k for k, v in samples.items() if not math.isfinite(v)]
        if answer.status_code == 201:
            # every accepted run is exported, and its model's metrics are computed without error
            assert "fuzzed" in training.models, run
            assert training.model_errors.get("fuzzed", 0) == 0, run
            assert samples.get(("mlmon_training_errors_total", (("model", "fuzzed"),)), 0) == 0, run

    with TestClient(create_app(config)) as client:
        posted_then_refreshed(client)
    database.engine.dispose()
