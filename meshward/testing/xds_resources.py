"""Small real Envoy resources for tests and benchmarks of meshward.xds (json_format-built).

The local mesh these tests used to build here is :mod:`meshward.testing.mesh` now (product
packages do not import test support).
"""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import json_format

from meshward.xds.resources import Resource, make_resource

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


def cluster(name: str, port: int = 8080) -> Resource:
    message = json_format.ParseDict(
        {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "127.0.0.1",
                                            "port_value": port,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        },
        cluster_pb2.Cluster(),
    )
    return make_resource(message)


def listener(
    name: str, cluster_name: str = "app", *, port: int = 15006, secrets: bool = True, tag: str = ""
) -> Resource:
    chain: dict[str, Any] = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": HCM,
                    "stat_prefix": name + tag,
                    "route_config": {
                        "name": name,
                        "virtual_hosts": [
                            {
                                "name": "all",
                                "domains": ["*"],
                                "routes": [
                                    {"match": {"prefix": "/"}, "route": {"cluster": cluster_name}}
                                ],
                            }
                        ],
                    },
                    "http_filters": [
                        {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
                    ],
                },
            }
        ]
    }
    if secrets:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": TLS,
                "require_client_certificate": True,
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [
                        {"name": "default", "sds_config": {"ads": {}}}
                    ],
                    "validation_context_sds_secret_config": {
                        "name": "ROOTCA",
                        "sds_config": {"ads": {}},
                    },
                },
            },
        }
    message = json_format.ParseDict(
        {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [chain],
        },
        listener_pb2.Listener(),
    )
    return make_resource(message)


def secret(name: str, payload: str = "x") -> Resource:
    message = secret_pb2.Secret(name=name)
    message.validation_context.trusted_ca.inline_string = payload
    return make_resource(message)


def http_request(
    port: int,
    path: str,
    method: str = "GET",
    timeout: float = 5.0,
    *,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    """(status, body) of one HTTP/1.1 request to 127.0.0.1:port; (0, error) if the connection
    fails (e.g. a plaintext client refused by an mTLS-only listener)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()
