"""TLS for the mesh: downstream (inbound) and upstream (outbound) contexts with SDS secret names.

Certificates are never in listeners or clusters, only the SDS names ``default`` (the workload's
SVID) and ``ROOTCA`` (the trust bundle). In xDS mode Envoy fetches them over ADS; in static mode
a name alone refers to ``static_resources.secrets``.
"""

from __future__ import annotations

from typing import Any

from meshward.compile import names
from meshward.compile.options import Mode

Json = dict[str, Any]

T_DOWNSTREAM_TLS = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)
T_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
TLS_SOCKET = "envoy.transport_sockets.tls"
ALPN_HTTP = ["h2", "http/1.1"]


def sds(name: str, mode: Mode) -> Json:
    if mode is Mode.XDS:
        return {"name": name, "sds_config": {"ads": {}, "resource_api_version": "V3"}}
    return {"name": name}


def _common(mode: Mode, san: Json, alpn: list[str] | None) -> Json:
    common: Json = {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
        "tls_certificate_sds_secret_configs": [sds(names.SECRET_DEFAULT, mode)],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [san]},
            "validation_context_sds_secret_config": sds(names.SECRET_ROOTCA, mode),
        },
    }
    if alpn:
        common["alpn_protocols"] = alpn
    return common


def downstream_tls(mode: Mode, trust_domain: str, *, alpn: list[str] | None) -> Json:
    """Inbound mTLS: a client certificate is required and must carry a SPIFFE ID of our trust
    domain (RBAC then matches on that URI SAN)."""
    san = {"san_type": "URI", "matcher": {"prefix": f"spiffe://{trust_domain}/"}}
    return {
        "name": TLS_SOCKET,
        "typed_config": {
            "@type": T_DOWNSTREAM_TLS,
            "require_client_certificate": True,
            "common_tls_context": _common(mode, san, alpn),
        },
    }


def upstream_tls(mode: Mode, peer_spiffe_id: str, *, alpn: list[str] | None) -> Json:
    """Outbound mTLS with our SVID; the server must present exactly the peer's SPIFFE ID."""
    san = {"san_type": "URI", "matcher": {"exact": peer_spiffe_id}}
    return {
        "name": TLS_SOCKET,
        "typed_config": {
            "@type": T_UPSTREAM_TLS,
            "sni": peer_spiffe_id,
            "common_tls_context": _common(mode, san, alpn),
        },
    }
