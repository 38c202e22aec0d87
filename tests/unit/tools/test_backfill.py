"""The backfill's pure parts: which steps are pending, the OpenMetrics a chunk writes, the
PromQL selector of the overlap check, and the command's usage errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from typer.testing import CliRunner

from exporter.cli import app
from exporter.config import Settings
from exporter.tools.backfill import (
    MANIFEST,
    Backfill,
    BackfillError,
    Chunk,
    ManifestError,
    by_day,
    covered,
    pending,
    runs,
    series_selector,
    with_time_slices,
)

T0 = datetime(2018, 11, 9, 22, tzinfo=UTC)
HOUR = timedelta(hours=1)


def test_pending_skips_the_steps_of_finished_files_only(tmp_path):
    (tmp_path / "mlmon-20181109T230000Z-20181110T010000Z.om").write_text("# EOF\n")
    (tmp_path / "mlmon-20181110T030000Z-20181110T030000Z.om.partial").write_text("")  # never finished
    (tmp_path / "notes.om").write_text("")
    done = covered(tmp_path)
    assert [(a.hour, b.hour) for a, b, _ in done] == [(23, 1)]
    todo = pending(T0, T0 + 6 * HOUR, HOUR, done)
    assert [t.hour for t in todo] == [22, 2, 3]
    # Another grid: its steps inside the finished span are done too.
    assert [t.strftime("%H:%M") for t in pending(T0 + HOUR / 2, T0 + 4 * HOUR, HOUR, done)] == ["22:30", "01:30"]
    with pytest.raises(BackfillError):
        pending(T0, T0 + HOUR, timedelta(0), [])


def test_runs_and_days():
    todo = [T0, T0 + 4 * HOUR, T0 + 5 * HOUR]
    assert runs(todo, HOUR) == [(T0, T0), (T0 + 4 * HOUR, T0 + 5 * HOUR)]
    assert [[t.hour for t in day] for day in by_day(todo)] == [[22], [2, 3]]


def test_chunk_writes_grouped_families_each_series_in_time_order(tmp_path):
    def families(value: float) -> list:
        gauge = GaugeMetricFamily("mlmon_x", "An x.", labels=["model"])
        gauge.add_metric(["b"], value)
        gauge.add_metric(["a"], value + 1)
        histogram = HistogramMetricFamily("mlmon_h", "An h.", labels=["model"])
        histogram.add_metric(["a"], [("0.5", value), ("+Inf", 2 * value)], 0.25 * value)
        return [gauge, histogram]

    chunk = Chunk({"job": "mlmon"})
    chunk.add(T0, families(1.0))
    chunk.add(T0 + HOUR, families(3.0))
    path = chunk.write(tmp_path)
    assert path.name == "mlmon-20181109T220000Z-20181109T230000Z.om"
    assert path.read_text() == (
        "# HELP mlmon_h An h.\n"
        "# TYPE mlmon_h histogram\n"
        'mlmon_h_bucket{job="mlmon",le="0.5",model="a"} 1.0 1541800800.0\n'
        'mlmon_h_bucket{job="mlmon",le="+Inf",model="a"} 2.0 1541800800.0\n'
        'mlmon_h_count{job="mlmon",model="a"} 2.0 1541800800.0\n'
        'mlmon_h_sum{job="mlmon",model="a"} 0.25 1541800800.0\n'
        'mlmon_h_bucket{job="mlmon",le="0.5",model="a"} 3.0 1541804400.0\n'
        'mlmon_h_bucket{job="mlmon",le="+Inf",model="a"} 6.0 1541804400.0\n'
        'mlmon_h_count{job="mlmon",model="a"} 6.0 1541804400.0\n'
        'mlmon_h_sum{job="mlmon",model="a"} 0.75 1541804400.0\n'
        "# HELP mlmon_x An x.\n"
        "# TYPE mlmon_x gauge\n"
        'mlmon_x{job="mlmon",model="a"} 2.0 1541800800.0\n'
        'mlmon_x{job="mlmon",model="a"} 4.0 1541804400.0\n'
        'mlmon_x{job="mlmon",model="b"} 1.0 1541800800.0\n'
        'mlmon_x{job="mlmon",model="b"} 3.0 1541804400.0\n'
        "# EOF\n"
    )
    assert not list(tmp_path.glob("*.partial"))


def _settings(*names: str) -> Settings:
    return Settings.model_validate(
        {
            "stores": {"s": {"url": "sqlite:///x.db"}},
            "models": [
                {
                    "name": n,
                    "predictions": {
                        "store": "s",
                        "table": "p",
                        "columns": {"id": "id", "timestamp": "ts", "score": "p"},
                    },
                }
                for n in names
            ],
        }
    )


def test_selector_matches_the_models_and_target_labels():
    selector = series_selector(_settings("ctr", "ctr.v2"), {"job": "mlmon", "instance": 'a"b'})
    assert selector == '{__name__=~"mlmon_.+",model=~"ctr|ctr\\\\.v2",instance="a\\"b",job="mlmon"}'


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "2018-11-10", "--to", "2018-11-10"], "--from '2018-11-10' must be before --to '2018-11-10'"),
        (["--from", "yesterday", "--to", "2018-11-10"], "--from: 'yesterday' is not an ISO-8601 time"),
        (["--from", "2018-11-09", "--to", "2999-01-01"], "--to '2999-01-01' is in the future"),
        (
            ["--from", "2018-11-09", "--to", "2018-11-10", "--step", "0s"],
            "--step: duration '0s' must be greater than zero",
        ),
        (["--from", "2018-11-09", "--to", "2018-11-10", "--step", "1500ms"], "--step: '1500ms' must be a whole number"),
        (["--from", "2018-11-09", "--to", "2018-11-10", "--step", "fast"], "--step:"),
        (["--from", "2018-11-09", "--to", "2018-11-10", "--label", "job"], "--label: 'job' is not NAME=VALUE"),
        (["--from", "2018-11-09", "--to", "2018-11-10", "--label", "model=x"], "--label: 'model=x' is not NAME=VALUE"),
        (["--from", "2018-11-09", "--to", "2018-11-10", "--label", "1a=x"], "--label: '1a=x' is not NAME=VALUE"),
        (["--from", "2018-11-09", "--to", "2018-11-10", "--label", "window=x"], "--label: 'window=x' is not NAME="),
        (["--from", "2018-11-09", "--to", "2018-11-10", "--label", "le=x"], "--label: 'le=x' is not NAME=VALUE"),
        (["--from", "2018-11-09", "--to", "2018-11-10", "--label", "__x=y"], "--label: '__x=y' is not NAME=VALUE"),
    ],
)
def test_usage_errors_exit_2_naming_the_option(tmp_path: Path, args, message):
    config = tmp_path / "mlmon.yml"
    config.write_text(
        "stores: {s: {url: 'sqlite:///x.db'}}\n"
        "models: [{name: m, predictions: {store: s, table: p, columns: {id: id, timestamp: ts, score: p}}}]\n"
    )
    result = CliRunner().invoke(app, ["backfill", "--config", str(config), "--output", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o").exists()


def test_prometheus_data_without_promtool_is_a_usage_error(tmp_path, monkeypatch):
    config = tmp_path / "mlmon.yml"
    config.write_text(
        "stores: {s: {url: 'sqlite:///x.db'}}\n"
        "models: [{name: m, predictions: {store: s, table: p, columns: {id: id, timestamp: ts, score: p}}}]\n"
    )
    monkeypatch.setenv("PATH", str(tmp_path))
    result = CliRunner().invoke(
        app,
        ["backfill", "--config", str(config), "--from", "2018-11-09", "--to", "2018-11-10", "--output", "o"]
        + ["--prometheus-data", str(tmp_path / "d")],
    )
    assert result.exit_code == 2
    assert "--prometheus-data needs promtool on the PATH (Debian package prometheus)" in result.output


def test_output_written_with_another_step_labels_models_or_time_slices_is_refused(tmp_path):
    """The files' names are the record of what is done: a run with another step, other
    target labels, other models or other time slices must not take them for its own; a
    manifest written before time slices were recorded had none."""

    def job(step=HOUR, labels=None, models=("m",), sliced=False):
        settings = _settings(*models)
        settings = with_time_slices(settings) if sliced else settings
        return Backfill(settings, T0, T0 + 2 * HOUR, step, tmp_path, labels or {"job": "mlmon"})

    job().check_manifest()
    job().check_manifest()  # the same run again: continues
    with pytest.raises(ManifestError, match=r"--step \(seconds\) 3600, this run has 1800"):
        job(step=HOUR / 2).check_manifest()
    with pytest.raises(ManifestError, match=r"--label \{'job': 'mlmon'\}, this run has \{'job': 'other'\}"):
        job(labels={"job": "other"}).check_manifest()
    with pytest.raises(ManifestError, match=r"models \['m'\], this run has \['m', 'n'\]"):
        job(models=("m", "n")).check_manifest()
    with pytest.raises(ManifestError, match=r"time slices .*\{'m': None\}, this run has \{'m': 300.0\}"):
        job(sliced=True).check_manifest()
    manifest = tmp_path / MANIFEST
    older = json.loads(manifest.read_text())
    del older["time_slice_seconds"]
    manifest.write_text(json.dumps(older))
    job().check_manifest()  # no time slices recorded: none
    with pytest.raises(ManifestError, match=r"time slices"):
        job(sliced=True).check_manifest()
