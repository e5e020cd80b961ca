"""Per-identity limits on ADS nodes: the pure parts, then bounded floods over real gRPC and mTLS
with simulated ADS clients holding real SVIDs (one workload certificate trying to create many
nodes, many streams, many SVIDs), and the garbage collection of nodes that went away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from meshward.certs import CertificateAuthority
from meshward.certs.client_tls import client_ssl_context
from meshward.compile import CompileOptions
from meshward.policy import parse
from meshward.testing.ads_client import AdsClient
from meshward.testing.topology import workloads_yaml
from meshward.xds import typeurls
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.limits import (
    NodeLimits,
    RefusalLog,
    SvidRateLimiter,
    TokenBucket,
    expired,
    make_room,
    next_expiry,
)
from meshward.xds.server import Stream
from meshward.xds.service import XdsService

FRONTEND = "shop/frontend"
IDENTITY = "spiffe://cluster.local/ns/shop/sa/frontend"
POLICY = workloads_yaml(["frontend", "orders"])
ALL_TYPES = {typeurls.CLUSTER: (), typeurls.LISTENER: (), typeurls.SECRET: ("default", "ROOTCA")}


# -- pure parts -----------------------------------------------------------------------------------
def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(3, 2.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)  # 2/s: one token per 0.5 s
    assert not bucket.full(0.6) and bucket.full(10.0)
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]  # capped at 3


def test_svid_rate_limiter_is_per_identity_and_bounded() -> None:
    limiter = SvidRateLimiter(NodeLimits(svid_burst=1, svid_rate=0.001), max_tracked=10)
    assert limiter.allow("a", 0.0) and not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)  # another identity has its own bucket
    for i in range(1000):
        limiter.allow(f"id{i}", 1.0)
    assert len(limiter) <= 10


def test_refusal_log_writes_once_per_identity_and_reason_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("meshward.test.refusals")
    refusals = RefusalLog(logger, interval=60.0, max_tracked=8)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        written = [
            refusals.refused("a", "svid-rate-limit", "refused a", t / 10) for t in range(100)
        ]
        assert written.count(True) == 1
        assert refusals.refused("b", "svid-rate-limit", "refused b", 1.0)  # another identity
        assert refusals.refused("a", "stream-limit", "refused a", 1.0)  # another reason
        assert refusals.refused("a", "svid-rate-limit", "refused a again", 61.0)  # next interval
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert "99 more like it" in lines[-1]
    for i in range(100):  # bounded: many identities never grow it past max_tracked
        refusals.refused(f"x{i}", "r", "m", 200.0)
    assert len(refusals._seen) <= 8


@dataclass
class FakeNode:
    identity: str
    connected: bool
    disconnected_at: float | None = None


def test_make_room_replaces_the_longest_disconnected_instance_or_refuses() -> None:
    nodes = {
        "a/1": FakeNode("A", True),
        "a/2": FakeNode("A", False, 5.0),
        "a/3": FakeNode("A", False, 2.0),
        "b/1": FakeNode("B", False, 1.0),
    }
    assert make_room(nodes, "A", 4) == (None, True)
    assert make_room(nodes, "A", 3) == ("a/3", True)  # the longest gone; never B's
    for node in nodes.values():
        node.connected = True
    assert make_room(nodes, "A", 3) == (None, False)


def test_expired_nodes_and_when_the_next_one_is_due() -> None:
    nodes = {
        "x": FakeNode("A", False, 10.0),
        "y": FakeNode("A", False, 15.0),
        "z": FakeNode("A", True),
    }
    assert list(expired(nodes, now=20.0, after=10.0)) == ["x"]
    assert next_expiry(nodes.values(), now=20.0, after=10.0) == 0.0
    assert next_expiry([nodes["y"], nodes["z"]], now=20.0, after=10.0) == 5.0
    assert next_expiry([nodes["z"]], now=20.0, after=10.0) is None


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_instances"):
        NodeLimits(max_instances=0)
    with pytest.raises(ValueError, match="svid_rate"):
        NodeLimits(svid_rate=0)


async def test_a_wake_up_on_a_full_stream_queue_is_coalesced_not_an_error() -> None:
    stream = Stream(
        id=1, node=None, mode="sotw", peer="", identity=None, connected_at=0.0,  # type: ignore[arg-type]
        connected_wall=0.0, protocol=None, queue=asyncio.Queue(2),  # type: ignore[arg-type]
    )  # fmt: skip
    stream.queue.put_nowait("request")
    stream.queue.put_nowait("request")
    stream.wake()  # queue full: the flag stays set, the loop plans after draining anyway
    stream.wake()
    assert stream.wake_pending and stream.queue.qsize() == 2


# -- floods over real gRPC + mTLS -----------------------------------------------------------------
@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.ephemeral("cluster.local")


class Mesh:
    def __init__(self, service: XdsService, ca: CertificateAuthority) -> None:
        self.service, self.ca = service, ca
        svid = ca.issue(IDENTITY)  # frontend's one ADS certificate, shared by the flood
        self.context = client_ssl_context(
            svid.cert_chain_pem, svid.private_key_pem, ca.trust_bundle().roots_pem
        )
        self.tasks: list[asyncio.Task[None]] = []
        self.running: dict[str, asyncio.Task[None]] = {}

    def open(self, node: str, **kwargs: Any) -> AdsClient:
        client = AdsClient(
            "127.0.0.1", self.service.port or 0, node, self.context,
            server_identity=self.service.server_identity,
            subscriptions=dict(kwargs.pop("subscriptions", ALL_TYPES)), **kwargs,
        )  # fmt: skip
        self.tasks.append(asyncio.create_task(client.run()))
        self.running[client.node_id] = self.tasks[-1]
        return client

    async def disconnect(self, clients: list[AdsClient]) -> None:
        tasks = [self.running.pop(c.node_id) for c in clients]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def status(self, node: str) -> dict[str, Any] | None:
        return next((n for n in self.service.status()["nodes"] if n["node"] == node), None)

    def in_sync(self, node: str, version: str | None = None) -> bool:
        entry = self.status(node)
        if entry is None or not entry["connected"]:
            return False
        types_ = [t for s in entry["streams"] for t in s["types"]]
        if version is not None and self.service.control.policy.version != version:
            return False
        return len(types_) >= 3 and all(t["in_sync"] for t in types_)

    def metric(self, name: str, **labels: str) -> float:
        value = self.service.metrics.registry.get_sample_value(name, labels)
        return float(value or 0.0)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()


@pytest.fixture
async def start(ca: CertificateAuthority) -> AsyncIterator[Callable[[NodeLimits], Any]]:
    running: list[tuple[XdsService, Mesh]] = []

    async def starter(limits: NodeLimits) -> Mesh:
        service = XdsService(
            parse({"mesh.yaml": POLICY}), ca, compiler_for(CompileOptions()), limits=limits
        )
        await service.start()
        mesh = Mesh(service, ca)
        running.append((service, mesh))
        return mesh

    try:
        yield starter
    finally:
        for service, mesh in running:
            await mesh.close()
            await service.stop()


async def until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "it") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def finished(clients: list[AdsClient], mesh: Mesh) -> None:
    """Wait until every client is either refused (error) or in sync."""
    await until(
        lambda: all(c.error is not None or mesh.in_sync(c.node_id) for c in clients),
        what="every flood client to be answered",
    )


async def still_works(mesh: Mesh, legit: str) -> None:
    """The legitimate node gets a policy change pushed and ACKs it."""
    changed = POLICY.replace("port: 8080", "port: 8081", 1)
    mesh.service.control.apply_policy(parse({"mesh.yaml": changed}))
    version = mesh.service.control.policy.version
    await until(lambda: mesh.in_sync(legit, version), what="the legitimate node to sync")


async def test_a_flood_of_nodes_from_one_certificate_gets_no_svid_signed(start: Any) -> None:
    """Connecting costs the control plane no signature: nodes bring their SVID (CSRs, and
    their own rate limit, are the certificate service's: test_certservice). A flood of node
    ids from one certificate is bounded by the instance limit alone, and nothing is issued."""
    mesh = await start(NodeLimits(svid_burst=1, svid_rate=0.001, max_instances=100))
    legit = mesh.open(FRONTEND)
    await until(lambda: mesh.in_sync(FRONTEND), what="the legitimate node")
    flood = [mesh.open(f"{FRONTEND}/flood{i}") for i in range(40)]
    await finished(flood, mesh)
    assert all(c.error is None for c in flood), next(c.error for c in flood if c.error)
    assert mesh.metric("meshward_xds_rejected_streams_total", reason="svid-rate-limit") == 0
    assert mesh.metric("meshward_xds_svid_requests_total", method="Join", result="ok") == 0
    control = mesh.service.control
    assert len(control.nodes) == 41
    assert legit.error is None
    await still_works(mesh, FRONTEND)


async def test_instance_flood_is_capped_and_replaces_gone_instances(start: Any) -> None:
    mesh = await start(NodeLimits(max_instances=5, svid_burst=100))
    mesh.open(FRONTEND)
    await until(lambda: mesh.in_sync(FRONTEND), what="the legitimate node")
    flood = [mesh.open(f"{FRONTEND}/flood{i}") for i in range(30)]
    await finished(flood, mesh)
    assert sum(c.error is None for c in flood) == 4
    assert mesh.metric("meshward_xds_rejected_streams_total", reason="instance-limit") == 26
    assert all(
        "RESOURCE_EXHAUSTED" in repr(c.error) and "--max-instances" in repr(c.error)
        for c in flood
        if c.error is not None
    )
    frontend_nodes = [k for k in mesh.service.control.nodes if k.startswith(FRONTEND)]
    assert len(frontend_nodes) == 5
    # The flood's streams close; a new instance (a restarted replica) takes a gone one's place.
    await mesh.disconnect(flood)
    await until(
        lambda: sum(n["connected"] for n in mesh.service.status()["nodes"]) == 1,
        what="the flood to disconnect",
    )
    newcomer = mesh.open(f"{FRONTEND}/replica-b")
    await until(lambda: mesh.in_sync(newcomer.node_id), what="the newcomer")
    assert len([k for k in mesh.service.control.nodes if k.startswith(FRONTEND)]) == 5
    await still_works(mesh, FRONTEND)


async def test_stream_flood_is_capped_per_identity(start: Any) -> None:
    mesh = await start(NodeLimits(max_streams=3))
    mesh.open(FRONTEND)
    await until(lambda: mesh.in_sync(FRONTEND), what="the legitimate node")
    flood = [mesh.open(FRONTEND) for _ in range(20)]  # same node, more streams
    await until(
        lambda: (
            sum(c.error is not None for c in flood) == 18 and len(mesh.service.ads.streams) == 3
        ),
        what="the refusals",
    )
    assert mesh.metric("meshward_xds_rejected_streams_total", reason="stream-limit") == 18
    assert mesh.service.ads.identity_streams == {IDENTITY: 3}
    await still_works(mesh, FRONTEND)
    await mesh.close()
    await until(lambda: not mesh.service.ads.identity_streams, what="the counts to drain")


async def test_disconnected_nodes_are_collected_from_status(start: Any) -> None:
    mesh = await start(NodeLimits(node_gc_after=0.2))
    mesh.open(FRONTEND)
    replicas = [mesh.open(f"{FRONTEND}/r{i}") for i in range(5)]
    await until(lambda: all(mesh.in_sync(c.node_id) for c in replicas), what="the replicas")
    assert len(mesh.service.status()["nodes"]) == 6
    await mesh.disconnect(replicas)
    # The timer loop collects them (it wakes at least every CA_POLL_SECONDS).
    await until(lambda: len(mesh.service.status()["nodes"]) == 1, what="garbage collection")
    assert [n["node"] for n in mesh.service.status()["nodes"]] == [FRONTEND]
    assert mesh.metric("meshward_xds_nodes_collected_total") == 5
    assert len(mesh.service.control.nodes) == 1 and len(mesh.service.control.cache) == 1
    await still_works(mesh, FRONTEND)


async def test_a_request_flood_on_one_stream_stays_within_its_queue(start: Any) -> None:
    mesh = await start(NodeLimits(stream_queue=4))
    client = mesh.open(FRONTEND)
    await until(lambda: mesh.in_sync(FRONTEND), what="the node")
    for _ in range(2000):  # stale requests: each is read, queued and ignored
        client.subscribe(typeurls.CLUSTER, ())
    await until(lambda: client._send.empty(), what="the client to send them")
    [stream] = mesh.service.ads.streams.values()
    await until(lambda: stream.queue.empty(), what="the server to read them")
    assert 1 <= stream.queue_peak <= 4
    await still_works(mesh, FRONTEND)


class _StuckContext:
    """A stream whose node never reads: HTTP/2 flow control leaves the write pending forever."""

    async def write(self, message: object) -> None:
        await asyncio.Event().wait()


async def test_a_push_the_node_never_reads_closes_its_stream(
    start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from meshward.xds.protocol import Push

    caplog.set_level(logging.WARNING, logger="meshward.xds.audit")
    mesh = await start(NodeLimits(write_timeout=0.2))
    client = mesh.open(FRONTEND)
    await until(lambda: mesh.in_sync(FRONTEND), what="the node")
    [stream] = mesh.service.ads.streams.values()
    push = Push(type_url=typeurls.CLUSTER, version="v", nonce="n", resources=())
    assert not await mesh.service.ads._write(stream, _StuckContext(), push)
    assert mesh.metric("meshward_xds_streams_closed_total", reason="not-reading") == 1
    assert any("did not read a push" in r.getMessage() for r in caplog.records)
    assert client.error is None


async def test_a_delta_subscription_flood_of_bogus_names_is_bounded_end_to_end(
    start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """100,000 endpoint names that do not exist, in one 2 MB delta request over real gRPC: the
    server tracks 16,384 of them, answers each once ("does not exist", removed_resources) in
    responses of at most 1,024 names, one per ACK, and the node keeps working. The operator
    hears of it once, as a warning naming the node and its certificate."""
    from meshward.xds.limits import MAX_SUBSCRIBED_NAMES
    from meshward.xds.protocol import MAX_ABSENT_PER_PUSH, DeltaProtocol

    mesh = await start(NodeLimits())
    removed: list[list[str]] = []

    def record(_client: AdsClient, type_url: str, response: Any) -> None:
        if type_url == typeurls.ENDPOINT:
            removed.append(list(response.removed_resources))

    bogus = tuple(f"no-such-endpoints-{i}" for i in range(100_000))
    client = mesh.open(FRONTEND, delta=True, on_response=record,
                       subscriptions={**ALL_TYPES, typeurls.ENDPOINT: bogus})  # fmt: skip
    expected = -(-MAX_SUBSCRIBED_NAMES // MAX_ABSENT_PER_PUSH)
    await until(lambda: len(removed) >= expected, what="every tracked name answered")
    await asyncio.sleep(0.2)  # (nothing more comes)
    assert client.error is None and len(removed) == expected
    assert max(len(batch) for batch in removed) == MAX_ABSENT_PER_PUSH
    answered = [name for batch in removed for name in batch]
    assert len(answered) == len(set(answered)) == MAX_SUBSCRIBED_NAMES
    [stream] = mesh.service.ads.streams.values()
    assert isinstance(stream.protocol, DeltaProtocol)
    eds = stream.protocol.states[typeurls.ENDPOINT]
    assert len(eds.names) == len(eds.absent) == MAX_SUBSCRIBED_NAMES
    warned = [r for r in caplog.records if "past the limits" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert FRONTEND in warned[0].getMessage() and "83616 name(s)" in warned[0].getMessage()
    await still_works(mesh, FRONTEND)


async def test_a_sotw_subscription_flood_of_bogus_names_is_bounded_end_to_end(
    start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """SotW repeats a type's whole name list in every request, ACKs included: 100,000 endpoint
    names (2 MB a request) over real gRPC leave the server tracking 16,384 of them, answering
    none (SotW answers only what exists), warning once, and the node keeps working."""
    from meshward.xds.limits import MAX_SUBSCRIBED_NAMES
    from meshward.xds.protocol import SotwProtocol

    mesh = await start(NodeLimits())
    answers: list[int] = []

    def record(_client: AdsClient, type_url: str, response: Any) -> None:
        if type_url == typeurls.ENDPOINT:
            answers.append(len(response.resources))

    bogus = tuple(f"no-such-endpoints-{i}" for i in range(100_000))
    client = mesh.open(FRONTEND, on_response=record,
                       subscriptions={**ALL_TYPES, typeurls.ENDPOINT: bogus})  # fmt: skip
    await until(lambda: bool(answers), what="the endpoint subscription answered")
    client.subscribe(typeurls.ENDPOINT, (*bogus, "yet-another"))  # a second flood, same stream
    await asyncio.sleep(0.3)
    assert client.error is None and set(answers) == {0}
    [stream] = mesh.service.ads.streams.values()
    assert isinstance(stream.protocol, SotwProtocol)
    eds = stream.protocol.states[typeurls.ENDPOINT]
    assert len(eds.names) == MAX_SUBSCRIBED_NAMES and eds.requested_names is None
    warned = [r for r in caplog.records if "past the limits" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert FRONTEND in warned[0].getMessage() and "83616 name(s)" in warned[0].getMessage()
    await still_works(mesh, FRONTEND)
