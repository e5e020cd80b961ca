"""CA rotation: state on disk, bundle timing, and real mutual-TLS handshakes (Python ssl, i.e.
OpenSSL) between workloads issued by the old and the new root."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from meshward.certs.bundle import TrustBundle
from meshward.certs.ca import CertificateAuthority, Svid
from meshward.certs.spiffe import parse_spiffe_id
from meshward.certs.verify import SvidVerificationError, verify_svid
from meshward.errors import UserError

TD = "cluster.local"
SERVER = f"spiffe://{TD}/ns/shop/sa/cart"
CLIENT = f"spiffe://{TD}/ns/shop/sa/frontend"
Forge = Callable[[CertificateAuthority, Sequence[x509.GeneralName]], Svid]


# ---- a real mTLS handshake on loopback ------------------------------------------------------


@dataclass
class Outcome:
    server_saw: str | None = None  # the client's SPIFFE ID as the server authenticated it
    client_saw: str | None = None
    server_error: str | None = None
    client_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.server_error is None and self.client_error is None


def _context(side: str, svid: Svid, bundle: TrustBundle, tmp: Path) -> ssl.SSLContext:
    server = side == "server"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # SPIFFE authenticates the URI SAN (checked below), not a hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    chain, key = tmp / f"{side}-chain.pem", tmp / f"{side}-key.pem"
    chain.write_bytes(svid.cert_chain_pem)
    key.write_bytes(svid.private_key_pem)
    key.chmod(0o600)
    ctx.load_cert_chain(chain, key)
    ctx.load_verify_locations(cadata=bundle.roots_pem.decode())
    return ctx


def _peer_id(tls: ssl.SSLSocket) -> str:
    """The SPIFFE authorizer step: exactly one URI SAN, in our trust domain."""
    cert = tls.getpeercert() or {}
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    assert len(uris) == 1, cert
    return str(parse_spiffe_id(str(uris[0]), TD))


def handshake(
    tmp: Path, server: Svid, server_roots: TrustBundle, client: Svid, client_roots: TrustBundle
) -> Outcome:
    out = Outcome()
    server_ctx = _context("server", server, server_roots, tmp)
    client_ctx = _context("client", client, client_roots, tmp)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                out.server_saw = _peer_id(tls)
                tls.sendall(b"hello " + out.server_saw.encode())
        except (OSError, AssertionError) as exc:
            out.server_error = str(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=10) as raw,
            client_ctx.wrap_socket(raw) as tls,
        ):
            out.client_saw = _peer_id(tls)
            # Under TLS 1.3 the server judges our certificate after our handshake returns;
            # its verdict (data or an alert) arrives on the first read.
            reply = tls.recv(1024)
            if not reply.startswith(b"hello "):
                raise ConnectionError(f"server closed the connection ({reply!r})")
    except (OSError, AssertionError) as exc:
        out.client_error = str(exc)
    finally:
        thread.join(15)
        listener.close()
    assert not thread.is_alive()
    return out


# ---- fixtures ------------------------------------------------------------------------------


T0 = datetime.now(UTC)
GRACE = timedelta(hours=2)


@dataclass
class Rotated:
    directory: Path
    before: TrustBundle  # what workloads trusted before the rotation
    overlap: TrustBundle  # old + new root
    after: TrustBundle  # after the grace period, computed by a reloaded (restarted) CA
    old_server: Svid
    old_client: Svid
    new_server: Svid
    new_client: Svid


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> Rotated:
    directory = tmp_path_factory.mktemp("rotating-ca")
    ca = CertificateAuthority.init(directory, TD, now=T0)
    before = ca.trust_bundle(now=T0)
    old_server, old_client = ca.issue(SERVER, now=T0), ca.issue(CLIENT, now=T0)
    ca.rotate(grace=GRACE, now=T0)
    overlap = ca.trust_bundle(now=T0)
    new_server, new_client = ca.issue(SERVER, now=T0), ca.issue(CLIENT, now=T0)
    restarted = CertificateAuthority.load(directory)
    after = restarted.trust_bundle(now=T0 + GRACE)
    return Rotated(
        directory, before, overlap, after, old_server, old_client, new_server, new_client
    )


# ---- rotation state and timing -------------------------------------------------------------


def test_rotation_introduces_a_new_root_and_keeps_the_old_one(rotated: Rotated) -> None:
    assert len(rotated.before) == 1 and len(rotated.overlap) == 2 and len(rotated.after) == 1
    old_root, new_root = rotated.overlap.roots()
    assert rotated.before.roots() == [old_root]
    assert rotated.after.roots() == [new_root]
    assert rotated.old_server.chain()[1].issuer == old_root.subject
    assert rotated.new_server.chain()[1].issuer == new_root.subject


def test_rotation_state_survives_restart(rotated: Rotated) -> None:
    state = json.loads((rotated.directory / "ca.json").read_text())
    assert state["active"] == 2
    (first, second) = state["generations"]
    assert datetime.fromisoformat(first["trusted_until"]) == T0 + GRACE
    assert second["trusted_until"] is None
    restarted = CertificateAuthority.load(rotated.directory)
    assert restarted.active_generation.number == 2
    just_before = T0 + GRACE - timedelta(seconds=1)
    assert restarted.trust_bundle(now=just_before) == rotated.overlap
    assert restarted.trust_bundle(now=T0 + GRACE) == rotated.after


def test_cryptography_verifier_follows_the_bundle(rotated: Rotated) -> None:
    for svid in (rotated.old_client, rotated.new_client):
        assert str(verify_svid(svid.cert_chain_pem, rotated.overlap)) == CLIENT
    assert str(verify_svid(rotated.new_client.cert_chain_pem, rotated.after)) == CLIENT
    with pytest.raises(SvidVerificationError, match="not in the trust bundle"):
        verify_svid(rotated.old_client.cert_chain_pem, rotated.after)


def test_second_rotation_keeps_earlier_deadlines_and_prunes(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path, TD, now=T0)
    ca.rotate(grace=timedelta(hours=1), now=T0)
    ca.rotate(grace=timedelta(hours=3), now=T0 + timedelta(minutes=30))
    deadlines = [g.trusted_until for g in ca.generations]
    assert deadlines == [T0 + timedelta(hours=1), T0 + timedelta(hours=3, minutes=30), None]
    assert len(ca.trust_bundle(now=T0 + timedelta(minutes=59))) == 3
    assert len(ca.trust_bundle(now=T0 + timedelta(hours=1))) == 2
    assert ca.prune(now=T0 + timedelta(hours=2)) == [1]
    assert not (tmp_path / "gen-0001").exists() and (tmp_path / "gen-0002").exists()
    assert [g.number for g in CertificateAuthority.load(tmp_path).generations] == [2, 3]
    # a rotation after the last deadline prunes what it supersedes ... and the active one stays
    ca.rotate(grace=timedelta(0), now=T0 + timedelta(hours=4))
    assert [g.number for g in ca.generations] == [3, 4]
    assert len(ca.trust_bundle(now=T0 + timedelta(hours=4))) == 1


def test_negative_grace_is_rejected(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path, TD)
    with pytest.raises(UserError, match="negative"):
        ca.rotate(grace=timedelta(seconds=-1))
    assert [g.number for g in CertificateAuthority.load(tmp_path).generations] == [1]


# ---- real handshakes -----------------------------------------------------------------------


def test_handshake_before_rotation(rotated: Rotated, tmp_path: Path) -> None:
    out = handshake(
        tmp_path, rotated.old_server, rotated.before, rotated.old_client, rotated.before
    )
    assert out.ok, out
    assert out.server_saw == CLIENT and out.client_saw == SERVER


@pytest.mark.parametrize("direction", ["old-client->new-server", "new-client->old-server"])
def test_overlap_old_and_new_roots_interoperate(
    rotated: Rotated, tmp_path: Path, direction: str
) -> None:
    if direction == "old-client->new-server":
        server, client = rotated.new_server, rotated.old_client
    else:
        server, client = rotated.old_server, rotated.new_client
    out = handshake(tmp_path, server, rotated.overlap, client, rotated.overlap)
    assert out.ok, out
    assert out.server_saw == CLIENT and out.client_saw == SERVER


def test_bundle_must_reach_peers_before_new_root_svids(rotated: Rotated, tmp_path: Path) -> None:
    # A server that has not received the new bundle yet rejects a new-root client: this is why
    # the control plane pushes ROOTCA before re-issuing "default".
    out = handshake(
        tmp_path, rotated.old_server, rotated.before, rotated.new_client, rotated.overlap
    )
    assert not out.ok
    assert out.server_error is not None and "certificate verify failed" in out.server_error


def test_after_grace_old_root_peer_is_rejected_by_server(rotated: Rotated, tmp_path: Path) -> None:
    out = handshake(
        tmp_path, rotated.new_server, rotated.after, rotated.old_client, rotated.overlap
    )
    assert out.server_error is not None and "certificate verify failed" in out.server_error
    assert out.server_saw is None and out.client_error is not None


def test_after_grace_old_root_peer_is_rejected_by_client(rotated: Rotated, tmp_path: Path) -> None:
    out = handshake(
        tmp_path, rotated.old_server, rotated.overlap, rotated.new_client, rotated.after
    )
    assert out.client_error is not None and "certificate verify failed" in out.client_error
    assert out.client_saw is None and out.server_error is not None


def test_after_grace_new_root_peers_still_talk(rotated: Rotated, tmp_path: Path) -> None:
    out = handshake(tmp_path, rotated.new_server, rotated.after, rotated.new_client, rotated.after)
    assert out.ok, out


# ---- the root's name constraints, enforced by OpenSSL in a real handshake ----------------------


@pytest.mark.parametrize(
    ("names", "reason"),
    [
        (
            [x509.UniformResourceIdentifier("spiffe://evil.org/ns/shop/sa/frontend")],
            "permitted subtree violation",
        ),
        (
            [x509.UniformResourceIdentifier(CLIENT), x509.DNSName("frontend.shop.svc")],
            "excluded subtree violation",
        ),
    ],
)
def test_leaked_intermediate_cannot_mint_outside_the_trust_domain(
    ca: CertificateAuthority,
    forge_svid: Forge,
    tmp_path: Path,
    names: list[x509.GeneralName],
    reason: str,
) -> None:
    bundle = ca.trust_bundle()
    forged = forge_svid(ca, names)
    out = handshake(tmp_path, ca.issue(SERVER), bundle, forged, bundle)
    assert out.server_error is not None and reason in out.server_error, out
    assert out.server_saw is None


# ---- issuing for peers that may hold an old bundle (the ADS server) --------------------------


def test_oldest_trusted_generation_follows_the_grace_periods(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path, TD, now=T0)
    assert ca.oldest_trusted_generation(now=T0).number == 1
    ca.rotate(grace=timedelta(hours=1), now=T0)
    ca.rotate(grace=timedelta(hours=3), now=T0 + timedelta(minutes=30))
    at = {minutes: ca.oldest_trusted_generation(now=T0 + timedelta(minutes=minutes)).number
          for minutes in (0, 59, 60, 209, 210)}  # fmt: skip
    assert at == {0: 1, 59: 1, 60: 2, 209: 2, 210: 3}
    assert CertificateAuthority.load(tmp_path).oldest_trusted_generation(now=T0).number == 1


def test_a_certificate_from_the_oldest_trusted_generation_verifies_with_a_pre_rotation_bundle(
    rotated: Rotated, tmp_path: Path
) -> None:
    """What lets a sidecar whose bootstrap bundle predates `meshward ca rotate` reach the ADS
    server: its certificate comes from the old generation during the grace period, and the
    server still accepts old-root and new-root clients."""
    ca = CertificateAuthority.load(rotated.directory)
    oldest = ca.oldest_trusted_generation(now=T0)
    assert oldest.number == 1 and ca.active_generation.number == 2
    server = ca.issue(SERVER, now=T0, generation=oldest.number)
    assert server.chain()[1].issuer == rotated.before.roots()[0].subject
    for client, client_roots in ((rotated.old_client, rotated.before),
                                 (rotated.new_client, rotated.overlap)):  # fmt: skip
        outcome = handshake(tmp_path, server, rotated.overlap, client, client_roots)
        assert outcome.ok and outcome.server_saw == CLIENT, outcome
    assert ca.issuing_generation(server.certificate()) == oldest
    assert ca.issuing_generation(rotated.new_client.certificate()) == ca.active_generation
    stranger = CertificateAuthority.ephemeral(TD).issue(CLIENT)
    assert ca.issuing_generation(stranger.certificate()) is None


def test_issuing_from_a_generation_no_longer_trusted_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path, TD, now=T0)
    ca.rotate(grace=timedelta(hours=1), now=T0)
    assert ca.issue(CLIENT, now=T0, generation=2).chain()[1] == ca.active_generation.intermediate
    with pytest.raises(UserError, match="generation 1 is not trusted"):
        ca.issue(CLIENT, now=T0 + timedelta(hours=1), generation=1)
    with pytest.raises(UserError, match="generation 7 is not trusted"):
        ca.issue(CLIENT, now=T0, generation=7)
