"""ADS streams without gRPC, for the benches that drive the real
:class:`meshward.xds.server.AdsServer` in one process (bench/xds_messages.py,
bench/xds_coldstart.py): they measure the server's own work per message, which gRPC's cost and
scheduling would hide. Kept under bench/, not meshward/testing/: with ``--baseline`` the server
comes from another tree, and the simulated nodes' side must stay this checkout's in both
variants (the same work in each)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from meshward.xds.cache import SnapshotCache


class SnapshotSource:
    """The control plane reduced to a snapshot cache: nothing to authorize or issue."""

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

    def client_certificate(self, certificate: Any) -> Any:
        raise AssertionError("no client certificates here")

    def client_certificate_status(self, cert: Any) -> dict[str, Any]:
        return {}


class InProcessCall:
    """One ADS call: the request iterator the server reads (:meth:`stream`, ended by a None in
    :attr:`requests`) and the servicer context it answers on; subclasses give ``write``, the
    simulated node's side."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: asyncio.Queue[Any] = asyncio.Queue()

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
        raise NotImplementedError
