"""A static Envoy sidecar with the ext_authz filter, for tests, the benchmark and trying the
service by hand without the control plane. The compiled (xDS) config uses the same settings:
``failure_mode_allow: false`` with a timeout (fail closed), per-route ``context_extensions``
naming the workload, and HTTP/2 to the ext_authz and OTLP clusters.
"""

from __future__ import annotations

from typing import Any

from meshward.envoy.bootstrap import (
    HCM,
    ROUTER,
    admin,
    grpc_cluster,
    socket_address,
    static_cluster,
)

EXTAUTHZ_CLUSTER = "meshward-extauthz"
OTLP_CLUSTER = "meshward-otlp"
T_EXTAUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
T_EXTAUTHZ_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
T_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
T_OTEL = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
T_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
T_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"

ACCESS_LOG_FORMAT = {
    "code": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "method": "%REQ(:METHOD):256%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH):1024%",
    "trace_id": "%TRACE_ID%",
    "ext_authz": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz)%",
}


def ext_authz_filter(*, timeout_ms: int = 250, cluster: str = EXTAUTHZ_CLUSTER) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": T_EXTAUTHZ,
            "grpc_service": {
                "envoy_grpc": {"cluster_name": cluster},
                "timeout": f"{timeout_ms / 1000:.3f}s",
            },
            "transport_api_version": "V3",
            "failure_mode_allow": False,  # fail closed: no answer -> 403
            "include_peer_certificate": True,
            "include_tls_session": True,
        },
    }


def ext_authz_per_route(workload: str, port: int | None = None) -> dict[str, Any]:
    extensions = {"workload": workload}
    if port is not None:
        extensions["port"] = str(port)
    return {"@type": T_EXTAUTHZ_ROUTE, "check_settings": {"context_extensions": extensions}}


def extauthz_upstream_tls(
    *, cert_chain: str, private_key: str, roots: str, server_id: str
) -> dict[str, Any]:
    """mTLS to ext_authz with inline PEMs (the compiled config uses SDS instead): present the
    workload's SVID, require ext_authz's SPIFFE ID."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": T_UPSTREAM_TLS,
            "sni": server_id,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"inline_string": cert_chain},
                        "private_key": {"inline_string": private_key},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"inline_string": roots},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": server_id}}
                    ],
                },
            },
        },
    }


def rbac_allow_paths(prefixes: list[str]) -> dict[str, Any]:
    """A native RBAC ALLOW filter on path prefixes: the benchmark's Python-free baseline."""
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": T_RBAC,
            "rules": {
                "action": "ALLOW",
                "policies": {
                    "paths": {
                        "permissions": [{"url_path": {"path": {"prefix": p}}} for p in prefixes],
                        "principals": [{"any": True}],
                    }
                },
            },
        },
    }


def sidecar(
    *,
    workload: str,
    extauthz_port: int | None,
    upstream_port: int | None = None,
    listen_port: int = 0,
    otlp_port: int | None = None,
    extra_filters: list[dict[str, Any]] | None = None,
    access_log_path: str | None = None,
    service_name: str = "sidecar",
    timeout_ms: int = 250,
    declared_port: int | None = None,
    extauthz_tls: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One HTTP listener named ``ingress``: [extra filters] -> [ext_authz] -> router, to
    ``upstream_port`` (or a 200 direct response when None). ``extauthz_port=None`` leaves the
    ext_authz filter out. With ``otlp_port``, Envoy traces every request over OTLP.
    ``extauthz_tls`` (:func:`extauthz_upstream_tls`): the ext_authz cluster's transport socket;
    ``meshward extauthz serve`` speaks only mTLS."""
    route: dict[str, Any] = {"match": {"prefix": "/"}}
    if upstream_port is None:
        route["direct_response"] = {"status": 200, "body": {"inline_string": "ok\n"}}
    else:
        route["route"] = {"cluster": "upstream", "timeout": "5s"}
    if extauthz_port is not None:
        route["typed_per_filter_config"] = {
            "envoy.filters.http.ext_authz": ext_authz_per_route(workload, declared_port)
        }
    filters = list(extra_filters or [])
    if extauthz_port is not None:
        filters.append(ext_authz_filter(timeout_ms=timeout_ms))
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}})
    hcm: dict[str, Any] = {
        "@type": HCM,
        "stat_prefix": "ingress",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "route_config": {
            "name": "ingress",
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}],
        },
        "http_filters": filters,
    }
    clusters: list[dict[str, Any]] = []
    if upstream_port is not None:
        clusters.append(static_cluster("upstream", "127.0.0.1", upstream_port))
    if extauthz_port is not None:
        cluster = grpc_cluster(
            EXTAUTHZ_CLUSTER, "127.0.0.1", extauthz_port, connect_timeout="0.25s"
        )
        if extauthz_tls is not None:
            cluster["transport_socket"] = extauthz_tls
        clusters.append(cluster)
    bootstrap: dict[str, Any] = {
        "node": {"id": f"{service_name}~{workload}", "cluster": service_name},
        "admin": admin(),
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": socket_address("127.0.0.1", listen_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }
    if access_log_path:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": T_FILE_LOG,
                    "path": access_log_path,
                    "log_format": {"json_format": ACCESS_LOG_FORMAT},
                },
            }
        ]
    if otlp_port is not None:
        clusters.append(grpc_cluster(OTLP_CLUSTER, "127.0.0.1", otlp_port))
        hcm["tracing"] = {
            "provider": {
                "name": "envoy.tracers.opentelemetry",
                "typed_config": {
                    "@type": T_OTEL,
                    "grpc_service": {"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": "1s"},
                    "service_name": service_name,
                },
            },
            "random_sampling": {"value": 100},
        }
        # Export spans within ~200 ms instead of Envoy's 5 s batches (tests wait for them).
        bootstrap["layered_runtime"] = {
            "layers": [
                {
                    "name": "otel-flush",
                    "static_layer": {
                        "tracing.opentelemetry.flush_interval_ms": 200,
                        "tracing.opentelemetry.min_flush_spans": 1,
                    },
                }
            ]
        }
    return bootstrap
