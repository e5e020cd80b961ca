"""Dicts in Envoy's v3 JSON form -> xds-protos messages.

Importing the ``*_pb2`` modules below registers every type that sits inside an ``Any`` of the
compiled resources; without them ``json_format.ParseDict`` cannot resolve an ``@type`` (and a
consumer walking the resources could not look inside them).
"""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2 as config_rbac_pb2  # noqa: F401
from envoy.config.route.v3 import route_pb2
from envoy.config.trace.v3 import opentelemetry_pb2  # noqa: F401  (registers types)
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2  # noqa: F401
from envoy.extensions.access_loggers.grpc.v3 import als_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # noqa: F401
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2  # noqa: F401
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_authn_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2  # noqa: F401
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2  # noqa: F401
from envoy.extensions.matching.common_inputs.ssl.v3 import ssl_inputs_pb2  # noqa: F401
from envoy.extensions.matching.input_matchers.ip.v3 import ip_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from envoy.type.matcher.v3 import http_inputs_pb2  # noqa: F401
from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory

from meshward.compile import fastparse

# Subtrees that hold no Any: not walked (an RBAC config with 1,000 rules is most of a listener).
_NO_ANY = frozenset(
    {
        "envoy.config.rbac.v3.Policy",
        "google.protobuf.Struct",
        "envoy.config.core.v3.Address",
        "envoy.type.matcher.v3.StringMatcher",
    }
)


def _parse(data: dict[str, Any], message: Any) -> Any:
    """``data`` as ``message``: by :mod:`meshward.compile.fastparse` (same bytes, a fraction of
    the CPU), or by ``json_format.ParseDict`` when ``data`` uses more of the JSON mapping."""
    try:
        return fastparse.parse(data, message)
    except (fastparse.Unsupported, ValueError, TypeError, KeyError):
        message.Clear()
    return slow_parse(data, message)


_MESSAGES: dict[str, Any] = {
    "listener": listener_pb2.Listener,
    "route": route_pb2.RouteConfiguration,
    "cluster": cluster_pb2.Cluster,
    "endpoint": endpoint_pb2.ClusterLoadAssignment,
}


def parse_reusing(
    kind: str, data: dict[str, Any], before: fastparse.Anys
) -> tuple[Any, fastparse.Anys]:
    """``data`` as a ``kind`` ("listener", "route", "cluster", "endpoint") message, taking the
    packed ``Any`` values of the resource's previous parse (``before``) where their source is
    unchanged (:class:`meshward.compile.fastparse.Reuse`); also this parse's ``Any`` values,
    for the next one (empty when the general path parsed it)."""
    message = _MESSAGES[kind]()
    reuse = fastparse.Reuse(before)
    try:
        fastparse.parse(data, message, reuse)
        return message, reuse.after
    except (fastparse.Unsupported, ValueError, TypeError, KeyError):
        message.Clear()
    return slow_parse(data, message), {}


def slow_parse(data: dict[str, Any], message: Any) -> Any:
    """The general path: ``json_format.ParseDict``, then every Any re-packed."""
    json_format.ParseDict(data, message)
    _repack(message)
    return message


def _repack(message: Any) -> None:
    """Re-pack every nested Any deterministically.

    ``json_format.ParseDict`` packs an ``@type`` object with a plain ``SerializeToString()``, so
    maps inside it (RBAC policies, access-log JSON formats) come out in hash order and the bytes
    change with PYTHONHASHSEED. Re-packing inner-first with ``deterministic=True`` makes the whole
    resource byte-identical for the same input.
    """
    if message.DESCRIPTOR.full_name in _NO_ANY:
        return
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                for key in value:
                    _visit(value[key])
        elif field.is_repeated:
            for item in value:
                _visit(item)
        else:
            _visit(value)


def unpack(packed: Any) -> Any:
    descriptor = descriptor_pool.Default().FindMessageTypeByName(packed.TypeName())
    inner = message_factory.GetMessageClass(descriptor)()
    packed.Unpack(inner)
    return inner


def _visit(message: Any) -> None:
    if message.DESCRIPTOR.full_name != "google.protobuf.Any":
        _repack(message)
        return
    inner = unpack(message)
    _repack(inner)
    packed = any_pb2.Any()
    packed.Pack(inner, deterministic=True)
    message.value = packed.value


def listener(data: dict[str, Any]) -> Any:
    return _parse(data, listener_pb2.Listener())


def route(data: dict[str, Any]) -> Any:
    return _parse(data, route_pb2.RouteConfiguration())


def cluster(data: dict[str, Any]) -> Any:
    return _parse(data, cluster_pb2.Cluster())


def endpoint(data: dict[str, Any]) -> Any:
    return _parse(data, endpoint_pb2.ClusterLoadAssignment())


def secret(data: dict[str, Any]) -> Any:
    return _parse(data, secret_pb2.Secret())
