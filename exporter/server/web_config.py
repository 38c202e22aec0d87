"""TLS and basic auth for the HTTP server, configured as Prometheus exporters do: a web
configuration file in the exporter-toolkit format (``--web.config.file``).

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_ca_file: ca.crt                  # optional: verify client certificates
      client_auth_type: RequireAndVerifyClientCert
    basic_auth_users:
      prometheus: $2y$10$...                  # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':')

Basic auth protects every endpoint but ``/api/v1/...``, whose requests carry the
training-run API's own bearer token (``api.token``) in the same header, and the health
probes ``/healthz`` and ``/readyz``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
from pathlib import Path
from typing import Literal

import bcrypt
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from exporter.config import ConfigError
from exporter.errors import error_lines, yaml_error_line

#: A bcrypt hash to check unknown users against, so that they take about as long as known
#: ones (exactly as long when the users' hashes have cost 10, the htpasswd -C 10 of the docs).
_DUMMY_HASH = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=10))
#: Paths basic auth leaves alone: the API has its own bearer token in the same header, and
#: the health probes of Docker and Kubernetes carry no credentials and reveal nothing.
UNPROTECTED = ("/api/v1/", "/healthz", "/readyz")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsServerConfig(_Strict):
    """The server certificate and key, and optionally the CA that client certificates must chain to."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: Literal["NoClientCert", "RequireAndVerifyClientCert"] = "NoClientCert"


class WebConfig(_Strict):
    """The web configuration file: TLS and the users of basic auth (name -> bcrypt hash)."""

    tls_server_config: TlsServerConfig | None = None
    basic_auth_users: dict[str, str] = {}

    def uvicorn_options(self) -> dict:
        """Keyword arguments of ``uvicorn.run`` for the TLS part (none without TLS)."""
        tls = self.tls_server_config
        if tls is None:
            return {}
        options: dict[str, str | int] = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
        if tls.client_ca_file is not None:
            options["ssl_ca_certs"] = str(tls.client_ca_file)
        if tls.client_auth_type == "RequireAndVerifyClientCert":
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        return options


def load_web_config(path: str | Path) -> WebConfig:
    """Read and validate a web configuration file; relative paths are relative to it.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown keys, missing files, or a user
            whose hash is not bcrypt (each naming its key path).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
        config = WebConfig.model_validate(data)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read web config: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([yaml_error_line(path, exc)]) from None
    except ValidationError as exc:
        raise ConfigError(error_lines(exc.errors(), WebConfig)) from None
    errors = [
        f"basic_auth_users.{user}: not a bcrypt hash (expected $2a$, $2b$ or $2y$...)"
        for user, hashed in config.basic_auth_users.items()
        if not _is_bcrypt(hashed)
    ]
    tls = config.tls_server_config
    if tls is not None:
        resolved = {name: path.parent / value for name, value in tls.model_dump().items() if isinstance(value, Path)}
        errors += [f"tls_server_config.{name}: no file {file}" for name, file in resolved.items() if not file.is_file()]
        if tls.client_auth_type == "RequireAndVerifyClientCert" and tls.client_ca_file is None:
            errors.append("tls_server_config.client_ca_file: required by RequireAndVerifyClientCert")
        config = config.model_copy(update={"tls_server_config": tls.model_copy(update=resolved)})
        if not errors:
            try:  # a bad PEM or a key of another certificate: said now, not as a traceback at startup
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    resolved["cert_file"], resolved["key_file"]
                )
            except (ssl.SSLError, OSError) as exc:
                errors.append(f"tls_server_config: cert_file and key_file do not make a usable certificate: {exc}")
    if errors:
        raise ConfigError(errors)
    return config


def _is_bcrypt(hashed: str) -> bool:
    try:
        bcrypt.checkpw(b"probe", hashed.encode())
    except ValueError:
        return False
    return hashed.startswith(("$2a$", "$2b$", "$2y$"))


class BasicAuth:
    """ASGI middleware: HTTP basic auth against bcrypt hashes, for every path but those
    in ``UNPROTECTED``. Verified (user, password) pairs are remembered by a hash of the
    password, as exporter-toolkit does, since bcrypt takes tens of milliseconds."""

    def __init__(self, app: ASGIApp, users: dict[str, str]):
        self.app = app
        self.users = {user: hashed.encode() for user, hashed in users.items()}
        self._verified: set[tuple[str, bytes]] = set()

    def _allowed(self, header: str) -> bool:
        """Whether an ``Authorization`` header holds a known user's password (slow: bcrypt)."""
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        key = (user, hashlib.sha256(password.encode()).digest())
        if key in self._verified:
            return True
        hashed = self.users.get(user)
        try:
            ok = bcrypt.checkpw(password.encode(), hashed or _DUMMY_HASH) and hashed is not None
        except ValueError:  # a password over bcrypt's 72 bytes: no user can have it
            return False
        if ok:
            self._verified.add(key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(UNPROTECTED):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        # bcrypt takes tens of milliseconds: off the event loop, so that bad guesses
        # cannot stall the scrapes of everyone else.
        if await asyncio.to_thread(self._allowed, headers.get(b"authorization", b"").decode("latin-1")):
            await self.app(scope, receive, send)
            return
        response = PlainTextResponse(
            "unauthorized\n", status_code=401, headers={"WWW-Authenticate": 'Basic realm="mlmon"'}
        )
        await response(scope, receive, send)
