"""SVID renewal timing (RotationSchedule) and the remaining-lifetime arithmetic behind metrics."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from meshward.certs.ca import CertificateAuthority, Svid
from meshward.certs.lifetime import Lifetime, Validity, remaining_lifetime
from meshward.certs.rotation import RotationSchedule

TD = "cluster.local"
A = f"spiffe://{TD}/ns/shop/sa/a"
B = f"spiffe://{TD}/ns/shop/sa/b"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def _svid(spiffe_id: str, not_before: datetime, ttl: timedelta) -> Svid:
    # Timing is pure arithmetic on (notBefore, notAfter); no need to sign anything here.
    return Svid(spiffe_id, b"", b"", not_before, not_before + ttl, 1)


def test_default_renews_at_half_life_without_jitter() -> None:
    schedule = RotationSchedule(jitter=0.0)
    renewal = schedule.track("node-a", _svid(A, T0, timedelta(hours=1)))
    assert renewal.due_at == T0 + timedelta(minutes=30)
    assert renewal.not_after == T0 + timedelta(hours=1)


def test_half_life_of_a_real_svid_counts_the_backdated_start(ca: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    svid = ca.issue(A, now=now)
    due = RotationSchedule(jitter=0.0).track("n", svid).due_at
    assert due == svid.not_before + (svid.not_after - svid.not_before) / 2
    assert now + timedelta(minutes=29) < due < now + timedelta(minutes=31)


def test_jitter_spreads_renewals_within_bounds() -> None:
    schedule = RotationSchedule(rng=random.Random(7))  # 50% ± 10%
    dues = {schedule.renewal_time(T0, T0 + timedelta(hours=1)) for _ in range(500)}
    assert min(dues) >= T0 + timedelta(minutes=24) and max(dues) <= T0 + timedelta(minutes=36)
    assert max(dues) - min(dues) > timedelta(minutes=10)  # actually spread, not one instant
    assert len(dues) > 400


def test_custom_fraction() -> None:
    schedule = RotationSchedule(renew_fraction=0.8, jitter=0.0)
    assert schedule.renewal_time(T0, T0 + timedelta(hours=10)) == T0 + timedelta(hours=8)


@pytest.mark.parametrize(("fraction", "jitter"), [(0.0, 0.0), (1.0, 0.0), (0.5, 0.5), (0.9, 0.2)])
def test_rejects_schedules_that_renew_outside_the_lifetime(fraction: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        RotationSchedule(renew_fraction=fraction, jitter=jitter)


def test_due_yields_renewals_most_urgent_first_until_retracked() -> None:
    schedule = RotationSchedule(jitter=0.0)
    schedule.track("node-a", _svid(A, T0, timedelta(hours=1)))  # due T0+30m
    schedule.track("node-b", _svid(B, T0, timedelta(minutes=20)))  # due T0+10m
    assert list(schedule.due(T0 + timedelta(minutes=9))) == []
    assert schedule.next_due() == T0 + timedelta(minutes=10)
    assert schedule.seconds_until_next(T0) == 600.0
    assert [r.key for r in schedule.due(T0 + timedelta(minutes=31))] == ["node-b", "node-a"]
    # Still due until renewed: a failed renewal is never forgotten.
    assert [r.key for r in schedule.due(T0 + timedelta(minutes=31))] == ["node-b", "node-a"]
    assert schedule.seconds_until_next(T0 + timedelta(minutes=31)) == 0.0
    # Renewing node-b replaces its entry.
    schedule.track("node-b", _svid(B, T0 + timedelta(minutes=31), timedelta(minutes=20)))
    assert [r.key for r in schedule.due(T0 + timedelta(minutes=31))] == ["node-a"]
    assert len(schedule) == 2 and "node-b" in schedule


def test_retry_postpones_and_forget_removes() -> None:
    schedule = RotationSchedule(jitter=0.0)
    schedule.track("n", _svid(A, T0, timedelta(hours=1)))
    schedule.retry("n", T0 + timedelta(minutes=35))
    assert list(schedule.due(T0 + timedelta(minutes=31))) == []
    assert [r.due_at for r in schedule.due(T0 + timedelta(minutes=35))] == [
        T0 + timedelta(minutes=35)
    ]
    schedule.forget("n")
    assert schedule.next_due() is None and schedule.seconds_until_next(T0) is None
    schedule.retry("n", T0)  # unknown key: nothing to do
    assert len(schedule) == 0


def test_status_exposes_expiry_for_metrics_and_status() -> None:
    schedule = RotationSchedule(jitter=0.0)
    schedule.track("node-a", _svid(A, T0, timedelta(hours=1)))
    (status,) = schedule.status(T0 + timedelta(minutes=45))
    assert status.spiffe_id == A and status.remaining_seconds == 15 * 60 and not status.expired
    assert status.renew_at == T0 + timedelta(minutes=30)
    (late,) = schedule.status(T0 + timedelta(hours=1, minutes=5))
    assert late.expired and late.remaining_seconds == -300
    assert late.as_dict()["remaining_seconds"] == -300 and late.as_dict()["key"] == "node-a"


def test_remaining_lifetime_is_pure() -> None:
    assert remaining_lifetime(T0 + timedelta(hours=1), T0) == timedelta(hours=1)
    assert remaining_lifetime(T0, T0 + timedelta(seconds=5)) == timedelta(seconds=-5)
    naive = T0.replace(tzinfo=None)
    assert remaining_lifetime(naive + timedelta(minutes=1), T0) == timedelta(minutes=1)
    life = Lifetime(T0, T0 + timedelta(hours=2))
    assert life.elapsed_fraction(T0 + timedelta(minutes=30)) == 0.25
    assert life.validity(T0 - timedelta(seconds=1)) is Validity.NOT_YET_VALID
    assert life.validity(T0 + timedelta(hours=3)) is Validity.EXPIRED
    assert life.validity(T0 + timedelta(hours=1)) is Validity.VALID
