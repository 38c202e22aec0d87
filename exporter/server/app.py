"""The FastAPI service: ``/metrics``, ``/healthz``, ``/readyz`` and a landing page."""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

# The classic text format 0.0.4 is what every Prometheus (2.x and 3.x) scrapes.
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.types import Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

from exporter import __version__
from exporter.config import Settings, Store
from exporter.db import DEFAULT_MAX_CONNECTIONS, PoolSize
from exporter.predictions.refresh import refresh_deadline
from exporter.predictions.stores import Stores
from exporter.server.collector import build_registry, render
from exporter.server.loop import RefreshLoop
from exporter.snapshot import SnapshotStore
from exporter.training.api import STATE_THREADS, document_training_run, training_api
from exporter.training.storage import StateDatabase

log = logging.getLogger(__name__)

_LANDING = """<!doctype html>
<html><head><title>mlmon</title></head>
<body><h1>mlmon {version}</h1>
<p>Prometheus exporter for machine-learning model monitoring, watching {models} model(s).</p>
<ul><li><a href="metrics">/metrics</a>: the exposition Prometheus scrapes</li>
<li><a href="healthz">/healthz</a>: process alive</li>
<li><a href="readyz">/readyz</a>: the first refresh of every model is on /metrics</li>
<li><a href="api/v1/models">/api/v1/models</a>: models with training runs (<a href="docs">API docs</a>)</li></ul>
</body></html>
"""


class SlicedResponse(Response):
    """A response whose body is sent in ``SLICE``-byte pieces, each after the client took
    the previous ones (uvicorn waits while the transport's buffer is over its high-water
    mark), as views of the one body every connection shares.

    Sent whole, the body is copied per connection (h11 joins what it frames) and waits
    there for a client that never reads: 100 such clients of a 24 MB exposition held 2.5 GB.
    The header deadline and ``write_timeout`` (exporter/server/http_server.py) bound how
    long one waits.
    """

    SLICE = 64 * 1024

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        body = memoryview(self.body)
        for start in range(0, max(len(body), 1), self.SLICE):
            end = start + self.SLICE
            await send({"type": "http.response.body", "body": body[start:end], "more_body": end < len(body)})


class ExpositionCache:
    """The rendered ``/metrics`` body, re-rendered in the background at most once a second
    when a snapshot changed (and every ``MAX_AGE`` seconds for the process metrics), so a
    scrape returns bytes at once: rendering hundreds of models in the request would make
    scrapes slow and compete with the refreshes."""

    MAX_AGE = 5.0

    def __init__(self, registry, store: SnapshotStore):
        self._registry = registry
        self._store = store
        self._bodies: tuple[bytes, bytes] | None = None  # (plain, gzip), replaced together
        self._version = -1
        self._rendered_at = 0.0
        self.ready = False
        """True once a rendering holds the first refresh of every model."""

    def latest(self, gzipped: bool = False) -> bytes:
        """The newest rendering, plain or gzip-compressed (rendered now if there is none yet)."""
        bodies = self._bodies
        if bodies is None:
            bodies = self._render()
        plain, compressed = bodies
        return compressed if gzipped else plain

    def _render(self) -> tuple[bytes, bytes]:
        # Read first: a put during the rendering triggers another one.
        version, ready = self._store.version, self._store.ready
        body = render(self._registry)
        # Prometheus asks for gzip: a tenth of the bytes to send, compressed once per rendering.
        self._bodies = bodies = (body, gzip.compress(body, compresslevel=1))
        self._version, self._rendered_at = version, time.monotonic()
        self.ready = self.ready or ready
        return bodies

    async def keep_fresh(self) -> None:
        """Re-render whenever needed, until cancelled; a failed rendering is logged and retried."""
        while True:
            stale = time.monotonic() - self._rendered_at > self.MAX_AGE
            if self._store.version != self._version or stale:
                try:
                    await asyncio.to_thread(self._render)
                except Exception:  # a bug guard: keep serving the last rendering
                    log.exception("rendering /metrics failed")
            await asyncio.sleep(1.0)


def store_pools(settings: Settings) -> dict[str, PoolSize]:
    """The pool of each store that models read, for ``mlmon serve`` (``db.PoolSize``).

    Every model refreshes in a thread of its own and holds one connection at a time, of
    its predictions' store (its sources run one after another there, each table reflected
    before its connection is taken), so a store has as many users at once as models read
    it: that many connections, at most its ``max_connections``. A checkout waits up to the
    longest deadline of those models (``predictions.refresh.refresh_deadline``)."""
    users: dict[str, int] = {}
    waits: dict[str, timedelta] = {}
    for model in settings.models:
        name = model.predictions.store
        users[name] = users.get(name, 0) + 1
        deadline = refresh_deadline(model, settings.refresh_policy)
        waits[name] = max(waits.get(name, deadline), deadline)
    return {name: _pool(settings.stores[name], users[name], waits[name]) for name in users}


def state_pool(settings: Settings) -> PoolSize:
    """The state database's pool for ``mlmon serve`` (``db.PoolSize``): its users at once are
    the training API's ``STATE_THREADS``, the training refresh and the refresh of each model
    with features (which reads the training run it compares with) or time slices (which
    saves its kept slices), one connection at a time; a checkout waits up to the longest
    deadline of those refreshes."""
    policy = settings.refresh_policy
    featured = [model for model in settings.models if model.features is not None or model.time_slice is not None]
    wait = max([policy.deadline(), *(refresh_deadline(model, policy) for model in featured)])
    return _pool(settings.state, STATE_THREADS + 1 + len(featured), wait)


def _pool(database: Store, users: int, wait: timedelta) -> PoolSize:
    return PoolSize(min(users, database.max_connections or DEFAULT_MAX_CONNECTIONS), wait.total_seconds())


def create_app(settings: Settings) -> FastAPI:
    """The ASGI app. The refresh loop starts with the app's lifespan and stops with it."""
    store = SnapshotStore([m.name for m in settings.models])
    registry = build_registry(store, settings.thresholds)
    stores = Stores(settings.stores, settings.query_timeout, store_pools(settings))
    state = StateDatabase(settings.state.resolved_url(), settings.query_timeout.total_seconds(), state_pool(settings))
    loop = RefreshLoop(settings, store, stores, state)
    exposition = ExpositionCache(registry, store)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if settings.api.token is None and settings.api.token_file is None:
            log.warning(
                "api.token is not set: anyone who reaches this port can report and delete training runs "
                "(/api/v1); set api.token or api.token_file"
            )
        loop.start()
        renderer = asyncio.create_task(exposition.keep_fresh(), name="render-metrics")
        try:
            yield
        finally:
            renderer.cancel()
            await asyncio.gather(renderer, return_exceptions=True)
            await loop.stop()
            stores.dispose()
            state.engine.dispose()

    # /docs is served below with Swagger UI's files from the swagger-ui-bundle package:
    # FastAPI's default loads them from a CDN, a blank page on a network without internet.
    app = FastAPI(title="mlmon", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.snapshots = store
    configured = frozenset(m.name for m in settings.models)
    app.include_router(
        training_api(
            settings.api, settings.training.max_models, configured, state, loop.training_changed, store.count_refusal
        )
    )
    document_training_run(app)
    app.mount("/docs/static", StaticFiles(directory=swagger_ui_path), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        static = f"{request.scope.get('root_path', '')}/docs/static"
        return get_swagger_ui_html(
            openapi_url=f"{request.scope.get('root_path', '')}{app.openapi_url}",
            title="mlmon API",
            swagger_js_url=f"{static}/swagger-ui-bundle.js",
            swagger_css_url=f"{static}/swagger-ui.css",
            swagger_favicon_url=f"{static}/favicon-32x32.png",
        )

    # HEAD as well as GET on the endpoints that load balancers and Prometheus-style tools
    # probe: the same status and headers, no body (the server drops it).
    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    def landing() -> str:
        return _LANDING.format(version=__version__, models=len(settings.models))

    @app.api_route("/metrics", methods=["GET", "HEAD"], include_in_schema=False)
    async def metrics(request: Request) -> Response:
        if "gzip" in request.headers.get("accept-encoding", ""):
            return SlicedResponse(
                exposition.latest(gzipped=True),
                media_type=CONTENT_TYPE_PLAIN_0_0_4,
                headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"},
            )
        return SlicedResponse(
            exposition.latest(), media_type=CONTENT_TYPE_PLAIN_0_0_4, headers={"Vary": "Accept-Encoding"}
        )

    # GET in the OpenAPI document, HEAD beside it: one route with both methods gives both
    # operations the same operationId, which the spec forbids.
    @app.head("/healthz", response_class=PlainTextResponse, include_in_schema=False)
    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        """The process is alive."""
        return "ok\n"

    @app.head("/readyz", response_class=PlainTextResponse, include_in_schema=False)
    @app.get("/readyz", response_class=PlainTextResponse)
    def readyz(response: Response) -> str:
        """200 once the first refresh of every model is on /metrics, else 503."""
        if exposition.ready:
            return "ready\n"
        response.status_code = 503
        return "waiting for the first refresh of every model\n"

    return app
