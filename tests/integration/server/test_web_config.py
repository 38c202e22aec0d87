"""TLS and basic auth of the real server (`mlmon serve --web.config.file`), with a
certificate made by openssl for the test."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import bcrypt
import httpx
import pytest

from exporter.config import ConfigError
from exporter.server.web_config import load_web_config
from tests.conftest import free_port, require, start_process, wait_until_answers

PASSWORD = "correct horse battery staple"


@pytest.fixture
def certificate(tmp_path) -> tuple[Path, Path]:
    require(shutil.which("openssl") is not None, "openssl not installed")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_and_basic_auth_on_the_real_server(tmp_path, certificate):
    cert, key = certificate
    hashed = (
        bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode().replace("$2b$", "$2y$", 1)
    )  # htpasswd style
    (tmp_path / "web.yml").write_text(
        f"tls_server_config: {{cert_file: {cert.name}, key_file: {key.name}}}\nbasic_auth_users: {{prometheus: '{hashed}'}}\n"
    )
    (tmp_path / "mlmon.yml").write_text(
        f'stores: {{}}\nmodels: []\nstate: {{url: "sqlite:///{tmp_path}/state.sqlite"}}\n'
    )
    port = free_port()
    log = tmp_path / "server.log"
    server = start_process(
        [
            sys.executable,
            "-m",
            "exporter",
            "serve",
            "--config",
            str(tmp_path / "mlmon.yml"),
            "--port",
            str(port),
            "--web.config.file",
            str(tmp_path / "web.yml"),
        ],
        log,
    )
    base = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        wait_until_answers(f"{base}/healthz", server, log, timeout=30, verify=trust)
        anonymous = httpx.get(f"{base}/metrics", verify=trust)
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(f"{base}/metrics", verify=trust, auth=("prometheus", "wrong")).status_code == 401
        assert httpx.get(f"{base}/metrics", verify=trust, auth=("nobody", PASSWORD)).status_code == 401
        allowed = httpx.get(f"{base}/metrics", verify=trust, auth=("prometheus", PASSWORD))
        assert allowed.status_code == 200 and "mlmon_build_info" in allowed.text
        # the training-run API keeps its own bearer token, in the same header; probes stay open
        assert httpx.get(f"{base}/api/v1/models", verify=trust).status_code == 200
        assert httpx.get(f"{base}/healthz", verify=trust).status_code == 200
        assert (
            httpx.get(f"{base}/metrics", verify=trust, auth=("prometheus", "x" * 100)).status_code == 401
        )  # > 72 bytes
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_web_config_errors_are_named(tmp_path):
    (tmp_path / "web.yml").write_text(
        "tls_server_config: {cert_file: missing.crt, key_file: missing.key}\nbasic_auth_users: {u: plain}\nextra: 1\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_web_config(tmp_path / "web.yml")
    assert caught.value.errors == ["extra: unknown key 'extra' (allowed: basic_auth_users, tls_server_config)"]
    (tmp_path / "web.yml").write_text(
        "tls_server_config: {cert_file: missing.crt, key_file: missing.key}\nbasic_auth_users: {u: plain, v: $2y$10$garbage}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_web_config(tmp_path / "web.yml")
    assert caught.value.errors == [
        "basic_auth_users.u: not a bcrypt hash (expected $2a$, $2b$ or $2y$...)",
        "basic_auth_users.v: not a bcrypt hash (expected $2a$, $2b$ or $2y$...)",
        f"tls_server_config.cert_file: no file {tmp_path / 'missing.crt'}",
        f"tls_server_config.key_file: no file {tmp_path / 'missing.key'}",
    ]


def test_a_certificate_that_does_not_match_its_key_is_a_config_error(tmp_path, certificate):
    cert, _ = certificate
    other_key = tmp_path / "other.key"
    subprocess.run(["openssl", "genrsa", "-out", str(other_key), "2048"], check=True, capture_output=True)
    (tmp_path / "web.yml").write_text(f"tls_server_config: {{cert_file: {cert.name}, key_file: other.key}}\n")
    with pytest.raises(ConfigError) as caught:
        load_web_config(tmp_path / "web.yml")
    (error,) = caught.value.errors
    assert error.startswith("tls_server_config: cert_file and key_file do not make a usable certificate")
