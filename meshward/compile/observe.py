"""Access logs and tracing for compiled listeners.

The JSON access-log fields are a contract with ``meshward denials`` and the demo: a denial carries
``response_code_details`` (``rbac_access_denied_matched_policy[ns[..]-policy[..]-rule[..]]`` or
``ext_authz_denied``), the RBAC dynamic metadata (enforced and shadow/dry-run results) and the
trace id, so one line says who was denied, by which rule, and where to find the trace.
"""

from __future__ import annotations

from typing import Any

from meshward.compile import names
from meshward.compile.options import AccessLogFormat, CompileOptions, Mode

Json = dict[str, Any]

T_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
T_OTEL = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"

# Request-controlled fields are cut to these many bytes (Envoy's %REQ(X):N%), so a 16 KiB path
# or a 60 KiB header cannot make every log line that large (issue 13). The total size of the file
# is bounded by whoever runs Envoy rotating it (meshward.envoy.logrotate in the demo).
MAX_PATH_LOG = 1024
MAX_HEADER_LOG = 256

#: The node metadata key the xDS bootstrap sets to the node's workload ("ns/name"). In xDS mode
#: outbound access logs read the caller from it (``%CEL(xds.node.metadata[...])%``), not from a
#: literal: the outbound listener for a peer is then the same bytes for every caller, built and
#: packed once per peer instead of once per (caller, peer) pair (namespace-wide rules over N
#: services would otherwise cost N^2 listeners).
NODE_WORKLOAD_METADATA = "meshward.dev/workload"
NODE_WORKLOAD = f"%CEL(xds.node.metadata['{NODE_WORKLOAD_METADATA}'])%"

# Field names of the JSON access log (the denials reader keys on them).
HTTP_LOG_FIELDS: dict[str, str] = {
    "time": "%START_TIME%",
    "method": f"%REQ(:METHOD):{MAX_HEADER_LOG}%",
    "path": f"%REQ(:PATH):{MAX_PATH_LOG}%",
    "authority": f"%REQ(:AUTHORITY):{MAX_HEADER_LOG}%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "response_flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "peer_principal": "%DOWNSTREAM_PEER_URI_SAN%",
    "source_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "sni": "%REQUESTED_SERVER_NAME%",
    "upstream_host": "%UPSTREAM_HOST%",
    "request_id": f"%REQ(X-REQUEST-ID):{MAX_HEADER_LOG}%",
    "trace_id": "%TRACE_ID%",
    "rbac": f"%DYNAMIC_METADATA({names.RBAC_METADATA_NAMESPACE})%",
    "ext_authz": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz)%",
}
TCP_LOG_FIELDS: dict[str, str] = {
    "time": "%START_TIME%",
    "response_flags": "%RESPONSE_FLAGS%",
    "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%",
    "duration_ms": "%DURATION%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "peer_principal": "%DOWNSTREAM_PEER_URI_SAN%",
    "source_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "upstream_host": "%UPSTREAM_HOST%",
    "rbac": f"%DYNAMIC_METADATA({names.NETWORK_RBAC_METADATA_NAMESPACE})%",
}


def access_log(
    options: CompileOptions,
    *,
    workload: str,
    direction: str,
    port: int | None = None,
    tcp: bool = False,
) -> list[Json]:
    """Inbound logs name the declared port; outbound logs name the peer through
    ``upstream_cluster`` (``outbound|<port>||<name>.<ns>``) and, in xDS mode, the caller through
    the node's metadata (:data:`NODE_WORKLOAD`), so every caller's outbound listener for a peer
    is the same. The flow log (:func:`flow_log`) rides along."""
    flows = flow_log(options, workload=workload, direction=direction, port=port, tcp=tcp)
    if not options.access_log_path:
        return flows
    fields = dict(TCP_LOG_FIELDS if tcp else HTTP_LOG_FIELDS)
    shared = direction == "outbound" and options.mode is Mode.XDS
    static = {"workload": NODE_WORKLOAD if shared else workload, "direction": direction}
    if port is not None:
        static["port"] = str(port)
    else:
        fields["upstream_cluster"] = "%UPSTREAM_CLUSTER%"
    if options.access_log_format is AccessLogFormat.JSON:
        log_format: Json = {"json_format": {**static, **fields}}
    else:
        text = " ".join(f"{k}={v}" for k, v in {**static, **fields}.items())
        log_format = {"text_format_source": {"inline_string": text + "\n"}}
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": T_FILE_LOG,
                "path": options.access_log_path,
                "log_format": log_format,
            },
        },
        *flows,
    ]


def tracing(options: CompileOptions, service_name: str) -> Json | None:
    """OpenTelemetry spans to the ``meshward-otlp`` cluster; None when no collector is set."""
    if options.otlp is None:
        return None
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": T_OTEL,
                "grpc_service": {
                    "envoy_grpc": {"cluster_name": names.CLUSTER_OTLP},
                    "timeout": "1s",
                },
                "service_name": service_name,
            },
        },
    }


# ---- flow logs (Envoy gRPC ALS to the control plane's collector, meshward.flows) ------------

T_HTTP_GRPC_LOG = (
    "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"
)
T_TCP_GRPC_LOG = (
    "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.TcpGrpcAccessLogConfig"
)
T_CEL_FILTER = "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"
FLOW_LOG_NAME = "meshward-flows"
#: Custom tags every flow log entry carries (the collector keys on them).
TAG_WORKLOAD, TAG_DIRECTION, TAG_PORT, TAG_KIND = "workload", "direction", "port", "kind"
#: The caller's trace context: its trace id is the flow's (the span id differs per hop).
FLOW_REQUEST_HEADERS = ("traceparent",)
#: Outbound flow logs keep only refusals the caller's own sidecar saw: no route, the peer
#: unreachable or refusing the TLS handshake (an mTLS refusal seen from the caller's side).
OUTBOUND_FAILURE_FLAGS = ("NR", "UF", "UH", "URX")
#: Connection-level (listener) flow logs keep only refused connections: a failed TLS handshake
#: (no client certificate, untrusted certificate) or no filter chain (plaintext to STRICT).
CONNECTION_REFUSED_CEL = 'connection.transport_failure_reason != "" || response.flags != 0'


def _flow_common(cluster: str, tags: dict[str, str]) -> Json:
    return {
        "log_name": FLOW_LOG_NAME,
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
        "transport_api_version": "V3",
        "buffer_flush_interval": "0.5s",
        "custom_tags": [{"tag": k, "literal": {"value": v}} for k, v in sorted(tags.items())],
    }


def flow_log(
    options: CompileOptions,
    *,
    workload: str,
    direction: str,
    port: int | None = None,
    tcp: bool = False,
) -> list[Json]:
    """The gRPC access logger to the flow collector (meshward.flows), or nothing without
    ``options.flow_log_cluster``. Inbound HTTP logs every request (the callee decides);
    outbound logs only the caller-side refusals (OUTBOUND_FAILURE_FLAGS), so a flow is not
    counted twice. Outbound logs carry no workload tag: the collector attributes them to the
    node that opened the ALS stream (its first message names it, and the node is authenticated
    by its certificate), so the outbound listener for a peer is the same for every caller."""
    if options.flow_log_cluster is None:
        return []
    tags = {TAG_DIRECTION: direction, TAG_KIND: "tcp" if tcp else "http"}
    if direction != "outbound":
        tags[TAG_WORKLOAD] = workload
    if port is not None:
        tags[TAG_PORT] = str(port)
    common = _flow_common(options.flow_log_cluster, tags)
    logger: Json
    if tcp:
        logger = {
            "name": "envoy.access_loggers.tcp_grpc",
            "typed_config": {"@type": T_TCP_GRPC_LOG, "common_config": common},
        }
    else:
        logger = {
            "name": "envoy.access_loggers.http_grpc",
            "typed_config": {
                "@type": T_HTTP_GRPC_LOG,
                "common_config": common,
                "additional_request_headers_to_log": list(FLOW_REQUEST_HEADERS),
            },
        }
    if direction == "outbound":
        logger["filter"] = {"response_flag_filter": {"flags": list(OUTBOUND_FAILURE_FLAGS)}}
    return [logger]


def connection_flow_log(options: CompileOptions, *, workload: str, port: int) -> list[Json]:
    """The listener's own access log: connections refused before any HTTP (mTLS handshake
    failures, plaintext to a STRICT port), which no connection manager ever sees."""
    if options.flow_log_cluster is None:
        return []
    tags = {TAG_WORKLOAD: workload, TAG_DIRECTION: "inbound", TAG_PORT: str(port),
            TAG_KIND: "connection"}  # fmt: skip
    return [
        {
            "name": "envoy.access_loggers.tcp_grpc",
            "filter": {
                "extension_filter": {
                    "name": "envoy.access_loggers.extension_filters.cel",
                    "typed_config": {"@type": T_CEL_FILTER, "expression": CONNECTION_REFUSED_CEL},
                }
            },
            "typed_config": {
                "@type": T_TCP_GRPC_LOG,
                "common_config": _flow_common(options.flow_log_cluster, tags),
            },
        }
    ]
