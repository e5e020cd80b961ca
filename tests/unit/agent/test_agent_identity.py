"""The agent's key, CSR and on-disk credentials."""

from __future__ import annotations

import os
import random
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meshward.agent.identity import Credentials, CredentialStore, key_pem, make_csr, new_key
from meshward.agent.run import MIN_RENEW_INTERVAL, AgentConfig, renew_delay
from meshward.certs import CertificateAuthority
from meshward.errors import UserError

ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.ephemeral("cluster.local")


def issued(ca: CertificateAuthority, ttl: timedelta = timedelta(hours=1)) -> Credentials:
    key = new_key()
    svid = ca.issue_for_csr(make_csr(key, ORDERS), ORDERS, ttl=ttl)
    assert svid.private_key_pem == b""  # the CA never saw the key
    return Credentials.build(key_pem(key), svid.cert_chain_pem, ca.trust_bundle().roots_pem, "t")


def test_csr_is_accepted_by_the_ca_for_its_identity_only(ca: CertificateAuthority) -> None:
    creds = issued(ca)
    assert creds.spiffe_id == ORDERS
    with pytest.raises(UserError, match="CSR asks for"):
        ca.issue_for_csr(make_csr(new_key(), ORDERS), "spiffe://cluster.local/ns/shop/sa/x")


def test_store_round_trip_is_private(ca: CertificateAuthority, tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "state")
    store.ensure()
    assert store.load() is None  # first start
    creds = issued(ca)
    store.save(creds)
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "svid.pem").st_mode) == 0o600
    assert store.load() == creds


def test_store_refuses_a_readable_key_and_a_corrupt_file(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    store = CredentialStore(tmp_path)
    store.save(issued(ca))
    os.chmod(tmp_path / "svid.pem", 0o644)
    with pytest.raises(UserError, match="accessible by group/others"):
        store.load()
    os.chmod(tmp_path / "svid.pem", 0o600)
    (tmp_path / "svid.pem").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        store.load()


def test_mismatched_key_is_refused_without_showing_it(ca: CertificateAuthority) -> None:
    creds = issued(ca)
    other = key_pem(new_key())
    with pytest.raises(UserError, match="does not match") as info:
        Credentials.build(other, creds.chain_pem, creds.bundle_pem, "t")
    assert "PRIVATE" not in str(info.value)


def test_renewal_is_due_at_the_fraction_of_the_issued_lifetime(ca: CertificateAuthority) -> None:
    creds = issued(ca)  # 1 h, not_before backdated 60 s against clock skew
    now = datetime.now(UTC)
    delays = [renew_delay(creds, now, 0.5, 0.1, random.Random(i)) for i in range(50)]
    assert all(0.4 * 3600 - 5 <= d <= 0.6 * 3600 + 5 for d in delays)
    assert len({round(d) for d in delays}) > 10  # jittered
    late = now + timedelta(hours=2)  # past due (e.g. loaded from disk late): soon, not never
    assert renew_delay(creds, late, 0.5, 0.1, random.Random(1)) == MIN_RENEW_INTERVAL


def test_agent_config_refuses_nonsense(tmp_path: Path) -> None:
    base = {"workload": "shop/orders", "xds": "127.0.0.1:1", "state_dir": tmp_path,
            "spiffe_id": ORDERS, "server_identity": ORDERS}  # fmt: skip
    with pytest.raises(UserError, match="renew-fraction"):
        AgentConfig(**base, renew_fraction=1.5)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="jitter"):
        AgentConfig(**base, renew_fraction=0.1, jitter=0.2)  # type: ignore[arg-type]
