"""The mlmon-client distribution (client/pyproject.toml, built by scripts/build-client):
installed alone into a fresh venv, exporter.client works and the service's dependencies
are absent. Marked slow (a fresh venv and pip install take about 40 s); .ci/run runs it
with the load test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # builds and installs into a fresh venv

#: Installed with the service (pyproject.toml), never with the client.
SERVICE_ONLY = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "pyarrow", "rich", "typer", "prometheus_client")

SCRIPT = """
import importlib.util, json, sys
import httpx
import pandas as pd
from exporter.client import build_training_run, post_training_run

absent = [name for name in sys.argv[1].split(",") if importlib.util.find_spec(name) is not None]
frame = pd.DataFrame({"device": ["mobile", "desktop", "mobile", None], "hour": [1.0, 5.0, 9.0, 13.0]})
run = build_training_run(
    model="ctr", version="v1", trained_at="2026-11-28T02:00:00Z", training_data=frame,
    validation=([0, 1, 1, 0, 1], [0.2, 0.7, 0.6, 0.4, 0.9]),
)
seen = []

def handler(request):
    seen.append(json.loads(request.content))
    return httpx.Response(201, json={"status": "created", "in_config": True})

answer = post_training_run("http://mlmon.invalid", run, token="t" * 16, http=httpx.Client(transport=httpx.MockTransport(handler)))
print(json.dumps({"present": absent, "answer": answer, "posted": seen[0]}))
"""


def test_the_client_wheel_works_alone_without_the_service(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    built = subprocess.run(
        [str(REPO / "scripts" / "build-client"), str(tmp_path / "dist")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    wheel = built.stdout.split()[-1]
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    installed = subprocess.run([python, "-m", "pip", "install", "-q", wheel], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    result = subprocess.run(
        [python, "-c", SCRIPT, ",".join(SERVICE_ONLY)], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["present"] == []  # not one of the service's packages came with the client
    assert out["answer"] == {"status": "created", "in_config": True}
    posted = out["posted"]
    y, p = np.array([0, 1, 1, 0, 1]), np.array([0.2, 0.7, 0.6, 0.4, 0.9])
    assert posted["validation_rows"] == 5
    assert posted["validation_logloss"] == pytest.approx(log_loss(y, p), rel=1e-12)
    assert posted["validation_roc_auc"] == pytest.approx(roc_auc_score(y, p), rel=1e-12)
    assert (posted["model"], posted["version"], posted["training_rows"]) == ("ctr", "v1", 4)
    device = next(f for f in posted["features"] if f["name"] == "device")
    assert device["missing_ratio"] == pytest.approx(0.25)
    assert device["categories"] == pytest.approx({"mobile": 2 / 3, "desktop": 1 / 3})
