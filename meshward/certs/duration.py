"""Human durations for flags and output (``90s``, ``30m``, ``1h30m``, ``7d``).

TTLs and grace periods are typed by operators; ``3600`` is ambiguous (seconds? minutes?) so a
unit is required except for a bare ``0``.
"""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_PART_RE = re.compile(r"(\d+)([dhms])")
# Far beyond any TTL or window that makes sense, and far below what timedelta overflows on.
MAX_SECONDS = 100 * 366 * 86400


def parse_duration(text: str) -> timedelta:
    """``1h30m`` -> timedelta; raises ValueError with a hint (argparse shows it as a usage error)."""
    value = text.strip().lower()
    if value == "0":
        return timedelta(0)
    if len(value) > 40:
        raise ValueError(f"invalid duration {text[:40]!r}...: too long; use e.g. 90s, 30m or 7d")
    if value.startswith("-"):
        raise ValueError(
            f"invalid duration {text!r}: a duration cannot be negative; use e.g. 90s, 30m, "
            "1h, 1h30m or 7d (or 0)"
        )
    pos = 0
    seconds = 0
    seen: set[str] = set()
    for match in _PART_RE.finditer(value):
        if match.start() != pos or match.group(2) in seen:
            break
        seen.add(match.group(2))
        seconds += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not value or pos != len(value):
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 30m, 1h, 1h30m or 7d")
    if seconds > MAX_SECONDS:
        raise ValueError(f"invalid duration {text!r}: longer than 100 years")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """Compact, two most significant units: ``59m 12s``, ``3d 4h``, ``-2m 5s`` when negative."""
    total = int(delta.total_seconds())
    sign = "-" if total < 0 else ""
    total = abs(total)
    parts: list[str] = []
    for unit, size in _UNITS.items():
        amount, total = divmod(total, size)
        if amount or (unit == "s" and not parts):
            parts.append(f"{amount}{unit}")
    return sign + " ".join(parts[:2])
