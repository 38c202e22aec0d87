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
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from exporter.config import Settings
from exporter.predictions.refresh import model_refreshers
from exporter.predictions.stores import Stores, utc_now
from exporter.snapshot import SnapshotStore
from exporter.training.metrics import TrainingRefresher
from exporter.training.storage import StateDatabase

log = logging.getLogger(__name__)

S = TypeVar("S")
S_co = TypeVar("S_co", covariant=True)

#: Seconds ``RefreshLoop.stop`` waits for refreshes still running in their threads, so that
#: the engines disposed after it close every connection (a SQLite store in WAL mode keeps its
#: -wal and -shm files while a connection stays open); a refresh hung longer is left to die
#: with the process.
STOP_GRACE_SECONDS = 5.0


def _in_daemon_thread(fn: Callable[[datetime], S], now: datetime) -> asyncio.Future[S]:
    """Run ``fn(now)`` in a daemon thread; the returned future gets its result.

    Not ``asyncio.to_thread``: its executor is joined at shutdown, so one refresh hung on a
    dead database would keep the process from exiting.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[S] = loop.create_future()

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def work() -> None:
        try:
            result = fn(now)
        except BaseException as exc:  # handed to the awaiting task, which logs it
            outcome: tuple[Callable[[Any], None], Any] = (future.set_exception, exc)
        else:
            outcome = (future.set_result, result)
        try:
            loop.call_soon_threadsafe(deliver, *outcome)
        except RuntimeError:  # the loop closed while the refresh ran: nobody is waiting
            pass

    threading.Thread(target=work, daemon=True, name=f"refresh-{getattr(fn, '__qualname__', 'fn')}").start()
    return future


class Refresher(Protocol[S_co]):
    """What the loop runs: a model's refresher (``predictions.refresh.ModelRefresher``) or
    the training refresher (``training.metrics.TrainingRefresher``)."""

    @property
    def name(self) -> str:
        """How logs name it."""
        ...

    def refresh(self, now: datetime) -> S_co:
        """The snapshot at ``now``; counts its failures itself rather than raising."""
        ...

    def stalled(self, now: datetime) -> S_co:
        """The snapshot to publish while ``refresh`` runs past ``deadline``."""
        ...

    def deadline(self) -> timedelta:
        """How long ``refresh`` may run before it is reported stalled."""
        ...


class RefreshLoop:
    """Runs every model's refresh, and the training runs', every ``settings.refresh_interval``
    until stopped."""

    def __init__(self, settings: Settings, store: SnapshotStore, stores: Stores, state: StateDatabase):
        self.interval = settings.refresh_interval
        self.store = store
        policy = settings.refresh_policy
        # Only here are the kept time slices saved: `once` and `backfill` write nothing there.
        self.refreshers = model_refreshers(
            settings.models, policy, stores, training=settings.training, state=state, save_slices=True
        )
        self.training = TrainingRefresher(state, settings.training, policy)
        self._training_changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._running: set[asyncio.Future] = set()

    def _start(self, fn: Callable[[datetime], S], now: datetime) -> asyncio.Future[S]:
        """``_in_daemon_thread(fn, now)``, remembered until done so that ``stop`` can wait for it."""
        future = _in_daemon_thread(fn, now)
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        return future

    def training_changed(self) -> None:
        """Re-read the training runs now rather than at the next interval (a run was stored)."""
        self._training_changed.set()

    async def _run(
        self, refresher: Refresher[S], publish: Callable[[S], None], wake: asyncio.Event | None = None
    ) -> None:
        """Refresh, publish, wait for the rest of the interval (or until ``wake`` is set), forever.

        A refresh still running at its deadline is published as ``stalled`` and awaited
        again in the next interval rather than started anew.
        """
        interval = self.interval.total_seconds()
        deadline = refresher.deadline().total_seconds()
        loop = asyncio.get_running_loop()
        running: asyncio.Future[S] | None = None
        while True:
            started = loop.time()
            if wake is not None:
                wake.clear()
            if running is None:
                running = self._start(refresher.refresh, utc_now())
            done, _ = await asyncio.wait({running}, timeout=deadline)
            if done:
                try:
                    publish(running.result())
                except Exception:  # refresh() counts its failures itself; this is a bug guard
                    log.exception("%s: refresh crashed", refresher.name)
                running = None
            else:
                # A database that accepts connections but never answers must not freeze the
                # metrics: report it down and let staleness drop its values.
                log.warning("%s: refresh still running after %.0f s", refresher.name, deadline)
                publish(refresher.stalled(utc_now()))
            rest = max(0.0, interval - (loop.time() - started))
            if wake is None:
                await asyncio.sleep(rest)
            else:
                # Not asyncio.wait_for: on Python 3.11 it drops a cancel that comes as the
                # event is set (a run stored just before shutdown), and stop() then waited
                # for this task forever. asyncio.timeout lets that cancel through.
                try:
                    async with asyncio.timeout(rest):
                        await wake.wait()
                except TimeoutError:
                    pass

    def start(self) -> None:
        """Start one task per model and one for the training runs on the running event loop."""
        self._tasks = [
            asyncio.create_task(self._run(r, self.store.put), name=f"refresh-{r.model.name}") for r in self.refreshers
        ]
        self._tasks.append(
            asyncio.create_task(
                self._run(self.training, self.store.put_training, self._training_changed), name="refresh-training"
            )
        )

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
    stores = Stores(settings.stores, settings.query_timeout)
    state = StateDatabase(settings.state.resolved_url(), settings.query_timeout.total_seconds())
    try:
        policy = settings.refresh_policy
        for refresher in model_refreshers(settings.models, policy, stores, training=settings.training, state=state):
            store.put(refresher.refresh(as_of))
        store.put_training(TrainingRefresher(state, settings.training, policy).refresh(as_of))
    finally:
        stores.dispose()
        state.engine.dispose()
    return store
