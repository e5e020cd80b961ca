"""Chain validation with cryptography's X.509 verifier against the trust bundle."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.x509 import verification

from meshward.certs.bundle import TrustBundle
from meshward.certs.ca import CertificateAuthority, Svid
from meshward.certs.pem import certs_to_pem
from meshward.certs.verify import SvidVerificationError, spiffe_id_of, verify_svid

TD = "cluster.local"
FRONTEND = f"spiffe://{TD}/ns/shop/sa/frontend"
Forge = Callable[[CertificateAuthority, list[x509.GeneralName]], Svid]


def test_issued_svid_verifies_against_bundle(ca: CertificateAuthority) -> None:
    svid = ca.issue(FRONTEND)
    sid = verify_svid(svid.cert_chain_pem, ca.trust_bundle())
    assert str(sid) == FRONTEND and sid.namespace == "shop"


def test_leaf_hop_runs_through_cryptography_client_verifier(ca: CertificateAuthority) -> None:
    """What works with cryptography's verifier directly (documented in meshward/certs/verify.py)."""
    leaf, inter = ca.issue(FRONTEND).chain()
    root = ca.active_generation.root
    builder = verification.PolicyBuilder().time(datetime.now(UTC))
    # ClientVerifier with the intermediate as anchor: the full EE profile check, returns the SAN.
    verified = builder.store(verification.Store([inter])).build_client_verifier().verify(leaf, [])
    assert verified.subjects == [x509.UniformResourceIdentifier(FRONTEND)]
    # ClientVerifier with the root as anchor: refused because of the root's URI name constraint.
    with pytest.raises(verification.VerificationError, match="unsupported name constraint"):
        builder.store(verification.Store([root])).build_client_verifier().verify(leaf, [inter])
    # ServerVerifier: an SVID has no DNS/IP SAN to match, whatever subject we ask for.
    with pytest.raises(verification.VerificationError, match="no matching subjectAltName"):
        builder.store(verification.Store([inter])).build_server_verifier(
            verification.DNSName("frontend.shop")
        ).verify(leaf, [])


def test_other_ca_is_rejected(ca: CertificateAuthority) -> None:
    stranger = CertificateAuthority.ephemeral(TD)
    svid = stranger.issue(FRONTEND)
    with pytest.raises(SvidVerificationError, match="not in the trust bundle"):
        verify_svid(svid.cert_chain_pem, ca.trust_bundle())


def test_expired_and_not_yet_valid_leaf(ca: CertificateAuthority) -> None:
    svid = ca.issue(FRONTEND, ttl=timedelta(minutes=10))
    with pytest.raises(SvidVerificationError, match="not valid at validation time"):
        verify_svid(
            svid.cert_chain_pem, ca.trust_bundle(), now=svid.not_after + timedelta(seconds=1)
        )
    with pytest.raises(SvidVerificationError, match="not valid at"):
        verify_svid(
            svid.cert_chain_pem, ca.trust_bundle(), now=svid.not_before - timedelta(seconds=1)
        )


def test_chain_without_intermediate_is_rejected(ca: CertificateAuthority) -> None:
    leaf = ca.issue(FRONTEND).certificate()
    with pytest.raises(SvidVerificationError, match="does not include its issuer"):
        verify_svid([leaf], ca.trust_bundle())


def test_empty_bundle(ca: CertificateAuthority) -> None:
    with pytest.raises(SvidVerificationError, match="holds no roots"):
        verify_svid(ca.issue(FRONTEND).cert_chain_pem, TrustBundle(TD, b""))


def test_root_name_constraint_enforced_for_other_trust_domains(
    ca: CertificateAuthority, forge_svid: Forge
) -> None:
    forged = forge_svid(ca, [x509.UniformResourceIdentifier("spiffe://evil.org/ns/a/sa/b")]).chain()
    # Under our own trust domain the identity is refused outright ...
    with pytest.raises(SvidVerificationError, match=r"trust domain 'evil\.org'"):
        verify_svid(forged, ca.trust_bundle())
    # ... and even a bundle labelled evil.org holding our root refuses it: the name constraint.
    evil = TrustBundle.from_certificates("evil.org", ca.trust_bundle().roots())
    with pytest.raises(SvidVerificationError, match="outside the root's name constraints"):
        verify_svid(forged, evil)


def test_leaf_with_extra_or_non_uri_sans_is_not_an_svid(
    ca: CertificateAuthority, forge_svid: Forge
) -> None:
    for names in (
        [x509.UniformResourceIdentifier(FRONTEND), x509.DNSName("frontend")],
        [x509.DNSName("frontend")],
    ):
        with pytest.raises(SvidVerificationError, match="exactly one URI SAN"):
            verify_svid(forge_svid(ca, names).cert_chain_pem, ca.trust_bundle())


def test_spiffe_id_of_requires_a_san(ca: CertificateAuthority) -> None:
    with pytest.raises(SvidVerificationError, match="no subjectAltName"):
        spiffe_id_of(ca.active_generation.root)


def test_bundle_is_a_value(ca: CertificateAuthority) -> None:
    bundle = ca.trust_bundle()
    assert bundle == TrustBundle(TD, certs_to_pem(bundle.roots()))
    assert len(bundle) == 1 and len(bundle.fingerprints()[0]) == 64
    assert bundle.version == TrustBundle(TD, bundle.roots_pem).version
