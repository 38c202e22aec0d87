from datetime import timedelta

import pytest

from exporter.durations import parse_duration


@pytest.mark.parametrize(
    "text, expected",
    [
        ("90s", timedelta(seconds=90)),
        ("1h", timedelta(hours=1)),
        ("1h30m", timedelta(minutes=90)),
        ("7d", timedelta(days=7)),
        ("500ms", timedelta(milliseconds=500)),
        ("2w", timedelta(weeks=2)),
    ],
)
def test_valid(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "1", "h", "1x", "-1h", "30m1h", "1h 30m", "0s", "1.5h"])
def test_invalid(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_zero_only_when_allowed():
    assert parse_duration("0s", allow_zero=True) == timedelta(0)


@pytest.mark.parametrize("text", ["99999999999999999999d", "9" * 400 + "s", "5300w"])
def test_absurdly_long_is_a_value_error(text):
    with pytest.raises(ValueError, match="longer than 100 years"):
        parse_duration(text)
