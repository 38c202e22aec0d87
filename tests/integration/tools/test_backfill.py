"""``mlmon backfill`` on real input: the car_loan slice and three training runs backfilled
with the real promtool into a data directory, served by the real Prometheus, and every
sampled value compared with ``mlmon once --as-of`` at that instant (counters with pandas).
The range crosses a UTC day (two files) and two training runs; it is written in two runs
(the second continues the first) and a third, overlapping run is refused."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from exporter.cli import app
from exporter.client import build_training_run
from exporter.config import load_settings
from exporter.predictions.slices import SliceStore
from exporter.tools.backfill import NOT_HISTORY, Evaluator, with_time_slices
from exporter.training.storage import migrate, save_run
from tests.conftest import REPO, TEST_DATA, free_port, require, start_process, wait_until_answers

DATA = TEST_DATA / "car_loan"
START, MIDDLE, END = (pd.Timestamp(t) for t in ("2018-11-09T20:00Z", "2018-11-10T01:00Z", "2018-11-10T04:00Z"))
STEP = pd.Timedelta(hours=1)
INSTANTS = list(pd.date_range(START, END - STEP, freq=STEP))
#: (version, trained_at, training rows): v2 trained on under half of v1's rows, inside the range.
RUNS = [("v0", "2018-10-09T12:00Z", 3000), ("v1", "2018-11-09T21:30Z", 2500), ("v2", "2018-11-10T01:30Z", 1200)]
#: Counters: ``once`` starts them at 0, the backfill counts from the first row (checked with pandas).
COUNTERS = frozenset(
    {
        "mlmon_predictions_total",
        "mlmon_prediction_score_bucket",
        "mlmon_prediction_score_count",
        "mlmon_prediction_score_sum",
    }
)
TARGET = {"job": "mlmon", "instance": "mlmon:9847"}


def _cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


def _key(name: str, labels: dict[str, str]) -> tuple:
    return name, tuple(sorted(labels.items()))


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory):
    """(tmp dir, config, Prometheus base URL, output of the second run)."""
    binaries = {name: shutil.which(name) for name in ("promtool", "prometheus")}
    require(all(binaries.values()), f"needs promtool and prometheus (Debian package prometheus); found {binaries}")
    tmp = tmp_path_factory.mktemp("backfill")
    config = _car_loan(tmp)
    prom_data, output = tmp / "tsdb", tmp / "out"
    common = ["backfill", "--config", str(config), "--step", "1h", "--output", str(output)]
    common += ["--prometheus-data", str(prom_data), "--label", "job=mlmon", "--label", "instance=mlmon:9847"]
    first = _cli(*common, "--from", START.isoformat(), "--to", MIDDLE.isoformat())
    assert "5 step(s) evaluated, 2 file(s)" in first  # 20:00..00:00: two UTC days
    assert "2 file(s) turned into blocks" in first
    second = _cli(*common, "--from", START.isoformat(), "--to", END.isoformat())
    assert "1 file(s) turned into blocks" in second  # 01:00..03:00, a third file
    again = _cli(*common, "--from", START.isoformat(), "--to", END.isoformat())
    assert "0 step(s) evaluated, 3 file(s)" in again and "0 file(s) turned into blocks" in again
    refused = _cli(*common, "--step", "30m", "--from", START.isoformat(), "--to", END.isoformat(), code=2)
    assert "--step (seconds) 3600, this run has 1800" in refused and "steps" not in refused  # no progress bar

    with _serving(prom_data, tmp) as base:
        yield tmp, config, base, second


@contextmanager
def _serving(data: Path, tmp: Path) -> Iterator[str]:
    """The real Prometheus on ``data``; yields its base URL."""
    port = free_port()
    (tmp / "prometheus.yml").write_text("global: {scrape_interval: 1m}\n")
    log = tmp / "prometheus.log"
    process = start_process(
        [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={data}",
            "--storage.tsdb.retention.time=100y",  # the default 15d would delete 2018 at once
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        log,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_answers(f"{base}/-/ready", process, log)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def _car_loan(tmp: Path) -> Path:
    """The car_loan store, its state database with ``RUNS``, and their config, in ``tmp``."""
    url = f"sqlite:///{tmp / 'car_loan.db'}"
    _cli("load", "--url", url, "--table", "predictions", str(DATA / "synthetic_car_loan_analysis.csv"))
    _cli("load", "--url", url, "--table", "labels", str(DATA / "synthetic_car_loan_analysis_target.csv"))
    config = tmp / "car_loan.yml"
    config.write_text(
        f"""
stores: {{warehouse: {{url: "{url}"}}}}
state: {{url: "sqlite:///{tmp / "state.sqlite"}"}}
models:
  - name: car_loan
    predictions: {{store: warehouse, table: predictions, columns: {{id: id, timestamp: timestamp, score: y_pred_proba}}}}
    labels: {{store: warehouse, table: labels, columns: {{id: id, label: repaid}}}}
    features: {{numeric: [car_value, debt_to_income_ratio, loan_length], categorical: [size_of_downpayment]}}
    windows: [1d, 7d]
    label_delay: 0s
"""
    )
    reference = pd.read_csv(DATA / "synthetic_car_loan_reference.csv")
    features = reference[["car_value", "debt_to_income_ratio", "loan_length", "size_of_downpayment"]]
    engine = sa.create_engine(f"sqlite:///{tmp / 'state.sqlite'}")
    migrate(engine)
    for version, trained_at, rows in RUNS:
        run = build_training_run(
            model="car_loan",
            version=version,
            trained_at=trained_at,
            training_data=features.head(rows),
            validation=(reference["repaid"].tail(1000), reference["y_pred_proba"].tail(1000)),
            categorical=["size_of_downpayment"],
        )
        save_run(engine, run, pd.Timestamp(trained_at).to_pydatetime())
    engine.dispose()

    return config


def _prometheus(base: str) -> dict[pd.Timestamp, dict[tuple, float]]:
    """Every mlmon series at every instant, from one range query."""
    answer = httpx.get(
        f"{base}/api/v1/query_range",
        params={
            "query": '{__name__=~"mlmon_.+"}',
            "start": START.timestamp(),
            "end": (END - STEP).timestamp(),
            "step": STEP.total_seconds(),
        },
        timeout=30,
    ).json()
    assert answer["status"] == "success", answer
    out: dict[pd.Timestamp, dict[tuple, float]] = {t: {} for t in INSTANTS}
    for series in answer["data"]["result"]:
        labels = dict(series["metric"])
        name = labels.pop("__name__")
        for when, value in series["values"]:
            out[pd.Timestamp(when, unit="s", tz="UTC")][_key(name, labels)] = float(value)
    return out


def _once(config: Path, at: pd.Timestamp) -> dict[tuple, float]:
    """What ``mlmon once --as-of`` prints at ``at``, with the backfill's target labels."""
    text = _cli("once", "--config", str(config), "--as-of", at.isoformat())
    text = text[text.index("# HELP") :]  # after the log lines CliRunner mixes in
    return {
        _key(s.name, {**s.labels, "job": "mlmon", "instance": "mlmon:9847"}): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("mlmon_") and s.name not in NOT_HISTORY
    }


def test_every_backfilled_value_equals_once_as_of(backfilled):
    _, config, base, _ = backfilled
    served = _prometheus(base)
    for at in INSTANTS:
        expected = {k: v for k, v in _once(config, at).items() if k[0] not in COUNTERS}
        got = {k: v for k, v in served[at].items() if k[0] not in COUNTERS}
        assert got.keys() == expected.keys(), (at, got.keys() ^ expected.keys())
        for key, value in expected.items():
            assert got[key] == value, (at, key)  # exact: both sides print floats round-trip
    # Online, prediction and training metrics really are compared, the training runs
    # appearing version by version at their trained_at.
    newest = [[dict(k[1])["version"] for k in served[at] if k[0] == "mlmon_model_info"] for at in INSTANTS]
    assert newest == [["v0"], ["v0"], ["v1"], ["v1"], ["v1"], ["v1"], ["v2"], ["v2"]]
    # Feature skew is history too, compared at each step with the newest run trained by then.
    compared = [
        [dict(k[1])["version"] for k in served[at] if k[0] == "mlmon_feature_skew_reference_info"] for at in INSTANTS
    ]
    assert compared == newest
    assert all(any(k[0] == "mlmon_feature_skew_psi" for k in served[at]) for at in INSTANTS)
    rows_key = _key("mlmon_training_rows", {**TARGET, "model": "car_loan"})
    assert [served[at][rows_key] for at in INSTANTS] == [3000] * 2 + [2500] * 4 + [1200] * 2
    rows = _rows()
    for at in INSTANTS:
        day = rows[(rows["timestamp"] >= at - pd.Timedelta(days=1)) & (rows["timestamp"] < at)]
        labels = {**TARGET, "model": "car_loan", "window": "1d"}
        auc = roc_auc_score(day["repaid"], day["y_pred_proba"])
        assert served[at][_key("mlmon_online_roc_auc", labels)] == pytest.approx(auc, abs=1e-12)
        assert served[at][_key("mlmon_window_predictions", labels)] == len(day)


def test_counters_count_every_prediction_before_the_instant(backfilled):
    """The documented meaning of the counters in backfilled data (docs/backfill.md): every
    valid prediction stamped before the instant, whatever run computed it."""
    _, _, base, _ = backfilled
    served = _prometheus(base)
    rows = _rows()
    series = {**TARGET, "model": "car_loan"}
    bounds = sorted({float(dict(k[1])["le"]) for k in served[INSTANTS[0]] if k[0] == "mlmon_prediction_score_bucket"})
    assert len(bounds) > 5 and bounds[-1] == math.inf
    for at in INSTANTS:
        before = rows.loc[rows["timestamp"] < at, "y_pred_proba"].to_numpy(np.float64)
        assert served[at][_key("mlmon_predictions_total", series)] == len(before)
        assert served[at][_key("mlmon_prediction_score_count", series)] == len(before)
        assert served[at][_key("mlmon_prediction_score_sum", series)] == pytest.approx(before.sum(), rel=1e-12)
        for bound in bounds:
            le = "+Inf" if bound == math.inf else repr(bound)
            count = served[at][_key("mlmon_prediction_score_bucket", {**series, "le": le})]
            assert count == np.count_nonzero(before <= bound), (at, le)
    assert (
        served[INSTANTS[-1]][_key("mlmon_predictions_total", series)]
        > served[INSTANTS[0]][_key("mlmon_predictions_total", series)]
    )


def test_second_run_continues_without_duplicates(backfilled):
    tmp, _, _, second = backfilled
    assert "3 step(s) evaluated, 3 file(s)" in second  # 01:00..03:00 only
    files = sorted((tmp / "out").glob("mlmon-*.om"))
    assert [f.name for f in files] == [
        "mlmon-20181109T200000Z-20181109T230000Z.om",
        "mlmon-20181110T000000Z-20181110T000000Z.om",
        "mlmon-20181110T010000Z-20181110T030000Z.om",
    ]
    for f in files:  # each turned into blocks of the data directory once
        assert f.with_name(f.name + ".imported").read_text() == f"{(tmp / 'tsdb').resolve()}\n"
    seen: set[tuple] = set()
    stamps = set()
    for f in files:
        text = f.read_text()
        assert text.endswith("# EOF\n")
        types = re.findall(r"^# TYPE (\S+)", text, re.MULTILINE)
        assert len(types) == len(set(types))  # each family once: grouped
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            series, _, stamp = line.rpartition(" ")[0].rpartition(" ")[0], None, line.rsplit(" ", 1)[1]
            assert (series, stamp) not in seen, line
            seen.add((series, stamp))
            stamps.add(float(stamp))
    assert sorted(stamps) == [t.timestamp() for t in INSTANTS]  # seconds, every instant once


def test_range_overlapping_existing_series_is_refused(backfilled):
    tmp, config, _, _ = backfilled
    out = _cli(
        "backfill",
        "--config",
        str(config),
        "--from",
        "2018-11-10T02:00:00Z",
        "--to",
        "2018-11-10T06:00:00Z",
        "--step",
        "1h",
        "--output",
        str(tmp / "other"),
        "--prometheus-data",
        str(tmp / "tsdb"),
        "--label",
        "job=mlmon",
        "--label",
        "instance=mlmon:9847",
        code=2,
    )
    assert "already holds mlmon series between 2018-11-10T02:00:00+00:00 and 2018-11-10T05:00:00+00:00" in out
    assert "an earlier --to" in out
    assert not list((tmp / "other").glob("mlmon-*.om"))  # nothing evaluated


def _rows() -> pd.DataFrame:
    served = pd.read_csv(DATA / "synthetic_car_loan_analysis.csv", parse_dates=["timestamp"])
    served["timestamp"] = served["timestamp"].dt.tz_localize("UTC")
    return served.merge(pd.read_csv(DATA / "synthetic_car_loan_analysis_target.csv"), on="id", how="left")


def _promtool_values(values: list[float | None]) -> str:
    """A series' values as a promtool test writes them: ``_`` where it has none."""
    return " ".join("_" if v is None else repr(v) for v in values)


def test_promtool_case_runs_on_backfilled_series(backfilled):
    """The backfilled case of prometheus/tests/mlmon_test.yml holds exactly the series the
    backfill wrote (at its 1 h steps), and the shipped rules fire on them as they should:
    v2, trained at 01:30 on 1200 rows after v1's 2500, drops the rows below the 0.7 threshold
    from the 02:00 step (the sixth hour) on."""
    tmp, _, base, _ = backfilled
    served = _prometheus(base)
    tests_file = REPO / "prometheus" / "tests" / "mlmon_test.yml"
    case = next(t for t in yaml.safe_load(tests_file.read_text())["tests"] if t["name"].startswith("backfilled"))
    assert case["interval"] == "1h"
    for series in case["input_series"]:
        name, labels = re.fullmatch(r"(\w+)\{(.*)\}", series["series"]).groups()
        key = _key(name, dict(re.findall(r'(\w+)="([^"]*)"', labels)))
        assert str(series["values"]) == _promtool_values([served[at].get(key) for at in INSTANTS]), key
    ratios = [None, None] + [2500 / 3000] * 4 + [1200 / 2500] * 2  # from RUNS, by the instants' newest version
    first_firing = next(i for i, r in enumerate(ratios) if r is not None and r < 0.7)
    assert first_firing == 6
    for alert in ("MlmonTrainingRowsDropped", "MlmonTrainingRowsDroppedVsMonthAgo"):
        evals = {t["eval_time"]: t["exp_alerts"] for t in case["alert_rule_test"] if t["alertname"] == alert}
        assert evals[f"{first_firing - 1}h"] == [] and evals[f"{first_firing}h"], alert
    only = tmp / "backfilled_test.yml"  # this case alone (the whole file runs in test_alerting.py)
    only.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(REPO / "prometheus" / "rules" / "mlmon.yml")],
                "evaluation_interval": "1m",
                "tests": [case],
            }
        )
    )
    done = subprocess.run(
        ["promtool", "test", "rules", str(only)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_failing_source_stops_the_run_and_a_second_run_continues(tmp_path):
    """A day whose steps fail is not written (a hole, or a source reported down because the
    database was during the backfill, would pass for history); the days before it are kept
    and the same command continues after the cause is fixed."""
    db = tmp_path / "p.db"
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE p (id INTEGER, ts TEXT, score REAL)"))
        conn.execute(sa.text("INSERT INTO p VALUES (1, '2018-11-09 12:00:00', 0.25), (2, '2018-11-10 12:00:00', 0.5)"))
    config = tmp_path / "mlmon.yml"
    config.write_text(
        f"stores: {{s: {{url: 'sqlite:///{db}'}}}}\n"
        f"state: {{url: 'sqlite:///{tmp_path / 'state.sqlite'}'}}\n"
        "models: [{name: m, windows: [1d], predictions: {store: s, table: p, columns: {id: id, timestamp: ts, score: score}}}]\n"
    )
    args = ["backfill", "--config", str(config), "--step", "6h", "--output", str(tmp_path / "out")]
    args += ["--from", "2018-11-09T00:00:00Z"]
    assert "4 step(s) evaluated, 1 file(s)" in _cli(*args, "--to", "2018-11-10T00:00:00Z")
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE p RENAME TO gone"))
    failed = _cli(*args, "--to", "2018-11-11T00:00:00Z", code=1)
    assert "at 2018-11-10T00:00:00+00:00: model 'm': source(s) predictions failed" in failed
    assert len(list((tmp_path / "out").glob("mlmon-*.om"))) == 1
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE gone RENAME TO p"))
    assert "4 step(s) evaluated, 2 file(s)" in _cli(*args, "--to", "2018-11-11T00:00:00Z")
    text = (tmp_path / "out" / "mlmon-20181110T000000Z-20181110T180000Z.om").read_text()
    # The counter at 18:00 counts both rows, the one of the first run's day included.
    assert 'mlmon_predictions_total{job="mlmon",model="m"} 2.0 1541872800.0' in text
    assert 'mlmon_predictions_total{job="mlmon",model="m"} 1.0 1541808000.0' in text


def test_recording_rules_backfill_from_the_backfilled_series(tmp_path):
    """docs/backfill.md's step 4, at the default 5-minute step: promtool evaluates the
    shipped recording rules over the backfilled range through Prometheus's API (at points
    offset by the rule group's hash, hence a step within the 5-minute look-back) and
    writes their blocks; given only the recording rules, as the docs say."""
    require(shutil.which("promtool") and shutil.which("prometheus"), "needs the Debian package prometheus")
    config = _car_loan(tmp_path)
    start, end = pd.Timestamp("2018-11-10T00:00Z"), pd.Timestamp("2018-11-10T01:00Z")
    _cli(
        *["backfill", "--config", str(config), "--from", start.isoformat(), "--to", end.isoformat()],
        *["--output", str(tmp_path / "out"), "--prometheus-data", str(tmp_path / "tsdb")],
    )
    rules = yaml.safe_load((REPO / "prometheus" / "rules" / "mlmon.yml").read_text())
    for group in rules["groups"]:
        group["rules"] = [rule for rule in group["rules"] if "record" in rule]
    (tmp_path / "recording.yml").write_text(yaml.safe_dump(rules))
    blocks = tmp_path / "rule-blocks"
    with _serving(tmp_path / "tsdb", tmp_path) as base:
        done = subprocess.run(
            ["promtool", "tsdb", "create-blocks-from", "rules", f"--start={start.isoformat()}"]
            + [f"--end={end.isoformat()}", f"--url={base}", f"--output-dir={blocks}", str(tmp_path / "recording.yml")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        backfilled = _prometheus_range(base, "mlmon_prediction_score_mean", start, end)
    (blocks / "wal").mkdir(exist_ok=True)  # promtool's dump wants one
    dump = subprocess.run(
        ["promtool", "tsdb", "dump", str(blocks)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    recorded = [line.rsplit(" ", 2) for line in dump.splitlines()]
    assert {series.split('"')[1] for series, _, _ in recorded} == {
        r["record"] for g in rules["groups"] for r in g["rules"]
    }
    mean = '{__name__="job_model_window:mlmon_prediction_score_mean:max", job="mlmon", model="car_loan", window="1d"}'
    points = [
        (pd.Timestamp(int(stamp), unit="ms", tz="UTC"), float(v)) for series, v, stamp in recorded if series == mean
    ]
    assert len(points) >= 50  # one a minute over the hour, from the group's offset on
    for at, value in points:
        # The backfilled sample Prometheus looks back to: the last step at or before ``at``.
        step = max(t for t in backfilled if t <= at)
        assert at - step < pd.Timedelta(minutes=5)
        assert value == backfilled[step], at


def _prometheus_range(base: str, selector: str, start: pd.Timestamp, end: pd.Timestamp) -> dict[pd.Timestamp, float]:
    """The samples of the one series of ``selector``, window 1d, at the 5-minute steps."""
    answer = httpx.get(
        f"{base}/api/v1/query_range",
        params={"query": f'{selector}{{window="1d"}}', "start": start.timestamp(), "end": end.timestamp(), "step": 300},
        timeout=30,
    ).json()
    [series] = answer["data"]["result"]
    return {pd.Timestamp(when, unit="s", tz="UTC"): float(v) for when, v in series["values"]}


def test_files_written_without_a_data_directory_are_checked_for_overlap_before_import(backfilled):
    """Files of an earlier run without --prometheus-data are imported by the next run that
    has one: their instants are checked like those still to evaluate, so series the data
    directory holds at those instants are refused, not mixed in."""
    tmp, config, _, _ = backfilled
    args = ["backfill", "--config", str(config), "--from", "2018-11-10T02:00:00Z", "--to", "2018-11-10T04:00:00Z"]
    args += ["--step", "1h", "--output", str(tmp / "unimported"), "--label", "job=mlmon"]
    args += ["--label", "instance=mlmon:9847"]
    assert "2 step(s) evaluated, 1 file(s)" in _cli(*args)
    out = _cli(*args, "--prometheus-data", str(tmp / "tsdb"), code=2)
    assert "already holds mlmon series between 2018-11-10T02:00:00+00:00 and 2018-11-10T03:00:00+00:00" in out
    assert not list((tmp / "unimported").glob("*.imported"))


def test_runs_of_models_outside_the_config_are_not_backfilled(tmp_path):
    """The state database holds another model's runs (another config's backfill): only the
    configured model's series are written, as the overlap check selects them."""
    db = tmp_path / "p.db"
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE p (id INTEGER, ts TEXT, score REAL)"))
        conn.execute(sa.text("INSERT INTO p VALUES (1, '2018-11-09 12:00:00', 0.25)"))
    state = sa.create_engine(f"sqlite:///{tmp_path / 'state.sqlite'}")
    migrate(state)
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0]})
    for model in ("m", "other"):
        run = build_training_run(
            model=model,
            version="v1",
            trained_at="2018-11-01T00:00Z",
            training_data=frame,
            validation=(pd.Series([0, 1, 0, 1]), pd.Series([0.2, 0.7, 0.4, 0.6])),
        )
        save_run(state, run, pd.Timestamp("2018-11-01T00:00Z").to_pydatetime())
    state.dispose()
    config = tmp_path / "mlmon.yml"
    config.write_text(
        f"stores: {{s: {{url: 'sqlite:///{db}'}}}}\n"
        f"state: {{url: 'sqlite:///{tmp_path / 'state.sqlite'}'}}\n"
        "models: [{name: m, windows: [1d], predictions: {store: s, table: p, columns: {id: id, timestamp: ts, score: score}}}]\n"
    )
    args = ["backfill", "--config", str(config), "--step", "12h", "--output", str(tmp_path / "out")]
    assert "2 step(s) evaluated" in _cli(*args, "--from", "2018-11-09T00:00:00Z", "--to", "2018-11-10T00:00:00Z")
    (text,) = [p.read_text() for p in (tmp_path / "out").glob("mlmon-*.om")]
    assert 'mlmon_version_training_rows{job="mlmon",model="m",version="v1"} 4.0' in text
    assert 'model="other"' not in text


@pytest.mark.long
def test_steps_read_only_new_time_slices_and_equal_the_one_pass_refresh(tmp_path, monkeypatch):
    """``mlmon backfill`` gives a model without ``time_slice`` the ``auto`` slices (2 h for
    windows 1d and 7d: 84 slices): the first steps fill them (here 14 a step, with
    ``slice_fill_refreshes: 6`` to keep the test short), reading the windows in one pass
    meanwhile; then each (hourly) step reads at most the one slice sealed since. Every
    value equals the one-pass refresh that ``mlmon once`` runs on that config (counts
    exactly, floats to the last bits)."""
    settings = load_settings(_car_loan(tmp_path))
    sliced_settings = with_time_slices(settings)
    assert settings.models[0].time_slice is None
    assert sliced_settings.models[0].slice_width() == pd.Timedelta(hours=2)
    assert sliced_settings.models[0].slice_fill_refreshes == 24
    faster = sliced_settings.models[0].model_copy(update={"slice_fill_refreshes": 6})
    sliced_settings = sliced_settings.model_copy(update={"models": [faster]})
    own = settings.models[0].model_copy(update={"time_slice": pd.Timedelta(hours=1).to_pytimedelta()})
    kept = with_time_slices(settings.model_copy(update={"models": [own]}))
    assert kept.models[0].slice_width() == pd.Timedelta(hours=1)  # a model's own is kept

    read: list[tuple[int, bool]] = []  # per step: slices read, windows merged from slices
    merge = SliceStore.merge

    def counted(store, plan, parts):
        read.append((len(plan.new_slices), bool(plan.windows)))
        return merge(store, plan, parts)

    monkeypatch.setattr(SliceStore, "merge", counted)
    sliced, one_pass = Evaluator(sliced_settings), Evaluator(settings)
    try:
        for at in pd.date_range(START, periods=12, freq=STEP):
            got, expected = (_samples(e.evaluate(at.to_pydatetime())) for e in (sliced, one_pass))
            assert got.keys() == expected.keys()
            for key, value in expected.items():
                assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), (at, key)
    finally:
        sliced.close()
        one_pass.close()
    filled = [merged for _, merged in read].index(True)
    # 14 a step, and the one sealed since the step before (every other hourly step).
    assert filled >= 5 and all(14 <= n <= 15 and not merged for n, merged in read[:filled]), read
    assert all(n <= 1 and merged for n, merged in read[filled + 1 :]) and len(read) - filled >= 5, read


def _samples(families) -> dict[tuple, float]:
    return {_key(s.name, s.labels): s.value for family in families for s in family.samples}
