"""Building CheckRequests the way Envoy does, and reading CheckResponses back: used by
`meshward extauthz check`, the tests and the benchmark."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from meshward.extauthz.authorizer import WORKLOAD_KEY


def build_check_request(
    *,
    method: str = "GET",
    path: str = "/",
    host: str = "",
    headers: Mapping[str, str] | None = None,
    source_principal: str = "",
    destination_principal: str = "",
    source_ip: str = "127.0.0.1",
    destination_port: int = 8080,
    workload: str | None = None,
    sni: str = "",
) -> Any:
    attrs = attribute_context_pb2.AttributeContext()
    attrs.source.principal = source_principal
    attrs.source.address.socket_address.address = source_ip
    attrs.source.address.socket_address.port_value = 40000
    attrs.destination.principal = destination_principal
    attrs.destination.address.socket_address.address = "127.0.0.1"
    attrs.destination.address.socket_address.port_value = destination_port
    http = attrs.request.http
    http.method = method
    http.path = path
    http.host = host
    http.protocol = "HTTP/1.1"
    all_headers = {":method": method, ":path": path, ":authority": host}
    all_headers.update({k.lower(): v for k, v in (headers or {}).items()})
    for key, value in all_headers.items():
        http.headers[key] = value
    if workload is not None:
        attrs.context_extensions[WORKLOAD_KEY] = workload
    if sni:
        attrs.tls_session.sni = sni
    return external_auth_pb2.CheckRequest(attributes=attrs)


def describe_response(response: Any) -> dict[str, Any]:
    """A CheckResponse as plain data: status, headers set/removed, body (parsed if JSON)."""
    out: dict[str, Any] = {"grpc_code": response.status.code}
    kind = response.WhichOneof("http_response")
    if kind == "ok_response":
        ok = response.ok_response
        out["http_status"] = 200
        out["headers"] = {h.header.key: h.header.value for h in ok.headers}
        out["headers_to_remove"] = list(ok.headers_to_remove)
        out["query_parameters_to_remove"] = list(ok.query_parameters_to_remove)
    elif kind == "denied_response":
        denied = response.denied_response
        out["http_status"] = denied.status.code
        out["headers"] = {h.header.key: h.header.value for h in denied.headers}
        try:
            out["body"] = json.loads(denied.body)
        except ValueError:
            out["body"] = denied.body
    else:
        out["http_status"] = 200 if response.status.code == 0 else 403
    if response.HasField("dynamic_metadata"):
        out["dynamic_metadata"] = {k: v for k, v in response.dynamic_metadata.items()}
    return out
