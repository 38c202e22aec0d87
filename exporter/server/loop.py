"""The background refresh loop: one asyncio task per model, started by the app's lifespan.

Each model refreshes on its own schedule in a worker thread, so a slow or hanging
database delays only that model, and ``/metrics`` (which reads snapshots) never waits.
A refresh still running after its deadline (``ModelRefresher.deadline``) is reported as
stalled on every interval until it returns: the source it is in down, with one
``reason="timeout"``, the others as what happened to them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import datetime

from exporter.config import Settings
from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.stores import Stores, utc_now
from exporter.snapshot import SnapshotStore
from exporter.training.metrics import TrainingRefresher
from exporter.training.storage import StateDatabase

log = logging.getLogger(__name__)

#: Seconds ``RefreshLoop.stop`` waits for refreshes still running in their threads, so that
#: the engines disposed after it close every connection (a SQLite store in WAL mode keeps its
#: -wal and -shm files while a connection stays open); a refresh hung longer is left to die
#: with the process.
STOP_GRACE_SECONDS = 5.0


def _in_daemon_thread(fn, *args) -> asyncio.Future:
    """Run ``fn(*args)`` in a daemon thread; the returned future gets its result.

    Not ``asyncio.to_thread``: its executor is joined at shutdown, so one refresh hung on a
    dead database would keep the process from exiting.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def deliver(setter, value) -> None:
        if not future.done():
            setter(value)

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task, which logs it
            outcome = (future.set_exception, exc)
        else:
            outcome = (future.set_result, result)
        try:
            loop.call_soon_threadsafe(deliver, *outcome)
        except RuntimeError:  # the loop closed while the refresh ran: nobody is waiting
            pass

    threading.Thread(target=work, daemon=True, name=f"refresh-{getattr(fn, '__qualname__', 'fn')}").start()
    return future


class RefreshLoop:
    """Runs every model's refresh every ``settings.refresh_interval`` until stopped."""

    def __init__(self, settings: Settings, store: SnapshotStore, stores: Stores, state: StateDatabase):
        self.settings = settings
        self.store = store
        self.refreshers = [ModelRefresher(model, settings, stores) for model in settings.models]
        self.training = TrainingRefresher(state, settings)
        self._training_changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._running: set[asyncio.Future] = set()

    def _start(self, fn, *args) -> asyncio.Future:
        """``_in_daemon_thread(fn, *args)``, remembered until done so that ``stop`` can wait for it."""
        future = _in_daemon_thread(fn, *args)
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        return future

    def training_changed(self) -> None:
        """Re-read the training runs now rather than at the next interval (a run was stored)."""
        self._training_changed.set()

    async def _run_training(self) -> None:
        interval = self.settings.refresh_interval.total_seconds()
        deadline = self.settings.refresh_deadline.total_seconds()
        running: asyncio.Future | None = None
        while True:
            self._training_changed.clear()
            if running is None:
                running = self._start(self.training.refresh, utc_now())
            done, _ = await asyncio.wait({running}, timeout=deadline)
            if done:
                self.store.put_training(running.result())  # refresh() never raises
                running = None
            else:  # a hung state database must not freeze the training metrics as "up"
                self.store.put_training(self.training.stalled(utc_now()))
            try:
                await asyncio.wait_for(self._training_changed.wait(), timeout=interval)
            except TimeoutError:
                pass

    async def _run(self, refresher: ModelRefresher) -> None:
        interval = self.settings.refresh_interval.total_seconds()
        deadline = refresher.deadline().total_seconds()
        loop = asyncio.get_running_loop()
        running: asyncio.Future | None = None
        while True:
            started = loop.time()
            if running is None:
                running = self._start(refresher.refresh, utc_now())
            done, _ = await asyncio.wait({running}, timeout=deadline)
            if done:
                try:
                    self.store.put(running.result())
                except Exception:  # refresh() counts source failures itself; this is a bug guard
                    log.exception("model %s: refresh crashed", refresher.model.name)
                running = None
            else:
                # A database that accepts connections but never answers must not freeze the
                # model's metrics: report it down and let staleness drop its values.
                log.warning("model %s: refresh still running after %.0f s", refresher.model.name, deadline)
                self.store.put(refresher.stalled(utc_now()))
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))

    def start(self) -> None:
        """Start one task per model on the running event loop."""
        self._tasks = [asyncio.create_task(self._run(r), name=f"refresh-{r.model.name}") for r in self.refreshers]
        self._tasks.append(asyncio.create_task(self._run_training(), name="refresh-training"))

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Cancel the tasks and wait for them, then up to ``grace`` seconds for the refreshes
        still running in worker threads, which hold database connections until they return."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._running:
            log.info("waiting up to %.0f s for %d running refresh(es) to finish", grace, len(self._running))
            await asyncio.wait(set(self._running), timeout=grace)


def refresh_all(settings: Settings, as_of: datetime) -> SnapshotStore:
    """Refresh every model, and the training runs trained by then, once at ``as_of``
    (timezone-aware), in this thread."""
    store = SnapshotStore([m.name for m in settings.models])
    stores = Stores(settings)
    state = StateDatabase(settings.state.resolved_url(), settings.query_timeout.total_seconds())
    try:
        for model in settings.models:
            store.put(ModelRefresher(model, settings, stores).refresh(as_of))
        store.put_training(TrainingRefresher(state, settings).refresh(as_of))
    finally:
        stores.dispose()
        state.engine.dispose()
    return store
