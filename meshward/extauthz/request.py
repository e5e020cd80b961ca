"""Step 1 of a Check (OPA-Envoy's "request"): the CheckRequest protobuf read into plain values,
or a Rejection when it is malformed or over the limits.

Nothing here knows about policy: the later steps never touch the protobuf, so each can be
tested with plain values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshward.extauthz.result import Rejection
from meshward.extauthz.tokens import payload_from_metadata

# ExtAuthzPerRoute check_settings.context_extensions keys (set by meshward.compile).
WORKLOAD_KEY = "workload"  # "<ns>/<name>"
PORT_KEY = "port"  # the declared service port the request arrived on (runtime ports differ)
MAX_PATH_BYTES = 16 * 1024
MAX_HEADERS = 512
MAX_HEADER_BYTES = 96 * 1024  # Envoy's own default limit is 60 KiB


@dataclass(frozen=True)
class HttpCheck:
    """One CheckRequest's HTTP attributes, as Envoy sent them (path not yet normalized)."""

    method: str
    raw_path: str
    host: str
    headers: Mapping[str, str]
    source_principal: str | None
    source_ip: str | None
    destination_ip: str | None
    destination_port: int  # the declared port when the route names one, else the socket's
    destination_principal: str
    workload: str  # context_extensions.workload, "" when the route set none
    sni: str | None
    metadata: Any  # the CheckRequest's metadata_context (jwt_authn's verified payload)

    def jwt_payload(self) -> Mapping[str, Any] | None:
        """The payload Envoy's jwt_authn verified (jwtEnforcement: native), if any."""
        return payload_from_metadata(self.metadata)


def read(request: Any) -> HttpCheck | Rejection:
    """The CheckRequest's HTTP attributes, or why they cannot be authorized at all."""
    attrs = request.attributes
    http = attrs.request.http
    method = http.method
    raw_path = http.path
    if not method or not raw_path:
        return Rejection(
            403,
            "malformed CheckRequest: no HTTP method/path in attributes.request.http",
            "malformed_request",
            method=method,
            path=raw_path,
        )
    headers: Mapping[str, str] = http.headers
    if not headers and len(http.header_map.headers):
        headers = header_map(http.header_map)
    too_big = oversized(raw_path, headers)
    if too_big:
        return Rejection(403, too_big, "request_too_large", method=method, path=raw_path[:256])
    dest = attrs.destination.address.socket_address
    declared = attrs.context_extensions.get(PORT_KEY)  # rules name declared ports
    return HttpCheck(
        method=method,
        raw_path=raw_path,
        host=http.host,
        headers=headers,
        source_principal=attrs.source.principal or None,
        source_ip=attrs.source.address.socket_address.address or None,
        destination_ip=dest.address or None,
        destination_port=(
            int(declared)
            if declared and declared.isascii() and declared.isdigit()
            else dest.port_value
        ),
        destination_principal=attrs.destination.principal,
        workload=attrs.context_extensions.get(WORKLOAD_KEY, ""),
        sni=attrs.tls_session.sni or None,
        metadata=attrs.metadata_context,
    )


def header_map(header_map: Any) -> dict[str, str]:
    """Envoy sends ``header_map`` instead of ``headers`` when ``encode_raw_headers`` is set."""
    out: dict[str, str] = {}
    for entry in header_map.headers:
        value = entry.value or entry.raw_value.decode("utf-8", "replace")
        key = entry.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def oversized(path: str, headers: Mapping[str, str]) -> str:
    """Why the request is over ext_authz's limits, or "" (bounded work and memory per Check)."""
    if len(path) > MAX_PATH_BYTES:
        return f"request too large: path of {len(path)} bytes (limit {MAX_PATH_BYTES})"
    if len(headers) > MAX_HEADERS:
        return f"request too large: {len(headers)} headers (limit {MAX_HEADERS})"
    if len(headers) > 64:
        size = sum(len(k) + len(v) for k, v in headers.items())
        if size > MAX_HEADER_BYTES:
            return f"request too large: {size} bytes of headers (limit {MAX_HEADER_BYTES})"
    return ""
