"""The one server certificate class (the ADS server's and ext_authz's own SVID): issued by the
oldest trusted CA generation, re-trusting clients when the bundle changes, moving to the new
generation when the old root is dropped, renewed when its schedule says so."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509

from meshward.certs.ca import CertificateAuthority
from meshward.certs.pem import load_certificates
from meshward.certs.rotation import RotationSchedule
from meshward.certs.server_identity import SERVER_KEY, ServerCertificate

TD = "cluster.local"
XDS = f"spiffe://{TD}/ns/meshward-system/sa/meshward-xds"


def leaf(chain_pem: bytes) -> x509.Certificate:
    return load_certificates(chain_pem, "served chain")[0]


def roots(roots_pem: bytes) -> int:
    return len(load_certificates(roots_pem, "served roots"))


def test_rotation_keeps_the_certificate_until_its_root_is_dropped() -> None:
    ca = CertificateAuthority.ephemeral(TD)
    now = datetime.now(UTC)
    cert = ServerCertificate(lambda: XDS, timedelta(hours=1), RotationSchedule())
    tls = cert.make_tls(ca, now)
    key, chain, roots_pem = tls.current()
    assert cert.generation == 1 and roots(roots_pem) == 1
    assert leaf(chain).serial_number == leaf(cert.svid.cert_chain_pem).serial_number

    ca.rotate(grace=timedelta(hours=2), now=now)
    cert.bundle_changed(ca, ca.trust_bundle(now=now).roots_pem, now)
    key2, chain2, roots2 = tls.current()
    # Sidecars holding the old bundle still accept it: same certificate, generation 1, but
    # clients from the new root are verified now.
    assert (key2, chain2) == (key, chain) and cert.generation == 1 and roots(roots2) == 2

    later = now + timedelta(hours=3)  # the old root's grace is over
    cert.bundle_changed(ca, ca.trust_bundle(now=later).roots_pem, later)
    key3, chain3, roots3 = tls.current()
    assert cert.generation == 2 and roots(roots3) == 1 and key3 != key
    generation = ca.issuing_generation(leaf(chain3))
    assert generation is not None and generation.number == 2


def test_renewal_is_scheduled_about_half_life_and_served_in_place() -> None:
    ca = CertificateAuthority.ephemeral(TD)
    now = datetime.now(UTC)
    schedule = RotationSchedule()
    cert = ServerCertificate(lambda: XDS, timedelta(hours=1), schedule)
    tls = cert.make_tls(ca, now)
    first = leaf(tls.current()[1]).serial_number
    due = schedule.next_due()
    assert due is not None and SERVER_KEY in schedule
    # 50% +- 10% of its lifetime, which is the TTL plus the clock-skew backdate (up to 60 s)
    lifetime = cert.svid.not_after - cert.svid.not_before
    assert lifetime >= timedelta(hours=1)
    assert lifetime * 0.4 <= due - cert.svid.not_before <= lifetime * 0.6
    assert not list(schedule.due(now))
    cert.renew(ca, due)
    assert leaf(tls.current()[1]).serial_number != first
    assert (schedule.next_due() or now) > due  # the new SVID is tracked, nothing due now
