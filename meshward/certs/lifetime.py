"""Certificate lifetime arithmetic shared by rotation, metrics, `meshward status` and inspect.

Pure: every function takes ``now``; nothing reads the clock except ``utcnow``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime:
    """``None`` -> now; naive datetimes are taken to be UTC (cryptography's convention)."""
    if value is None:
        return utcnow()
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class Validity(StrEnum):
    VALID = "valid"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"


def remaining_lifetime(not_after: datetime, now: datetime) -> timedelta:
    """Time left until ``not_after``; negative once expired (a metric can show how late we are)."""
    return as_utc(not_after) - as_utc(now)


@dataclass(frozen=True)
class Lifetime:
    not_before: datetime
    not_after: datetime

    @property
    def total(self) -> timedelta:
        return self.not_after - self.not_before

    def remaining(self, now: datetime) -> timedelta:
        return remaining_lifetime(self.not_after, now)

    def remaining_seconds(self, now: datetime) -> float:
        return self.remaining(now).total_seconds()

    def elapsed_fraction(self, now: datetime) -> float:
        """0.0 at notBefore, 1.0 at notAfter (clamped)."""
        total = self.total.total_seconds()
        if total <= 0:
            return 1.0
        elapsed = (as_utc(now) - as_utc(self.not_before)).total_seconds()
        return min(1.0, max(0.0, elapsed / total))

    def validity(self, now: datetime) -> Validity:
        now = as_utc(now)
        if now < as_utc(self.not_before):
            return Validity.NOT_YET_VALID
        if now > as_utc(self.not_after):
            return Validity.EXPIRED
        return Validity.VALID
