"""A sidecar's Envoy bootstrap for Meshward's ADS server (pure: values in, dict out).

The bootstrap holds exactly one thing besides the node and the admin socket (a Unix socket,
mode 0600: no TCP admin any local process could use): how to reach the control plane. Everything else (listeners, clusters, routes, endpoints, secrets) arrives over ADS.

- ``ads_config``: ``api_type`` GRPC (state of the world) or DELTA_GRPC (incremental), V3,
  ``set_node_on_first_message_only``; LDS and CDS from ``ads`` (DESIGN.md field notes).
- Cluster ``meshward-xds``: :func:`meshward.envoy.bootstrap.grpc_cluster` (HTTP/2: without it
  ADS hangs in PRE_INITIALIZING) with mTLS.
- First-connection credentials (written by ``meshward bootstrap --ca DIR``): an SVID for the
  workload's own identity (``xds-cert.pem`` + ``xds-key.pem``, default TTL 24 h) and the trust
  bundle (``xds-ca.pem``). Envoy presents them to the ADS server, which only lets that identity
  act as this workload's node, and verifies the server is ``spiffe://<td>/ns/<root
  namespace>/sa/meshward-xds``. They are used for the ADS connection only: the data-plane SVID
  (``default``) comes over SDS and is renewed by the control plane. The files are watched
  (``watched_directory``): re-running ``meshward bootstrap`` before they expire refreshes them
  in a running Envoy without a restart.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshward.compile.observe import NODE_WORKLOAD_METADATA
from meshward.envoy.admin import ADMIN_SOCKET_FILE, admin_pipe
from meshward.envoy.bootstrap import grpc_cluster
from meshward.envoy.runtime import re2_runtime
from meshward.xds.nodeid import NodeId

XDS_CLUSTER = "meshward-xds"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
CERT_FILE, KEY_FILE, CA_FILE = "xds-cert.pem", "xds-key.pem", "xds-ca.pem"
BOOTSTRAP_FILE = "envoy.json"
METADATA_WORKLOAD = NODE_WORKLOAD_METADATA  # outbound access logs read it (compile.observe)
METADATA_INSTANCE = "meshward.dev/instance"
#: Envoy command-line flags to run a sidecar with. Policy edits do not need them: the rules live
#: in the route config (RDS), which applies to open connections at their next request. A
#: listener is still replaced when a port's mTLS mode or its set of authorization filters
#: changes (the first DENY policy, ext_authz becoming needed, ...); Envoy's default then drains
#: the old listener's connections (which keep its chain and route) gradually over 600 s. These
#: flags close them at their next response instead.
ENVOY_ARGS = ("--drain-time-s", "5", "--drain-strategy", "immediate")


@dataclass(frozen=True)
class AdsCredentials:
    """Where Envoy finds its ADS client credentials: file paths, or PEM bytes to inline.

    ``watched_directory``: the directory holding the files, watched by Envoy for replacements
    (files only; ignored for inline credentials).
    """

    certificate_chain: str | bytes
    private_key: str | bytes
    trusted_ca: str | bytes
    watched_directory: str | None = None

    @classmethod
    def in_directory(cls, directory: str | Path) -> AdsCredentials:
        d = str(directory).rstrip("/")
        return cls(f"{d}/{CERT_FILE}", f"{d}/{KEY_FILE}", f"{d}/{CA_FILE}", d)


def _source(value: str | bytes) -> dict[str, str]:
    if isinstance(value, bytes):
        return {"inline_bytes": base64.b64encode(value).decode()}
    return {"filename": value}


def ads_tls_context(credentials: AdsCredentials, server_identity: str) -> dict[str, Any]:
    certificate: dict[str, Any] = {
        "certificate_chain": _source(credentials.certificate_chain),
        "private_key": _source(credentials.private_key),
    }
    validation: dict[str, Any] = {
        "trusted_ca": _source(credentials.trusted_ca),
        "match_typed_subject_alt_names": [
            {"san_type": "URI", "matcher": {"exact": server_identity}}
        ],
    }
    files = not any(
        isinstance(v, bytes)
        for v in (credentials.certificate_chain, credentials.private_key, credentials.trusted_ca)
    )
    if credentials.watched_directory and files:
        certificate["watched_directory"] = {"path": credentials.watched_directory}
        validation["watched_directory"] = {"path": credentials.watched_directory}
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UPSTREAM_TLS,
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificates": [certificate],
                "validation_context": validation,
                "alpn_protocols": ["h2"],
            },
        },
    }


def render_bootstrap(
    node: NodeId,
    xds_host: str,
    xds_port: int,
    *,
    server_identity: str,
    credentials: AdsCredentials,
    delta: bool = False,
    admin_socket: str = ADMIN_SOCKET_FILE,
    metadata: Mapping[str, str] | None = None,
    connect_timeout: str = "1s",
) -> dict[str, Any]:
    """The bootstrap dict (Envoy v3 JSON form) for ``node``; ``delta`` picks DELTA_GRPC."""
    cluster = grpc_cluster(XDS_CLUSTER, xds_host, xds_port, connect_timeout=connect_timeout)
    cluster["transport_socket"] = ads_tls_context(credentials, server_identity)
    if not _is_ip(xds_host):
        cluster["type"] = "STRICT_DNS"
    cluster["upstream_connection_options"] = {
        "tcp_keepalive": {"keepalive_time": 30, "keepalive_interval": 10, "keepalive_probes": 3}
    }
    node_metadata = {METADATA_WORKLOAD: node.workload_ref}
    if node.instance:
        node_metadata[METADATA_INSTANCE] = node.instance
    node_metadata.update(metadata or {})
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": str(node), "cluster": node.envoy_cluster(), "metadata": node_metadata},
        "admin": admin_pipe(admin_socket),  # a 0600 Unix socket: no TCP admin for anyone
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
            },
            "lds_config": ads,
            "cds_config": ads,
        },
        "static_resources": {"clusters": [cluster]},
        "layered_runtime": re2_runtime(),  # the RE2 limit policy validation checks against
    }


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
