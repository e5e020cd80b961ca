"""Verifying an SVID chain against a trust bundle with cryptography's X.509 verifier.

What works, and why it is split in two hops (cryptography 50, measured):

- ``ServerVerifier`` cannot be used: it matches a DNS name or IP address subject against the SAN
  and an SVID has only a URI SAN ("leaf certificate has no matching subjectAltName").
- ``ClientVerifier`` is the right profile (no subject to match; it returns the SANs and requires
  the clientAuth EKU that every SVID carries) — but it refuses any chain whose CA carries a *URI*
  name constraint ("unsupported name constraint"), and Meshward roots are constrained to the
  trust domain on purpose (OpenSSL and BoringSSL, i.e. Python ``ssl`` and Envoy, enforce it).

So: the leaf -> intermediate hop runs through ``ClientVerifier`` with the intermediate as the
store's anchor (full RFC 5280/web-PKI EE profile: signature, validity, EKU, critical SAN rules,
basicConstraints), and the intermediate -> root hop is checked here: signature
(``verify_directly_issued_by``), validity, CA flags, path length, and the root's URI name
constraints applied to the leaf's SPIFFE ID. The intermediate is only accepted as an anchor after
that hop succeeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509 import verification

from meshward.certs.bundle import TrustBundle
from meshward.certs.lifetime import as_utc
from meshward.certs.pem import load_certificates
from meshward.certs.spiffe import InvalidSpiffeId, SpiffeId, parse_spiffe_id
from meshward.errors import UserError


class SvidVerificationError(UserError):
    """The chain does not prove a SPIFFE identity under this trust bundle."""


def spiffe_id_of(cert: x509.Certificate, trust_domain: str | None = None) -> SpiffeId:
    """The SPIFFE ID of an SVID: its one and only SAN, a ``spiffe://`` URI."""
    try:
        names = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        raise SvidVerificationError("certificate has no subjectAltName: not an SVID") from None
    if len(names) != 1 or not isinstance(names[0], x509.UniformResourceIdentifier):
        raise SvidVerificationError(
            f"an SVID carries exactly one URI SAN; this certificate has {len(names)} SAN(s): "
            + ", ".join(f"{type(n).__name__}={n.value!r}" for n in names)
        )
    try:
        return parse_spiffe_id(names[0].value, trust_domain)
    except InvalidSpiffeId as exc:
        raise SvidVerificationError(str(exc)) from None


def verify_svid(
    chain: bytes | Sequence[x509.Certificate],
    bundle: TrustBundle,
    *,
    now: datetime | None = None,
) -> SpiffeId:
    """Return the chain's SPIFFE ID if it is valid at ``now`` under ``bundle``; else raise."""
    certs = load_certificates(chain, "SVID chain") if isinstance(chain, bytes) else list(chain)
    if not certs:
        raise SvidVerificationError("empty certificate chain")
    at = as_utc(now)
    leaf = certs[0]
    identity = spiffe_id_of(leaf, bundle.trust_domain)
    roots = bundle.roots()
    if not roots:
        raise SvidVerificationError(f"trust bundle for {bundle.trust_domain} holds no roots")
    candidates = [c for c in certs[1:] if c.subject == leaf.issuer]
    if not candidates:
        raise SvidVerificationError(
            f"chain for {identity} does not include its issuer ({leaf.issuer.rfc4514_string()})"
        )
    problems: list[str] = []
    for intermediate in candidates:
        for root in (r for r in roots if r.subject == intermediate.issuer):
            try:
                _check_ca_hop(intermediate, root, identity, at)
                _verify_leaf(leaf, intermediate, at)
            except SvidVerificationError as exc:
                problems.append(str(exc))
                continue
            return identity
    if not problems:
        raise SvidVerificationError(
            f"{identity} was issued under {candidates[0].issuer.rfc4514_string()}, "
            "which is not in the trust bundle (dropped after a CA rotation, or another CA)"
        )
    raise SvidVerificationError(f"{identity} does not verify: " + "; ".join(problems))


def _verify_leaf(leaf: x509.Certificate, anchor: x509.Certificate, at: datetime) -> None:
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([anchor]))
        .time(at)
        .max_chain_depth(0)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, [])
    except verification.VerificationError as exc:
        raise SvidVerificationError(f"leaf rejected: {exc}") from None
    if len(verified.subjects or []) != 1:
        raise SvidVerificationError("leaf must carry exactly one SAN")


def _check_ca_hop(
    intermediate: x509.Certificate, root: x509.Certificate, identity: SpiffeId, at: datetime
) -> None:
    try:
        intermediate.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise SvidVerificationError(
            "intermediate signature does not verify under the root"
        ) from None
    for kind, cert, min_path in (("root", root, 1), ("intermediate", intermediate, 0)):
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            raise SvidVerificationError(
                f"{kind} {cert.subject.rfc4514_string()} is not valid at {at:%Y-%m-%d %H:%M:%SZ}"
            )
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca or (bc.path_length is not None and bc.path_length < min_path):
            raise SvidVerificationError(f"{kind} is not a CA allowed to issue this chain")
        try:
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            ku = None
        if ku is not None and not ku.key_cert_sign:
            raise SvidVerificationError(f"{kind} key usage does not allow signing certificates")
        _check_uri_constraints(cert, kind, identity)


def _check_uri_constraints(cert: x509.Certificate, kind: str, identity: SpiffeId) -> None:
    """RFC 5280 4.2.1.10 for URIs: the constraint names a host (``td``) or a domain (``.td``)."""
    try:
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return
    host = (urlsplit(str(identity)).hostname or "").lower()

    def matches(base: str) -> bool:
        base = base.lower()
        return host.endswith(base) if base.startswith(".") else host == base

    permitted = [
        n.value
        for n in nc.permitted_subtrees or ()
        if isinstance(n, x509.UniformResourceIdentifier)
    ]
    excluded = [
        n.value for n in nc.excluded_subtrees or () if isinstance(n, x509.UniformResourceIdentifier)
    ]
    if (permitted and not any(map(matches, permitted))) or any(map(matches, excluded)):
        raise SvidVerificationError(
            f"{identity} is outside the {kind}'s name constraints (permitted: {permitted or 'any'})"
        )
