"""The ADS server's fleet counts (meshward.xds.fleetcounts) at every point another task can
read them: the server recomputes a node once per pass of its stream's loop (the requests
drained, then the plan), not once per request and again for the plan, so every write, and
every wait for the next request, must find them equal to a recomputation from the streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from meshward.testing.xds_resources import cluster, listener
from meshward.xds import typeurls
from meshward.xds.cache import SnapshotCache
from meshward.xds.server import AdsServer
from meshward.xds.snapshot import build_snapshot
from meshward.xds.status import FleetCounts, stream_flags

NOW = 1000.0
THRESHOLD = 10.0


class Source:
    """The control plane reduced to a snapshot cache (nothing to authorize or issue)."""

    def __init__(self) -> None:
        self.cache = SnapshotCache()

    def authorize(self, node: Any, peer_identity: str | None) -> None:
        return None

    async def node_connected(self, node: Any, envoy_node: Any = None) -> None:
        return None

    def node_disconnected(self, node: Any) -> None:
        return None

    def node_details(self, node: Any) -> dict[str, Any]:
        return {}


def recomputed(server: AdsServer) -> dict[str, Any]:
    counts = FleetCounts()
    by_node: dict[str, list[Any]] = {}
    for stream in server.streams.values():
        by_node.setdefault(stream.name, []).append(stream)
    out_of_sync: dict[str, int] = {}
    for node, streams in sorted(by_node.items()):
        snapshot = server.cache.get(node)
        counts.add(
            node,
            [(s.mode, stream_flags(s.protocol.states, snapshot, NOW, THRESHOLD)) for s in streams],
        )
        behind = {
            typeurls.short(t)
            for s in streams
            for t, st in s.protocol.states.items()
            if st.requested and st.acked_version != (snapshot.type_version(t) if snapshot else "")
        }
        for short in behind:
            out_of_sync[short] = out_of_sync.get(short, 0) + 1
    return {**counts.as_dict(), "out_of_sync_types": out_of_sync}


class Node:
    """A simulated node: its requests, and a context whose ``write`` checks the fleet counts
    (a write is an await: another task may read them there), then ACKs, or NACKs the types
    in ``nack``."""

    def __init__(self, name: str, server: AdsServer, mode: str, nack: set[str]) -> None:
        self.name, self.server, self.mode, self.nack = name, server, mode, nack
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.received: list[str] = []
        self.checks = 0

    def request(self, type_url: str, nonce: str = "", error: str | None = None) -> None:
        message: Any = (
            discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce)
            if self.mode == "delta"
            else discovery_pb2.DiscoveryRequest(type_url=type_url, response_nonce=nonce)
        )
        if not nonce and not self.received and self.requests.empty():
            message.node.id = self.name
        if error is not None:
            message.error_detail.message = error
        self.requests.put_nowait(message)

    async def stream(self) -> AsyncIterator[Any]:
        while True:
            item = await self.requests.get()
            if item is None:
                return
            yield item

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def auth_context(self) -> dict[str, Any]:
        return {}

    async def abort(self, code: Any, message: str) -> None:
        raise AssertionError(f"{self.name} refused: {message}")

    async def write(self, data: bytes) -> None:
        check(self.server)
        self.checks += 1
        kind = discovery_pb2.DeltaDiscoveryResponse if self.mode == "delta" else None
        response: Any = (kind or discovery_pb2.DiscoveryResponse).FromString(data)
        self.received.append(response.type_url)
        error = (
            "Error adding/updating listener(s) l0: bad" if response.type_url in self.nack else None
        )
        if self.mode == "sotw":
            message = discovery_pb2.DiscoveryRequest(
                type_url=response.type_url, response_nonce=response.nonce
            )
            message.version_info = "" if error else response.version_info
            if error:
                message.error_detail.message = error
            self.requests.put_nowait(message)
        else:
            self.request(response.type_url, response.nonce, error)


def check(server: AdsServer) -> None:
    want = recomputed(server)
    got = server.fleet.summary(NOW, THRESHOLD)
    for key in ("connected", "in_sync", "pending", "drifting", "not_enforced", "streams"):
        assert got[key] == want[key], (key, got, want)
    assert got["out_of_sync_types"] == want["out_of_sync_types"]


async def settle(server: AdsServer, nodes: list[Node]) -> None:
    for _ in range(200):
        await asyncio.sleep(0)
        if all(n.requests.empty() for n in nodes) and all(
            s.queue.empty() for s in server.streams.values()
        ):
            return
    raise AssertionError("the streams did not settle")


def test_counts_are_right_wherever_another_task_can_read_them() -> None:
    async def scenario() -> None:
        source = Source()
        server = AdsServer(source, clock=lambda: NOW)
        touches: dict[str, int] = {}
        touch = server.fleet.touch

        def counting(node: str) -> None:
            touches[node] = touches.get(node, 0) + 1
            touch(node)

        server.fleet.touch = counting  # type: ignore[method-assign]
        plan = {  # (mode, types it NACKs)
            "ns/a/r0": ("delta", set()),
            "ns/a/r1": ("delta", {typeurls.LISTENER}),
            "ns/b/r0": ("sotw", set()),
            "ns/b/r1": ("sotw", {typeurls.LISTENER}),
        }
        resources = {
            typeurls.CLUSTER: [cluster("c0"), cluster("c1")],
            typeurls.LISTENER: [listener("l0", "c0", secrets=False)],
        }
        nodes = []
        for name, (mode, nack) in plan.items():
            source.cache.set(name, build_snapshot(None, resources, NOW))
            node = Node(name, server, mode, nack)
            node.request(typeurls.CLUSTER)  # both read in the stream's first pass
            node.request(typeurls.LISTENER)
            nodes.append(node)
        tasks = [asyncio.create_task(server.serve(n.mode, n.stream(), n)) for n in nodes]
        await settle(server, nodes)
        check(server)
        got = server.fleet.summary(NOW, THRESHOLD)
        assert (got["connected"], got["in_sync"], got["not_enforced"]) == (4, 2, 2)
        assert got["out_of_sync_types"] == {"LDS": 2}
        assert all(n.checks >= 2 and set(n.received) >= {typeurls.CLUSTER} for n in nodes)
        # The first pass read two requests and planned: one recomputation for it, besides the
        # one the stream's opening makes (three before: one per request and one for the plan).
        assert touches["ns/a/r0"] <= 1 + 3  # opening; CDS+LDS pass; CDS ACK; LDS ACK
        # A new version: the nodes are woken, pushed to, ACK (or NACK again).
        resources[typeurls.CLUSTER] = [cluster("c0"), cluster("c1", 9090)]
        for name in plan:
            source.cache.set(name, build_snapshot(source.cache.get(name), resources, NOW))
        check(server)
        await settle(server, nodes)
        check(server)
        assert server.fleet.summary(NOW, THRESHOLD)["in_sync"] == 2
        for node in nodes:
            node.requests.put_nowait(None)
        await asyncio.gather(*tasks)
        check(server)
        assert server.fleet.summary(NOW, THRESHOLD)["connected"] == 0
        await server.stop()

    asyncio.run(scenario())
