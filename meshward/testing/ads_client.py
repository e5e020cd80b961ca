"""A minimal ADS client that behaves like Envoy on the wire: simulated nodes for the benchmark
and for tests that need to misbehave (claim another identity, ask for someone else's secret,
NACK on purpose).

It speaks over grpclib (pure-Python HTTP/2) with the standard library's TLS instead of grpcio:
grpcio's client insists on matching the server's *DNS* name, and SVIDs carry only a SPIFFE URI.
Here the chain is verified against the trust bundle and the server's URI SAN is checked against
the expected SPIFFE ID, which is what Envoy does too.

Like a real node, a simulated node brings its own SVID (:func:`node_ssl_context`: its key made
here, the certificate signed from its CSR) and gets none from the control plane: it subscribes
to clusters and listeners (and routes), not to secrets (the control plane serves only the public
trust bundle over SDS).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from meshward.xds import typeurls

SOTW_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


class ServerIdentityMismatch(Exception):
    pass


def node_ssl_context(ca: Any, spiffe_id: str) -> ssl.SSLContext:
    """A node's mTLS context for the ADS port: a key made here (as the agent and `meshward
    bootstrap` do), an SVID signed by ``ca`` (a CertificateAuthority) from its CSR, the bundle."""
    from meshward.certs.client_tls import client_ssl_context
    from meshward.testing.sidecar import node_svid

    svid = node_svid(ca, spiffe_id)
    return client_ssl_context(
        svid.cert_chain_pem, svid.private_key_pem, ca.trust_bundle().roots_pem
    )


@dataclass
class TypeView:
    """What the client holds for one type: resources by name (bytes) and the last version."""

    version: str = ""
    resources: dict[str, Any] = field(default_factory=dict)  # name -> Any (packed)
    versions: dict[str, str] = field(default_factory=dict)  # delta: name -> resource version
    nonce: str = ""
    responses: int = 0


@dataclass
class AdsClient:
    """One simulated node. ``run()`` opens the stream and ACKs everything until ``close()``.
    ``run()`` again (after the stream ended) reconnects as Envoy does: the first requests carry
    what the client holds (SotW ``version_info``, delta ``initial_resource_versions``).

    ``nack``: called with (type_url, response); return an error string to NACK that response.
    ``on_response``: called after each response is applied (e.g. to time convergence).
    ``follow_routes``: like Envoy, subscribe to the route configs (RDS) that the received
    listeners name, and follow them as listeners change (authorization rules live there).
    """

    host: str
    port: int
    node_id: str
    ssl_context: ssl.SSLContext
    server_identity: str | None = None
    delta: bool = False
    subscriptions: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {typeurls.CLUSTER: (), typeurls.LISTENER: ()}
    )
    nack: Callable[[str, Any], str | None] | None = None
    on_response: Callable[[AdsClient, str, Any], None] | None = None
    follow_routes: bool = False
    views: dict[str, TypeView] = field(default_factory=dict)
    error: BaseException | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    last_response_at: float = 0.0
    _send: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    _channel: Any = None
    _listener_routes: dict[str, tuple[bytes, list[str]]] = field(default_factory=dict)

    def view(self, type_url: str) -> TypeView:
        return self.views.setdefault(type_url, TypeView())

    def subscribe(self, type_url: str, names: Iterable[str]) -> None:
        """Change a subscription while running (SotW: the full name list; delta: adds)."""
        names = tuple(names)
        old = self.subscriptions.get(type_url, ())
        self.subscriptions[type_url] = names
        view = self.view(type_url)
        if self.delta:
            self._send.put_nowait(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=type_url,
                    resource_names_subscribe=[n for n in names if n not in old],
                    resource_names_unsubscribe=[n for n in old if n not in names],
                    response_nonce=view.nonce,
                )
            )
        else:
            self._send.put_nowait(
                discovery_pb2.DiscoveryRequest(
                    type_url=type_url, version_info=view.version, resource_names=list(names),
                    response_nonce=view.nonce,
                )
            )  # fmt: skip

    async def run(self) -> None:
        from grpclib.client import Channel
        from grpclib.const import Cardinality

        self._channel = Channel(self.host, self.port, ssl=self.ssl_context)
        self.error = None
        while not self._send.empty():  # answers meant for an earlier stream
            self._send.get_nowait()
        try:
            method = DELTA_METHOD if self.delta else SOTW_METHOD
            request_type: Any = (
                discovery_pb2.DeltaDiscoveryRequest
                if self.delta
                else discovery_pb2.DiscoveryRequest
            )
            reply_type: Any = (
                discovery_pb2.DeltaDiscoveryResponse
                if self.delta
                else discovery_pb2.DiscoveryResponse
            )
            async with self._channel.request(
                method, Cardinality.STREAM_STREAM, request_type, reply_type
            ) as stream:
                await stream.send_request()
                self._check_server(stream)
                first = True
                for type_url, names in self.subscriptions.items():
                    request = self._initial(type_url, names)
                    if first:
                        request.node.id = self.node_id
                        request.node.cluster = self.node_id
                        first = False
                    await stream.send_message(request)
                self.connected.set()
                sender = asyncio.create_task(self._sender(stream))
                try:
                    async for response in stream:
                        self._apply(response)
                finally:
                    sender.cancel()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = exc
            self.connected.set()
        finally:
            self._channel.close()

    def _check_server(self, stream: Any) -> None:
        if self.server_identity is None:
            return
        cert = stream.peer.cert() or {}
        uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
        if self.server_identity not in uris:
            raise ServerIdentityMismatch(
                f"server presented {uris}, expected {self.server_identity}"
            )

    def _initial(self, type_url: str, names: tuple[str, ...]) -> Any:
        view = self.views.get(type_url) or TypeView()  # (no view for a type never answered)
        if self.delta:
            return discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url,
                resource_names_subscribe=list(names),
                initial_resource_versions=view.versions,
            )
        return discovery_pb2.DiscoveryRequest(
            type_url=type_url, version_info=view.version, resource_names=list(names)
        )

    async def _sender(self, stream: Any) -> None:
        while True:
            message = await self._send.get()
            await stream.send_message(message)

    def _apply(self, response: Any) -> None:
        type_url = response.type_url
        view = self.view(type_url)
        error = self.nack(type_url, response) if self.nack else None
        if self.delta:
            if error is None:
                for resource in response.resources:
                    view.resources[resource.name] = resource.resource
                    view.versions[resource.name] = resource.version
                for name in response.removed_resources:
                    view.resources.pop(name, None)
                    view.versions.pop(name, None)
                view.version = response.system_version_info
            request = discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url, response_nonce=response.nonce
            )
        else:
            if error is None:
                view.resources = {_name(any_): any_ for any_ in response.resources}
                view.version = response.version_info
            request = discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                version_info=view.version,
                resource_names=list(self.subscriptions.get(type_url, ())),
                response_nonce=response.nonce,
            )
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        view.nonce = response.nonce
        view.responses += 1
        self.last_response_at = time.monotonic()
        self._send.put_nowait(request)
        if self.follow_routes and type_url == typeurls.LISTENER and error is None:
            names = tuple(
                sorted({n for name, r in view.resources.items() for n in self._routes(name, r)})
            )
            if names != self.subscriptions.get(typeurls.ROUTE, ()):
                self.subscribe(typeurls.ROUTE, names)
        if self.on_response is not None:
            self.on_response(self, type_url, response)

    def _routes(self, name: str, packed: Any) -> list[str]:
        """The route names a listener uses, decoded once per content (as Envoy skips a resource
        it already holds), not on every listener response."""
        known = self._listener_routes.get(name)
        if known is not None and known[0] == packed.value:
            return known[1]
        found = _route_names(packed)
        self._listener_routes[name] = (packed.value, found)
        return found

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


def _route_names(packed_listener: Any) -> list[str]:
    """The RDS route config names a packed Listener's HTTP connection managers use."""
    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    listener = listener_pb2.Listener()
    packed_listener.Unpack(listener)
    found = []
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            hcm = hcm_pb2.HttpConnectionManager()
            if network_filter.typed_config.Unpack(hcm) and hcm.HasField("rds"):
                found.append(hcm.rds.route_config_name)
    return found


def _name(resource: Any) -> str:
    """The name of a packed resource without decoding all of it (field 1 for every type we
    serve: Listener/Cluster/RouteConfiguration/Secret ``name``, ClusterLoadAssignment
    ``cluster_name``)."""
    data = resource.value
    if data[:1] == b"\x0a":
        length, offset = 0, 1
        shift = 0
        while True:
            byte = data[offset]
            length |= (byte & 0x7F) << shift
            offset += 1
            if not byte & 0x80:
                break
            shift += 7
        return str(data[offset : offset + length].decode())
    return ""
