"""The FastAPI service: ``/metrics``, ``/healthz``, ``/readyz`` and a landing page."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.responses import HTMLResponse, PlainTextResponse
# The classic text format 0.0.4 is what every Prometheus (2.x and 3.x) scrapes.
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from exporter import __version__
from exporter.api import training_api
from exporter.collector import build_registry, render
from exporter.config import Settings
from exporter.loop import RefreshLoop
from exporter.snapshot import SnapshotStore
from exporter.state import StateDatabase
from exporter.stores import Stores

_LANDING = """<!doctype html>
<html><head><title>mlmon</title></head>
<body><h1>mlmon {version}</h1>
<p>Prometheus exporter for machine-learning model monitoring, watching {models} model(s).</p>
<ul><li><a href="metrics">/metrics</a>: the exposition Prometheus scrapes</li>
<li><a href="healthz">/healthz</a>: process alive</li>
<li><a href="readyz">/readyz</a>: every model refreshed at least once</li>
<li><a href="api/v1/models">/api/v1/models</a>: models with training runs (<a href="docs">API docs</a>)</li></ul>
</body></html>
"""


def create_app(settings: Settings) -> FastAPI:
    """The ASGI app. The refresh loop starts with the app's lifespan and stops with it."""
    store = SnapshotStore([m.name for m in settings.models])
    registry = build_registry(store, settings)
    stores = Stores(settings)
    state = StateDatabase(settings.state.resolved_url(), settings.query_timeout.total_seconds())
    loop = RefreshLoop(settings, store, stores, state)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        loop.start()
        try:
            yield
        finally:
            await loop.stop()
            stores.dispose()
            state.engine.dispose()

    app = FastAPI(title="mlmon", version=__version__, lifespan=lifespan)
    app.state.snapshots = store
    app.include_router(training_api(settings, state, loop.training_changed))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def landing() -> str:
        return _LANDING.format(version=__version__, models=len(settings.models))

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        """The process is alive."""
        return "ok\n"

    @app.get("/readyz", response_class=PlainTextResponse)
    def readyz(response: Response) -> str:
        """200 once every model completed its first refresh, else 503."""
        if store.ready:
            return "ready\n"
        response.status_code = 503
        return "waiting for the first refresh of every model\n"

    return app
