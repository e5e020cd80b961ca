"""Access logs and tracing for compiled listeners.

The JSON access-log fields are a contract with ``meshward denials`` and the demo: a denial carries
``response_code_details`` (``rbac_access_denied_matched_policy[ns[..]-policy[..]-rule[..]]`` or
``ext_authz_denied``), the RBAC dynamic metadata (enforced and shadow/dry-run results) and the
trace id, so one line says who was denied, by which rule, and where to find the trace.
"""

from __future__ import annotations

from typing import Any

from meshward.compile import names
from meshward.compile.options import AccessLogFormat, CompileOptions

Json = dict[str, Any]

T_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
T_OTEL = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"

# Request-controlled fields are cut to these many bytes (Envoy's %REQ(X):N%), so a 16 KiB path
# or a 60 KiB header cannot make every log line that large (issue 13). The total size of the file
# is bounded by whoever runs Envoy rotating it (meshward.envoy.logrotate in the demo).
MAX_PATH_LOG = 1024
MAX_HEADER_LOG = 256

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
    ``upstream_cluster`` (``outbound|<port>||<name>.<ns>``), so every outbound listener of a
    workload shares one log config."""
    if not options.access_log_path:
        return []
    fields = dict(TCP_LOG_FIELDS if tcp else HTTP_LOG_FIELDS)
    static = {"workload": workload, "direction": direction}
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
        }
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
