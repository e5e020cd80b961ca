"""Calls to the control plane's certificate service (:mod:`meshward.xds.certservice`).

grpclib (pure-Python HTTP/2) over the standard library's TLS, as the project's other clients:
grpcio's client insists on the server's DNS name and SVIDs carry only a SPIFFE URI. The server
chain is verified against the mesh roots and its URI SAN must be the control plane's identity.
Messages are the service's JSON objects (see its docstring).
"""

from __future__ import annotations

import json
import ssl
from typing import Any

from meshward.xds.certservice import BUNDLE, JOIN, MAX_MESSAGE, RENEW, SERVICE


class CertCallFailed(Exception):
    """A call that did not return an SVID; ``code`` is the gRPC status name (or "UNAVAILABLE"
    for a connection that failed), ``retryable`` whether trying again later can help."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code

    @property
    def retryable(self) -> bool:
        return self.code in {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "INTERNAL",
                             "UNKNOWN"}  # fmt: skip


class _Raw(bytes):
    """Bytes that grpclib's protobuf codec passes through unchanged."""

    def SerializeToString(self) -> bytes:
        return bytes(self)

    @classmethod
    def FromString(cls, data: bytes) -> _Raw:
        return cls(data)


def server_only_context(roots_pem: bytes) -> ssl.SSLContext:
    """TLS that authenticates the control plane only (first contact: no client certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # no DNS names in SVIDs: the URI SAN is checked instead
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=roots_pem.decode())
    context.set_alpn_protocols(["h2"])
    return context


def mtls_context(chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> ssl.SSLContext:
    from meshward.certs.client_tls import client_ssl_context

    return client_ssl_context(chain_pem, key_pem, roots_pem)


async def call(
    address: str,
    method: str,
    message: dict[str, Any],
    *,
    context: ssl.SSLContext,
    server_id: str,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """One unary call; the decoded JSON reply, or CertCallFailed."""
    from grpclib.client import Channel
    from grpclib.const import Cardinality
    from grpclib.exceptions import GRPCError, StreamTerminatedError

    from meshward.xds.service import split_address

    host, port = split_address(address)
    channel = Channel(host, port, ssl=context)
    try:
        async with channel.request(
            f"/{SERVICE}/{method}", Cardinality.UNARY_UNARY, _Raw, _Raw, timeout=timeout
        ) as stream:
            await stream.send_request()
            peer = stream.peer
            cert = (peer.cert() if peer is not None else None) or {}
            uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
            if server_id not in uris:
                raise CertCallFailed(
                    "PERMISSION_DENIED",
                    f"the control plane at {address} presented {uris or 'no URI SAN'}, "
                    f"not {server_id}; nothing was sent",
                )
            body = json.dumps(message, separators=(",", ":")).encode()
            await stream.send_message(_Raw(body), end=True)
            reply = await stream.recv_message()
            await stream.recv_trailing_metadata()
    except GRPCError as exc:
        raise CertCallFailed(exc.status.name, exc.message or "") from None
    except (OSError, StreamTerminatedError, TimeoutError, ssl.SSLError) as exc:
        raise CertCallFailed("UNAVAILABLE", f"{type(exc).__name__}: {exc}") from None
    finally:
        channel.close()
    if reply is None or len(reply) > MAX_MESSAGE * 4:
        raise CertCallFailed("UNKNOWN", "no (or an oversized) reply")
    try:
        decoded = json.loads(reply)
    except ValueError:
        raise CertCallFailed("UNKNOWN", "the reply is not JSON") from None
    if not isinstance(decoded, dict):
        raise CertCallFailed("UNKNOWN", "the reply is not a JSON object")
    return decoded


__all__ = ["BUNDLE", "JOIN", "RENEW", "CertCallFailed", "call", "mtls_context",
           "server_only_context"]  # fmt: skip
