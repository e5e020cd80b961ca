"""Building blocks for Envoy bootstraps, as plain dicts in Envoy's v3 JSON form.

The compiler and the control plane produce protos; bootstraps are small and read by people, so
they stay dicts (``json_format.ParseDict`` turns one into a proto when a test wants it).
"""

from __future__ import annotations

from typing import Any

from meshward.envoy.admin import ADMIN_SOCKET_FILE, admin_pipe

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HTTP_PROTOCOL_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def static_cluster(
    name: str, host: str, port: int, *, connect_timeout: str = "1s"
) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": socket_address(host, port)}}]}
            ],
        },
    }


def grpc_cluster(name: str, host: str, port: int, *, connect_timeout: str = "1s") -> dict[str, Any]:
    """A cluster Envoy speaks gRPC to (ADS, ext_authz, OTLP).

    Without explicit HTTP/2 protocol options Envoy speaks HTTP/1.1 to it: ADS then hangs in
    PRE_INITIALIZING with no warning, and ext_authz answers every request 403 (DESIGN.md).
    """
    cluster = static_cluster(name, host, port, connect_timeout=connect_timeout)
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HTTP_PROTOCOL_OPTIONS,
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return cluster


def admin(path: str = ADMIN_SOCKET_FILE) -> dict[str, Any]:
    """Admin on a Unix socket, mode 0600 (relative paths: Envoy's working directory;
    :class:`meshward.envoy.EnvoyProcess` places them in its workdir)."""
    return admin_pipe(path)


def http_proxy_listener(
    name: str,
    port: int,
    cluster: str,
    *,
    host: str = "127.0.0.1",
    http_filters: list[dict[str, Any]] | None = None,
    access_log_path: str | None = None,
) -> dict[str, Any]:
    """A plaintext HTTP listener that routes everything to one cluster."""
    hcm: dict[str, Any] = {
        "@type": HCM,
        "stat_prefix": name,
        "route_config": {
            "name": name,
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                }
            ],
        },
        "http_filters": [
            *(http_filters or []),
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
        ],
    }
    if access_log_path:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": access_log_path,
                },
            }
        ]
    return {
        "name": name,
        "address": socket_address(host, port),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def static_proxy(
    upstream_port: int,
    *,
    listen_port: int = 0,
    upstream_host: str = "127.0.0.1",
    node_id: str = "meshward-static",
    access_log_path: str | None = None,
) -> dict[str, Any]:
    """The smallest useful bootstrap: one listener proxying to one upstream."""
    return {
        "node": {"id": node_id, "cluster": node_id},
        "admin": admin(),
        "static_resources": {
            "listeners": [
                http_proxy_listener(
                    "ingress", listen_port, "upstream", access_log_path=access_log_path
                )
            ],
            "clusters": [static_cluster("upstream", upstream_host, upstream_port)],
        },
    }
