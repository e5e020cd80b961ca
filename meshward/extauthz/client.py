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


# ---- Check over mTLS ---------------------------------------------------------------------------

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"


class CheckFailed(Exception):
    """The call did not produce a CheckResponse: refused (PERMISSION_DENIED), unreachable, TLS."""


class CheckClient:
    """Checks over mTLS, presenting an SVID, as a sidecar does. grpclib (pure-Python HTTP/2) with
    the standard library's TLS, because grpcio's client insists on the server's DNS name and
    SVIDs carry only a SPIFFE URI: the chain is verified against the trust bundle and the
    server's URI SAN against ``server_id`` (what Envoy's compiled cluster does too).

    Use from one event loop: ``await client.check(request)``; ``close()`` when done.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        cert_chain_pem: bytes,
        key_pem: bytes,
        roots_pem: bytes,
        server_id: str | None,
    ) -> None:
        from meshward.certs.client_tls import client_ssl_context

        self.host, self.port, self.server_id = host, port, server_id
        self._ssl = client_ssl_context(cert_chain_pem, key_pem, roots_pem)
        self._channel: Any = None  # made on first use, in the caller's event loop

    async def check(self, request: Any, timeout: float = 5.0) -> Any:
        from grpclib.client import Channel
        from grpclib.const import Cardinality
        from grpclib.exceptions import GRPCError, StreamTerminatedError

        if self._channel is None:
            self._channel = Channel(self.host, self.port, ssl=self._ssl)
        try:
            async with self._channel.request(
                CHECK_METHOD,
                Cardinality.UNARY_UNARY,
                external_auth_pb2.CheckRequest,
                external_auth_pb2.CheckResponse,
                timeout=timeout,
            ) as stream:
                await stream.send_request()
                self._verify(stream)
                await stream.send_message(request, end=True)
                response = await stream.recv_message()
                await stream.recv_trailing_metadata()
        except GRPCError as exc:
            raise CheckFailed(f"{exc.status.name} {exc.message or ''}".strip()) from None
        except (OSError, StreamTerminatedError, TimeoutError) as exc:
            raise CheckFailed(f"{type(exc).__name__}: {exc}") from None
        if response is None:
            raise CheckFailed("the server closed the call without a CheckResponse")
        return response

    def _verify(self, stream: Any) -> None:
        if self.server_id is None:
            return
        cert = stream.peer.cert() or {}
        uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
        if self.server_id not in uris:
            raise CheckFailed(f"the server presented {uris or 'no URI SAN'}, not {self.server_id}")

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def check_once(
    host: str,
    port: int,
    request: Any,
    *,
    cert_chain_pem: bytes,
    key_pem: bytes,
    roots_pem: bytes,
    server_id: str | None,
    timeout: float = 5.0,
) -> Any:
    """One Check over mTLS from synchronous code (``meshward extauthz check``, tests)."""
    import asyncio

    async def run() -> Any:
        client = CheckClient(
            host,
            port,
            cert_chain_pem=cert_chain_pem,
            key_pem=key_pem,
            roots_pem=roots_pem,
            server_id=server_id,
        )
        try:
            return await client.check(request, timeout)
        finally:
            client.close()

    return asyncio.run(run())
