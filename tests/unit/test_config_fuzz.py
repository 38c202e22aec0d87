"""Every config field fuzzed: any value gives a valid config or a ConfigError whose lines
name a key path, never another exception (a traceback for the user)."""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.config import ConfigError, parse_settings

BASE = {
    "refresh_interval": "60s",
    "query_timeout": "30s",
    "stores": {"s": {"url": "sqlite:///x.db"}},
    "state": {"url": "sqlite:///state.db"},
    "api": {"max_body_bytes": 4096},
    "training": {"history_versions": 10},
    "alerting": {"mode_share_ratio_max": 0.5},
    "models": [
        {
            "name": "ctr",
            "predictions": {
                "store": "s",
                "table": "p",
                "columns": {"id": "id", "timestamp": "ts", "score": "p", "version": "v"},
                "filter": {"model": "ctr"},
                "timezone": "UTC",
                "ingestion_delay": "0s",
            },
            "labels": {
                "store": "s",
                "table": "l",
                "columns": {"id": "id", "label": "y", "timestamp": "ts"},
                "missing": "negative",
            },
            "replays": {"store": "s", "table": "r", "columns": {"id": "id", "score": "p"}},
            "windows": ["1h", "24h"],
            "label_delay": "1h",
            "mode_share_decimals": 6,
            "histogram_buckets": [0.1, 0.5, 1.0],
            "replay_tolerance": {"atol": 1e-6, "rtol": 1e-6},
            "bucket_decimals": 5,
            "alert_thresholds": {"calibration_ratio_max": 1.3},
        }
    ],
}


def _paths(node, prefix=()):
    """Every key path of the tree (dict keys and list indexes)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from _paths(child, prefix + (key,))


PATHS = list(_paths(BASE))
durations = st.from_regex(r"\A[0-9]{1,30}(ms|s|m|h|d|w)\Z")
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | durations,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=values)
def test_any_value_anywhere_is_valid_or_a_clear_error(path, value):
    data = copy.deepcopy(BASE)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    try:
        parse_settings(data)
    except ConfigError as error:
        assert error.errors and all(": " in line and line.split(": ")[0] for line in error.errors), error.errors


@settings(max_examples=200, deadline=None)
@given(document=values)
def test_any_document_is_a_clear_error(document):
    try:
        parse_settings(document)
    except ConfigError as error:
        assert error.errors
