"""Prometheus-style durations (``90s``, ``5m``, ``1h``, ``7d``, ``1h30m``) used in the config."""

import re
from datetime import timedelta

_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+)(ms|s|m|h|d|w)")


def parse_duration(text: str, allow_zero: bool = False) -> timedelta:
    """Parse a Prometheus duration string into a ``timedelta`` (positive unless ``allow_zero``).

    Units follow Prometheus' duration format: ``ms``, ``s``, ``m``, ``h``, ``d``, ``w``,
    concatenated largest first (``1h30m``).

    Raises:
        ValueError: empty, negative, zero (unless ``allow_zero``), unknown unit, units out of order.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"duration must be a non-empty string like '60s' or '1h', got {text!r}")
    pos, total, last_rank = 0, 0.0, -1
    ranks = list(_UNIT_SECONDS)[::-1]  # w, d, h, m, s, ms: largest first
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        rank = ranks.index(match.group(2))
        if rank <= last_rank:
            raise ValueError(f"duration {text!r}: units must go from largest to smallest")
        last_rank = rank
        total += int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise ValueError(f"invalid duration {text!r}: use digits and units ms, s, m, h, d, w (e.g. '90s', '1h30m')")
    if total < 0 or (total == 0 and not allow_zero):
        raise ValueError(f"duration {text!r} must be greater than zero")
    return timedelta(seconds=total)
