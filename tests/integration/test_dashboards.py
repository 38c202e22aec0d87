"""The Grafana dashboards (grafana/): generated JSON up to date, valid against Grafana's
JSON Schemas, linted, linked from the alerts, and every query run against the real
Prometheus scraping the real ``mlmon demo`` (and a stand-in model server for the
serving dashboard), which must answer with data."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC
from types import ModuleType

import httpx
import pytest
import yaml
from jsonschema import Draft7Validator

from exporter.config import AlertThresholds
from tests.conftest import REPO, catalog, free_port, require, start_process, wait_until_answers

GRAFANA = REPO / "grafana"
# Vendored from shared/schemas/grafana (with its licence), so a fresh clone tests on its own.
SCHEMAS = REPO / "tests" / "data" / "grafana_schemas"
RULES = REPO / "prometheus" / "rules" / "mlmon.yml"
sys.path.insert(0, str(GRAFANA))  # build.py imports mlmon_dashboards from there


def load(name: str) -> ModuleType:
    """A script of grafana/ under a name of its own: "build" or "queries" alone could be
    another installed module's (PyPI's build, for one)."""
    spec = importlib.util.spec_from_file_location(f"mlmon_grafana_{name}", GRAFANA / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load("build")
queries = load("queries")
DASHBOARDS = {path.stem: json.loads(path.read_text()) for path in sorted((GRAFANA / "dashboards").glob("*.json"))}
UIDS = {"mlmon-model", "mlmon-training", "mlmon-exporter", "mlmon-serving"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Thresholds switched off by default, so off in the demo: their colour queries are empty.
SWITCHED_OFF = {name for name, value in AlertThresholds() if value is None}
#: Metrics of other exporters that the dashboards read.
OTHER_METRICS = {
    "up",
    "scrape_duration_seconds",
    "ALERTS",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "http_requests_total",
    "http_request_duration_seconds_bucket",
    "http_request_duration_highr_seconds_bucket",
    "model_server_cache_hits_total",
    "model_server_cache_misses_total",
}


def all_queries() -> list[tuple[str, queries.Query]]:
    return [(uid, query) for uid, dashboard in DASHBOARDS.items() for query in queries.queries(dashboard)]


# --- generated, complete, linked ------------------------------------------------------


def test_committed_json_is_what_the_code_builds():
    assert build.stale() == [], "run: python grafana/build.py"


def test_one_file_per_dashboard_named_by_uid():
    assert set(DASHBOARDS) == UIDS
    for uid, dashboard in DASHBOARDS.items():
        assert dashboard["uid"] == uid
        ids = [panel["id"] for panel in queries.panels(dashboard)]
        assert len(set(ids)) == len(ids), uid


def test_every_alert_links_to_an_existing_dashboard():
    alerts = [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule
    ]
    for alert in alerts:
        url = alert["annotations"]["dashboard_url"]
        uid = re.fullmatch(r"/d/([\w-]+)(\?.*)?", url).group(1)
        assert uid in DASHBOARDS, f"{alert['alert']}: {url}"
        names = {variable["name"] for variable in DASHBOARDS[uid]["templating"]["list"]}
        for name in re.findall(r"var-(\w+)=", url):
            assert name in names, f"{alert['alert']}: {uid} has no variable {name}"


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards():
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "mlmon.yml").read_text())["datasources"]
    assert [(d["uid"], d["type"], d["url"]) for d in datasources] == [
        ("mlmon-prometheus", "prometheus", "http://prometheus:9090")
    ]
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "mlmon.yml").read_text())["providers"]
    assert [(p["type"], p["options"]["path"]) for p in providers] == [("file", "/var/lib/grafana/dashboards")]


# --- JSON Schemas -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict]:
    require(SCHEMAS.is_dir(), f"Grafana JSON Schemas not found at {SCHEMAS}")
    return {
        path.name.removesuffix(".jsonschema.json"): json.loads(path.read_text())
        for path in SCHEMAS.glob("*.jsonschema.json")
    }


def errors(schema: dict, definition: str | None, instance: object) -> list[str]:
    """Validation errors of ``instance`` against ``schema`` or one of its definitions."""
    if definition:
        schema = {**schema, "$ref": f"#/definitions/{definition}"}
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in Draft7Validator(schema).iter_errors(instance)
    ]


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_dashboard_panels_and_queries_validate_against_grafana_schemas(uid, schemas):
    dashboard = DASHBOARDS[uid]
    assert errors(schemas["dashboard"], None, dashboard) == []
    for panel in queries.panels(dashboard):
        kind = schemas[panel["type"]]  # a KeyError names a panel kind without schema
        where = f"{uid} / {panel['title']}"
        assert errors(kind, "Options", panel["options"]) == [], where
        custom = panel["fieldConfig"]["defaults"].get("custom")
        if custom is not None and "FieldConfig" in kind["definitions"]:
            assert errors(kind, "FieldConfig", custom) == [], where
        for target in panel["targets"]:
            assert errors(schemas["prometheus"], None, target) == [], where


# --- lint ---------------------------------------------------------------------------------


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_every_query_uses_the_datasource_variable(uid):
    dashboard = DASHBOARDS[uid]
    variables = dashboard["templating"]["list"]
    assert variables[0] == {**variables[0], "name": "datasource", "type": "datasource", "query": "prometheus"}
    for variable in variables[1:]:
        assert variable["datasource"] == DATASOURCE, variable["name"]
    for panel in queries.panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert all(target["datasource"] == DATASOURCE for target in panel["targets"]), panel["title"]
    for annotation in dashboard["annotations"].get("list", []):
        assert annotation["datasource"] == DATASOURCE, annotation["name"]
    text = json.dumps(dashboard)
    assert "${DS_" not in text and "__inputs" not in dashboard


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_query_variables_refresh_on_time_range_change(uid):
    for variable in DASHBOARDS[uid]["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["refresh"] == 2, variable["name"]


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_every_panel_has_title_description_unit_and_queries(uid):
    for panel in queries.panels(DASHBOARDS[uid]):
        assert panel.get("title"), panel
        assert panel.get("description"), panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
        assert panel["targets"], panel["title"]


@pytest.mark.parametrize(
    ("uid", "query"), all_queries(), ids=lambda v: v if isinstance(v, str) else f"{v.panel['title']}/{v.ref}"
)
def test_rate_functions_use_rate_interval(uid, query):
    for function in re.finditer(r"\b(rate|irate|increase)\s*\(", query.expr):
        ranges = re.findall(r"\[([^\]]*)\]", argument(query.expr, function.end()))
        assert ranges == ["$__rate_interval"], f"{uid} / {query.panel['title']}: {query.expr}"


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_threshold_colours_read_the_models_thresholds(uid):
    """Each "Config from query results" transformation reads an instant query whose legend
    is the field it maps, as min or max of percentage thresholds (see judged_stat)."""
    for panel in queries.panels(DASHBOARDS[uid]):
        targets = {target["refId"]: target for target in panel["targets"]}
        for transformation in panel.get("transformations", []):
            if transformation["id"] != "configFromData":
                continue
            [mapping] = transformation["options"]["mappings"]
            target = targets[transformation["options"]["configRefId"]]
            assert target["instant"] and target["legendFormat"] == mapping["fieldName"] == mapping["handlerKey"] in (
                "min",
                "max",
            ), panel["title"]
            assert "mlmon_alert_threshold" in target["expr"], panel["title"]
            assert panel["fieldConfig"]["defaults"]["thresholds"]["mode"] == "percentage", panel["title"]


def argument(expr: str, start: int) -> str:
    """The text from ``start`` to the parenthesis that closes the one before it."""
    depth = 1
    for end in range(start, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[end], 0)
        if depth == 0:
            return expr[start:end]
    raise AssertionError(f"unbalanced parentheses: {expr}")


def test_queries_use_only_cataloged_metrics_and_known_thresholds():
    known = set(catalog()) | OTHER_METRICS
    texts = [query.expr for _, query in all_queries()]
    texts += [v["query"] for d in DASHBOARDS.values() for v in d["templating"]["list"] if v["type"] == "query"]
    for text in texts:
        names = set(re.findall(r"\b(mlmon_\w+)", text)) | set(re.findall(r"([A-Za-z_:][\w:]*)\s*\{", text))
        for name in names:
            assert name in known or re.sub(r"_(bucket|sum|count)$", "", name) in known, (
                f"{name} is not in docs/metrics.md: {text}"
            )
        for threshold in re.findall(r'threshold="(\w+)"', text):
            assert threshold in AlertThresholds.model_fields, text


# --- every query returns data from the real Prometheus scraping the real demo -----------


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> str:
    """URL of a real Prometheus that scrapes ``mlmon demo`` (job mlmon) and the stand-in
    model server (job model-server) every second and evaluates the repo's rules."""
    binary = shutil.which("prometheus")
    require(binary is not None, "needs prometheus (Debian package prometheus)")
    tmp = tmp_path_factory.mktemp("dashboards")
    demo_port, server_port, prometheus_port = free_port(), free_port(), free_port()
    (tmp / "prometheus.yml").write_text(
        f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{RULES}"]
scrape_configs:
  - job_name: mlmon
    static_configs: [{{targets: ["127.0.0.1:{demo_port}"]}}]
  - job_name: model-server
    static_configs: [{{targets: ["127.0.0.1:{server_port}"]}}]
"""
    )
    commands = {
        "demo": (
            [
                sys.executable,
                "-m",
                "exporter",
                "demo",
                "--port",
                str(demo_port),
                "--database",
                str(tmp / "demo.sqlite"),
            ],
            f"http://127.0.0.1:{demo_port}/readyz",
        ),
        "model-server": (
            [sys.executable, str(GRAFANA / "serving_standin.py"), "--port", str(server_port)],
            f"http://127.0.0.1:{server_port}/metrics",
        ),
        "prometheus": (
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            f"http://127.0.0.1:{prometheus_port}/-/ready",
        ),
    }
    processes = []
    try:
        for name, (args, ready) in commands.items():
            log = tmp / f"{name}.log"
            processes.append(start_process(args, log, cwd=tmp))
            wait_until_answers(ready, processes[-1], log, timeout=60)
        yield f"http://127.0.0.1:{prometheus_port}"
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run(prometheus: str, expr: str) -> list:
    """The result of an instant query; a PromQL error fails with Prometheus' message."""
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", f"{body.get('errorType')}: {body.get('error')}"
    return body["data"]["result"]


def may_be_empty(query: queries.Query) -> bool:
    """A colour query of a threshold that is switched off in the demo (see judged_stat)."""
    config_refs = {
        t["options"]["configRefId"] for t in query.panel.get("transformations", []) if t["id"] == "configFromData"
    }
    named = set(re.findall(r'threshold="(\w+)"', query.expr))
    return query.ref in config_refs and named and named <= SWITCHED_OFF


@pytest.mark.long  # a Prometheus over the demo's week: about 30 s
def test_model_variable_lists_both_demo_models(prometheus):
    deadline = time.monotonic() + 60
    while set(queries.label_values(prometheus, "label_values(mlmon_alert_threshold, model)")) != {
        "ctr_feed",
        "ctr_search",
    }:
        assert time.monotonic() < deadline, "the demo's models never appeared"
        time.sleep(0.5)


@pytest.mark.long
@pytest.mark.parametrize("uid", sorted(UIDS))
def test_every_query_returns_data(prometheus, uid):
    """Each target and annotation, variables resolved as Grafana would (ctr_feed, the model
    with incidents), returns at least one series; the demo and the stand-in need a few
    scrapes and refreshes first, so empty results are retried until a deadline."""
    dashboard = DASHBOARDS[uid]
    pending = [query for query in queries.queries(dashboard) if not may_be_empty(query)]
    values = None
    deadline = time.monotonic() + 90
    while True:
        try:
            values = queries.resolve_variables(
                prometheus,
                dashboard,
                {"model": "ctr_feed", "job": "model-server" if uid == "mlmon-serving" else "mlmon"},
            )
            pending = [query for query in pending if not run(prometheus, queries.substitute(query.expr, values))]
        except LookupError:
            pass  # a variable has no value yet
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert values is not None, f"{uid}: a variable never had a value"
    assert not pending, "no data:\n" + "\n".join(f"{uid} / {q.panel['title']} / {q.ref}: {q.expr}" for q in pending)
    # The exemptions are exactly the switched-off thresholds' queries, and they are empty.
    for query in queries.queries(dashboard):
        if may_be_empty(query):
            assert run(prometheus, queries.substitute(query.expr, values)) == [], query.expr


@pytest.mark.long  # a Prometheus over the demo's week: about 30 s
def test_firing_alerts_panel_shows_the_demo_incidents(prometheus):
    """ctr_feed's newest version regressed offline: MlmonOfflineAccuracyRegressed (no
    ``for``) fires and is what the panel lists."""
    panel = next(p for p in queries.panels(DASHBOARDS["mlmon-model"]) if p["title"] == "Firing mlmon alerts")
    expr = queries.substitute(panel["targets"][0]["expr"], {"model": "ctr_feed"})
    deadline = time.monotonic() + 60
    while not (names := {series["metric"]["alertname"] for series in run(prometheus, expr)}):
        assert time.monotonic() < deadline, "no mlmon alert fired"
        time.sleep(1)
    assert "MlmonOfflineAccuracyRegressed" in names


# --- versions in training order -------------------------------------------------------------


def by_version_panels() -> list[dict]:
    """The panels that draw one value per version (a ``mlmon_version_*`` metric)."""
    return [
        panel
        for dashboard in DASHBOARDS.values()
        for panel in queries.panels(dashboard)
        if any(re.search(r"mlmon_version_(?!trained)", t["expr"]) for t in panel["targets"])
    ]


def test_by_version_panels_sort_versions_by_training_time():
    """Prometheus sorts label values as text (v10 before v3): every panel that lists
    versions joins each version's training time, sorts by it and hides it."""
    panels = by_version_panels()
    assert {p["title"] for p in panels} == {
        "Training rows by version",
        "Validation log loss by version",
        "Validation ROC AUC by version",
    }
    for panel in panels:
        trained = [t for t in panel["targets"] if "mlmon_version_trained_timestamp_seconds" in t["expr"]]
        assert len(trained) == 1 and all(t["format"] == "table" and t["instant"] for t in panel["targets"])
        field = f"Value #{trained[0]['refId']}"
        steps = {t["id"]: t["options"] for t in panel["transformations"]}
        assert [t["id"] for t in panel["transformations"]] == ["merge", "sortBy", "organize"], panel["title"]
        assert steps["sortBy"]["sort"] == [{"field": field}]  # ascending: oldest first
        assert steps["organize"]["excludeByName"] == {"Time": True, "model": True, field: True}
        assert panel["options"]["reduceOptions"]["values"] is True  # one bar per row


def test_by_version_panel_rows_are_in_training_order(tmp_path):
    """Grafana's merge, sortBy and organize applied (as Grafana does) to the instant
    vectors of a real exposition whose version names do not sort in training order."""
    from datetime import datetime, timedelta

    from prometheus_client.parser import text_string_to_metric_families

    from exporter.config import parse_settings
    from exporter.training.schema import TrainingRun
    from exporter.training.storage import StateDatabase, save_run
    from tests.conftest import refresh_once

    now = datetime(2026, 11, 28, tzinfo=UTC)
    trained = ["v3", "v9", "v10", "v11", "v2-hotfix"]  # oldest first
    state = f"sqlite:///{tmp_path}/state.sqlite"
    database = StateDatabase(state)
    for age, version in enumerate(reversed(trained)):
        run = TrainingRun(
            model="m",
            version=version,
            trained_at=now - timedelta(days=age),
            training_rows=100 + age,
            validation_logloss=0.3,
            validation_roc_auc=0.8,
        )
        save_run(database.ready(), run, now)
    database.engine.dispose()
    settings = parse_settings({"stores": {}, "models": [], "state": {"url": state}})
    families = {f.name: f for f in text_string_to_metric_families(refresh_once(settings, now).decode())}
    for panel in by_version_panels():
        columns = {}
        for target in panel["targets"]:
            name = re.search(r"(mlmon_\w+)", target["expr"]).group(1)
            for sample in families[name].samples:
                row = columns.setdefault(sample.labels["version"], {"version": sample.labels["version"]})
                row[f"Value #{target['refId']}"] = sample.value
        field = panel["transformations"][1]["options"]["sort"][0]["field"]
        rows = sorted(columns.values(), key=lambda row: row[field])
        assert [row["version"] for row in rows] == trained, panel["title"]
        assert sorted(columns) != trained  # text order would be wrong
