"""The real server's answers that tools other than Prometheus rely on: HEAD probes,
the API docs page on a network without internet access, and its log (--log.level)."""

from __future__ import annotations

import re
import socket
import sys

import httpx
import pytest
from typer.testing import CliRunner

from exporter.cli import app as cli
from tests.conftest import free_port, start_process, wait_until_answers


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("server")
    (tmp_path / "mlmon.yml").write_text(
        f'stores: {{}}\nmodels: []\nstate: {{url: "sqlite:///{tmp_path}/state.sqlite"}}\n'
    )
    port = free_port()
    log = tmp_path / "server.log"
    process = start_process(
        [sys.executable, "-m", "exporter", "serve", "--config", str(tmp_path / "mlmon.yml"), "--port", str(port)], log
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{base}/readyz", process, log, timeout=30)
        yield base, port
    finally:
        process.terminate()
        process.wait(timeout=10)


def _raw(port: int, request: bytes) -> bytes:
    """Everything the server sends for one request on a connection it then closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz", "/"])
def test_head_answers_like_get_without_a_body(server, path):
    base, port = server
    get = httpx.get(f"{base}{path}")
    raw = _raw(port, f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK", lines[0]
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert body == b""
    assert headers["content-type"] == get.headers["content-type"]
    if path != "/metrics":  # the exposition may change between the two requests
        assert int(headers["content-length"]) == len(get.content)


def test_api_docs_are_served_without_a_cdn(server):
    base, _ = server
    page = httpx.get(f"{base}/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    assets = re.findall(r"""(?:src|href)=["']?([^"' >]+)""", page.text)
    assert {"/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui.css"} <= set(assets), assets
    for asset in assets:
        response = httpx.get(f"{base}{asset}")
        assert response.status_code == 200 and len(response.content) > 100, asset
    assert "SwaggerUIBundle" in httpx.get(f"{base}/docs/static/swagger-ui-bundle.js").text
    assert "/api/v1/training-runs" in httpx.get(f"{base}/openapi.json").json()["paths"]


def test_every_operation_of_the_api_document_has_its_own_operation_id(server):
    """OpenAPI 3: operationId is unique among all operations (a GET+HEAD route shared one)."""
    base, _ = server
    paths = httpx.get(f"{base}/openapi.json").json()["paths"]
    ids = [op["operationId"] for methods in paths.values() for op in methods.values()]
    assert len(ids) == len(set(ids)), ids


@pytest.mark.parametrize("level, logged", [("info", False), ("debug", True)])
@pytest.mark.long
def test_requests_are_logged_at_debug_only(tmp_path, level, logged):
    """A line per scrape is noise at a 15 s scrape interval; --log.level debug shows them.
    uvicorn's lines carry a timestamp as mlmon's own do."""
    (tmp_path / "mlmon.yml").write_text(f'stores: {{}}\nmodels: []\nstate: {{url: "sqlite:///{tmp_path}/s.sqlite"}}\n')
    port, log = free_port(), tmp_path / "server.log"
    args = ["serve", "--config", str(tmp_path / "mlmon.yml"), "--port", str(port), "--log.level", level]
    process = start_process([sys.executable, "-m", "exporter", *args], log)
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/readyz", process, log)
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=10)
    text = log.read_text()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO uvicorn\.(?:error|access): "
    assert re.search(rf"^{stamp}Uvicorn running on", text, re.MULTILINE), text  # info and above either way
    assert bool(re.search(rf'^{stamp}.*"GET /metrics HTTP/1\.1" 200', text, re.MULTILINE)) is logged, text


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_an_unknown_log_level_is_a_usage_error(tmp_path, command):
    (tmp_path / "mlmon.yml").write_text("stores: {}\nmodels: []\n")
    config = ["--config", str(tmp_path / "mlmon.yml")] if command == "serve" else []
    result = CliRunner().invoke(cli, [command, *config, "--log.level", "verbose"])
    assert result.exit_code == 2
    assert "--log.level: 'verbose' is not one of debug, info, warn, error" in result.output
