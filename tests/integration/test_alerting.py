"""The shipped alert rules and Alertmanager routing, checked with the real promtool and
amtool: syntax, rule unit tests, routes per severity, Slack template output, and the
rules' consistency with the metrics catalog, the thresholds and the runbook."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from exporter.config import AlertThresholds
from tests.conftest import REPO, TEST_DATA, catalog, require

RULES = REPO / "prometheus" / "rules" / "mlmon.yml"
ALERTMANAGER = REPO / "alertmanager"
DATA = TEST_DATA / "alertmanager"
#: Dashboards of grafana/dashboards that alerts link to (uid).
DASHBOARD_UIDS = {"mlmon-model", "mlmon-training", "mlmon-exporter"}


def tool(name: str) -> str:
    path = shutil.which(name)
    require(
        path is not None,
        f"{name} not installed (Debian package {'prometheus' if name == 'promtool' else 'prometheus-alertmanager'})",
    )
    return path


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alerts() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


def test_promtool_checks_rules_and_config():
    promtool = tool("promtool")
    checked = run(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = run(promtool, "check", "config", str(REPO / "prometheus" / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_rule_unit_tests_pass():
    files = sorted(p.name for p in (REPO / "prometheus" / "tests").glob("*_test.yml"))
    assert files == ["mlmon_test.yml", "mlmon_weekly_test.yml"]
    result = run(tool("promtool"), "test", "rules", *files, cwd=REPO / "prometheus" / "tests")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested():
    tests = "".join(p.read_text() for p in (REPO / "prometheus" / "tests").glob("*_test.yml"))
    tested = set(re.findall(r"alertname: (Mlmon\w+)", tests))
    assert tested == {a["alert"] for a in alerts()}


def test_every_alert_has_severity_annotations_runbook_and_dashboard():
    runbook = (REPO / "docs" / "runbook.md").read_text()
    sections = {line[3:].strip().lower() for line in runbook.splitlines() if line.startswith("## ")}
    for alert in alerts():
        name = alert["alert"]
        assert name.startswith("Mlmon")
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert set(alert["annotations"]) == {"summary", "description", "runbook_url", "dashboard_url"}, name
        assert "{{ $labels.model }}" in alert["annotations"]["summary"] or "model" not in alert["expr"], name
        assert alert["annotations"]["runbook_url"] == f"docs/runbook.md#{name.lower()}"
        assert name.lower() in sections, f"docs/runbook.md has no section {name}"
        uid = re.match(r"/d/([\w-]+)", alert["annotations"]["dashboard_url"]).group(1)
        assert uid in DASHBOARD_UIDS, name


def test_rules_use_only_cataloged_metrics_and_known_thresholds():
    text = "\n".join(rule["expr"] for rule in rules())
    used = set(re.findall(r"(?<![\w:])(mlmon_\w+)", text))
    assert used and used <= set(catalog()), used - set(catalog())
    thresholds = set(re.findall(r'threshold="(\w+)"', text))
    assert thresholds <= set(AlertThresholds.model_fields), thresholds - set(AlertThresholds.model_fields)


def test_recording_rules_follow_level_metric_operations():
    for rule in rules():
        if "record" in rule:
            level, metric, operations = rule["record"].split(":")
            assert level and metric.startswith("mlmon_") and operations, rule["record"]


def test_rules_avoid_fields_that_only_one_prometheus_version_knows():
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        assert set(group) <= {"name", "interval", "rules"}, group.keys()  # no group labels, no query_offset


def test_amtool_checks_the_alertmanager_config():
    result = run(tool("amtool"), "check-config", str(ALERTMANAGER / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 templates" in result.stdout and "2 inhibit rules" in result.stdout
    config = yaml.safe_load((ALERTMANAGER / "alertmanager.yml").read_text())
    assert "slack_api_url" not in config["global"] and config["global"]["slack_api_url_file"]
    assert all(c["send_resolved"] for r in config["receivers"] for c in r["slack_configs"])


@pytest.mark.parametrize(
    "labels, receiver",
    [
        (["severity=critical", "alertname=MlmonPredictionsUnavailable", "model=ctr"], "slack-critical"),
        (["severity=warning", "alertname=MlmonPredictionsDegenerate", "model=ctr"], "slack-warnings"),
        (["severity=info", "alertname=MlmonLabelCoverageLow", "model=ctr"], "slack-info"),
        (["alertname=SomethingElse"], "slack-warnings"),
    ],
)
def test_routes_by_severity(labels, receiver):
    result = run(
        tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER / 'alertmanager.yml'}", *labels
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == receiver


def render(template: str, data: str) -> str:
    result = run(
        tool("amtool"),
        "template",
        "render",
        f"--template.glob={ALERTMANAGER / 'templates' / '*.tmpl'}",
        f"--template.data={DATA / data}",
        f'--template.text={{{{ template "{template}" . }}}}',
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


RUNBOOK = "https://git.example.com/mlmon/blob/main/docs/runbook.md"
GRAFANA = "http://127.0.0.1:3000"


def test_slack_message_of_a_firing_group():
    assert render("mlmon.slack.title", "firing.json") == "[FIRING:2] MlmonPredictionsDegenerate · ctr_feed"
    assert render("mlmon.slack.color", "firing.json") == "warning"
    assert render("mlmon.slack.text", "firing.json") == (
        "*Many identical predictions of ctr_feed* (warning, window 1h)\n"
        "80% of the predictions of ctr_feed over the 1h window have the same score: a stuck feature or a fallback.\n"
        f"<{RUNBOOK}#mlmonpredictionsdegenerate|Runbook> · <{GRAFANA}/d/mlmon-model?var-model=ctr_feed|Dashboard>\n"
        "*Many identical predictions of ctr_feed* (warning, window 24h)\n"
        "55% of the predictions of ctr_feed over the 24h window have the same score: a stuck feature or a fallback.\n"
        f"<{RUNBOOK}#mlmonpredictionsdegenerate|Runbook> · <{GRAFANA}/d/mlmon-model?var-model=ctr_feed|Dashboard>\n"
    )


def test_slack_message_of_a_resolved_critical_alert():
    assert render("mlmon.slack.title", "resolved.json") == "[RESOLVED] MlmonPredictionsUnavailable · ctr_search"
    assert render("mlmon.slack.color", "resolved.json") == "good"
    assert render("mlmon.slack.text", "resolved.json") == (
        "*Resolved: No new prediction of ctr_search* (critical)\n"
        "The newest prediction of ctr_search is 1h 5m 0s old.\n"
        f"<{RUNBOOK}#mlmonpredictionsunavailable|Runbook> · <{GRAFANA}/d/mlmon-model?var-model=ctr_search|Dashboard>\n"
    )
