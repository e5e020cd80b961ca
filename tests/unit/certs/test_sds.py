"""SDS secrets for a workload: proto round trip, usable material, and never pushing a broken one."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import any_pb2

from meshward.certs.bundle import TrustBundle
from meshward.certs.ca import CertificateAuthority
from meshward.certs.pem import certs_to_pem
from meshward.certs.sds import (
    DEFAULT_SECRET,
    ROOTCA_SECRET,
    SECRET_TYPE_URL,
    InvalidSecret,
    tls_certificate_secret,
    validate_secret,
    validation_context_secret,
    workload_secrets,
)
from meshward.errors import UserError

TD = "cluster.local"
FRONTEND = f"spiffe://{TD}/ns/shop/sa/frontend"


def test_round_trip_through_the_proto(ca: CertificateAuthority) -> None:
    ws = workload_secrets(ca, FRONTEND)
    tls, roots = ws.secrets()
    assert tls.name == DEFAULT_SECRET == "default" and roots.name == ROOTCA_SECRET == "ROOTCA"
    for secret in (tls, roots):
        packed = any_pb2.Any()
        packed.Pack(secret)
        assert packed.type_url == SECRET_TYPE_URL
        back = secret_pb2.Secret()
        assert packed.Unpack(back)
        assert back == secret
        assert secret_pb2.Secret.FromString(secret.SerializeToString()) == secret
        validate_secret(back, trust_bundle=ws.bundle)
    back_tls = secret_pb2.Secret.FromString(tls.SerializeToString())
    assert back_tls.tls_certificate.certificate_chain.inline_bytes == ws.svid.cert_chain_pem
    assert back_tls.tls_certificate.private_key.inline_bytes == ws.svid.private_key_pem
    back_roots = secret_pb2.Secret.FromString(roots.SerializeToString())
    assert back_roots.validation_context.trusted_ca.inline_bytes == ca.trust_bundle().roots_pem


def test_secret_material_loads_into_a_tls_stack(ca: CertificateAuthority, tmp_path: Path) -> None:
    tls, roots = workload_secrets(ca, FRONTEND).secrets()
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain.write_bytes(tls.tls_certificate.certificate_chain.inline_bytes)
    key.write_bytes(tls.tls_certificate.private_key.inline_bytes)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key)  # raises if key and chain do not belong together
    ctx.load_verify_locations(cadata=roots.validation_context.trusted_ca.inline_bytes.decode())
    assert len(ctx.get_ca_certs()) == 1


def test_bundle_secret_carries_every_trusted_root() -> None:
    ca = CertificateAuthority.ephemeral(TD)
    ca.rotate(grace=timedelta(hours=1))
    ws = workload_secrets(ca, FRONTEND)
    assert (
        len(TrustBundle(TD, ws.validation_context.validation_context.trusted_ca.inline_bytes)) == 2
    )


# ---- validation: what must never be pushed -------------------------------------------------


def _tls(ca: CertificateAuthority, **svid_changes: Any) -> Any:
    svid = ca.issue(FRONTEND)
    secret = tls_certificate_secret(svid)
    for field, value in svid_changes.items():
        getattr(secret.tls_certificate, field).inline_bytes = value
    return secret


def _assert_invalid(secret: Any, fragment: str, **kwargs: Any) -> None:
    with pytest.raises(InvalidSecret) as exc:
        validate_secret(secret, **kwargs)
    message = str(exc.value)
    assert fragment in message, message
    # Safe to log: never key material (Envoy's NACK would echo it; we must not).
    assert "PRIVATE KEY" not in message and "\n" not in message
    if secret.HasField("tls_certificate"):
        body = secret.tls_certificate.private_key.inline_bytes.splitlines()[1:2]
        assert not body or body[0].decode(errors="replace") not in message


def test_key_that_does_not_match_the_certificate(ca: CertificateAuthority) -> None:
    other_key = ca.issue(FRONTEND).private_key_pem
    _assert_invalid(_tls(ca, private_key=other_key), "does not match")


def test_expired_and_not_yet_valid_certificate(ca: CertificateAuthority) -> None:
    secret = _tls(ca)
    later = datetime.now(UTC) + timedelta(hours=2)
    _assert_invalid(secret, "expired", now=later)
    _assert_invalid(secret, "not-yet-valid", now=datetime.now(UTC) - timedelta(hours=1))


def test_corrupt_or_missing_material(ca: CertificateAuthority) -> None:
    svid = ca.issue(FRONTEND)
    truncated_key = svid.private_key_pem[:60] + b"\n-----END PRIVATE KEY-----\n"
    _assert_invalid(_tls(ca, private_key=truncated_key), "corrupt PEM private key")
    _assert_invalid(_tls(ca, private_key=b""), "private_key is not inline_bytes (or is empty)")
    _assert_invalid(_tls(ca, certificate_chain=b"junk"), "no PEM certificate")
    bad_chain = svid.cert_chain_pem.replace(b"MII", b"MIX", 1)
    _assert_invalid(_tls(ca, certificate_chain=bad_chain), "corrupt")


def test_chain_out_of_order(ca: CertificateAuthority) -> None:
    svid = ca.issue(FRONTEND)
    leaf, inter = svid.chain()
    secret = _tls(ca)
    secret.tls_certificate.certificate_chain.inline_bytes = certs_to_pem([leaf, inter, inter])
    secret.tls_certificate.private_key.inline_bytes = svid.private_key_pem
    _assert_invalid(secret, "out of order")


def test_chain_from_another_ca_fails_against_the_bundle(ca: CertificateAuthority) -> None:
    stranger = CertificateAuthority.ephemeral(TD)
    secret = tls_certificate_secret(stranger.issue(FRONTEND))
    validate_secret(secret)  # self-consistent ...
    _assert_invalid(secret, "not in the trust bundle", trust_bundle=ca.trust_bundle())


def test_csr_issued_svid_cannot_be_served(
    ca: CertificateAuthority, make_csr: Callable[..., bytes]
) -> None:
    csr = make_csr(
        ec.generate_private_key(ec.SECP256R1()), [x509.UniformResourceIdentifier(FRONTEND)]
    )
    with pytest.raises(InvalidSecret, match="CSR"):
        tls_certificate_secret(ca.issue_for_csr(csr, FRONTEND))


def test_secret_shape(ca: CertificateAuthority) -> None:
    _assert_invalid(secret_pb2.Secret(), "no name")
    _assert_invalid(secret_pb2.Secret(name="x"), "carries nothing")
    generic = secret_pb2.Secret(name="x")
    generic.generic_secret.secret.inline_string = "hunter2"
    _assert_invalid(generic, "carries generic_secret")


def test_validation_context_checks(ca: CertificateAuthority) -> None:
    leaf_pem = ca.issue(FRONTEND).cert_chain_pem
    _assert_invalid(validation_context_secret(TrustBundle(TD, leaf_pem)), "is not a CA")
    _assert_invalid(validation_context_secret(TrustBundle(TD, b"")), "trusted_ca is not inline")
    expired = CertificateAuthority.ephemeral(
        TD, root_ttl=timedelta(days=1), now=datetime.now(UTC) - timedelta(days=3)
    ).active_generation.root
    _assert_invalid(
        validation_context_secret(TrustBundle.from_certificates(TD, [expired])), "expired"
    )


def test_invalid_secret_is_a_user_error() -> None:
    assert issubclass(InvalidSecret, UserError)


def test_reprs_never_show_the_private_key(ca: CertificateAuthority) -> None:
    ws = workload_secrets(ca, FRONTEND)
    key_line = ws.svid.private_key_pem.splitlines()[1].decode()
    assert key_line not in repr(ws.svid) and key_line not in repr(ws)
    assert "PRIVATE KEY" not in repr(ws)
