"""One xDS resource as the control plane handles it: packed once, hashed once, dependencies known.

A resource is built once per distinct content and shared by every node and stream that gets it,
so a policy change for 1,000 sidecars of one workload costs one ``Any`` packing, not 1,000.
The hash doubles as the delta-xDS resource version and as the key of per-resource ACK/NACK
tracking; its dependencies (secrets and clusters named inside, including inside typed Anys such
as the HTTP connection manager and TLS contexts) drive the push order. What an ``Any`` names is
looked up by its bytes (meshward.compile.anymemo): an RBAC engine an edit did not change is not
unpacked and walked again.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

# Importing these registers the message types that sit inside Anys of listeners and clusters, so
# dependency extraction can look inside them (an Any resolves only if its module was imported).
from envoy.config.cluster.v3 import cluster_pb2  # noqa: F401  (registers types)
from envoy.config.endpoint.v3 import endpoint_pb2  # noqa: F401
from envoy.config.listener.v3 import listener_pb2  # noqa: F401
from envoy.config.route.v3 import route_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, descriptor_pool, message_factory

from meshward.compile.anymemo import AnyMemo
from meshward.xds import typeurls

_SDS_SECRET_CONFIG = "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig"
# (message full name, string field) pairs that name a cluster.
_CLUSTER_REFS: dict[str, str] = {
    "envoy.config.route.v3.RouteAction": "cluster",
    "envoy.config.route.v3.WeightedCluster.ClusterWeight": "name",
    "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy": "cluster",
    "envoy.config.core.v3.GrpcService.EnvoyGrpc": "cluster_name",
    "envoy.config.core.v3.HttpUri": "cluster",
}
_RDS = "envoy.extensions.filters.network.http_connection_manager.v3.Rds"
#: (secrets, clusters, routes) an Any names
_Refs = tuple[frozenset[str], frozenset[str], frozenset[str]]
_IN_ANY: AnyMemo[_Refs] = AnyMemo()


@dataclass(frozen=True, eq=False)
class Resource:
    """``body`` is the packed ``Any`` (None for a stub that only records a version Envoy has)."""

    type_url: str
    name: str
    hash: str
    body: Any = field(repr=False)
    secrets: frozenset[str] = frozenset()
    clusters: frozenset[str] = frozenset()
    routes: frozenset[str] = frozenset()
    endpoints: frozenset[str] = frozenset()  # EDS names a cluster asks for (consistency check)

    @cached_property
    def key(self) -> tuple[str, str, str]:
        """(type URL, name, hash): this version as fingerprints and the compile process name
        it; made once per resource (resources are shared between workloads and compiles), not
        once per workload holding it in every compile."""
        return (self.type_url, self.name, self.hash)

    @property
    def sensitive(self) -> bool:
        return self.type_url == typeurls.SECRET

    @cached_property
    def sotw_entry(self) -> bytes:
        """This resource as one encoded ``resources`` entry of a DiscoveryResponse: encoded on
        first use, then the same bytes for every node it is sent to."""
        return _entry(self.body.SerializeToString())

    @cached_property
    def delta_entry(self) -> bytes:
        """The same for a DeltaDiscoveryResponse (name, version and the resource)."""
        entry = discovery_pb2.Resource(name=self.name, version=self.hash, resource=self.body)
        return _entry(entry.SerializeToString())

    @classmethod
    def stub(cls, type_url: str, name: str, version: str) -> Resource:
        """What a delta client says it already has (``initial_resource_versions``)."""
        return cls(type_url=type_url, name=name, hash=version, body=None)


# Field 2 is ``resources`` in both DiscoveryResponse and DeltaDiscoveryResponse.
_RESOURCES_TAG = bytes([2 << 3 | 2])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _entry(payload: bytes) -> bytes:
    return _RESOURCES_TAG + _varint(len(payload)) + payload


def encode_response(head: Any, resources: Iterable[Resource], *, delta: bool) -> bytes:
    """A discovery response on the wire: ``head`` (every field but ``resources``) encoded,
    followed by each resource's cached entry. Protobuf reads fields in any order and appends
    repeated ones in the order they come, so this decodes exactly as the message with the
    resources set, without re-encoding any resource for each node."""
    body: bytes = head.SerializeToString()
    return body + b"".join(r.delta_entry if delta else r.sotw_entry for r in resources)


def resource_name(message: Any) -> str:
    if message.DESCRIPTOR.full_name == "envoy.config.endpoint.v3.ClusterLoadAssignment":
        return str(message.cluster_name)
    return str(message.name)


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def make_resource(message: Any) -> Resource:
    """Pack, hash and index one resource message (a Listener, Cluster, Secret, ...)."""
    type_url = "type.googleapis.com/" + message.DESCRIPTOR.full_name
    body = any_pb2.Any()
    body.Pack(message, deterministic=True)
    secrets: set[str] = set()
    clusters: set[str] = set()
    routes: set[str] = set()
    if type_url != typeurls.SECRET:  # a secret names nothing, and must never be walked or logged
        _walk(message, secrets, clusters, routes)
    endpoints: frozenset[str] = frozenset()
    if type_url == typeurls.CLUSTER and message.HasField("eds_cluster_config"):
        endpoints = frozenset({message.eds_cluster_config.service_name or message.name})
    return Resource(
        type_url=type_url,
        name=resource_name(message),
        hash=content_hash(body.value),
        body=body,
        secrets=frozenset(secrets),
        clusters=frozenset(clusters),
        routes=frozenset(routes),
        endpoints=endpoints,
    )


def _unpack(value: Any) -> Any | None:
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(value.TypeName())
    except KeyError:
        return None  # a type whose module nobody imported: nothing we reference hides there
    inner = message_factory.GetMessageClass(descriptor)()
    return inner if value.Unpack(inner) else None


def _walk(message: Any, secrets: set[str], clusters: set[str], routes: set[str]) -> None:
    full_name = message.DESCRIPTOR.full_name
    if full_name == "google.protobuf.Any":
        type_url, value = message.type_url, message.value
        found = _IN_ANY.get(type_url, value)
        if found is None:
            inner = _unpack(message)
            held: tuple[set[str], set[str], set[str]] = (set(), set(), set())
            if inner is not None:
                _walk(inner, *held)
            found = _IN_ANY.put(
                type_url, value, (frozenset(held[0]), frozenset(held[1]), frozenset(held[2]))
            )
        secrets.update(found[0])
        clusters.update(found[1])
        routes.update(found[2])
        return
    if full_name == _SDS_SECRET_CONFIG:
        # Only secrets fetched over ADS depend on this snapshot; under `meshward agent` they
        # come from the node's agent (an api_config_source), which the control plane never sees.
        if not message.HasField("sds_config") or message.sds_config.HasField("ads"):
            secrets.add(message.name)
        return
    if full_name == _RDS:
        routes.add(message.route_config_name)
    ref_field = _CLUSTER_REFS.get(full_name)
    if ref_field is not None:
        value = getattr(message, ref_field)
        if value:
            clusters.add(value)
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if descriptor.is_repeated:
            if descriptor.message_type.GetOptions().map_entry:
                items = value.values()
                if descriptor.message_type.fields_by_name["value"].message_type is None:
                    continue
            else:
                items = value
            for item in items:
                _walk(item, secrets, clusters, routes)
        else:
            _walk(value, secrets, clusters, routes)


_NAME_BOUNDARY = r"(?:^|[\s,(]){name}: "


def rejected_names(error_detail: str, names: Iterable[str]) -> frozenset[str]:
    """Which of the resources of a NACKed response Envoy says it rejected.

    Envoy applies the valid resources of a response and lists the failed ones as
    ``Error adding/updating listener(s) <name>: <reason>`` (one per line for listeners,
    ``, ``-separated for clusters). An empty result means the message names none of them: the
    whole response was rejected (e.g. a proto constraint failure while decoding).
    """
    found = set()
    for name in names:
        if re.search(_NAME_BOUNDARY.format(name=re.escape(name)), error_detail, re.MULTILINE):
            found.add(name)
    return frozenset(found)
