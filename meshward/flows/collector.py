"""The flow collector: Envoy's gRPC access log service (``envoy.service.accesslog.v3.
AccessLogService/StreamAccessLogs``) on the control plane's gRPC server (grpc.aio, mTLS).

A node may only report flows of its own workload: the stream's first message names the node
(``identifier.node.id``), which must be one the peer certificate's SPIFFE ID may act as (the
same rule as ADS, :meth:`meshward.xds.controlplane.ControlPlane.authorize`), and every entry's
workload tag must be that node's workload. Anything else is refused, counted and logged once
per (identity, reason) (:class:`meshward.xds.limits.RefusalLog`). Garbage and floods are
bounded: at most ``max_streams`` streams, ``max_entries`` entries per message and
``rate``/``burst`` entries per second per stream; the excess is dropped and counted. The
handler never raises into grpcio (which would swallow it): it catches, counts, refuses.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from meshward.flows.records import FlowRecord, ForeignWorkload, RecordError, from_http, from_tcp
from meshward.flows.store import FlowStore
from meshward.xds.limits import RefusalLog
from meshward.xds.nodeid import InvalidNodeId, NodeId
from meshward.xds.peer import peer_identity
from meshward.xds.server import NodeRejected

log = logging.getLogger("meshward.flows")
audit = logging.getLogger("meshward.flows.audit")


@dataclass(frozen=True)
class CollectorLimits:
    max_streams: int = 1024
    max_streams_per_identity: int = 8  # a sidecar needs one (per worker thread at most)
    max_entries: int = 5000  # per message; Envoy batches ~16 KiB
    rate: float = 2000.0  # entries per second per stream
    burst: float = 20000.0


class FlowCollector:
    """``authorize(node, peer_identity)`` raises NodeRejected unless the identity may act as
    the node; ``resolve(spiffe_id)`` names the caller's workload (None: unknown)."""

    def __init__(
        self,
        store: FlowStore,
        *,
        authorize: Callable[[NodeId, str | None], None],
        resolve: Callable[[str], str | None],
        limits: CollectorLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.authorize = authorize
        self.resolve = resolve
        self.limits = limits or CollectorLimits()
        self.clock = clock
        self.refused: Counter[str] = Counter()  # by reason (bounded: fixed set of reasons)
        self.dropped: Counter[str] = Counter()
        self.entries = 0
        self.streams = 0
        self.identity_streams: Counter[str] = Counter()  # bounded: at most max_streams keys
        self.refusals = RefusalLog(audit)
        # Called with each batch of records after the store (the Prometheus metrics).
        self.observers: list[Callable[[list[FlowRecord]], None]] = []

    def add_to(self, server: grpc.aio.Server) -> None:
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(_Servicer(self), server)

    async def _refuse(self, context: Any, reason: str, message: str, who: str | None) -> None:
        self.refused[reason] += 1
        self.refusals.refused(who, reason, f"flow log refused: {message}", self.clock(),
                              audit="als-refused", peer=context.peer())  # fmt: skip
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    async def stream(self, requests: AsyncIterator[Any], context: Any) -> Any:
        identity = peer_identity(context)
        key = identity or "-"
        if self.streams >= self.limits.max_streams:
            self.refused["stream-limit"] += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many flow log streams")
        if self.identity_streams[key] >= self.limits.max_streams_per_identity:
            self.refused["identity-stream-limit"] += 1
            self.refusals.refused(identity, "identity-stream-limit",
                                  f"flow log refused: too many streams for {key}", self.clock())  # fmt: skip
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "too many flow log streams for this identity"
            )
        self.streams += 1
        self.identity_streams[key] += 1
        try:
            await self._serve(requests, context, identity)
        finally:
            self.streams -= 1
            self.identity_streams[key] -= 1
            if self.identity_streams[key] <= 0:
                del self.identity_streams[key]
        return als_pb2.StreamAccessLogsResponse()

    async def _serve(
        self, requests: AsyncIterator[Any], context: Any, identity: str | None
    ) -> None:
        node: NodeId | None = None
        tokens, last = self.limits.burst, self.clock()
        async for message in requests:
            if node is None:
                raw = message.identifier.node.id
                try:
                    node = NodeId.parse(raw)
                    self.authorize(node, identity)
                except InvalidNodeId as exc:
                    await self._refuse(context, "invalid-node-id", str(exc), identity)
                    return
                except NodeRejected as exc:
                    await self._refuse(context, exc.reason, str(exc), identity)
                    return
            entries = list(message.http_logs.log_entry) + list(message.tcp_logs.log_entry)
            if len(entries) > self.limits.max_entries:
                self.dropped["oversized-message"] += len(entries) - self.limits.max_entries
                entries = entries[: self.limits.max_entries]
            now = self.clock()
            tokens = min(self.limits.burst, tokens + (now - last) * self.limits.rate)
            last = now
            if len(entries) > tokens:
                self.dropped["rate"] += len(entries) - int(tokens)
                entries = entries[: int(tokens)]
            tokens -= len(entries)
            records: list[FlowRecord] = []
            for entry in entries:
                try:
                    record = self._record(entry, node)
                except ForeignWorkload as exc:
                    await self._refuse(context, "other-workload", str(exc), identity)
                    return
                except RecordError:
                    self.dropped["untagged"] += 1
                    continue
                except Exception:  # garbage the parser did not foresee: count, never crash
                    self.dropped["invalid"] += 1
                    continue
                if record is not None:
                    records.append(record)
            self.entries += len(records)
            self.store.add(records)
            for observe in self.observers:
                observe(records)

    def _record(self, entry: Any, node: NodeId) -> FlowRecord | None:
        if isinstance(entry, accesslog_pb2.HTTPAccessLogEntry):
            return from_http(entry, node_workload=node.workload_ref, resolve=self.resolve)
        return from_tcp(entry, node_workload=node.workload_ref, resolve=self.resolve)

    def status(self) -> dict[str, Any]:
        return {
            "streams": self.streams,
            "entries": self.entries,
            "refused": dict(self.refused),
            "dropped": dict(self.dropped),
            "store": vars(self.store.counters),
        }


class _Servicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, collector: FlowCollector) -> None:
        self.collector = collector

    async def StreamAccessLogs(self, request_iterator: Any, context: Any) -> Any:
        try:
            return await self.collector.stream(request_iterator, context)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception:  # grpcio would swallow it: log it, count it, refuse
            log.exception("flow log stream failed")
            self.collector.refused["internal-error"] += 1
            await context.abort(grpc.StatusCode.INTERNAL, "flow collector error")
