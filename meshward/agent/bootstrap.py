"""The Envoy bootstrap the agent renders (pure: values in, dict out).

It is :func:`meshward.xds.bootstrap.render_bootstrap` with two changes:

- a static cluster ``meshward-sds`` (HTTP/2, a Unix socket address) to the agent's SDS;
- the ADS cluster's TLS takes its client certificate (``default``) and its trust bundle
  (``ROOTCA``) from that SDS instead of files: the ADS stream authenticates with the same
  short-lived, renewed SVID as the data plane, so no longer-lived credential exists on the node
  and nothing expires unnoticed.

Compiled listeners and clusters fetch ``default``/``ROOTCA`` through ``meshward-sds`` too (the
control plane serves no workload secret: :mod:`meshward.xds.agentsds`).
"""

from __future__ import annotations

from typing import Any

from meshward.envoy.bootstrap import HTTP_PROTOCOL_OPTIONS
from meshward.xds.agentsds import SDS_CLUSTER
from meshward.xds.bootstrap import (
    UPSTREAM_TLS,
    XDS_CLUSTER,
    AdsCredentials,
    render_bootstrap,
)
from meshward.xds.nodeid import NodeId

METADATA_AGENT = "meshward.dev/agent"


def sds_cluster(socket_path: str) -> dict[str, Any]:
    return {
        "name": SDS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": SDS_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": socket_path}}}}]}
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_PROTOCOL_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }


def _sds(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {
            "resource_api_version": "V3",
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}],
            },
        },
    }


def ads_tls_from_sds(server_identity: str) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UPSTREAM_TLS,
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificate_sds_secret_configs": [_sds("default")],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"exact": server_identity}}
                        ]
                    },
                    "validation_context_sds_secret_config": _sds("ROOTCA"),
                },
                "alpn_protocols": ["h2"],
            },
        },
    }


def render_agent_bootstrap(
    node: NodeId,
    xds_host: str,
    xds_port: int,
    *,
    server_identity: str,
    sds_socket: str,
    admin_socket: str,
    delta: bool = True,
    runtime: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``runtime``: extra Envoy runtime keys, in a static layer over Meshward's own, then an
    admin layer (as Envoy has by default) so an operator on the 0600 admin socket can still
    override a key with ``runtime_modify`` (the runbooks' NACK triage shows one)."""
    placeholder = AdsCredentials(b"-", b"-", b"-")  # replaced below: nothing is inlined
    config = render_bootstrap(
        node,
        xds_host,
        xds_port,
        server_identity=server_identity,
        credentials=placeholder,
        delta=delta,
        admin_socket=admin_socket,
        metadata={METADATA_AGENT: "true"},
    )
    clusters = config["static_resources"]["clusters"]
    for cluster in clusters:
        if cluster["name"] == XDS_CLUSTER:
            cluster["transport_socket"] = ads_tls_from_sds(server_identity)
    clusters.insert(0, sds_cluster(sds_socket))
    if runtime:
        layers = config.setdefault("layered_runtime", {"layers": []})["layers"]
        values = {k: int(v) if v.isdigit() else v for k, v in runtime.items()}
        layers.append({"name": "meshward-agent", "static_layer": values})
        layers.append({"name": "admin", "admin_layer": {}})
    return config
