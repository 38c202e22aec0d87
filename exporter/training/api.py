"""The training-run API: ``POST /api/v1/training-runs``, ``GET /api/v1/models``,
``GET /api/v1/models/{model}/versions`` and ``DELETE /api/v1/models/{model}/versions/{version}``.

A request is accepted or rejected whole: nothing is stored unless the run was valid and
its commit succeeded. With a token configured, every request needs
``Authorization: Bearer <token>``, compared in constant time; without one, browser writes
from other pages are refused (``refuse_browser_writes_from_elsewhere``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from urllib.parse import urlsplit

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.openapi.utils import get_openapi
from pydantic import ValidationError

from exporter.config import ApiSettings
from exporter.errors import first_line, located
from exporter.training.schema import TrainingRun
from exporter.training.storage import (
    RunConflict,
    StateDatabase,
    TooManyModels,
    delete_run,
    list_models,
    list_versions,
    save_run,
)

log = logging.getLogger(__name__)

#: Seconds a client is asked to wait (``Retry-After``) after a 503. Only a hint: how long
#: the state database stays away is unknown, and a few seconds spaces out the retries of
#: many pipelines without delaying them much after a brief outage.
RETRY_AFTER_SECONDS = 5
#: The state database's calls get threads of their own (one pool per process): while it
#: hangs (until its statement_timeout), they must not take the default executor's few
#: threads, which render /metrics and check basic-auth passwords.
STATE_THREADS = 4
_STATE_POOL = ThreadPoolExecutor(max_workers=STATE_THREADS, thread_name_prefix="state-db")


def training_api(
    api: ApiSettings,
    max_models: int | None,
    configured: frozenset[str],
    state: StateDatabase,
    on_stored: Callable[[], None],
    on_refused: Callable[[str], None],
) -> APIRouter:
    """The API router, set up by the config's ``api`` and ``training.max_models``;
    ``configured`` names the models of the config (answers say whether a run's model is
    one). ``on_stored`` is called after a run was committed or deleted, ``on_refused`` with
    the reason (``"max_models"``) after a valid run was refused.

    Errors: 401 missing or wrong token; 404 no such model or version; 408 body slower than
    ``api.body_timeout``; 413 body over ``api.max_body_bytes``; 415 not
    JSON; 422 invalid run (``detail`` lists ``{"loc", "msg"}`` per problem); 409 the
    version is stored with another body, or the run is of a new model and runs of
    ``training.max_models`` models are stored; 503 the state database failed (with a
    ``Retry-After`` of ``RETRY_AFTER_SECONDS``; sending the same run again is safe, it is
    stored once).
    """
    token = api.resolved_token()
    limit = api.max_body_bytes
    body_timeout = api.body_timeout.total_seconds()

    def authorize(request: Request) -> None:
        if token is None:
            refuse_browser_writes_from_elsewhere(request)
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    router = APIRouter(prefix="/api/v1", dependencies=[Depends(authorize)])

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"body of {declared} bytes is over the limit of {limit} bytes")
        body = bytearray()
        try:
            # A client that trickles its body must not hold a worker for ever.
            async with asyncio.timeout(body_timeout):
                async for chunk in request.stream():  # a body without a (true) length is cut off too
                    body += chunk
                    if len(body) > limit:
                        raise HTTPException(413, f"body is over the limit of {limit} bytes")
        except TimeoutError:
            # The rest of the body may still be on its way: the connection cannot carry
            # another request, so the server closes it rather than wait for the rest.
            raise HTTPException(
                408, f"the body did not arrive within {body_timeout:g} s", headers={"Connection": "close"}
            ) from None
        return bytes(body)

    async def in_state_db(fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(_STATE_POOL, lambda: fn(state.ready(), *args))
        except sa.exc.SQLAlchemyError as exc:
            state.failed()
            log.warning("state database failed: %s", first_line(exc))
            raise HTTPException(
                503,
                "the state database is unavailable; nothing was stored, retry later",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None

    @router.post(
        "/training-runs",
        status_code=201,
        responses={200: {"description": "identical run already stored"}},
        # The body is read raw (to enforce the size limit first), so describe it here.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TrainingRun"}}},
            }
        },
    )
    async def report_training_run(request: Request, response: Response) -> dict:
        """Store a training run; the same body again is a no-op (200), another body for a
        stored version is a conflict (409). The answer: ``status`` (created, unchanged),
        ``model``, ``version`` and ``in_config`` (whether the config has the model; a run of
        another model is stored and exported all the same)."""
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise HTTPException(415, "send the run as application/json")
        body = await read_body(request)
        try:
            run = TrainingRun.model_validate_json(body)
        except ValidationError as exc:
            detail = [dict(zip(("loc", "msg"), located(e), strict=False)) for e in exc.errors(include_url=False)]
            raise HTTPException(422, detail) from None
        try:
            status = await in_state_db(save_run, run, datetime.now(UTC), max_models)
        except RunConflict as exc:
            raise HTTPException(409, str(exc)) from None
        except TooManyModels as exc:
            on_refused("max_models")  # counted, not logged: a client could flood the log
            raise HTTPException(409, str(exc)) from None
        if status == "created":
            on_stored()
        else:
            response.status_code = 200
        # Stored either way (the API serves models from training alone), but a model missing
        # from the config is often a typo the pipeline should be told about.
        return {"status": status, "model": run.model, "version": run.version, "in_config": run.model in configured}

    @router.get("/models")
    async def models() -> dict:
        """Models with stored training runs."""
        return {"models": await in_state_db(list_models)}

    @router.get("/models/{model}/versions")
    async def versions(model: str) -> dict:
        """A model's stored versions, newest first (by training time)."""
        runs = await in_state_db(list_versions, model)
        if not runs:
            raise HTTPException(404, f"no training run stored for model {model!r}")
        return {
            "model": model,
            "versions": [
                {
                    "version": r.version,
                    "trained_at": r.trained_at.isoformat(),
                    "training_rows": r.training_rows,
                    "validation_rows": r.validation_rows,
                    "validation_logloss": r.validation_logloss,
                    "validation_roc_auc": r.validation_roc_auc,
                    "received_at": r.received_at.isoformat(),
                }
                for r in runs
            ],
        }

    @router.delete("/models/{model}/versions/{version}")
    async def delete_version(model: str, version: str) -> dict:
        """Delete a stored run, to correct one reported by mistake; the training metrics are
        re-read at once. Reporting that version again afterwards stores it anew."""
        if not await in_state_db(delete_run, model, version):
            raise HTTPException(404, f"no training run stored for model {model!r} version {version!r}")
        log.info("training run of model %r version %r deleted", model, version)
        on_stored()
        return {"status": "deleted", "model": model, "version": version}

    return router


def refuse_browser_writes_from_elsewhere(request: Request) -> None:
    """Without a token, refuse (403) a write a browser sends from another page.

    Browsers send ``Origin`` with every request that is not a GET or HEAD (Fetch
    standard); other clients (the Python client, curl) send none and are not affected. A
    write is refused when its ``Origin`` differs from its ``Host`` (a cross-site request)
    or names a host that is not an IP address or ``localhost``: a DNS-rebinding page
    (``evil.example`` resolving to mlmon's address) is same-origin to the browser, but its
    origin is a host name. mlmon's own ``/docs`` opened at an address keeps working.

    Raises:
        HTTPException: 403.
    """
    origin = request.headers.get("origin")
    if origin is None or request.method in ("GET", "HEAD", "OPTIONS"):
        return
    parsed = urlsplit(origin)
    same = parsed.netloc.lower() == request.headers.get("host", "").lower() and parsed.scheme in ("http", "https")
    if not (same and _address_or_localhost(parsed.hostname)):
        raise HTTPException(
            403,
            "browser requests that write are only accepted from this server's own pages opened at an IP address or "
            "localhost while api.token is not set; set api.token to accept writes from anywhere with the token",
        )


def _address_or_localhost(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def document_training_run(app: FastAPI) -> None:
    """Add the ``TrainingRun`` body schema to the app's OpenAPI document (FastAPI only
    documents bodies it parses itself)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            run = TrainingRun.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(run.pop("$defs", {}))
            components["TrainingRun"] = run
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
