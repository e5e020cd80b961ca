"""When each SVID must be renewed: at a jittered fraction of its lifetime (50% by default).

Pure and clock-free: callers pass ``now``. The control plane keeps one schedule, ``track``s each
node's SVID under the node's key, sleeps until ``next_due()``, and re-issues whatever ``due(now)``
yields, pushing the new SDS secret and ``track``ing the new SVID (which replaces the entry).
An entry stays due until it is re-tracked or ``retry``-postponed, so a failed renewal is never
forgotten.

Why renew at half-life with jitter: half the lifetime is left to absorb control-plane outages,
and jitter keeps a fleet issued in one burst (a restart) from renewing in one burst forever.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from meshward.certs.ca import Svid
from meshward.certs.lifetime import Lifetime, as_utc


@dataclass(frozen=True)
class Renewal:
    key: str
    spiffe_id: str
    due_at: datetime
    not_after: datetime


@dataclass(frozen=True)
class ExpiryStatus:
    """One tracked SVID as metrics and `meshward status` show it."""

    key: str
    spiffe_id: str
    not_before: datetime
    not_after: datetime
    renew_at: datetime
    remaining_seconds: float  # negative once expired
    expired: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "spiffe_id": self.spiffe_id,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "renew_at": self.renew_at.isoformat(),
            "remaining_seconds": round(self.remaining_seconds, 3),
            "expired": self.expired,
        }


@dataclass(frozen=True)
class _Entry:
    spiffe_id: str
    lifetime: Lifetime
    renew_at: datetime
    due_at: datetime  # renew_at, or later after retry()


class RotationSchedule:
    def __init__(
        self,
        *,
        renew_fraction: float = 0.5,
        jitter: float = 0.1,
        rng: random.Random | None = None,
    ) -> None:
        """Renew at ``renew_fraction`` ± ``jitter`` of the lifetime (both fractions of it)."""
        if not 0.0 < renew_fraction < 1.0:
            raise ValueError("renew_fraction must be between 0 and 1 (exclusive)")
        if not 0.0 <= jitter < min(renew_fraction, 1.0 - renew_fraction):
            raise ValueError("jitter must keep renewal strictly inside the lifetime")
        self.renew_fraction = renew_fraction
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._entries: dict[str, _Entry] = {}

    def renewal_time(self, not_before: datetime, not_after: datetime) -> datetime:
        nb, na = as_utc(not_before), as_utc(not_after)
        fraction = self.renew_fraction + self._rng.uniform(-self.jitter, self.jitter)
        return nb + (na - nb) * fraction

    def track(self, key: str, svid: Svid) -> Renewal:
        """Start (or restart, replacing any previous SVID under ``key``) tracking ``svid``."""
        lifetime = Lifetime(as_utc(svid.not_before), as_utc(svid.not_after))
        renew_at = self.renewal_time(lifetime.not_before, lifetime.not_after)
        self._entries[key] = _Entry(svid.spiffe_id, lifetime, renew_at, renew_at)
        return Renewal(key, svid.spiffe_id, renew_at, lifetime.not_after)

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)

    def retry(self, key: str, at: datetime) -> None:
        """Postpone a renewal that failed; it is due again at ``at``."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = _Entry(entry.spiffe_id, entry.lifetime, entry.renew_at, as_utc(at))

    def due(self, now: datetime) -> Iterator[Renewal]:
        """Renewals due at ``now``, most urgent first."""
        at = as_utc(now)
        ready = sorted(
            ((e.due_at, key, e) for key, e in self._entries.items() if e.due_at <= at),
            key=lambda item: (item[0], item[1]),
        )
        for due_at, key, entry in ready:
            yield Renewal(key, entry.spiffe_id, due_at, entry.lifetime.not_after)

    def next_due(self) -> datetime | None:
        return min((e.due_at for e in self._entries.values()), default=None)

    def seconds_until_next(self, now: datetime) -> float | None:
        """How long to sleep (0 when something is already due; None when nothing is tracked)."""
        nxt = self.next_due()
        if nxt is None:
            return None
        return max(0.0, (nxt - as_utc(now)).total_seconds())

    def status(self, now: datetime) -> tuple[ExpiryStatus, ...]:
        at = as_utc(now)
        return tuple(
            ExpiryStatus(
                key=key,
                spiffe_id=e.spiffe_id,
                not_before=e.lifetime.not_before,
                not_after=e.lifetime.not_after,
                renew_at=e.due_at,
                remaining_seconds=e.lifetime.remaining_seconds(at),
                expired=e.lifetime.remaining(at) <= timedelta(0),
            )
            for key, e in sorted(self._entries.items())
        )

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries
