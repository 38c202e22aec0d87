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
import math
import ssl
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import bcrypt
import limits
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


#: Failed basic-auth attempts a client address may make per minute; beyond them it gets 429
#: without a bcrypt check until its oldest failure is a minute old (a moving window).
FAILURES_PER_MINUTE = 5
#: bcrypt checks that may wait or run at once; beyond them a new, unverified header gets 429
#: at once. With ``BCRYPT_THREADS`` threads at ~60 ms a check (cost 10), the last one waits
#: about half a second.
MAX_PENDING_CHECKS = 16
#: Threads of the bcrypt pool: its own, so that checks never queue the /metrics renderer
#: (asyncio's default executor) or the training API's state-database calls.
BCRYPT_THREADS = 2
#: Why a request was refused, the ``reason`` of ``mlmon_basic_auth_refusals_total``.
REFUSAL_REASONS = ("unauthorized", "rate_limited", "overloaded")


class BasicAuth:
    """ASGI middleware: HTTP basic auth against bcrypt hashes, for every path but those
    in ``UNPROTECTED``.

    A wrong password must not delay the right ones (bcrypt costs tens of milliseconds by
    design), so:

    - an ``Authorization`` header verified before is recognised by its SHA-256 digest on
      the event loop, without a thread hop (exporter-toolkit also caches verified
      credentials); only headers that verified are remembered, so the cache holds at most
      one entry per (user, right password, encoding);
    - other headers are checked with bcrypt in a pool of ``BCRYPT_THREADS`` threads of
      their own, at most ``MAX_PENDING_CHECKS`` at a time (429, ``reason="overloaded"``
      beyond);
    - a client address (``scope["client"]``) that failed ``FAILURES_PER_MINUTE`` times
      in the last minute gets 429 with ``Retry-After`` and no check
      (``reason="rate_limited"``), by the moving window of the ``limits`` library.

    Every refusal calls ``on_refused(reason)`` with a reason of ``REFUSAL_REASONS``.
    """

    def __init__(self, app: ASGIApp, users: dict[str, str], on_refused: Callable[[str], None] = lambda _: None):
        self.app = app
        self.users = {user: hashed.encode() for user, hashed in users.items()}
        self._on_refused = on_refused
        self._verified: set[bytes] = set()
        self._checks = ThreadPoolExecutor(max_workers=BCRYPT_THREADS, thread_name_prefix="bcrypt")
        self._pending: Counter[str] = Counter()  # bcrypt checks waiting or running, by client address
        self._failures = limits.strategies.MovingWindowRateLimiter(limits.storage.MemoryStorage())
        self._failure_limit = limits.RateLimitItemPerMinute(FAILURES_PER_MINUTE)

    @staticmethod
    def _credentials(header: bytes) -> tuple[str, str] | None:
        """(user, password) of a basic ``Authorization`` header; ``None`` if it is not one."""
        scheme, _, encoded = header.decode("latin-1").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return user, password

    def _check(self, user: str, password: str) -> bool:
        """Whether ``password`` is ``user``'s (slow: bcrypt; an unknown user as slow as a known one)."""
        hashed = self.users.get(user)
        try:
            return bcrypt.checkpw(password.encode(), hashed or _DUMMY_HASH) and hashed is not None
        except ValueError:  # a password over bcrypt's 72 bytes: no user can have it
            return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(UNPROTECTED):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        digest = hashlib.sha256(header).digest()
        if digest in self._verified:  # the common case, a scraper's every request: no thread, no wait
            await self.app(scope, receive, send)
            return
        refusal = await self._verify(header, digest, scope.get("client"))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        self._on_refused(refusal)
        if refusal == "unauthorized":
            response = PlainTextResponse(
                "unauthorized\n", status_code=401, headers={"WWW-Authenticate": 'Basic realm="mlmon"'}
            )
        else:
            response = PlainTextResponse(
                "too many failed or pending authentication attempts; retry later\n",
                status_code=429,
                headers={
                    "Retry-After": str(self._retry_after(scope.get("client")) if refusal == "rate_limited" else 1)
                },
            )
        await response(scope, receive, send)

    async def _verify(self, header: bytes, digest: bytes, client: tuple[str, int] | None) -> str | None:
        """``None`` if ``header`` holds a user's password (then remembered), else the refusal reason.

        Only bcrypt checks count as failures: a request without credentials (a browser's
        first) costs nothing and must not lock its address out."""
        credentials = self._credentials(header)
        if credentials is None:
            return "unauthorized"
        address = client[0] if client else "unknown"
        # A check in progress counts as a failure until it ends. The budget is read and the
        # check counted with no await between (one event loop: nothing interleaves), so that
        # parallel guesses cannot all pass before the first failure is counted (16 did).
        remaining = self._failures.get_window_stats(self._failure_limit, address).remaining
        if remaining - self._pending[address] <= 0:
            return "rate_limited"
        if self._pending.total() >= MAX_PENDING_CHECKS:
            return "overloaded"
        self._pending[address] += 1
        try:
            allowed = await asyncio.get_running_loop().run_in_executor(self._checks, self._check, *credentials)
        finally:
            self._pending[address] -= 1
            if not self._pending[address]:
                del self._pending[address]
        if allowed:
            self._verified.add(digest)
            return None
        self._failures.hit(self._failure_limit, address)
        return "unauthorized"

    def _retry_after(self, client: tuple[str, int] | None) -> int:
        """Seconds until the client's oldest counted failure leaves the window (1 at least)."""
        address = client[0] if client else "unknown"
        reset = self._failures.get_window_stats(self._failure_limit, address).reset_time
        return max(1, math.ceil(reset - time.time()))
