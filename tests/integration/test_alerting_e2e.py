"""End to end on the real binaries: mlmon serves a SQLite store, Prometheus scrapes it and
evaluates the repo's rules, Alertmanager (the repo's config) posts to a Slack stand-in on
loopback. Predictions become identical: the Slack receiver gets the firing message; they
recover: it gets the resolved one. Only the timings are shortened for the test."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sqlalchemy as sa

from tests.conftest import REPO, free_port, require, start_process, wait_until_answers

STUCK_SCORE = 0.0123


class SlackStandIn:
    """An HTTP server on loopback that records the JSON bodies posted to it."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/test"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, title_prefix: str, timeout: float) -> dict:
        """The first attachment whose title starts with ``title_prefix``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.received):
                for attachment in message.get("attachments", []):
                    if attachment.get("title", "").startswith(title_prefix):
                        return {**attachment, "channel": message.get("channel")}
            time.sleep(0.2)
        titles = [a.get("title") for m in self.received for a in m.get("attachments", [])]
        raise AssertionError(f"no Slack message {title_prefix!r} within {timeout} s; got {titles}")


def fill(url: str, stuck: bool) -> None:
    """200 varied predictions in the last hour, plus 1000 identical ones when ``stuck``."""
    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    table = sa.Table(
        "predictions", metadata, sa.Column("id", sa.Integer), sa.Column("ts", sa.DateTime), sa.Column("p", sa.Double)
    )
    metadata.create_all(engine)
    now = datetime.now(UTC).replace(tzinfo=None)
    with engine.begin() as conn:
        conn.execute(table.delete())
        rows = [{"id": i, "ts": now - timedelta(seconds=10 + i * 10), "p": 0.05 + i * 1e-4} for i in range(200)]
        if stuck:
            rows += [{"id": 1000 + i, "ts": now - timedelta(seconds=5 + i), "p": STUCK_SCORE} for i in range(1000)]
        conn.execute(table.insert(), rows)
    engine.dispose()


@pytest.fixture
def binaries():
    # Debian names the Alertmanager binary prometheus-alertmanager; upstream's release says alertmanager.
    alertmanager = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    found = {"prometheus": shutil.which("prometheus"), "alertmanager": alertmanager}
    require(all(found.values()), f"needs the Debian packages prometheus and prometheus-alertmanager (found {found})")
    return found


@pytest.mark.long  # real Prometheus and Alertmanager, waits for firing and resolving: about 20 s
def test_stuck_predictions_reach_slack_then_resolve(tmp_path, binaries):
    slack = SlackStandIn()
    mlmon_port, prometheus_port, alertmanager_port = free_port(), free_port(), free_port()
    store = f"sqlite:///{tmp_path}/store.sqlite"
    fill(store, stuck=False)

    (tmp_path / "mlmon.yml").write_text(
        f"""
refresh_interval: 1s
stores: {{s: {{url: "{store}"}}}}
state: {{url: "sqlite:///{tmp_path}/state.sqlite"}}
models:
  - name: ctr
    predictions: {{store: s, table: predictions, columns: {{id: id, timestamp: ts, score: p}}}}
    windows: [1h]
    alert_thresholds: {{window_predictions_min: 100, mode_share_ratio_max: 0.5}}
"""
    )
    # The repo's rules with every `for` shortened to 2s.
    rules = re.sub(r"for: \d+m", "for: 2s", (REPO / "prometheus" / "rules" / "mlmon.yml").read_text())
    (tmp_path / "rules.yml").write_text(rules)
    (tmp_path / "prometheus.yml").write_text(
        f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [rules.yml]
alerting:
  alertmanagers: [{{static_configs: [{{targets: ["127.0.0.1:{alertmanager_port}"]}}]}}]
scrape_configs:
  - job_name: mlmon
    static_configs: [{{targets: ["127.0.0.1:{mlmon_port}"]}}]
"""
    )
    # The repo's Alertmanager config and templates, with the Slack URL file of the test
    # and short grouping timers.
    am_dir = tmp_path / "alertmanager"
    shutil.copytree(REPO / "alertmanager", am_dir)
    (am_dir / "secrets").mkdir()
    (am_dir / "secrets" / "slack_webhook_url").write_text(slack.url + "\n")
    config = (am_dir / "alertmanager.yml").read_text()
    for key, value in {"group_wait": "1s", "group_interval": "2s"}.items():
        config = re.sub(rf"{key}: \w+", f"{key}: {value}", config)
    (am_dir / "alertmanager.yml").write_text(config)

    processes = []
    try:
        mlmon_log = tmp_path / "mlmon.log"
        processes.append(
            start_process(
                [
                    sys.executable,
                    "-m",
                    "exporter",
                    "serve",
                    "--config",
                    str(tmp_path / "mlmon.yml"),
                    "--port",
                    str(mlmon_port),
                ],
                mlmon_log,
            )
        )
        wait_until_answers(f"http://127.0.0.1:{mlmon_port}/readyz", processes[-1], mlmon_log)
        am_log = tmp_path / "alertmanager.log"
        processes.append(
            start_process(
                [
                    binaries["alertmanager"],
                    "--config.file=alertmanager.yml",
                    f"--storage.path={am_dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{alertmanager_port}",
                    "--cluster.listen-address=",
                ],
                am_log,
                cwd=am_dir,
            )
        )
        wait_until_answers(f"http://127.0.0.1:{alertmanager_port}/-/ready", processes[-1], am_log)
        prom_log = tmp_path / "prometheus.log"
        processes.append(
            start_process(
                [
                    binaries["prometheus"],
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                ],
                prom_log,
            )
        )
        wait_until_answers(f"http://127.0.0.1:{prometheus_port}/-/ready", processes[-1], prom_log)

        fill(store, stuck=True)  # 1000 of 1200 predictions now share one score
        firing = slack.wait_for("[FIRING:1] MlmonPredictionsDegenerate · ctr", timeout=60)
        assert firing["channel"] == "#mlmon-alerts" and firing["color"] == "warning"
        assert "*Many identical predictions of ctr* (warning, window 1h)" in firing["text"]
        assert "83.33% of the predictions of ctr over the 1h window have the same score" in firing["text"]
        assert "docs/runbook.md#mlmonpredictionsdegenerate|Runbook>" in firing["text"]
        assert "/d/mlmon-model?var-model=ctr|Dashboard>" in firing["text"]

        fill(store, stuck=False)
        resolved = slack.wait_for("[RESOLVED] MlmonPredictionsDegenerate · ctr", timeout=60)
        assert resolved["color"] == "good"
        assert "*Resolved: Many identical predictions of ctr*" in resolved["text"]
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        slack.server.shutdown()
