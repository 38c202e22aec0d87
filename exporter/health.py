"""Health bookkeeping shared by every source of a refresh: the prediction-side sources
(predictions, labels, replays) and the training refresher's state database.

A failure is data: it is counted by reason, the source reports down, and its last good
value is kept for the staleness period, then dropped rather than repeated
(docs/reliability.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Generic, TypeVar

from exporter.reasons import ERROR_REASONS

V = TypeVar("V")


@dataclass(frozen=True)
class SourceStatus:
    """Whether the last refresh of a source succeeded, and when it last did (epoch seconds)."""

    up: bool
    last_success: float | None


class SourceHealth(Generic[V]):
    """One source's health between refreshes: its errors by ``ERROR_REASONS`` value (each
    from 0, so that ``increase()`` sees the first), its last good value and when it was read.

    A refresh reported stalled (``stalled``) counts one ``timeout``, however often it is
    reported, and not another error when it then fails. Not thread-safe by itself: the
    owner serializes calls (a refresh and the loop's ``stalled`` run in two threads).
    """

    def __init__(self, staleness: timedelta):
        self.errors: dict[str, int] = dict.fromkeys(ERROR_REASONS, 0)
        self._staleness = staleness.total_seconds()
        self._last_good: tuple[float, V] | None = None
        self._timeout_counted = False

    def started(self) -> None:
        """A new refresh begins: its stall has not been counted yet."""
        self._timeout_counted = False

    def succeeded(self, now: float, value: V) -> SourceStatus:
        """Record ``value`` read at ``now`` (epoch seconds); the source is up."""
        self._last_good = (now, value)
        return SourceStatus(True, now)

    def failed(self, reason: str) -> SourceStatus:
        """Count a failure for ``reason`` (an ``ERROR_REASONS`` value) unless this refresh's
        stall was counted already; the source is down."""
        if not self._timeout_counted:
            self.errors[reason] += 1
        return self.down()

    def stalled(self) -> SourceStatus:
        """The refresh runs past its deadline: one ``timeout`` per refresh; the source is down."""
        if not self._timeout_counted:
            self.errors["timeout"] += 1
            self._timeout_counted = True
        return self.down()

    def down(self) -> SourceStatus:
        """Down, with the time of the last success (``None`` before any)."""
        return SourceStatus(False, self._last_good[0] if self._last_good else None)

    def fresh(self, now: float) -> V | None:
        """The last good value while at most the staleness period old at ``now`` (epoch
        seconds), else ``None``: stale values are dropped, not repeated."""
        if self._last_good is None or now - self._last_good[0] > self._staleness:
            return None
        return self._last_good[1]
