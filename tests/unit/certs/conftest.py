"""Shared fixtures for the certs tests: one CA per module (key generation is the slow part)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshward.certs.ca import CertificateAuthority, Svid
from meshward.certs.pem import cert_to_pem, key_to_pem

TD = "cluster.local"
FRONTEND = f"spiffe://{TD}/ns/shop/sa/frontend"
CART = f"spiffe://{TD}/ns/shop/sa/cart"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.ephemeral(TD)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    CertificateAuthority.init(directory, TD)
    return directory


def _make_csr(
    key: ec.EllipticCurvePrivateKey,
    names: Sequence[x509.GeneralName] = (),
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _csr_with_foreign_key(names: Sequence[x509.GeneralName]) -> bytes:
    """A CSR signed by key A that carries key B: the proof-of-possession check must catch it."""
    signer, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_pem_x509_csr(_make_csr(signer, names))
    der = csr.public_bytes(serialization.Encoding.DER)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    mine = signer.public_key().public_bytes(enc, spki)
    theirs = other.public_key().public_bytes(enc, spki)
    assert der.count(mine) == 1 and len(mine) == len(theirs)
    tampered = x509.load_der_x509_csr(der.replace(mine, theirs))
    return tampered.public_bytes(serialization.Encoding.PEM)


MakeCsr = Callable[..., bytes]


@pytest.fixture
def make_csr() -> MakeCsr:
    """``make_csr(key, [GeneralName...])`` -> PEM CSR signed by ``key``."""
    return _make_csr


@pytest.fixture
def csr_with_foreign_key() -> Callable[[Sequence[x509.GeneralName]], bytes]:
    return _csr_with_foreign_key


def _forge_svid(ca: CertificateAuthority, names: Sequence[x509.GeneralName]) -> Svid:
    """A leaf signed with the CA's real intermediate key but outside what ``issue`` allows:
    the leaked-intermediate-key scenario the root's name constraints exist for."""
    gen = ca._active
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(gen.info.intermediate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(list(names)), critical=True)
        .add_extension(gen.aki, critical=False)
        .sign(gen.intermediate_key, hashes.SHA256())
    )
    return Svid(
        str(names[0].value),
        cert_to_pem(leaf) + gen.intermediate_pem,
        key_to_pem(key),
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
        leaf.serial_number,
    )


@pytest.fixture
def forge_svid() -> Callable[[CertificateAuthority, Sequence[x509.GeneralName]], Svid]:
    return _forge_svid
