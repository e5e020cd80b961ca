"""Envoy SDS Secrets for a workload: ``default`` (its SVID) and ``ROOTCA`` (the trust bundle).

Istio's secret names, one SVID per node (see the interface contract in the team brief).

Every secret is validated before it leaves this module, and ``validate_secret`` is public so the
control plane can re-check anything it is about to push: Envoy NACKs a broken Secret by echoing
the whole message — inline private key included — in ``error_detail`` (DESIGN.md field notes),
so a broken secret must never be sent. Validation messages never contain key material.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from meshward.certs.bundle import TrustBundle
from meshward.certs.ca import DEFAULT_SVID_TTL, CertificateAuthority, Svid
from meshward.certs.lifetime import Lifetime, Validity, as_utc
from meshward.certs.pem import load_certificates, load_private_key, public_keys_equal
from meshward.certs.spiffe import SpiffeId
from meshward.certs.verify import SvidVerificationError, spiffe_id_of, verify_svid
from meshward.errors import UserError

DEFAULT_SECRET = "default"
ROOTCA_SECRET = "ROOTCA"
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


class InvalidSecret(UserError):
    """A Secret that must not be pushed. The message is safe to log (no key material)."""


@dataclass(frozen=True)
class WorkloadSecrets:
    svid: Svid
    bundle: TrustBundle
    tls_certificate: Any = field(repr=False)  # secret_pb2.Secret "default" (inline key!)
    validation_context: Any  # secret_pb2.Secret named "ROOTCA"

    def secrets(self) -> tuple[Any, Any]:
        return (self.tls_certificate, self.validation_context)


def tls_certificate_secret(svid: Svid, *, name: str = DEFAULT_SECRET) -> Any:
    if not svid.private_key_pem:
        raise InvalidSecret(
            f"SVID for {svid.spiffe_id} was issued from a CSR: the control plane does not hold "
            "its key, so it cannot be served over SDS"
        )
    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=_inline(svid.cert_chain_pem),
            private_key=_inline(svid.private_key_pem),
        ),
    )


def validation_context_secret(bundle: TrustBundle, *, name: str = ROOTCA_SECRET) -> Any:
    return secret_pb2.Secret(
        name=name,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=_inline(bundle.roots_pem)
        ),
    )


def _inline(data: bytes) -> Any:
    return base_pb2.DataSource(inline_bytes=data)


def workload_secrets(
    ca: CertificateAuthority,
    spiffe_id: str | SpiffeId,
    *,
    ttl: timedelta = DEFAULT_SVID_TTL,
    now: datetime | None = None,
) -> WorkloadSecrets:
    """Issue a fresh SVID for ``spiffe_id`` and build both secrets, validated."""
    at = as_utc(now)
    svid = ca.issue(spiffe_id, ttl=ttl, now=at)
    bundle = ca.trust_bundle(now=at)
    tls = tls_certificate_secret(svid)
    roots = validation_context_secret(bundle)
    validate_secret(roots, now=at)
    validate_secret(tls, now=at, trust_bundle=bundle)
    return WorkloadSecrets(svid, bundle, tls, roots)


def validate_secret(
    secret: Any, *, now: datetime | None = None, trust_bundle: TrustBundle | None = None
) -> None:
    """Raise InvalidSecret unless ``secret`` is safe to push at ``now``.

    tls_certificate: inline chain and key that parse, key matching the leaf, leaf currently
    valid with one SPIFFE URI SAN, each certificate signed by the next (and, with
    ``trust_bundle``, a chain that verifies under it). validation_context: inline roots that
    parse, are CAs and are all currently valid.
    """
    at = as_utc(now)
    name = getattr(secret, "name", "")
    if not name:
        raise InvalidSecret("secret has no name")
    kind = secret.WhichOneof("type")
    label = f"secret {name!r}"
    if kind == "tls_certificate":
        _validate_tls_certificate(secret.tls_certificate, label, at, trust_bundle)
    elif kind == "validation_context":
        _validate_validation_context(secret.validation_context, label, at)
    else:
        raise InvalidSecret(
            f"{label} carries {kind or 'nothing'}; Meshward pushes tls_certificate or "
            "validation_context only"
        )


def _inline_bytes(source: Any, what: str) -> bytes:
    if source.WhichOneof("specifier") != "inline_bytes" or not source.inline_bytes:
        raise InvalidSecret(f"{what} is not inline_bytes (or is empty)")
    return bytes(source.inline_bytes)


def _validate_tls_certificate(
    tls: Any, label: str, at: datetime, trust_bundle: TrustBundle | None
) -> None:
    chain_pem = _inline_bytes(tls.certificate_chain, f"{label} certificate_chain")
    key_pem = _inline_bytes(tls.private_key, f"{label} private_key")
    try:
        chain = load_certificates(chain_pem, f"{label} certificate_chain")
        key = load_private_key(key_pem, f"{label} private_key")
    except UserError as exc:
        raise InvalidSecret(str(exc)) from None
    leaf = chain[0]
    if not public_keys_equal(key.public_key(), leaf.public_key()):
        raise InvalidSecret(f"{label}: private key does not match the leaf certificate")
    state = Lifetime(leaf.not_valid_before_utc, leaf.not_valid_after_utc).validity(at)
    if state is not Validity.VALID:
        raise InvalidSecret(
            f"{label}: leaf certificate is {state} (valid {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}"
            f" .. {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ})"
        )
    try:
        spiffe_id_of(leaf)
    except SvidVerificationError as exc:
        raise InvalidSecret(f"{label}: {exc}") from None
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise InvalidSecret(
                f"{label}: certificate_chain is out of order or incomplete "
                f"({child.issuer.rfc4514_string()} is not the next certificate)"
            ) from None
    if trust_bundle is not None:
        try:
            verify_svid(chain, trust_bundle, now=at)
        except SvidVerificationError as exc:
            raise InvalidSecret(f"{label}: {exc}") from None


def _validate_validation_context(ctx: Any, label: str, at: datetime) -> None:
    roots_pem = _inline_bytes(ctx.trusted_ca, f"{label} trusted_ca")
    try:
        roots = load_certificates(roots_pem, f"{label} trusted_ca")
    except UserError as exc:
        raise InvalidSecret(str(exc)) from None
    for root in roots:
        try:
            is_ca = root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise InvalidSecret(
                f"{label}: {root.subject.rfc4514_string() or 'a certificate'} is not a CA"
            )
        state = Lifetime(root.not_valid_before_utc, root.not_valid_after_utc).validity(at)
        if state is not Validity.VALID:
            raise InvalidSecret(f"{label}: root {root.subject.rfc4514_string()} is {state}")
