"""The CA store on disk and SVID issuance (direct and CSR), including every bad input."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshward.certs import files
from meshward.certs.ca import (
    INTERMEDIATE_KEY,
    ROOT_KEY,
    CertificateAuthority,
)
from meshward.certs.pem import load_private_key, public_keys_equal
from meshward.certs.spiffe import InvalidSpiffeId
from meshward.errors import UserError

TD = "cluster.local"
FRONTEND = f"spiffe://{TD}/ns/shop/sa/frontend"
CART = f"spiffe://{TD}/ns/shop/sa/cart"
MakeCsr = Callable[..., bytes]

# ---- the store --------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_keys_0600_and_loads_back(tmp_path: Path) -> None:
    old_umask = os.umask(0o000)  # even a wide-open umask must not leak the keys
    try:
        ca = CertificateAuthority.init(tmp_path / "ca", TD)
    finally:
        os.umask(old_umask)
    gen = tmp_path / "ca" / "gen-0001"
    assert _mode(gen / ROOT_KEY) == 0o600
    assert _mode(gen / INTERMEDIATE_KEY) == 0o600
    assert _mode(gen / "root.pem") == 0o644
    assert not [p for p in gen.iterdir() if p.name.endswith(".tmp")]
    loaded = CertificateAuthority.load(tmp_path / "ca")
    assert loaded.trust_domain == TD
    assert loaded.trust_bundle().roots_pem == ca.trust_bundle().roots_pem


def test_root_profile(ca: CertificateAuthority) -> None:
    root = ca.active_generation.root
    key = root.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    life = root.not_valid_after_utc - root.not_valid_before_utc
    assert timedelta(days=3649) < life < timedelta(days=3651)
    nc = root.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert nc.value.permitted_subtrees == [x509.UniformResourceIdentifier(TD)]
    excluded = nc.value.excluded_subtrees or []
    assert x509.DNSName("") in excluded
    assert {type(n) for n in excluded} == {x509.DNSName, x509.IPAddress}
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 1
    inter = ca.active_generation.intermediate
    inter.verify_directly_issued_by(root)
    assert inter.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    CertificateAuthority.init(tmp_path, TD)
    key_before = (tmp_path / "gen-0001" / ROOT_KEY).read_bytes()
    with pytest.raises(UserError, match="--force"):
        CertificateAuthority.init(tmp_path, TD)
    assert (tmp_path / "gen-0001" / ROOT_KEY).read_bytes() == key_before
    CertificateAuthority.init(tmp_path, TD, force=True)
    assert (tmp_path / "gen-0001" / ROOT_KEY).read_bytes() != key_before
    assert _mode(tmp_path / "gen-0001" / ROOT_KEY) == 0o600


def test_half_initialised_store_is_not_clobbered(tmp_path: Path) -> None:
    # Keys exist but ca.json does not (crash before the commit point): still never overwritten.
    (tmp_path / "gen-0001").mkdir()
    (tmp_path / "gen-0001" / ROOT_KEY).write_bytes(b"precious")
    with pytest.raises(UserError, match="already exists; pass --force"):
        CertificateAuthority.init(tmp_path, TD)
    assert (tmp_path / "gen-0001" / ROOT_KEY).read_bytes() == b"precious"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_load_refuses_group_or_world_readable_keys(ca_dir: Path, mode: int) -> None:
    key = ca_dir / "gen-0001" / INTERMEDIATE_KEY
    key.chmod(mode)
    try:
        with pytest.raises(UserError) as exc:
            CertificateAuthority.load(ca_dir)
        message = str(exc.value)
        assert str(key) in message and f"{mode:04o}" in message and "chmod 600" in message
    finally:
        key.chmod(0o600)
    CertificateAuthority.load(ca_dir)


def test_atomic_write_leaves_nothing_behind_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "k.key"

    def fail(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", fail)
    with pytest.raises(UserError, match="No space left"):
        files.write_private(target, b"secret", overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_atomic_overwrite_replaces_in_one_step(tmp_path: Path) -> None:
    target = tmp_path / "k.key"
    files.write_private(target, b"one", overwrite=False)
    inode = target.stat().st_ino
    files.write_private(target, b"two", overwrite=True)
    assert target.read_bytes() == b"two" and target.stat().st_ino != inode
    assert _mode(target) == 0o600 and len(list(tmp_path.iterdir())) == 1


def test_load_missing_store_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="meshward ca init"):
        CertificateAuthority.load(tmp_path)


@pytest.mark.parametrize(
    ("victim", "content", "fragment"),
    [
        (
            "gen-0001/intermediate.key",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "corrupt PEM private key",
        ),
        ("gen-0001/intermediate.key", b"hello", "no PEM private key"),
        (
            "gen-0001/root.pem",
            b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            "corrupt PEM certificate",
        ),
        ("gen-0001/intermediate.pem", b"", "no PEM certificate"),
        ("ca.json", b"{not json", "not JSON"),
        ("ca.json", b'{"format": "other"}', "expected format"),
    ],
)
def test_corrupt_store_files(tmp_path: Path, victim: str, content: bytes, fragment: str) -> None:
    CertificateAuthority.init(tmp_path, TD)
    path = tmp_path / victim
    path.write_bytes(content)
    with pytest.raises(UserError) as exc:
        CertificateAuthority.load(tmp_path)
    assert fragment in str(exc.value)
    assert "AAAA" not in str(exc.value)


def test_swapped_keys_are_detected(tmp_path: Path) -> None:
    CertificateAuthority.init(tmp_path, TD)
    gen = tmp_path / "gen-0001"
    root, inter = (gen / ROOT_KEY).read_bytes(), (gen / INTERMEDIATE_KEY).read_bytes()
    files.write_private(gen / ROOT_KEY, inter, overwrite=True)
    files.write_private(gen / INTERMEDIATE_KEY, root, overwrite=True)
    with pytest.raises(UserError, match="does not match"):
        CertificateAuthority.load(tmp_path)


# ---- issuance ----------------------------------------------------------------------------------


def test_svid_profile(ca: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    svid = ca.issue(FRONTEND, now=now)
    leaf, inter = svid.chain()
    assert inter == ca.active_generation.intermediate
    assert svid.spiffe_id == FRONTEND and svid.serial == leaf.serial_number
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(FRONTEND)]
    assert leaf.subject == x509.Name([])
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # default TTL 1h from now; notBefore back-dated for clock skew
    assert abs((svid.not_after - now) - timedelta(hours=1)) < timedelta(seconds=1)
    assert timedelta(0) < now - svid.not_before <= timedelta(minutes=5)
    key = load_private_key(svid.private_key_pem, "svid key")
    assert public_keys_equal(key.public_key(), leaf.public_key())
    leaf.verify_directly_issued_by(inter)


def test_ttl_is_configurable_and_capped_by_the_intermediate() -> None:
    now = datetime.now(UTC)
    short = CertificateAuthority.ephemeral(TD, intermediate_ttl=timedelta(hours=2), now=now)
    assert short.issue(FRONTEND, ttl=timedelta(minutes=10), now=now).not_after - now < timedelta(
        minutes=10, seconds=1
    )
    capped = short.issue(FRONTEND, ttl=timedelta(days=1), now=now)
    assert capped.not_after == short.active_generation.intermediate.not_valid_after_utc
    with pytest.raises(UserError, match="at least"):
        short.issue(FRONTEND, ttl=timedelta(seconds=5), now=now)


def test_each_issue_gets_a_fresh_key_and_serial(ca: CertificateAuthority) -> None:
    a, b = ca.issue(FRONTEND), ca.issue(FRONTEND)
    assert a.private_key_pem != b.private_key_pem and a.serial != b.serial


@pytest.mark.parametrize(
    "bad",
    [
        "spiffe://other.org/ns/shop/sa/frontend",
        "https://cluster.local/ns/shop/sa/frontend",
        "spiffe://cluster.local/shop/frontend",
        "spiffe://cluster.local/ns/shop/sa/frontend?q",
        "spiffe://CLUSTER.LOCAL/ns/shop/sa/frontend",
    ],
)
def test_issue_rejects_bad_identities(ca: CertificateAuthority, bad: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        ca.issue(bad)


def test_expired_ca_issues_nothing() -> None:
    past = datetime.now(UTC) - timedelta(days=30)
    old = CertificateAuthority.ephemeral(TD, root_ttl=timedelta(days=2), now=past)
    with pytest.raises(UserError, match=r"expired at .*meshward ca rotate"):
        old.issue(FRONTEND)


def test_expired_intermediate_issues_nothing() -> None:
    past = datetime.now(UTC) - timedelta(days=30)
    old = CertificateAuthority.ephemeral(TD, intermediate_ttl=timedelta(days=1), now=past)
    with pytest.raises(UserError, match=r"CA intermediate .*expired"):
        old.issue(FRONTEND)


def test_not_yet_valid_ca_issues_nothing() -> None:
    future = datetime.now(UTC) + timedelta(days=1)
    early = CertificateAuthority.ephemeral(TD, now=future)
    with pytest.raises(UserError, match="not valid until"):
        early.issue(FRONTEND)


# ---- CSR flow ----------------------------------------------------------------------------------


def test_csr_flow_keeps_the_key_with_the_workload(
    ca: CertificateAuthority, make_csr: MakeCsr
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key, [x509.UniformResourceIdentifier(CART)])
    svid = ca.issue_for_csr(csr, CART)
    assert svid.private_key_pem == b""
    leaf = svid.certificate()
    assert public_keys_equal(key.public_key(), leaf.public_key())
    assert list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [
        x509.UniformResourceIdentifier(CART)
    ]
    assert leaf.subject == x509.Name([])  # the CSR's subject is never copied


@pytest.mark.parametrize(
    ("names", "fragment"),
    [
        (
            [x509.UniformResourceIdentifier(FRONTEND)],
            "asks for spiffe://cluster.local/ns/shop/sa/frontend",
        ),
        ([], "asks for no URI SAN"),
        (
            [x509.UniformResourceIdentifier(CART), x509.UniformResourceIdentifier(FRONTEND)],
            "exactly that one URI SAN",
        ),
        ([x509.UniformResourceIdentifier(CART), x509.DNSName("cart.shop")], "non-URI"),
    ],
)
def test_csr_must_request_exactly_the_issued_identity(
    ca: CertificateAuthority, names: list[x509.GeneralName], fragment: str, make_csr: MakeCsr
) -> None:
    csr = make_csr(ec.generate_private_key(ec.SECP256R1()), names)
    with pytest.raises(UserError) as exc:
        ca.issue_for_csr(csr, CART)
    assert fragment in str(exc.value) and "nothing was issued" in str(exc.value)


def test_csr_signed_by_another_key_is_rejected(
    ca: CertificateAuthority, csr_with_foreign_key: MakeCsr
) -> None:
    csr = csr_with_foreign_key([x509.UniformResourceIdentifier(CART)])
    with pytest.raises(UserError, match="not signed by the key it carries"):
        ca.issue_for_csr(csr, CART)


def test_corrupt_and_wrong_curve_csrs(ca: CertificateAuthority, make_csr: MakeCsr) -> None:
    good = make_csr(ec.generate_private_key(ec.SECP256R1()), [x509.UniformResourceIdentifier(CART)])
    lines = good.splitlines()
    truncated = b"\n".join(lines[:3] + lines[-1:]) + b"\n"
    with pytest.raises(UserError, match="CSR is corrupt"):
        ca.issue_for_csr(truncated, CART)
    with pytest.raises(UserError, match="not PEM"):
        ca.issue_for_csr(b"garbage", CART)
    p384 = make_csr(ec.generate_private_key(ec.SECP384R1()), [x509.UniformResourceIdentifier(CART)])
    with pytest.raises(UserError, match="P-256"):
        ca.issue_for_csr(p384, CART)


def test_state_file_is_plain_json(ca_dir: Path) -> None:
    state = json.loads((ca_dir / "ca.json").read_text())
    assert state["trust_domain"] == TD and state["active"] == 1
