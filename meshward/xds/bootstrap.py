"""A sidecar's Envoy bootstrap for Meshward's ADS server (pure: values in, dict out).

The bootstrap holds exactly one thing besides the node and the admin socket (a Unix socket,
mode 0600: no TCP admin any local process could use): how to reach the control plane.
Everything else (listeners, clusters, routes, endpoints) arrives over ADS; secrets never do.

- ``ads_config``: ``api_type`` GRPC (state of the world) or DELTA_GRPC (incremental), V3,
  ``set_node_on_first_message_only``; LDS and CDS from ``ads`` (DESIGN.md field notes).
- Cluster ``meshward-xds``: :func:`meshward.envoy.bootstrap.grpc_cluster` (HTTP/2: without it
  ADS hangs in PRE_INITIALIZING) with mTLS: the client certificate is the workload's own SVID,
  and the server must be ``spiffe://<td>/ns/<root namespace>/sa/meshward-xds``.
- Where that SVID comes from: under `meshward agent`, the agent's SDS socket
  (:mod:`meshward.agent.bootstrap`); for an Envoy the operator runs, ``secrets_dir``: the files
  ``meshward bootstrap`` keeps there, read through file-based SDS (:mod:`meshward.xds.filesds`),
  watched, so ``meshward bootstrap --renew`` reaches a running Envoy. The node metadata names
  that directory, so the control plane points the node's compiled TLS contexts at the same
  files. (``credentials``: PEM inline or file paths for the ADS connection alone, for tests.)
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshward.compile.observe import NODE_WORKLOAD_METADATA
from meshward.envoy.admin import ADMIN_SOCKET_FILE, admin_pipe
from meshward.envoy.bootstrap import grpc_cluster
from meshward.envoy.runtime import re2_runtime
from meshward.xds.filesds import METADATA_SECRETS_DIR, check_secrets_dir, sds_secret_config
from meshward.xds.nodeid import NodeId

XDS_CLUSTER = "meshward-xds"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
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


def ads_tls_from_files(secrets_dir: str, server_identity: str) -> dict[str, Any]:
    """The ADS cluster's TLS with ``default`` and ``ROOTCA`` from file-based SDS."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UPSTREAM_TLS,
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificate_sds_secret_configs": [sds_secret_config(secrets_dir, "default")],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"exact": server_identity}}
                        ]
                    },
                    "validation_context_sds_secret_config": sds_secret_config(
                        secrets_dir, "ROOTCA"
                    ),
                },
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
    credentials: AdsCredentials | None = None,
    secrets_dir: str | None = None,
    delta: bool = False,
    admin_socket: str = ADMIN_SOCKET_FILE,
    metadata: Mapping[str, str] | None = None,
    connect_timeout: str = "1s",
) -> dict[str, Any]:
    """The bootstrap dict (Envoy v3 JSON form) for ``node``; ``delta`` picks DELTA_GRPC.
    ``secrets_dir`` (as Envoy sees it) or ``credentials``: where the ADS client certificate
    comes from (see the module docstring)."""
    cluster = grpc_cluster(XDS_CLUSTER, xds_host, xds_port, connect_timeout=connect_timeout)
    if secrets_dir is not None:
        secrets_dir = check_secrets_dir(secrets_dir)
        cluster["transport_socket"] = ads_tls_from_files(secrets_dir, server_identity)
    elif credentials is not None:
        cluster["transport_socket"] = ads_tls_context(credentials, server_identity)
    else:
        raise ValueError("render_bootstrap needs secrets_dir or credentials")
    if not _is_ip(xds_host):
        cluster["type"] = "STRICT_DNS"
    cluster["upstream_connection_options"] = {
        "tcp_keepalive": {"keepalive_time": 30, "keepalive_interval": 10, "keepalive_probes": 3}
    }
    node_metadata = {METADATA_WORKLOAD: node.workload_ref}
    if node.instance:
        node_metadata[METADATA_INSTANCE] = node.instance
    if secrets_dir is not None:
        node_metadata[METADATA_SECRETS_DIR] = secrets_dir
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
