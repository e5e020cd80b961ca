"""The ADS gRPC service (grpc.aio): SotW and delta streams over the sans-IO protocol.

Thin by design: each stream authenticates its node, then loops "read requests -> feed the
protocol -> ask it what to push -> write". Everything with rules in it lives in
:mod:`meshward.xds.protocol` (ordering, ACK/NACK), :mod:`meshward.xds.snapshot` (versions) and the
:class:`NodeSource` (the control plane: what a node may be and what it gets).

grpc.aio, not the sync server: the sync server ties a pool thread to every open stream, so the
N+1th sidecar would get nothing (DESIGN.md field notes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from meshward.xds import typeurls
from meshward.xds.ads_handler import ads_handler
from meshward.xds.cache import SnapshotCache
from meshward.xds.clientcert import ClientCertificate
from meshward.xds.enforcement import compile_failure, not_enforced
from meshward.xds.fleetcounts import FleetTable
from meshward.xds.limits import (
    LIMIT_REASONS,
    STREAM_LIMIT,
    SUBSCRIPTION_LIMIT,
    NodeLimits,
    RefusalLog,
)
from meshward.xds.metrics import XdsMetrics
from meshward.xds.nodeid import InvalidNodeId, NodeId
from meshward.xds.peer import peer_certificate, peer_identity
from meshward.xds.protocol import (
    Acked,
    DeltaProtocol,
    DeltaRequest,
    Event,
    Ignored,
    Nacked,
    Push,
    Request,
    SecretDenied,
    SotwProtocol,
)
from meshward.xds.resources import encode_response
from meshward.xds.status import (
    DEFAULT_DRIFT_THRESHOLD,
    drifting,
    iso,
    stream_types,
)
from meshward.xds.streamqueue import StreamQueue
from meshward.xds.writewatch import WriteWatch

log = logging.getLogger("meshward.xds")
audit = logging.getLogger("meshward.xds.audit")

CONTROL_PLANE_ID = "meshward"
OWN_SECRETS = frozenset({"default", "ROOTCA"})  # the SDS names every node may have
_WAKE = object()
_END = object()


class AddressInUse(OSError):
    """The ADS address cannot be bound (another process holds it: never shared)."""


class NodeRejected(Exception):
    """The stream's node may not connect; ``reason`` is a short label, the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NodeSource(Protocol):
    """What the server needs from the control plane."""

    cache: SnapshotCache

    def authorize(self, node: NodeId, peer_identity: str | None) -> None:
        """Raise NodeRejected unless the peer's certificate identity may act as ``node``."""

    async def node_connected(self, node: NodeId, envoy_node: Any = None) -> None:
        """Make sure ``cache`` holds the node's snapshot (``envoy_node``: the first request's
        ``Node``, whose metadata may say where its Envoy reads its secrets)."""

    def node_disconnected(self, node: NodeId) -> None: ...

    def node_details(self, node: NodeId) -> dict[str, Any]:
        """Extra status for the node (workload, certificate)."""

    def client_certificate(self, certificate: Any) -> ClientCertificate:
        """What to remember of a stream's (verified) client certificate, an x509.Certificate."""

    def client_certificate_status(self, cert: ClientCertificate) -> dict[str, Any]:
        """Its status now (see :func:`meshward.xds.clientcert.credentials_status`)."""


# New ADS streams wait in gRPC core until the event loop takes them: grpc.aio asks core for
# the next call one at a time on the loop, between the work of the streams already open (each
# new node: its SVID, its first pushes). In a burst of thousands of nodes more calls arrive
# than the loop takes, and core sheds the queue before any Meshward code sees the calls (the
# node gets CANCELLED, nothing is logged): beyond ``grpc.server.max_pending_requests`` (core's
# default 1,000) it cancels new calls at random, beyond ``..._hard_limit`` (3,000) all of them,
# and any call left waiting past ``grpc.server_max_unrequested_time_in_server`` (30 s).
# bench/xds_fleet.py --burst-only with 5,050 nodes: 782-1,271 streams cancelled that way.
# Sized for a burst of a whole 5,000-node fleet (still bounded: a pending call is a stream of
# an already open connection; beyond the hard limit the node retries, as Envoy does).
UNREQUESTED_CALL_SECONDS = 300
PENDING_CALLS_SOFT = 10_000
PENDING_CALLS_HARD = 20_000


@dataclass
class Stream:
    id: int
    node: NodeId
    mode: str  # "sotw" | "delta"
    peer: str
    identity: str | None
    connected_at: float  # monotonic
    connected_wall: float
    protocol: SotwProtocol | DeltaProtocol
    client_cert: ClientCertificate | None = None
    # Requests read ahead of the loop, bounded: when it is full the reader waits, so gRPC's flow
    # control pushes back on the node. Wake-ups are a flag plus at most one item (dropped when
    # the queue is full: the loop plans after draining it anyway, from the latest snapshot).
    queue: StreamQueue | asyncio.Queue[Any] = field(default_factory=lambda: StreamQueue(64))
    wake_pending: bool = False
    ended: bool = False
    queue_peak: int = 0  # the most requests ever waiting (tests, flood checks)

    backlog: SnapshotCache | None = None  # counts this stream while woken and not yet pushed
    counted: bool = False
    name: str = ""  # str(node), once (the loop uses it on every message)

    def __post_init__(self) -> None:
        if not self.name and self.node is not None:
            self.name = str(self.node)

    def wake(self) -> None:
        if not self.wake_pending:
            self.wake_pending = True
            if self.backlog is not None and not self.counted:
                self.counted = True
                self.backlog.pushing += 1
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(_WAKE)

    def settle(self) -> None:
        """Its pushes are written (or it ended): it no longer counts as woken."""
        if self.counted and self.backlog is not None:
            self.counted = False
            self.backlog.pushing -= 1


class AdsServer:
    """The AggregatedDiscoveryService; construct, ``add_to(server)``, or use ``start``."""

    def __init__(
        self,
        source: NodeSource,
        *,
        metrics: XdsMetrics | None = None,
        drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
        clock: Callable[[], float] = time.monotonic,
        limits: NodeLimits | None = None,
    ) -> None:
        self.source = source
        self.limits = limits or NodeLimits()
        self.writes = WriteWatch(self.limits.write_timeout)  # every write's deadline
        self.refusals = RefusalLog(audit)
        self.identity_streams: dict[str, int] = {}
        self.cache = source.cache
        self.metrics = metrics or XdsMetrics()
        self.drift_threshold = drift_threshold
        self.clock = clock
        self.streams: dict[int, Stream] = {}
        self.fleet = FleetTable(self.cache)  # counts kept on events (meshward.xds.fleetcounts)
        self._node_streams: dict[str, int] = {}  # open streams per node (disconnect in O(1))
        self._ids = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None
        # More services on the ADS port (its mTLS), e.g. the certificate service's renewals.
        self.extra_handlers: list[grpc.GenericRpcHandler] = []
        # Other services on the same mTLS port (the flow collector, meshward.flows.collector).
        self.services: list[Callable[[grpc.aio.Server], None]] = []
        # Cleared while the control plane's first compile runs with the port already open:
        # streams are taken (TLS handshake, first request) and wait here, before anything is
        # counted or served; nothing partial is ever sent (fail closed).
        self.accepting = asyncio.Event()
        self.accepting.set()

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        """Listen on ``address`` (``host:port``, port 0 for any); None credentials: plaintext
        (only for tests of the protocol itself; node authentication then fails closed)."""
        server = grpc.aio.server(
            options=[
                # grpcio sets SO_REUSEPORT by default: a second control plane (maybe with another
                # CA) would silently share this port and take half the sidecars. Never share.
                ("grpc.so_reuseport", 0),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                # A new stream waits in gRPC core until the event loop asks for the next call;
                # after this long unasked, core cancels it (CANCELLED, nothing logged here).
                # Core's default, 30 s, is what a burst of thousands of nodes exceeded.
                ("grpc.server_max_unrequested_time_in_server", UNREQUESTED_CALL_SECONDS),
                ("grpc.server.max_pending_requests", PENDING_CALLS_SOFT),
                ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS_HARD),
            ]
        )
        server.add_generic_rpc_handlers((ads_handler(self),))
        if self.extra_handlers:
            server.add_generic_rpc_handlers(tuple(self.extra_handlers))
        for add in self.services:
            add(server)
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError:  # grpcio's "Failed to bind to address ..."
            port = 0
        if not port:
            raise AddressInUse(
                f"cannot listen on {address}: the address is in use (another control plane?) "
                "or not local; stop the other process or pick another --listen"
            )
        await server.start()
        self._server = server
        self.port = int(port)
        return self.port

    async def stop(self, grace: float | None = 1.0) -> None:
        self.writes.stop()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    # -- streams -------------------------------------------------------------------------------
    async def serve(self, mode: str, request_iterator: AsyncIterator[Any], context: Any) -> None:
        try:
            first = await request_iterator.__anext__()
        except StopAsyncIteration:
            return
        if not self.accepting.is_set():
            await self.accepting.wait()
        stream = await self._open(mode, first, context)
        if stream is None:
            return
        reader = asyncio.create_task(self._read(stream, request_iterator))
        try:
            await self._loop(stream, first, context)
        finally:
            reader.cancel()
            self._close(stream)

    async def _open(self, mode: str, first: Any, context: Any) -> Stream | None:
        peer = context.peer() or "?"
        certificate = peer_certificate(context)
        identity = peer_identity(context, certificate)
        raw_id = first.node.id
        try:
            node = NodeId.parse(raw_id)
            self.source.authorize(node, identity)
        except InvalidNodeId as err:
            await self._reject(context, "invalid-node-id", str(err), raw_id, identity, peer)
            return None
        except NodeRejected as err:
            await self._reject(context, err.reason, str(err), raw_id, identity, peer)
            return None
        if (
            identity is not None
            and self.identity_streams.get(identity, 0) >= self.limits.max_streams
        ):
            message = (
                f"{identity} already has {self.limits.max_streams} open ADS stream(s), the most "
                f"one identity may have (--max-streams); node {node} refused"
            )
            await self._reject(context, STREAM_LIMIT, message, raw_id, identity, peer)
            return None
        self._count_stream(identity, +1)  # held from here, so concurrent opens cannot overshoot
        try:
            await self.source.node_connected(node, first.node)
        except NodeRejected as err:  # a per-identity limit (instances, SVID rate)
            self._count_stream(identity, -1)
            await self._reject(context, err.reason, str(err), raw_id, identity, peer)
            return None
        except Exception:  # e.g. the CA cannot issue: say so, and let Envoy retry
            self._count_stream(identity, -1)
            log.exception("preparing node %s failed", node)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the control plane cannot serve this node now"
            )
            return None
        protocol: SotwProtocol | DeltaProtocol = (
            SotwProtocol() if mode == "sotw" else DeltaProtocol()
        )
        stream = Stream(
            id=next(self._ids),
            node=node,
            mode=mode,
            peer=peer,
            identity=identity,
            connected_at=self.clock(),
            connected_wall=time.time(),
            protocol=protocol,
            client_cert=(
                self.source.client_certificate(certificate) if certificate is not None else None
            ),
            queue=StreamQueue(self.limits.stream_queue),
            backlog=self.cache,
        )
        self.streams[stream.id] = stream
        self._node_streams[stream.name] = self._node_streams.get(stream.name, 0) + 1
        expiry = stream.client_cert.not_after if stream.client_cert is not None else None
        self.fleet.opened(stream.name, stream.id, mode, protocol.states, expiry)
        self.cache.watch(stream.name, stream.wake)
        log.info(
            "node %s connected (%s, stream %d, %s)", node, mode, stream.id, identity,
            extra={"node": str(node), "mode": mode, "peer": peer},
        )  # fmt: skip
        return stream

    async def _reject(
        self, context: Any, reason: str, message: str, node: str, identity: str | None, peer: str
    ) -> None:
        self.metrics.rejected_streams.labels(reason).inc()
        # Once per identity and reason per minute: a flood of refused attempts is counted in
        # the metric, not written line by line.
        self.refusals.refused(
            identity,
            reason,
            f"ADS stream refused: node {node[:200]!r}, certificate identity {identity}, "
            f"peer {peer}: {message}",
            self.clock(),
            audit="ads-stream-refused", node=node[:200], identity=identity, peer=peer,
        )  # fmt: skip
        code = (
            grpc.StatusCode.RESOURCE_EXHAUSTED
            if reason in LIMIT_REASONS
            else grpc.StatusCode.INVALID_ARGUMENT
            if reason == "invalid-node-id"
            else grpc.StatusCode.UNAUTHENTICATED
            if identity is None
            else grpc.StatusCode.PERMISSION_DENIED
        )
        await context.abort(code, message)

    def _count_stream(self, identity: str | None, delta: int) -> None:
        if identity is None:
            return
        count = self.identity_streams.get(identity, 0) + delta
        if count > 0:
            self.identity_streams[identity] = count
        else:
            self.identity_streams.pop(identity, None)

    def _close(self, stream: Stream) -> None:
        name = stream.name
        if self.streams.pop(stream.id, None) is not None:
            self.fleet.closed(name, stream.id)
            self._count_stream(stream.identity, -1)
            left = self._node_streams.get(name, 1) - 1
            if left > 0:
                self._node_streams[name] = left
            else:
                self._node_streams.pop(name, None)
        self.cache.unwatch(name, stream.wake)
        stream.settle()
        if name not in self._node_streams:
            self.source.node_disconnected(stream.node)
        log.info("node %s disconnected (stream %d)", stream.node, stream.id)

    async def _read(self, stream: Stream, request_iterator: AsyncIterator[Any]) -> None:
        try:
            async for request in request_iterator:
                await stream.queue.put(request)  # waits while the loop is behind (bounded)
                stream.queue_peak = max(stream.queue_peak, stream.queue.qsize())
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        except Exception:
            log.exception("reading ADS stream %d of %s failed", stream.id, stream.node)
        finally:
            stream.ended = True
            with contextlib.suppress(asyncio.QueueFull):  # full: the loop sees ``ended``
                stream.queue.put_nowait(_END)

    async def _loop(self, stream: Stream, first: Any, context: Any) -> None:
        node = stream.name
        self._receive(stream, first)
        touch = True  # the fleet counts must see what the requests (and plan) changed
        while True:
            # Drain everything queued (requests and wake-ups), then plan once from the latest
            # snapshot: changes made while a push was in flight coalesce into the next plan.
            while not stream.queue.empty():
                item = stream.queue.get_nowait()
                if item is _END:
                    return
                if item is not _WAKE:
                    self._receive(stream, item)
                    touch = True
            if stream.ended:
                return
            stream.wake_pending = False
            snapshot = self.cache.get(node)
            pushes: list[Push] = []
            if snapshot is not None:
                marks = stream.protocol.status_marks
                pushes, events = stream.protocol.plan(snapshot, self.clock())
                if events:
                    self._handle(stream, events)
                touch = touch or bool(events) or stream.protocol.status_marks != marks
            if touch:
                # Once per pass of this loop, not once per request and again for the plan:
                # nothing reads the counts before the first await below, so the states in
                # between were never seen (a delta node's cold start: 9 recomputations -> 4).
                self.fleet.touch(node)
                touch = False
            for push in pushes:
                if not await self._write(stream, context, push):
                    return
                self.metrics.push(push.type_url)
                if log.isEnabledFor(logging.DEBUG):  # (its arguments cost even when off)
                    log.debug(
                        "push %s %s v%s (%d resources) to %s",
                        typeurls.short(push.type_url), push.nonce, push.version,
                        len(push.resources), node,
                    )  # fmt: skip
            if not stream.wake_pending:
                stream.settle()
            item = await stream.queue.get()
            if item is _END:
                return
            if item is not _WAKE:
                self._receive(stream, item)
                touch = True

    async def _write(self, stream: Stream, context: Any, push: Push) -> bool:
        """Send one push; False (and the stream is to close) when the node has not read it for
        ``limits.write_timeout``: HTTP/2 flow control holds at most one unread push per stream,
        and a stuck stream must not keep its slot (or its identity's stream quota) forever."""
        if self.writes.timeout != self.limits.write_timeout:  # (limits replaced)
            self.writes.stop()
            self.writes = WriteWatch(self.limits.write_timeout)
        if not await self.writes.write(context.write(self._encode(stream.mode, push))):
            self.metrics.streams_closed.labels("not-reading").inc()
            self.refusals.refused(
                stream.identity,
                "not-reading",
                f"node {stream.node} did not read a push for {self.limits.write_timeout:g}s: "
                f"stream {stream.id} closed",
                self.clock(),
                node=str(stream.node),
            )
            return False
        return True

    def _receive(self, stream: Stream, message: Any) -> None:
        now = self.clock()
        error = message.error_detail.message if message.HasField("error_detail") else None
        protocol = stream.protocol
        if type(protocol) is SotwProtocol:
            events = protocol.receive(
                Request(
                    message.type_url,
                    message.version_info,
                    tuple(message.resource_names),
                    message.response_nonce,
                    error,
                ),
                now,
            )
        else:
            assert isinstance(stream.protocol, DeltaProtocol)
            events = stream.protocol.receive(
                DeltaRequest(
                    type_url=message.type_url,
                    subscribe=tuple(message.resource_names_subscribe),
                    unsubscribe=tuple(message.resource_names_unsubscribe),
                    initial_versions=dict(message.initial_resource_versions),
                    response_nonce=message.response_nonce,
                    error_detail=error,
                ),
                now,
            )
        self._handle(stream, events)

    def _handle(self, stream: Stream, events: list[Event]) -> None:
        node = stream.name
        for event in events:
            if isinstance(event, Acked):
                self.metrics.ack(event.type_url, event.latency)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "ACK %s v%s from %s", typeurls.short(event.type_url), event.version, node
                    )
            elif isinstance(event, Nacked):
                nack = event.nack
                self.metrics.nack(nack.type_url)
                # A NACKed listener/route is a policy not in force on that node: an error.
                secret = nack.type_url == typeurls.SECRET
                log.log(
                    logging.WARNING if secret else logging.ERROR,
                    "NACK %s v%s from %s: rejected %s%s: %s",
                    typeurls.short(nack.type_url), nack.version, node,
                    ", ".join(nack.resources) or "(whole response)",
                    "" if secret else " (the policy set is NOT ENFORCED on this node)",
                    nack.error,
                    extra={"node": node, "type": typeurls.short(nack.type_url),
                           "version": nack.version, "resources": list(nack.resources)},
                )  # fmt: skip
            elif isinstance(event, SecretDenied):
                for name in event.names:
                    if name in OWN_SECRETS:  # its own SVID: never served from here
                        log.warning(
                            "node %s asked the control plane for its secret %r: nothing sent, "
                            "a node's SVID comes from its agent or its `meshward bootstrap` "
                            "files (an Envoy bootstrap from an older Meshward?)",
                            node, name,
                        )  # fmt: skip
                        continue
                    self.metrics.secret_denials.inc()
                    audit.warning(
                        "node %s (certificate %s) requested secret %r, which is not its own: "
                        "nothing sent",
                        node, stream.identity, name[:200],
                        extra={"audit": "secret-denied", "node": node,
                               "identity": stream.identity, "secret": name[:200]},
                    )  # fmt: skip
            elif isinstance(event, Ignored) and event.limit:
                self.refusals.refused(
                    stream.identity, SUBSCRIPTION_LIMIT,
                    f"node {node} (certificate {stream.identity}): {typeurls.short(event.type_url)} "
                    f"subscription: {event.reason}",
                    self.clock(),
                    audit="ads-subscription-limit", node=node, identity=stream.identity,
                )  # fmt: skip
            elif isinstance(event, Ignored):
                log.debug("ignored %s request from %s: %s", event.type_url, node, event.reason)
        # (The fleet counts are touched by the caller, once per pass of the stream's loop.)

    def _encode(self, mode: str, push: Push) -> bytes:
        """The response's bytes: each resource is encoded once and the same bytes go to every
        node (meshward.xds.resources.encode_response)."""
        head: Any
        if mode == "sotw":
            head = discovery_pb2.DiscoveryResponse(
                version_info=push.version, type_url=push.type_url, nonce=push.nonce
            )
        else:
            head = discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=push.version,
                type_url=push.type_url,
                nonce=push.nonce,
                removed_resources=list(push.removed),
            )
        head.control_plane.identifier = CONTROL_PLANE_ID
        delta = mode != "sotw"
        if push.whole is not None:  # the whole content: its body is encoded once for all nodes
            body = push.whole.delta_body if delta else push.whole.sotw_body
            return bytes(head.SerializeToString()) + body
        return encode_response(head, push.resources, delta=delta)

    # -- status --------------------------------------------------------------------------------
    def _streams_by_node(self) -> dict[str, list[Stream]]:
        by_node: dict[str, list[Stream]] = {}
        for stream in self.streams.values():
            by_node.setdefault(str(stream.node), []).append(stream)
        return by_node

    def node_names(self) -> list[str]:
        """Every node with a stream or a snapshot, sorted (the per-node view's order)."""
        return sorted({str(s.node) for s in self.streams.values()} | set(self.cache.nodes()))

    def fleet_counts(self, failed_workloads: Collection[str] = ()) -> dict[str, Any]:
        """Counts over every node, kept on events (meshward.xds.fleetcounts): O(1) plus the
        nodes needing attention. ``failed_workloads``: refs whose compile failed (their
        connected nodes are not enforcing)."""
        return self.fleet.summary(self.clock(), self.drift_threshold, failed_workloads)

    def node_status(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """Per node: streams, per-type desired/ACKed versions, NACKs, drift (no secrets).
        ``names``: only these nodes (in that order; unknown names are skipped)."""
        now = self.clock()
        wall_offset = time.time() - now
        by_node = self._streams_by_node()
        known = set(by_node) | set(self.cache.nodes())
        wanted = sorted(known) if names is None else [n for n in names if n in known]
        result = []
        for node_name in wanted:
            snapshot = self.cache.get(node_name)
            streams = sorted(by_node.get(node_name, []), key=lambda s: s.id)
            entries = []
            node_drift = False
            warning = None
            rejected: dict[str, Any] | None = None
            for stream in streams:
                statuses = stream_types(stream.protocol.states, snapshot, now, self.drift_threshold)
                node_drift = node_drift or drifting(statuses)
                rejected = rejected or not_enforced(statuses)
                credentials = (
                    self.source.client_certificate_status(stream.client_cert)
                    if stream.client_cert is not None
                    else None
                )
                warning = warning or (credentials or {}).get("warning")
                entries.append(
                    {
                        "id": stream.id,
                        "mode": stream.mode,
                        "peer": stream.peer,
                        "identity": stream.identity,
                        "connected_since": iso(stream.connected_wall),
                        "ads_credentials": credentials,
                        "types": [s.as_dict(wall_offset) for s in statuses],
                    }
                )
            try:
                details = self.source.node_details(NodeId.parse(node_name))
            except InvalidNodeId:
                details = {}
            if rejected is None and streams and details.get("compile_error"):
                # Its workload did not compile: the node keeps its last good config, which is
                # not the policy set in force.
                rejected = compile_failure(details["compile_error"])
            if rejected is not None:
                documents = getattr(self.source, "policy_documents", None)
                if documents is not None:
                    rejected["policies"] = documents(node_name)
            result.append(
                {
                    "node": node_name,
                    "connected": bool(streams),
                    "connected_since": entries[0]["connected_since"] if entries else None,
                    "desired_version": snapshot.version if snapshot else None,
                    "drift": node_drift,
                    "policy_enforced": rejected is None,
                    "not_enforced": rejected,
                    "ads_credentials_warning": warning,
                    "streams": entries,
                    **details,
                }
            )
        return result
