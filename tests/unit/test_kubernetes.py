"""deploy/kubernetes/: the PrometheusRule is generated from the repo's rule files and says
the same thing; the ServiceMonitor scrapes the shipped Service's port; Deployment and
Service validate against Kubernetes' own schemas (kubernetes-validate ships them, offline)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from exporter.config import DEFAULT_PORT
from tests.conftest import REPO, require

K8S = REPO / "deploy" / "kubernetes"


def manifest(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def load_generator():
    spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheusrule_is_regenerated_byte_for_byte():
    committed = (K8S / "prometheusrule.yaml").read_text()
    assert load_generator().render() == committed, (
        "deploy/kubernetes/prometheusrule.yaml is stale: run python deploy/kubernetes/generate.py"
    )


def test_prometheusrule_groups_equal_the_rule_files():
    rule = manifest("prometheusrule.yaml")
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    files = sorted((REPO / "prometheus" / "rules").glob("*.yml"))
    assert files, "no rule files under prometheus/rules"
    expected = [group for path in files for group in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == expected
    names = [group["name"] for group in expected]
    assert len(names) == len(set(names)), f"group names must be unique in one PrometheusRule: {names}"


def test_servicemonitor_scrapes_the_service_port_at_metrics():
    monitor, service = manifest("servicemonitor.yaml"), manifest("service.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items(), "the ServiceMonitor does not select the Service"
    port_names = {port["name"] for port in service["spec"]["ports"]}
    endpoints = monitor["spec"]["endpoints"]
    assert endpoints and all(e["port"] in port_names and e["path"] == "/metrics" for e in endpoints), (
        endpoints,
        port_names,
    )
    assert [p["port"] for p in service["spec"]["ports"] if p["name"] == endpoints[0]["port"]] == [DEFAULT_PORT]


def test_service_job_label_is_the_one_the_alerts_watch():
    # The operator names the job after the Service; MlmonExporterDown matches that job.
    rules = (REPO / "prometheus" / "rules" / "mlmon.yml").read_text()
    jobs = set(re.findall(r'up\{job="([^"]+)"\}', rules))
    assert jobs == {manifest("service.yaml")["metadata"]["name"]}


def test_service_reaches_the_deployment_container_port():
    service, deployment = manifest("service.yaml"), manifest("deployment.yaml")
    template = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    (container,) = template["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert container_ports.get(port["targetPort"]) == DEFAULT_PORT, (port, container_ports)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in container_ports


def test_deployment_runs_the_image_as_built():
    """The uid, the command and the writable paths of the Deployment are the Dockerfile's."""
    dockerfile = (REPO / "Dockerfile").read_text()
    uid = re.search(r"^USER (\d+)", dockerfile, re.M).group(1)
    cmd = yaml.safe_load(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    pod = manifest("deployment.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == uid
    assert container["args"] == cmd
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    config_dir = str(Path(cmd[cmd.index("--config") + 1]).parent)
    assert {config_dir, "/var/lib/mlmon", "/tmp"} <= mounts
    assert not container["image"].endswith(":latest") and ":" in container["image"]


def test_deployment_takes_the_api_token_from_a_secret():
    """The pod does not start without the token (a secretKeyRef that is not optional), so
    the training API is never open in the cluster."""
    (container,) = manifest("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    (token,) = [e for e in container.get("env", []) if e["name"] == "MLMON_API_TOKEN"]
    assert "value" not in token
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "mlmon-secrets", "key": "MLMON_API_TOKEN"} and not ref.get("optional", False)


def test_kustomization_lists_every_manifest():
    listed = set(manifest("kustomization.yaml")["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("name", ["deployment.yaml", "service.yaml"])
def test_core_manifests_validate_against_kubernetes_schemas(name):
    try:
        import kubernetes_validate
    except ImportError:
        require(False, "needs kubernetes-validate (pip install -e '.[test]')")
    # strict: unknown fields (a typo such as readinesProbe) are errors, not ignored.
    kubernetes_validate.validate(manifest(name), kubernetes_validate.latest_version(), strict=True)
