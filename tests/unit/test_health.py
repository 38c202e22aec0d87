"""The health bookkeeping every source shares (exporter/health.py): errors by reason,
one timeout per stalled refresh, last good values kept for the staleness period."""

from __future__ import annotations

from datetime import timedelta

from exporter.health import SourceHealth, SourceStatus
from exporter.reasons import ERROR_REASONS


def test_every_reason_starts_at_zero_and_failures_count_by_reason():
    health: SourceHealth[int] = SourceHealth(timedelta(seconds=60))
    assert health.errors == dict.fromkeys(ERROR_REASONS, 0)
    for reason in ("query", "query", "connection"):
        health.started()
        assert health.failed(reason) == SourceStatus(False, None)
    assert health.errors == {**dict.fromkeys(ERROR_REASONS, 0), "query": 2, "connection": 1}


def test_a_stalled_refresh_counts_one_timeout_and_not_its_later_failure():
    health: SourceHealth[int] = SourceHealth(timedelta(seconds=60))
    health.started()
    for _ in range(3):  # reported stalled on three intervals
        health.stalled()
    health.failed("connection")  # the hung refresh then fails: already counted
    assert (health.errors["timeout"], health.errors["connection"]) == (1, 0)
    health.started()  # the next refresh stalls again: counted again
    health.stalled()
    assert health.errors["timeout"] == 2


def test_last_good_value_is_kept_for_the_staleness_period_then_dropped():
    health: SourceHealth[str] = SourceHealth(timedelta(seconds=30))
    assert health.fresh(0.0) is None
    assert health.succeeded(100.0, "values") == SourceStatus(True, 100.0)
    health.started()
    assert health.failed("timeout") == SourceStatus(False, 100.0)  # down, last success kept
    assert health.fresh(130.0) == "values"  # exactly the staleness period: still served
    assert health.fresh(130.001) is None
    assert health.down() == SourceStatus(False, 100.0)
