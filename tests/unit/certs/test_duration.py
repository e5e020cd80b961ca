from __future__ import annotations

from datetime import timedelta

import pytest

from meshward.certs.duration import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("7d", timedelta(days=7)),
        ("0", timedelta(0)),
        (" 2H ", timedelta(hours=2)),
    ],
)
def test_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "3600", "1y", "1h1h", "h", "-5m", "1.5h", "5m junk"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"e\.g\. 90s"):
        parse_duration(text)


def test_format() -> None:
    assert format_duration(timedelta(minutes=59, seconds=12)) == "59m 12s"
    assert format_duration(timedelta(days=3, hours=4, minutes=5)) == "3d 4h"
    assert format_duration(timedelta(seconds=-125)) == "-2m 5s"
    assert format_duration(timedelta(0)) == "0s"
