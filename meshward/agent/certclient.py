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

from cryptography.hazmat.primitives.asymmetric import ec

from meshward.agent.identity import Credentials, key_pem
from meshward.errors import UserError
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


class CertChannel:
    """One connection to the certificate service, reused for every call made with the same
    credentials (the agent's Renew and its Bundle polls): a TLS handshake costs the control
    plane several times what a call on an open connection does, and an agent polls the bundle
    every 30 s. Made for one ``context`` (one client certificate): when the SVID changes the
    agent closes this channel and opens another, so a connection never speaks for an SVID the
    agent no longer holds. The server identity is checked on every call (the connection may
    have been re-established underneath). A failed connection is dropped and the next call
    dials again."""

    def __init__(self, address: str, *, context: ssl.SSLContext, server_id: str) -> None:
        from meshward.xds.service import split_address

        self.address, self.server_id = address, server_id
        self._host, self._port = split_address(address)
        self._context = context
        self._channel: Any = None

    def _open(self) -> Any:
        from grpclib.client import Channel

        if self._channel is None:
            self._channel = Channel(self._host, self._port, ssl=self._context)
        return self._channel

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    async def call(self, method: str, message: dict[str, Any], *, timeout: float = 10.0
                   ) -> dict[str, Any]:  # fmt: skip
        """One unary call; the decoded JSON reply, or CertCallFailed."""
        from grpclib.const import Cardinality
        from grpclib.exceptions import GRPCError, StreamTerminatedError

        try:
            async with self._open().request(
                f"/{SERVICE}/{method}", Cardinality.UNARY_UNARY, _Raw, _Raw, timeout=timeout
            ) as stream:
                await stream.send_request()
                peer = stream.peer
                cert = (peer.cert() if peer is not None else None) or {}
                uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
                if self.server_id not in uris:
                    self.close()
                    raise CertCallFailed(
                        "PERMISSION_DENIED",
                        f"the control plane at {self.address} presented "
                        f"{uris or 'no URI SAN'}, not {self.server_id}; nothing was sent",
                    )
                body = json.dumps(message, separators=(",", ":")).encode()
                await stream.send_message(_Raw(body), end=True)
                reply = await stream.recv_message()
                await stream.recv_trailing_metadata()
        except GRPCError as exc:
            raise CertCallFailed(exc.status.name, exc.message or "") from None
        except (OSError, StreamTerminatedError, TimeoutError, ssl.SSLError) as exc:
            self.close()
            raise CertCallFailed("UNAVAILABLE", f"{type(exc).__name__}: {exc}") from None
        return _decode_reply(reply)


def _decode_reply(reply: bytes | None) -> dict[str, Any]:
    if reply is None or len(reply) > MAX_MESSAGE * 4:
        raise CertCallFailed("UNKNOWN", "no (or an oversized) reply")
    try:
        decoded = json.loads(reply)
    except ValueError:
        raise CertCallFailed("UNKNOWN", "the reply is not JSON") from None
    if not isinstance(decoded, dict):
        raise CertCallFailed("UNKNOWN", "the reply is not a JSON object")
    return decoded


async def call(
    address: str,
    method: str,
    message: dict[str, Any],
    *,
    context: ssl.SSLContext,
    server_id: str,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """One unary call on a connection of its own (a join: nothing to reuse yet); the decoded
    JSON reply, or CertCallFailed."""
    channel = CertChannel(address, context=context, server_id=server_id)
    try:
        return await channel.call(method, message, timeout=timeout)
    finally:
        channel.close()


__all__ = ["BUNDLE", "JOIN", "RENEW", "CertCallFailed", "CertChannel", "call", "mtls_context",
           "server_only_context"]  # fmt: skip


def credentials_from_reply(
    key: ec.EllipticCurvePrivateKey, reply: dict[str, Any], address: str, spiffe_id: str
) -> Credentials:
    """The credentials a Join or Renew reply gives for ``key``: the chain must be for
    ``key`` (checked by Credentials.build) and name ``spiffe_id``; anything else is a failed
    call, never credentials to serve."""
    try:
        fresh = Credentials.build(
            key_pem(key),
            str(reply["cert_chain"]).encode(),
            str(reply["trust_bundle"]).encode(),
            f"the SVID from {address}",
        )
    except (KeyError, UserError) as exc:
        raise CertCallFailed("UNKNOWN", f"unusable reply: {exc}") from None
    if fresh.spiffe_id != spiffe_id:
        raise CertCallFailed("UNKNOWN", f"got an SVID for {fresh.spiffe_id}, not {spiffe_id}")
    return fresh
