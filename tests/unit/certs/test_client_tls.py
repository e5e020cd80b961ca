"""The mTLS client context: built from PEM bytes in memory, it completes a real handshake that
presents the SVID, leaves no file and no descriptor behind, and refuses a key of another SVID."""

from __future__ import annotations

import contextlib
import os
import ssl
from pathlib import Path

import pytest

from meshward.certs.ca import CertificateAuthority
from meshward.certs.client_tls import client_ssl_context

TD = "cluster.local"


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> dict[str, object]:
    """Both sides of a TLS handshake over memory; the client certificate the server saw."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(5):
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return s.getpeercert() or {}


def test_the_context_presents_the_svid_and_leaves_nothing_behind(tmp_path: Path) -> None:
    ca = CertificateAuthority.ephemeral(TD)
    svid = ca.issue(f"spiffe://{TD}/ns/shop/sa/orders")
    server_svid = ca.issue(f"spiffe://{TD}/ns/meshward/sa/control-plane")
    roots = ca.trust_bundle().roots_pem
    (tmp_path / "s.pem").write_bytes(server_svid.cert_chain_pem)
    (tmp_path / "s.key").write_bytes(server_svid.private_key_pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "s.pem", tmp_path / "s.key")
    server.load_verify_locations(cadata=roots.decode())
    server.verify_mode = ssl.CERT_REQUIRED

    fds = set(os.listdir("/proc/self/fd"))
    client = client_ssl_context(svid.cert_chain_pem, svid.private_key_pem, roots)
    assert set(os.listdir("/proc/self/fd")) == fds  # the in-memory file is closed
    seen = _handshake(client, server)
    assert ("URI", svid.spiffe_id) in seen["subjectAltName"]  # type: ignore[operator]


def test_a_key_of_another_svid_is_refused() -> None:
    ca = CertificateAuthority.ephemeral(TD)
    one, other = ca.issue(f"spiffe://{TD}/ns/shop/sa/a"), ca.issue(f"spiffe://{TD}/ns/shop/sa/b")
    with pytest.raises(ssl.SSLError):
        client_ssl_context(one.cert_chain_pem, other.private_key_pem, ca.trust_bundle().roots_pem)
