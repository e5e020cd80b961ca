"""The certificate service: node agents send CSRs, the control plane signs them (keys stay home).

Service ``meshward.certs.v1.Certificates``, three unary methods:

- ``Join``: first contact. ``{"workload", "instance", "csr", "token"}`` with a join token
  (:mod:`meshward.certs.jointoken`); served on its own port (``--join-listen``) over TLS that
  authenticates the control plane only (the agent verifies the server certificate against the
  mesh root it was given): a node has no client certificate before its first SVID.
- ``Renew``: ``{"workload", "instance", "csr"}``; the caller is authenticated by its current SVID
  (mTLS). Served on the ADS port, whose listener already requires and verifies client
  certificates against the live trust bundle and follows CA rotations, so a renewal is
  authenticated exactly as the ADS stream is.
- ``Bundle``: ``{}`` -> the trust bundle (mTLS, ADS port): agents poll it to follow rotations.

Agents make Renew and their polls on one connection per SVID (a handshake costs the control
plane more than a call). TLS checked the client certificate at the handshake only, so a call on
a connection whose certificate has expired since is refused (UNAUTHENTICATED,
``certificate-expired``): a connection never speaks longer than its certificate.

Two ports rather than one because grpcio's Python server credentials either require a verified
client certificate or never ask for one: there is no "verify if presented" mode to tell a join
from a renewal on one port.

Messages are UTF-8 JSON objects (at most :data:`MAX_MESSAGE` bytes), not compiled protobuf: the
payload is four strings, a generated ``_pb2`` would need protoc at build time for no gain, and
JSON keeps the wire readable with ``grpcurl``-like tools. Responses:
``{"spiffe_id", "cert_chain", "trust_bundle", "not_before", "not_after", "serial",
"bundle_version"}`` (PEM strings, ISO-8601 times).

Identity is never taken from the CSR: the control plane decides it (join token's workload or the
caller's certificate, mapped through the policy's service account) and the CSR must agree.
Per-identity limits reuse :mod:`meshward.xds.limits`: a token bucket of CSRs per identity
(``--svid-rate``/``--svid-burst``) and at most ``--max-instances`` agent instances per identity
seen within ``--node-gc-after``. Refusals: UNAUTHENTICATED (no or an expired client
certificate), PERMISSION_DENIED (identity, token),
INVALID_ARGUMENT (bad message or CSR), RESOURCE_EXHAUSTED (limits), each with a message that says
why; logged once per identity and reason per minute (:class:`RefusalLog`).
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from meshward.certs.jointoken import JoinRefused, UsedTokens
from meshward.certs.jointoken import verify as verify_token
from meshward.certs.spiffe import InvalidSpiffeId, parse_spiffe_id
from meshward.errors import UserError
from meshward.xds.limits import (
    INSTANCE_LIMIT,
    MAX_TRACKED,
    SVID_RATE_LIMIT,
    NodeLimits,
    RefusalLog,
    SvidRateLimiter,
)
from meshward.xds.nodeid import InvalidNodeId, NodeId

log = logging.getLogger("meshward.certs.service")
audit = logging.getLogger("meshward.xds.audit")

SERVICE = "meshward.certs.v1.Certificates"
JOIN, RENEW, BUNDLE = "Join", "Renew", "Bundle"
MAX_MESSAGE = 64 * 1024
_MAX_FIELD = 16 * 1024


class Refusal(Exception):
    """A request refused with a gRPC status and a message safe to show the caller."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason = code, reason


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode()


def decode(data: bytes, required: tuple[str, ...]) -> dict[str, str]:
    """A request object with string fields; Refusal(INVALID_ARGUMENT) for anything else."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if len(data) > MAX_MESSAGE:
        raise Refusal(bad, "malformed", f"request larger than {MAX_MESSAGE} bytes")
    try:
        message = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise Refusal(bad, "malformed", "request is not a UTF-8 JSON object") from None
    if not isinstance(message, dict):
        raise Refusal(bad, "malformed", "request is not a JSON object")
    for name in required:
        value = message.get(name)
        if not isinstance(value, str) or not value or len(value) > _MAX_FIELD:
            raise Refusal(bad, "malformed", f"request field {name!r} missing or not a string")
    return {k: v for k, v in message.items() if isinstance(v, str)}


class InstanceRegistry:
    """Agent instances seen per identity within ``window`` seconds (bounded, pure: ``now``)."""

    def __init__(self, limit: int, window: float, *, max_tracked: int = MAX_TRACKED) -> None:
        self.limit, self.window, self.max_tracked = limit, window, max_tracked
        self._seen: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()

    def admit(self, identity: str, instance: str, now: float) -> bool:
        instances = self._seen.get(identity)
        if instances is None:
            instances = self._seen[identity] = OrderedDict()
            while len(self._seen) > self.max_tracked:
                self._seen.popitem(last=False)
        self._seen.move_to_end(identity)
        for key in [k for k, at in instances.items() if now - at >= self.window]:
            del instances[key]
        if instance not in instances and len(instances) >= self.limit:
            return False
        instances[instance] = now
        instances.move_to_end(instance)
        return True


class PeerCache:
    """The SPIFFE ID and expiry of a call's verified client certificate, looked up once per
    certificate (least recently used first out past ``max_entries``). An agent makes its Renew
    and its bundle polls on one open connection, so every call of it presents the same
    certificate; parsing it per call would cost more than a Bundle call's own work.

    The identity comes from the SANs gRPC's TLS already decoded into the call's auth context
    (``x509_subject_alternative_name``: every DNS/URI/email/IP SAN; ``peer_uri``: the URIs):
    an SVID has exactly one SAN and it is a ``spiffe://`` URI. Decoding the certificate's
    extensions again in Python cost about as much as the rest of a renewal's lookup; only the
    expiry is read from the certificate itself. gRPC lists no other SAN kinds (otherName,
    directoryName); only certificates TLS verified against this CA's roots get here, and the
    CA signs exactly one URI SAN (CSRs asking for any other kind are refused)."""

    def __init__(self, max_entries: int = MAX_TRACKED) -> None:
        self.max_entries = max_entries
        self._seen: OrderedDict[bytes, tuple[str | None, datetime]] = OrderedDict()

    def lookup(self, context: Any) -> tuple[str | None, datetime] | None:
        """(SPIFFE ID or None if not an SVID, not_after), or None without a certificate."""
        auth = context.auth_context() or {}
        pems = auth.get("x509_pem_cert") or []
        if not pems:
            return None
        pem = bytes(pems[0])
        hit = self._seen.get(pem)
        if hit is not None:
            self._seen.move_to_end(pem)
            return hit
        try:
            not_after = x509.load_pem_x509_certificate(pem).not_valid_after_utc
        except ValueError:
            return None
        entry = (_svid_identity(auth), not_after)
        self._seen[pem] = entry
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        return entry


def _svid_identity(auth: dict[str, Any]) -> str | None:
    """The SPIFFE ID of the peer's certificate from gRPC's auth context: its one and only SAN,
    a valid ``spiffe://`` URI; None for anything else (the rule of :func:`meshward.certs.verify.spiffe_id_of`)."""
    sans = [bytes(v) for v in auth.get("x509_subject_alternative_name") or []]
    uris = [bytes(v) for v in auth.get("peer_uri") or []]
    if len(sans) != 1 or uris != sans:
        return None
    try:
        return str(parse_spiffe_id(sans[0].decode()))
    except (InvalidSpiffeId, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class Issued:
    identity: str
    response: bytes
    serial: int


class CertService:
    """Signs agents' CSRs for the control plane ``control`` (a :class:`ControlPlane`)."""

    def __init__(
        self,
        control: Any,  # meshward.xds.controlplane.ControlPlane
        *,
        join_key: bytes | None,
        state_dir: Path | None,
        limits: NodeLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``join_key``: the join-token MAC key (None: joins refused); ``state_dir``: where
        spent token ids are recorded (required with a key)."""
        if join_key is not None and state_dir is None:
            raise ValueError("join tokens need a state directory to record spent ones")
        self.control = control
        self.join_key = join_key
        self.used = UsedTokens(state_dir) if join_key is not None and state_dir else None
        self.limits = limits or NodeLimits()
        self.clock = clock
        self.limiter = SvidRateLimiter(self.limits)
        self.instances = InstanceRegistry(self.limits.max_instances, self.limits.node_gc_after)
        self.refusals = RefusalLog(audit)
        self.counts: dict[str, int] = {}
        self.peers = PeerCache()
        self._bundle: tuple[Any, tuple[int, ...], str, str] | None = None
        self._metric_children: dict[str, Any] = {}
        self._join_server: grpc.aio.Server | None = None
        self.join_port: int | None = None

    # -- the pure-ish core (no gRPC) -----------------------------------------------------------
    def _identity_for(self, workload: str) -> tuple[NodeId, str]:
        try:
            node = NodeId.parse(workload)
        except InvalidNodeId as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "malformed", str(exc)) from None
        if node.instance:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "malformed", "workload must be NS/NAME")
        return node, self.control.expected_identity(node)

    def _sign(self, identity: str, csr: str, instance: str, now: datetime) -> Issued:
        at = self.clock()
        if not self.instances.admit(identity, instance[:128], at):
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                INSTANCE_LIMIT,
                f"{identity} already has {self.limits.max_instances} agent instance(s) active, "
                "the most one identity may have (--max-instances)",
            )
        if not self.limiter.allow(identity, at):
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                SVID_RATE_LIMIT,
                f"{identity} sent CSRs faster than {self.limits.svid_rate:g}/s (burst "
                f"{self.limits.svid_burst}; --svid-rate, --svid-burst); retry later",
            )
        ca = self.control.ca
        try:
            svid = ca.issue_for_csr(csr.encode(), identity, ttl=self.control.svid_ttl, now=now)
        except UserError as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "bad-csr", str(exc)) from None
        roots_pem, version = self._trust_bundle(now)
        response = encode(
            {
                "spiffe_id": svid.spiffe_id,
                "cert_chain": svid.cert_chain_pem.decode(),
                "trust_bundle": roots_pem,
                "bundle_version": version,
                "not_before": svid.not_before.isoformat(),
                "not_after": svid.not_after.isoformat(),
                "serial": f"{svid.serial:x}",
            }
        )
        return Issued(identity, response, svid.serial)

    async def join(self, request: bytes, now: datetime) -> Issued:
        """First contact with a join token (no client certificate). The token is reserved
        before signing and its spent record is durable before the SVID is returned; the fsync
        is shared with the other joins in flight and runs off the event loop."""
        message = decode(request, ("workload", "csr", "token"))
        node, identity = self._identity_for(message["workload"])
        if self.join_key is None or self.used is None:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                "joins-disabled",
                "this control plane accepts no join tokens (started without a CA directory)",
            )
        try:
            claims = verify_token(self.join_key, message["token"], workload=str(node), now=now)
            line = self.used.reserve(claims, now)
        except JoinRefused as exc:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, exc.reason, str(exc)) from None
        try:
            issued = self._sign(identity, message["csr"], message.get("instance", ""), now)
            await self.used.commit(line)  # durable before the SVID leaves
        except BaseException:
            self.used.release(claims)  # nothing was issued: the token is still unspent
            raise
        return issued

    def renew(
        self, request: bytes, certificate: tuple[str | None, datetime] | None, now: datetime
    ) -> Issued:
        """A renewal authenticated by the caller's current SVID (verified by TLS); ``certificate``:
        :meth:`PeerCache.lookup` of the call."""
        message = decode(request, ("workload", "csr"))
        node, identity = self._identity_for(message["workload"])
        peer = self._authenticated(
            certificate,
            now,
            "Renew needs the caller's current SVID as its client certificate (mTLS, on the "
            "ADS port); first contact uses Join with a join token",
        )
        if peer != identity:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                "identity-mismatch",
                f"a certificate for {peer} may not renew {identity} (workload {node})",
            )
        return self._sign(identity, message["csr"], message.get("instance", ""), now)

    @staticmethod
    def _authenticated(
        peer: tuple[str | None, datetime] | None, now: datetime, missing: str
    ) -> str | None:
        """The caller's SPIFFE ID (None: a certificate that is not an SVID); Refusal without a
        client certificate or with one that has expired since the connection was made (TLS
        checked it at the handshake only, and agents keep their connection open)."""
        if peer is None:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "no-client-certificate", missing)
        identity, not_after = peer
        if not_after <= now:
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "certificate-expired",
                f"the client certificate this connection was opened with expired at "
                f"{not_after:%Y-%m-%d %H:%M:%SZ}; connect again with a current SVID",
            )
        return identity

    def _trust_bundle(self, now: datetime) -> tuple[str, str]:
        """(roots PEM, version) of the CA's bundle at ``now``, encoded once per set of trusted
        generations (a rotation, an expired grace period or a reloaded CA makes a new set):
        every reply carries it and it changes a few times a year."""
        ca = self.control.ca
        trusted = tuple(g.number for g in ca.generations if g.trusted(now))
        cached = self._bundle
        if cached is None or cached[0] is not ca or cached[1] != trusted:
            bundle = ca.trust_bundle(now=now)
            cached = self._bundle = (ca, trusted, bundle.roots_pem.decode(), bundle.version)
        return cached[2], cached[3]

    def bundle(self, now: datetime) -> bytes:
        roots_pem, version = self._trust_bundle(now)
        return encode({"trust_bundle": roots_pem, "bundle_version": version})

    # -- gRPC ----------------------------------------------------------------------------------
    def _count(self, outcome: str, seconds: float | None = None) -> None:
        """``outcome``: ``METHOD:result`` (result ok, error or a refusal reason: a fixed set, so
        the metric's labels are bounded); ``seconds``: how long a signed CSR took."""
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        metrics = getattr(self.control, "metrics", None)
        if metrics is None:
            return
        method, result = outcome.split(":", 1)
        # The labelled children looked up once each (a fixed set; see above).
        counter = self._metric_children.get(outcome)
        if counter is None:
            counter = self._metric_children[outcome] = metrics.svid_requests.labels(method, result)
        counter.inc()
        if seconds is not None:
            histogram = self._metric_children.get(method)
            if histogram is None:
                histogram = self._metric_children[method] = metrics.svid_issuance.labels(method)
            histogram.observe(seconds)

    async def _refuse(self, method: str, exc: Refusal, context: Any) -> None:
        self._count(f"{method}:{exc.reason}")
        # Keyed by identity; every caller without a certificate shares one key, so a flood
        # of new connections logs one line a minute, not one per connection.
        seen = self.peers.lookup(context)
        who = seen[0] if seen else None
        self.refusals.refused(
            who or "anonymous",
            exc.reason,
            f"certificate {method} refused for {who or context.peer()}: {exc}",
            self.clock(),
        )
        await context.abort(exc.code, f"{exc.reason}: {exc}")

    async def _failed(self, method: str, context: Any) -> None:
        """grpcio would swallow the exception: log it, fail closed."""
        log.exception("certificate %s failed", method)
        self._count(f"{method}:error")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; nothing issued")

    def _done(self, method: str, result: Issued | bytes, started: float) -> bytes:
        if isinstance(result, Issued):
            self._count(f"{method}:ok", time.perf_counter() - started)
            # A join spends a token (first contact: an audit line at INFO); a renewal logs at
            # DEBUG, as SPIRE logs its signings: one line per renewal was a tenth of its
            # event-loop time, and the count and latency of issuances are in the metrics.
            log.log(logging.INFO if method == JOIN else logging.DEBUG,
                    "SVID for %s issued by CSR (%s), serial %x", result.identity,
                    method.lower(), result.serial)  # fmt: skip
            return result.response
        self._count(f"{method}:ok")
        return result

    def _wrap(
        self, method: str, fn: Callable[[bytes, Any], Issued | bytes | Awaitable[Issued]]
    ) -> Callable[[bytes, Any], Awaitable[bytes]]:
        """One handler shape for every method: refusals abort with their reason, anything
        else fails closed (nothing issued), and successes are counted and timed."""

        async def handler(request: bytes, context: Any) -> bytes:
            started = time.perf_counter()
            try:
                result = fn(request, context)
                if inspect.isawaitable(result):  # Join waits for the token store
                    result = await result
            except Refusal as exc:
                await self._refuse(method, exc, context)
                raise  # unreachable: abort raises
            except Exception:
                await self._failed(method, context)
                raise
            return self._done(method, result, started)

        return handler

    def handler(self) -> grpc.GenericRpcHandler:
        def now() -> datetime:  # looked up per call: the control plane's clock may be replaced
            return self.control.wall_clock()  # type: ignore[no-any-return]

        handlers = {
            JOIN: self._wrap(JOIN, lambda req, ctx: self.join(req, now())),
            RENEW: self._wrap(
                RENEW, lambda req, ctx: self.renew(req, self.peers.lookup(ctx), now())
            ),
            BUNDLE: self._wrap(BUNDLE, lambda req, ctx: self._bundle_for(ctx, now())),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in handlers.items()},
        )

    def _bundle_for(self, context: Any, now: datetime) -> bytes:
        self._authenticated(
            self.peers.lookup(context),
            now,
            "Bundle needs a client certificate (mTLS, on the ADS port)",
        )
        return self.bundle(now)

    async def start_join(self, address: str, server_tls: Any) -> int:
        """Listen for joins on ``address`` with the ADS server's certificate (no client auth)."""
        from meshward.xds.server import AddressInUse

        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_concurrent_streams", 64),
            ]
        )
        server.add_generic_rpc_handlers((self.handler(),))
        try:
            port = server.add_secure_port(address, _server_only(server_tls))
        except RuntimeError:
            port = 0
        if not port:
            raise AddressInUse(f"cannot listen for joins on {address}: the address is in use")
        await server.start()
        self._join_server, self.join_port = server, int(port)
        return self.join_port

    async def stop(self) -> None:
        if self._join_server is not None:
            await self._join_server.stop(0.5)
            self._join_server = None


def _server_only(server_tls: Any) -> grpc.ServerCredentials:
    """Credentials following ``server_tls`` (renewals, rotations) that ask for no client cert."""
    last = [server_tls.current()]

    def config() -> grpc.ServerCertificateConfiguration:
        key, chain, _roots = last[0]
        return grpc.ssl_server_certificate_configuration([(key, chain)])

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        current = server_tls.current()
        if current == last[0]:
            return None
        last[0] = current
        return config()

    return grpc.dynamic_ssl_server_credentials(config(), fetch, require_client_authentication=False)
