"""Real input: NannyML's car loan data (a committed slice), loaded with `mlmon load`,
monitored with `mlmon once --as-of`, checked against scikit-learn on exactly the rows
of the window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import log_loss, roc_auc_score
from typer.testing import CliRunner

from exporter.cli import app
from tests.conftest import REPO, TEST_DATA, require

DATA = TEST_DATA / "car_loan"
AS_OF = pd.Timestamp("2018-11-10T00:00:00Z")
WINDOWS = {"24h": pd.Timedelta(hours=24), "7d": pd.Timedelta(days=7)}


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """(url, schema or None) of an empty database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/car_loan.sqlite", None
    return request.getfixturevalue("postgres_schema")


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_car_loan_window_matches_scikit_learn(target, tmp_path):
    url, schema = target
    schema_args = ["--schema", schema] if schema else []
    _run("load", "--url", url, "--table", "predictions", *schema_args, str(DATA / "synthetic_car_loan_analysis.csv"))
    _run("load", "--url", url, "--table", "labels", *schema_args, str(DATA / "synthetic_car_loan_analysis_target.csv"))
    schema_line = f"schema: {schema}, " if schema else ""
    config = tmp_path / "mlmon.yml"
    config.write_text(
        f"""
stores: {{warehouse: {{url: "{url}"}}}}
models:
  - name: car_loan
    predictions: {{store: warehouse, {schema_line}table: predictions, columns: {{id: id, timestamp: timestamp, score: y_pred_proba}}}}
    labels: {{store: warehouse, {schema_line}table: labels, columns: {{id: id, label: repaid}}}}
    windows: [24h, 7d]
    label_delay: 0s
"""
    )
    _run("check-config", "--config", str(config))
    exposition = _run("once", "--config", str(config), "--as-of", AS_OF.isoformat())
    samples = {
        (s.name, s.labels.get("window")): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.labels.get("model") == "car_loan"
    }

    served = pd.read_csv(DATA / "synthetic_car_loan_analysis.csv", parse_dates=["timestamp"])
    truth = pd.read_csv(DATA / "synthetic_car_loan_analysis_target.csv")
    served["timestamp"] = served["timestamp"].dt.tz_localize("UTC")  # naive means UTC
    rows = served.merge(truth, on="id", how="left")
    assert rows["y_pred_proba"].isin([0.0, 1.0]).any()  # the clipping and tie cases are really exercised

    for window, span in WINDOWS.items():
        in_window = rows[(rows["timestamp"] >= AS_OF - span) & (rows["timestamp"] < AS_OF)]
        p, y = in_window["y_pred_proba"].to_numpy(np.float64), in_window["repaid"].to_numpy()
        assert len(in_window) > 100
        assert samples[("mlmon_window_predictions", window)] == len(in_window)
        assert samples[("mlmon_online_labeled_predictions", window)] == len(in_window)
        assert samples[("mlmon_prediction_score_mean", window)] == pytest.approx(p.mean(), abs=1e-12)
        assert samples[("mlmon_online_logloss", window)] == pytest.approx(
            log_loss(y, np.clip(p, 1e-15, 1 - 1e-15)), abs=1e-9
        )
        assert ("mlmon_online_roc_auc_error_bound", window) not in samples  # two decimals: exact
        assert samples[("mlmon_online_roc_auc", window)] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
        assert samples[("mlmon_online_positive_ratio", window)] == pytest.approx(y.mean(), abs=1e-12)


@pytest.mark.parametrize(
    "shell",
    [
        pytest.param(["bash", "-euo", "pipefail"], id="bash", marks=pytest.mark.long),
        pytest.param(["dash", "-eu"], id="dash", marks=pytest.mark.long),
    ],
)
def test_readme_worked_example_as_written(tmp_path, shell):
    """The README's car_loan commands, run verbatim by bash, and by dash (a POSIX sh, as
    Debian's /bin/sh), from the clone's root: they pass, leave nothing in the clone, and
    print the numbers the README states."""
    import shutil

    require(shutil.which(shell[0]) is not None, f"{shell[0]} not installed (Debian package {shell[0]})")
    import os
    import re
    import subprocess
    import sys

    from tests.conftest import free_port

    root = REPO
    readme = (root / "README.md").read_text()
    section = readme[readme.index("### Historical data") :]
    # The short-lived server that takes the training run listens on a free port, not the README's.
    script = re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1).replace("9849", str(free_port()))
    before = set(os.listdir(root))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
    }
    done = subprocess.run(
        [*shell, "-c", script],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert set(os.listdir(root)) == before  # car_loan.db, car_loan.yml and the state database went elsewhere
    assert "car_loan.yml: OK (1 model(s), 1 store(s))" in done.stdout

    # Quoted as printed (1307.0, not 1307), so that a reader can find it in the output.
    stated = re.search(r'`mlmon_future_predictions\{model="car_loan"\} (\S+)`', section).group(1)
    printed = re.search(r'^mlmon_future_predictions\{model="car_loan"\} (\S+)$', done.stdout, re.MULTILINE).group(1)
    served = pd.read_csv(DATA / "synthetic_car_loan_analysis.csv", parse_dates=["timestamp"])
    ahead = int((served["timestamp"].dt.tz_localize("UTC") >= AS_OF + pd.Timedelta(minutes=1)).sum())
    assert stated == printed and float(printed) == ahead
    assert "runs to 17 November" in section and served["timestamp"].max().strftime("%d %B") == "17 November"
    # The skew lines quoted are printed verbatim (the reference reported through report-training)
    quoted = re.search(
        r"```text\n(.*?)```", section[section.index("Training/serving skew on the same data") :], re.DOTALL
    )
    lines = quoted.group(1).splitlines()
    assert len(lines) == 6 and all(line in done.stdout.splitlines() for line in lines), lines
    psi = [
        float(v) for v in re.findall(r'^mlmon_feature_skew_psi\{[^}]*window="7d"\} (\S+)$', done.stdout, re.MULTILINE)
    ]
    assert len(psi) == 7 and max(psi) < 0.011
