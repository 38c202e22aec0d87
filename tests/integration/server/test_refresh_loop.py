"""The refresh loop's shutdown: ``RefreshLoop.stop`` returns whatever each task was doing
when it was cancelled."""

from __future__ import annotations

import asyncio

from exporter.config import parse_settings
from exporter.predictions.stores import Stores
from exporter.server.loop import RefreshLoop
from exporter.snapshot import SnapshotStore
from exporter.training.storage import StateDatabase


def test_stop_returns_when_a_stored_run_wakes_the_training_refresh_at_the_same_moment(tmp_path):
    """A run stored just before shutdown sets the training task's wake-up event in the same
    loop iteration as the cancel. ``asyncio.wait_for`` of Python 3.11 then returned the
    event's result and dropped the cancellation: the task refreshed on forever and the
    app's shutdown (``TestClient`` exit, Ctrl-C) hung."""
    settings = parse_settings(
        {"stores": {}, "models": [], "refresh_interval": "60s", "state": {"url": f"sqlite:///{tmp_path}/state.sqlite"}}
    )
    store = SnapshotStore([])
    stores = Stores(settings.stores, settings.query_timeout)
    state = StateDatabase(settings.state.resolved_url())
    loop = RefreshLoop(settings, store, stores, state)

    async def scenario() -> None:
        loop.start()
        while store.version == 0:  # the first training refresh is published ...
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # ... and the task waits for the interval or a stored run
        loop.training_changed()
        await asyncio.wait_for(loop.stop(), timeout=5)

    try:
        asyncio.run(scenario())
    finally:
        state.engine.dispose()
