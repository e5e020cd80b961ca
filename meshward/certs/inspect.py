"""What `meshward ca inspect` shows: who a certificate names, who signed it, how long it lives.

Pure (certificates and ``now`` in, dataclasses out); the CLI only formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from meshward.certs.duration import format_duration
from meshward.certs.lifetime import Lifetime, Validity, as_utc


@dataclass(frozen=True)
class CertificateInfo:
    position: int  # 0-based index in the file
    identity: str | None  # the URI SAN(s) of a leaf; None for CAs
    subject: str
    issuer: str
    serial: str
    not_before: datetime
    not_after: datetime
    remaining_seconds: float
    validity: Validity
    is_ca: bool
    key: str
    sha256: str
    sans: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "identity": self.identity,
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "remaining_seconds": round(self.remaining_seconds, 3),
            "validity": str(self.validity),
            "is_ca": self.is_ca,
            "key": self.key,
            "sha256": self.sha256,
            "sans": list(self.sans),
        }

    def remaining_text(self) -> str:
        if self.validity is Validity.NOT_YET_VALID:
            return "not yet valid"
        left = format_duration(timedelta(seconds=self.remaining_seconds))
        if self.validity is Validity.EXPIRED:
            return f"EXPIRED {left.lstrip('-')} ago"
        return left


def _key_description(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384"}.get(
            key.curve.name, f"ECDSA {key.curve.name}"
        )
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    out = []
    for n in names:
        if isinstance(n, x509.UniformResourceIdentifier):
            label = "URI"
        elif isinstance(n, x509.DNSName):
            label = "DNS"
        elif isinstance(n, x509.IPAddress):
            label = "IP"
        elif isinstance(n, x509.RFC822Name):
            label = "email"
        else:
            label = type(n).__name__
        out.append(f"{label}:{n.value}")
    return tuple(out)


def describe(cert: x509.Certificate, now: datetime, position: int = 0) -> CertificateInfo:
    at = as_utc(now)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    sans = _sans(cert)
    uris = [s[4:] for s in sans if s.startswith("URI:")]
    lifetime = Lifetime(cert.not_valid_before_utc, cert.not_valid_after_utc)
    return CertificateInfo(
        position=position,
        identity=", ".join(uris) if uris and not is_ca else None,
        subject=cert.subject.rfc4514_string() or "(empty)",
        issuer=cert.issuer.rfc4514_string() or "(empty)",
        serial=f"{cert.serial_number:x}",
        not_before=lifetime.not_before,
        not_after=lifetime.not_after,
        remaining_seconds=lifetime.remaining_seconds(at),
        validity=lifetime.validity(at),
        is_ca=is_ca,
        key=_key_description(cert),
        sha256=cert.fingerprint(hashes.SHA256()).hex(),
        sans=sans,
    )


def describe_all(certs: list[x509.Certificate], now: datetime) -> list[CertificateInfo]:
    return [describe(c, now, i) for i, c in enumerate(certs)]
