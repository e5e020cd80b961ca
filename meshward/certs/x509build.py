"""The three certificate profiles Meshward signs: root, intermediate, workload SVID.

Pure functions (keys and time are inputs), so the profiles can be tested byte by byte.

Profile choices and why:
- Root: name constraints (critical) permit URI names only under the trust domain and exclude
  every DNS name and IP address. RFC 5280 matches a URI constraint against the URI's *host*, so
  the permitted subtree is the bare trust domain (``cluster.local``): any URI SAN whose host is
  not the trust domain is rejected by OpenSSL/BoringSSL even if the intermediate key leaks.
  (The ``spiffe`` scheme itself cannot be expressed in a name constraint; issuance enforces it.)
- Each CA generation gets distinct subject names (``... g<N> <key id>``) so chain building never
  confuses an old root with a new one during a rotation overlap, nor one CA with another.
- SVID: empty subject and a *critical* SAN holding exactly one URI, as RFC 5280 requires when
  the subject is empty (and as Istio issues them). A non-empty subject would make the SAN
  non-critical, which strict verifiers (cryptography's, OpenSSL's X509_STRICT) then check.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

ORGANIZATION = "meshward"


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=not cert_sign,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def ca_name(
    kind: str, trust_domain: str, generation: int, key: ec.EllipticCurvePublicKey
) -> x509.Name:
    # The key id makes names unique across independent CAs of one trust domain too, so a chain
    # from a stranger CA is reported as "not in the bundle" instead of as a bad signature.
    key_id = x509.SubjectKeyIdentifier.from_public_key(key).digest[:4].hex()
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"meshward {kind} {trust_domain} g{generation} {key_id}"
            ),
        ]
    )


def name_constraints(trust_domain: str) -> x509.NameConstraints:
    return x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
        excluded_subtrees=[
            x509.DNSName(""),  # RFC 5280: the empty DNS constraint matches every name
            x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
            x509.IPAddress(ipaddress.ip_network("::/0")),
        ],
    )


def build_root(
    key: ec.EllipticCurvePrivateKey,
    trust_domain: str,
    generation: int,
    *,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    public = key.public_key()
    name = ca_name("root", trust_domain, generation, public)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(name_constraints(trust_domain), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def build_intermediate(
    key: ec.EllipticCurvePrivateKey,
    root: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    trust_domain: str,
    generation: int,
    *,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(ca_name("intermediate", trust_domain, generation, public))
        .issuer_name(root.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )


_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_LEAF_KU = _key_usage(cert_sign=False)
_LEAF_BC = x509.BasicConstraints(ca=False, path_length=None)
_EMPTY_NAME = x509.Name([])


_LEAF_FIXED = [
    x509.Extension(ExtensionOID.BASIC_CONSTRAINTS, True, _LEAF_BC),
    x509.Extension(ExtensionOID.KEY_USAGE, True, _LEAF_KU),
    x509.Extension(ExtensionOID.EXTENDED_KEY_USAGE, False, _EKU),
]
_SHA256 = hashes.SHA256()


def build_svid(
    public_key: ec.EllipticCurvePublicKey,
    uri: str,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    aki: x509.AuthorityKeyIdentifier,
    *,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """Built in one constructor call rather than a chain of ``add_extension`` (each of which
    copies the builder): the same certificate, in ~0.6-0.85x the time (this is every CSR's
    path; the ECDSA signature itself is the rest)."""
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)])
    return x509.CertificateBuilder(
        issuer_name=issuer.subject,
        subject_name=_EMPTY_NAME,
        public_key=public_key,
        serial_number=x509.random_serial_number(),
        not_valid_before=not_before,
        not_valid_after=not_after,
        extensions=[
            *_LEAF_FIXED,
            x509.Extension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, True, san),
            x509.Extension(
                ExtensionOID.SUBJECT_KEY_IDENTIFIER,
                False,
                x509.SubjectKeyIdentifier.from_public_key(public_key),
            ),
            x509.Extension(ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False, aki),
        ],
    ).sign(issuer_key, _SHA256)


SKEW_BACKDATE = timedelta(seconds=60)
