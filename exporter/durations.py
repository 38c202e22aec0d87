"""Prometheus-style durations (``90s``, ``5m``, ``1h``, ``7d``, ``1h30m``) used in the config."""

import re
from datetime import timedelta

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
#: Longer than any sensible window, and far below what timedelta can hold.
_MAX_MS = 100 * 365 * 86_400_000
_PART = re.compile(r"(\d+)(ms|s|m|h|d|w)")


def parse_duration(text: str, allow_zero: bool = False) -> timedelta:
    """Parse a Prometheus duration string into a ``timedelta`` (positive unless ``allow_zero``).

    Units follow Prometheus' duration format: ``ms``, ``s``, ``m``, ``h``, ``d``, ``w``,
    concatenated largest first (``1h30m``).

    Raises:
        ValueError: empty, negative, zero (unless ``allow_zero``), over 100 years, unknown
            unit, units out of order.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"duration must be a non-empty string like '60s' or '1h', got {text!r}")
    pos, total_ms, last_rank = 0, 0, -1
    ranks = list(_UNIT_MS)[::-1]  # w, d, h, m, s, ms: largest first
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        rank = ranks.index(match.group(2))
        if rank <= last_rank:
            raise ValueError(f"duration {text!r}: units must go from largest to smallest")
        last_rank = rank
        total_ms += int(match.group(1)) * _UNIT_MS[match.group(2)]  # integers: no overflow
        pos = match.end()
    if pos != len(text):
        raise ValueError(f"invalid duration {text!r}: use digits and units ms, s, m, h, d, w (e.g. '90s', '1h30m')")
    if total_ms == 0 and not allow_zero:
        raise ValueError(f"duration {text!r} must be greater than zero")
    if total_ms > _MAX_MS:
        raise ValueError(f"duration {text[:40]!r} is longer than 100 years")
    return timedelta(milliseconds=total_ms)
