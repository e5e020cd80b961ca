"""PEM in and out, with errors an operator can act on.

cryptography's parse errors ("Could not deserialize key data...", "Unable to load PEM file") do
not say which file or what was expected; every loader here takes a ``source`` label for that.
Messages never include key material.
"""

from __future__ import annotations

from collections.abc import Iterable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshward.errors import UserError

_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"
_KEY_MARKERS = (b"PRIVATE KEY-----",)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8 ("BEGIN PRIVATE KEY"): what Envoy/BoringSSL, OpenSSL and Go all read.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def certs_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(cert_to_pem(c) for c in certs)


def load_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    """All certificates in a PEM blob (at least one), or a UserError naming ``source``."""
    if _CERT_MARKER not in data:
        if any(marker in data for marker in _KEY_MARKERS):
            raise UserError(f"{source} holds a private key, not a certificate")
        raise UserError(f"{source} contains no PEM certificate (-----BEGIN CERTIFICATE-----)")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise UserError(
            f"{source} holds a corrupt PEM certificate (truncated or edited?); "
            "re-issue or restore it"
        ) from None


def load_certificate(data: bytes, source: str) -> x509.Certificate:
    certs = load_certificates(data, source)
    if len(certs) != 1:
        raise UserError(f"{source} holds {len(certs)} certificates; expected exactly one")
    return certs[0]


def load_private_key(data: bytes, source: str) -> ec.EllipticCurvePrivateKey:
    """An unencrypted ECDSA P-256 private key, or a UserError naming ``source``."""
    if not any(marker in data for marker in _KEY_MARKERS):
        raise UserError(f"{source} contains no PEM private key (-----BEGIN PRIVATE KEY-----)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UserError(f"{source} is encrypted; Meshward needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise UserError(
            f"{source} holds a corrupt PEM private key (truncated or edited?); restore it or "
            "re-create the CA with --force"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise UserError(f"{source} is not an ECDSA P-256 key")
    return key


def public_keys_equal(a: ec.EllipticCurvePublicKey, b: object) -> bool:
    """Compare by SubjectPublicKeyInfo: the same on every backend and for every key type."""
    if not isinstance(b, ec.EllipticCurvePublicKey):
        return False
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return a.public_bytes(enc, fmt) == b.public_bytes(enc, fmt)
