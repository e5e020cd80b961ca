"""The certificate service over real gRPC and TLS: joins with tokens, renewals with SVIDs,
refusals with reasons, per-identity CSR limits. The agent's own client makes the calls."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshward.agent.certclient import (
    BUNDLE,
    JOIN,
    RENEW,
    CertCallFailed,
    CertChannel,
    call,
    mtls_context,
    server_only_context,
)
from meshward.agent.identity import Credentials, key_pem, make_csr, new_key
from meshward.certs import CertificateAuthority
from meshward.certs.jointoken import load_or_create_key, mint
from meshward.compile import CompileOptions
from meshward.policy import parse
from meshward.testing.relay import TcpRelay
from meshward.testing.topology import workloads_yaml
from meshward.xds.certservice import PeerCache, Refusal, decode
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.limits import NodeLimits
from meshward.xds.service import XdsService

ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
POLICY = workloads_yaml(["frontend", "orders"])


async def start(ca_dir: Path, limits: NodeLimits | None = None) -> XdsService:
    ca = CertificateAuthority.load(ca_dir)
    service = XdsService(
        parse({"mesh.yaml": POLICY}),
        ca,
        compiler_for(CompileOptions()),
        admin=None,
        join_listen="127.0.0.1:0",
        limits=limits,
        svid_ttl=timedelta(minutes=5),
    )
    return await service.start()


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    CertificateAuthority.init(tmp_path / "ca", "cluster.local")
    return tmp_path / "ca"


@pytest.fixture
async def service(ca_dir: Path) -> AsyncIterator[XdsService]:
    svc = await start(ca_dir)
    try:
        yield svc
    finally:
        await svc.stop()


def roots(ca_dir: Path) -> bytes:
    return CertificateAuthority.load(ca_dir).trust_bundle().roots_pem


def token(
    ca_dir: Path, workload: str = "shop/orders", ttl: timedelta = timedelta(minutes=5)
) -> str:
    return mint(load_or_create_key(ca_dir), workload, ttl=ttl)


async def join(svc: XdsService, ca_dir: Path, tok: str, workload: str = "shop/orders",
               spiffe: str = ORDERS, instance: str = "") -> Credentials:  # fmt: skip
    key = new_key()
    assert svc.join_address is not None
    reply = await call(
        svc.join_address,
        JOIN,
        {
            "workload": workload,
            "csr": make_csr(key, spiffe).decode(),
            "token": tok,
            "instance": instance,
        },
        context=server_only_context(roots(ca_dir)),
        server_id=svc.server_identity,
    )
    return Credentials.build(
        key_pem(key), reply["cert_chain"].encode(), reply["trust_bundle"].encode(), "reply"
    )


async def renew(svc: XdsService, creds: Credentials, workload: str = "shop/orders",
                spiffe: str = ORDERS, address: str | None = None) -> Credentials:  # fmt: skip
    key = new_key()
    reply = await call(
        address or svc.address,
        RENEW,
        {"workload": workload, "csr": make_csr(key, spiffe).decode()},
        context=mtls_context(creds.chain_pem, creds.key_pem, creds.bundle_pem),
        server_id=svc.server_identity,
    )
    return Credentials.build(
        key_pem(key), reply["cert_chain"].encode(), reply["trust_bundle"].encode(), "reply"
    )


async def test_join_then_renew_with_the_svid(
    service: XdsService, ca_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshward.certs.service")
    first = await join(service, ca_dir, token(ca_dir))
    assert first.spiffe_id == ORDERS
    second = await renew(service, first)
    assert second.spiffe_id == ORDERS and second.serial != first.serial
    third = await renew(service, second)  # the renewed SVID authenticates the next renewal
    assert third.serial != second.serial
    assert service.certs.counts == {"Join:ok": 1, "Renew:ok": 2}
    text = service.metrics.exposition().decode()
    assert 'meshward_xds_svid_requests_total{method="Join",result="ok"} 1.0' in text
    assert 'meshward_xds_svid_requests_total{method="Renew",result="ok"} 2.0' in text
    assert 'meshward_xds_svid_issuance_seconds_count{method="Renew"} 2.0' in text
    # A join (a token spent) is an audit line at INFO; routine renewals are not.
    issued = [r.getMessage() for r in caplog.records if "issued by CSR" in r.getMessage()]
    assert issued == [f"SVID for {ORDERS} issued by CSR (join), serial {first.serial:x}"]


async def test_a_token_works_once_even_across_restarts(ca_dir: Path) -> None:
    svc = await start(ca_dir)
    tok = token(ca_dir)
    try:
        await join(svc, ca_dir, tok)
        with pytest.raises(CertCallFailed, match="PERMISSION_DENIED: used: join token was already"):
            await join(svc, ca_dir, tok)
    finally:
        await svc.stop()
    svc = await start(ca_dir)  # a restarted control plane remembers
    try:
        with pytest.raises(CertCallFailed, match="used: join token was already used"):
            await join(svc, ca_dir, tok)
    finally:
        await svc.stop()


async def test_expired_token_is_refused(service: XdsService, ca_dir: Path) -> None:
    tok = mint(load_or_create_key(ca_dir), "shop/orders", ttl=timedelta(seconds=1),
               now=None)  # fmt: skip
    import asyncio

    await asyncio.sleep(1.1)
    with pytest.raises(CertCallFailed, match="PERMISSION_DENIED: expired: join token expired at"):
        await join(service, ca_dir, tok)


async def test_token_for_another_workload_is_refused(service: XdsService, ca_dir: Path) -> None:
    tok = token(ca_dir, "shop/frontend")
    with pytest.raises(CertCallFailed, match="wrong-workload: join token is for workload shop/"):
        await join(service, ca_dir, tok)


async def test_token_with_a_bad_signature_is_refused(service: XdsService, ca_dir: Path) -> None:
    forged = mint(b"z" * 32, "shop/orders", ttl=timedelta(minutes=5))
    with pytest.raises(CertCallFailed, match="bad-signature: join token signature does not"):
        await join(service, ca_dir, forged)


async def test_csr_must_ask_for_the_workloads_identity(service: XdsService, ca_dir: Path) -> None:
    tok = token(ca_dir)
    with pytest.raises(CertCallFailed, match="INVALID_ARGUMENT: bad-csr: CSR asks for"):
        await join(service, ca_dir, tok, spiffe="spiffe://cluster.local/ns/shop/sa/frontend")
    # A refused CSR does not spend the token.
    assert (await join(service, ca_dir, tok)).spiffe_id == ORDERS


async def test_renewal_for_another_identity_is_refused(service: XdsService, ca_dir: Path) -> None:
    orders = await join(service, ca_dir, token(ca_dir))
    with pytest.raises(CertCallFailed, match=r"identity-mismatch: a certificate for .*orders may"):
        await renew(service, orders, "shop/frontend", "spiffe://cluster.local/ns/shop/sa/frontend")


async def test_renewal_without_a_client_certificate_is_refused(
    service: XdsService, ca_dir: Path
) -> None:
    """The join port asks for no certificate: Renew there has no identity and fails closed."""
    assert service.join_address is not None
    with pytest.raises(CertCallFailed, match="UNAUTHENTICATED: no-client-certificate"):
        await call(
            service.join_address,
            RENEW,
            {"workload": "shop/orders", "csr": make_csr(new_key(), ORDERS).decode()},
            context=server_only_context(roots(ca_dir)),
            server_id=service.server_identity,
        )
    with pytest.raises(CertCallFailed, match="UNAUTHENTICATED"):
        await call(service.join_address, BUNDLE, {}, context=server_only_context(roots(ca_dir)),
                   server_id=service.server_identity)  # fmt: skip


async def test_bundle_follows_a_rotation(service: XdsService, ca_dir: Path) -> None:
    creds = await join(service, ca_dir, token(ca_dir))
    ctx = mtls_context(creds.chain_pem, creds.key_pem, creds.bundle_pem)
    before = await call(service.address, BUNDLE, {}, context=ctx, server_id=service.server_identity)
    CertificateAuthority.load(ca_dir).rotate(grace=timedelta(hours=1))
    service.control.ca = CertificateAuthority.load(ca_dir)  # what the CA watcher does
    after = await call(service.address, BUNDLE, {}, context=ctx, server_id=service.server_identity)
    assert before["bundle_version"] != after["bundle_version"]
    assert after["trust_bundle"].count("BEGIN CERTIFICATE") == 2
    # The same CA past the old root's grace period: the bundle (kept encoded) drops that root.
    last = json.loads(service.certs.bundle(datetime.now(UTC) + timedelta(hours=2)))
    assert last["trust_bundle"].count("BEGIN CERTIFICATE") == 1
    assert last["bundle_version"] not in (before["bundle_version"], after["bundle_version"])


async def test_csr_rate_is_limited_per_identity(ca_dir: Path) -> None:
    svc = await start(ca_dir, NodeLimits(svid_rate=0.001, svid_burst=3))
    try:
        creds = await join(svc, ca_dir, token(ca_dir))
        creds = await renew(svc, creds)
        creds = await renew(svc, creds)
        with pytest.raises(CertCallFailed, match="RESOURCE_EXHAUSTED: svid-rate-limit"):
            await renew(svc, creds)
        # Another identity has its own bucket.
        front = "spiffe://cluster.local/ns/shop/sa/frontend"
        await join(svc, ca_dir, token(ca_dir, "shop/frontend"), "shop/frontend", front)
    finally:
        await svc.stop()


async def test_agent_instances_are_limited_per_identity(ca_dir: Path) -> None:
    svc = await start(ca_dir, NodeLimits(max_instances=2))
    try:
        await join(svc, ca_dir, token(ca_dir), instance="a")
        await join(svc, ca_dir, token(ca_dir), instance="b")
        with pytest.raises(CertCallFailed, match="RESOURCE_EXHAUSTED: instance-limit"):
            await join(svc, ca_dir, token(ca_dir), instance="c")
    finally:
        await svc.stop()


async def test_no_private_key_in_what_the_control_plane_holds(
    service: XdsService, ca_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Agent keys are born in the agent: the control plane's state, logs and replies (and, in
    agent mode, its snapshots) contain no private key at all."""
    caplog.set_level("DEBUG")
    creds = await join(service, ca_dir, token(ca_dir))
    await renew(service, creds)
    blob = (
        repr(vars(service.control))
        + repr(vars(service.certs))
        + json.dumps(service.status(), default=str)
        + caplog.text
    )
    for state in service.control.nodes.values():
        blob += repr(state.secrets) + repr(state.svid)
    assert "PRIVATE KEY" not in blob
    secret_line = creds.key_pem.decode().splitlines()[1]
    assert secret_line not in blob
    for path in ca_dir.rglob("*"):  # the control plane's files (CA, spent tokens)
        if path.is_file():
            assert secret_line.encode() not in path.read_bytes(), path


def test_decode_refuses_bad_requests() -> None:
    for data in (b"\xff", b"[]", b"{}", b'{"workload": 5}', b"x" * 70_000):
        with pytest.raises(Refusal):
            decode(data, ("workload",))
    assert decode(b'{"workload": "a/b", "n": 1}', ("workload",)) == {"workload": "a/b"}


async def test_a_flood_of_bad_requests_stays_bounded(service: XdsService, ca_dir: Path) -> None:
    """Garbage, forged tokens and unknown workloads: each refused with its reason; the counters
    and the refusal log stay small (fixed labels, one log line per identity and reason)."""
    import asyncio

    assert service.join_address is not None
    ctx = server_only_context(roots(ca_dir))

    async def bad(i: int) -> str:
        message = {"workload": f"ns{i}/w{i}", "csr": "x", "token": f"mwjoin1.{i}.{i}"}
        try:
            await call(service.join_address or "", JOIN, message, context=ctx,
                       server_id=service.server_identity)  # fmt: skip
        except CertCallFailed as exc:
            return exc.code
        return "OK"

    codes = await asyncio.gather(*(bad(i) for i in range(200)))
    assert set(codes) == {"PERMISSION_DENIED"}
    assert set(service.certs.counts) == {"Join:bad-signature"}
    text = service.metrics.exposition().decode()
    series = [x for x in text.splitlines() if x.startswith("meshward_xds_svid_requests_total{")]
    assert series == [
        'meshward_xds_svid_requests_total{method="Join",result="bad-signature"} 200.0'
    ]
    assert 'meshward_xds_svid_issuance_seconds_count{method="Join"}' not in text  # none signed
    assert len(service.certs.refusals._seen) == 1  # one key for every anonymous caller
    assert len(service.certs.limiter) == 0  # refused before any CSR work or bucket


async def test_status_advice_after_rotation_fits_agents(service: XdsService, ca_dir: Path) -> None:
    """The advice fits both kinds of node: agents renew by themselves, an operator-run Envoy
    needs `meshward bootstrap --renew` (nothing the control plane made to re-issue)."""
    from datetime import UTC, datetime

    from meshward.xds.clientcert import RETIRING, ClientCertificate

    CertificateAuthority.load(ca_dir).rotate(grace=timedelta(hours=1))
    service.control.ca = CertificateAuthority.load(ca_dir)
    status = service.control.client_certificate_status(
        ClientCertificate(1, datetime.now(UTC) + timedelta(minutes=5))
    )
    assert status["state"] == RETIRING
    assert "agent renews by itself" in status["warning"]
    assert "meshward bootstrap --renew" in status["warning"]


async def test_an_open_channel_carries_renew_and_polls_on_one_connection(
    service: XdsService, ca_dir: Path
) -> None:
    creds = await join(service, ca_dir, token(ca_dir))
    counter = TcpRelay(service.address)
    async with counter as address:
        channel = CertChannel(
            address,
            context=mtls_context(creds.chain_pem, creds.key_pem, creds.bundle_pem),
            server_id=service.server_identity,
        )
        try:
            for _ in range(3):
                assert "trust_bundle" in await channel.call(BUNDLE, {})
            key = new_key()
            reply = await channel.call(
                RENEW, {"workload": "shop/orders", "csr": make_csr(key, ORDERS).decode()}
            )
            assert (await channel.call(BUNDLE, {}))["bundle_version"] == reply["bundle_version"]
        finally:
            channel.close()
        assert counter.connections == 1
        # The one-shot call (a join, or anything made without a channel) dials its own.
        await renew(service, creds, address=address)
        assert counter.connections == 2


async def test_a_connection_that_outlives_its_certificate_is_refused(
    service: XdsService, ca_dir: Path
) -> None:
    creds = await join(service, ca_dir, token(ca_dir))
    channel = CertChannel(
        service.address,
        context=mtls_context(creds.chain_pem, creds.key_pem, creds.bundle_pem),
        server_id=service.server_identity,
    )
    try:
        await channel.call(BUNDLE, {})  # connected while the SVID is valid
        later = creds.not_after + timedelta(seconds=1)
        service.control.wall_clock = lambda: later
        for method, message in (
            (BUNDLE, {}),
            (RENEW, {"workload": "shop/orders", "csr": make_csr(new_key(), ORDERS).decode()}),
        ):
            with pytest.raises(CertCallFailed) as refused:
                await channel.call(method, message)
            assert refused.value.code == "UNAUTHENTICATED"
            assert "certificate-expired" in str(refused.value)
    finally:
        channel.close()
    assert service.certs.counts["Renew:certificate-expired"] == 1


async def test_handshakes_are_tls13_with_an_ecdsa_p256_server_certificate(
    service: XdsService, ca_dir: Path
) -> None:
    """What the join and the ADS (Renew) listeners negotiate with the agent's TLS client:
    TLS 1.3 (one round trip) and an ECDSA P-256 server key (the cheapest signature a
    handshake makes the control plane compute)."""
    creds = await join(service, ca_dir, token(ca_dir))
    assert service.join_address is not None
    for address, context in (
        (service.join_address, server_only_context(roots(ca_dir))),
        (service.address, mtls_context(creds.chain_pem, creds.key_pem, creds.bundle_pem)),
    ):
        host, port = address.rsplit(":", 1)
        _, writer = await asyncio.open_connection(host, int(port), ssl=context)
        try:
            tls = writer.get_extra_info("ssl_object")
            assert tls.version() == "TLSv1.3"
            server_key = x509.load_der_x509_certificate(tls.getpeercert(True)).public_key()
            assert isinstance(server_key, ec.EllipticCurvePublicKey)
            assert server_key.curve.name == "secp256r1"
        finally:
            writer.close()


def test_peer_cache_is_bounded() -> None:
    ca = CertificateAuthority.ephemeral("cluster.local")

    class Context:  # the one method of grpc's ServicerContext the cache reads
        def __init__(self, pem: bytes, uri: str = "") -> None:
            self.pem, self.uri = pem, uri.encode()

        def auth_context(self) -> dict[str, list[bytes]]:  # the keys grpc's TLS sets
            return {"x509_pem_cert": [self.pem], "x509_subject_alternative_name": [self.uri],
                    "peer_uri": [self.uri]}  # fmt: skip

    cache = PeerCache(max_entries=8)
    for i in range(50):
        svid = ca.issue(f"spiffe://cluster.local/ns/shop/sa/w{i}")
        leaf = svid.cert_chain_pem[: svid.cert_chain_pem.index(b"-----END CERTIFICATE-----") + 25]
        seen = cache.lookup(Context(leaf + b"\n", svid.spiffe_id))
        assert seen == (svid.spiffe_id, svid.not_after)
    assert len(cache._seen) == 8
    assert cache.lookup(Context(b"not a certificate")) is None


@pytest.mark.parametrize(
    ("sans", "uris", "identity"),
    [
        ([b"spiffe://cluster.local/ns/shop/sa/orders"], None, "spiffe://cluster.local/ns/shop/sa/orders"),
        ([b"spiffe://cluster.local/ns/shop/sa/orders", b"orders.shop"],
         [b"spiffe://cluster.local/ns/shop/sa/orders"], None),  # a DNS SAN besides the URI
        ([b"orders.shop"], [], None),  # a DNS SAN only
        ([b"https://example.com/x"], None, None),  # a URI that is not a SPIFFE ID
        ([b"spiffe://cluster.local/ns/shop/sa/orders", b"spiffe://cluster.local/ns/shop/sa/x"],
         None, None),  # two URIs
        ([], [], None),  # no SAN at all
    ],
)  # fmt: skip
def test_peer_identity_is_the_one_uri_san(
    sans: list[bytes], uris: list[bytes] | None, identity: str | None
) -> None:
    """An SVID's identity is its one and only SAN, a spiffe:// URI (what gRPC's TLS put in the
    call's auth context); anything else is no SVID (None), never a guess."""
    from meshward.xds.certservice import _svid_identity

    auth = {"x509_subject_alternative_name": sans, "peer_uri": sans if uris is None else uris}
    assert _svid_identity(auth) == identity


async def test_the_agent_keeps_one_connection_and_tls_context_per_svid(
    service: XdsService, ca_dir: Path, tmp_path: Path
) -> None:
    """Bundle polls and the renewal share the agent's connection; the renewed SVID gets a
    connection of its own (the old one spoke for the old certificate) and the server sees it.
    The TLS context is built once per SVID: a dropped connection, and an expired SVID's calls
    (a fresh connection each), dial again with the same one."""
    from meshward.agent.run import Agent, AgentConfig
    from meshward.agent.sds import SdsServer

    creds = await join(service, ca_dir, token(ca_dir))
    relay = TcpRelay(service.address)
    async with relay as address:
        agent = Agent(
            AgentConfig(
                workload="shop/orders",
                xds=address,
                state_dir=tmp_path / "agent",
                spiffe_id=ORDERS,
                server_identity=service.server_identity,
                envoy=False,
            )
        )
        agent.store.ensure()
        agent.credentials, agent.sds = creds, SdsServer(creds)

        def context() -> object:
            assert agent._channel is not None
            return agent._channel._context

        try:
            await agent._poll_bundle()
            first = context()
            relay.cut()  # the connection drops (the first call may find out): dialled again
            await agent._poll_bundle()
            await agent._poll_bundle()
            assert context() is first and relay.connections == 2
            await agent._renew()
            assert (agent.renewals, agent.failures, relay.connections) == (1, 0, 2)
            assert agent.credentials.serial != creds.serial
            await agent._poll_bundle()
            await agent._poll_bundle()
            renewed = context()
            assert relay.connections == 3 and renewed is not first
            newest = next(reversed(service.certs.peers._seen.values()))
            assert newest == (ORDERS, agent.credentials.not_after)
            later = agent.credentials.not_after + timedelta(seconds=1)
            agent._now = lambda: later  # type: ignore[method-assign]  # the SVID has expired
            service.control.wall_clock = lambda: later
            for n in range(2):  # refused, each on a fresh connection, the context kept
                await agent._poll_bundle()
                assert context() is renewed and relay.connections == 4 + n
            assert service.certs.counts["Bundle:certificate-expired"] == 2
        finally:
            agent._close_channel()
