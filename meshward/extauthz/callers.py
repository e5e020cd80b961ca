"""Who may ask ext_authz a question: mTLS callers holding a mesh sidecar identity, and only
about their own workload (issue 13).

Why: a Check answered for anyone on the host is a policy oracle, and its denials land in the
decision log as if they were real traffic (``meshward denials`` then shows forged requests). So
Check is served over mTLS only (a server SVID for ``spiffe://<td>/ns/<root ns>/sa/meshward-extauthz``
from the mesh CA, a client certificate required and verified against the trust bundle), and
before a Check reaches the decision cache or the log, :func:`caller_refusal` checks that

- the client certificate carries the SPIFFE ID of a workload of the policy set (a sidecar's
  SVID: Envoy presents its SDS ``default`` secret on the ext_authz cluster), and
- the Check is about that workload: its ``context_extensions.workload`` is one of the workloads
  with that identity, and its ``destination.principal`` (set by Envoy for an mTLS inbound
  connection: the sidecar's own SVID) is empty or that identity.

Anything else is answered with gRPC PERMISSION_DENIED and nothing else (Envoy fails closed: 403).

Credentials are files, as ``meshward ca issue`` writes them (``cert-chain.pem``, ``key.pem``,
``root-cert.pem``); a changed set is picked up for new connections without a restart.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshward.certs.cli import CHAIN_FILE, KEY_FILE, ROOTS_FILE
from meshward.compile.names import extauthz_spiffe_id
from meshward.errors import UserError
from meshward.extauthz.authorizer import WORKLOAD_KEY

if TYPE_CHECKING:
    from meshward.certs.server_tls import ServerTls

log = logging.getLogger("meshward.extauthz")

# Refusal kinds (the metric label): no identity can only happen on a plaintext test server.
NO_IDENTITY, NOT_A_WORKLOAD, OTHER_WORKLOAD, NO_WORKLOAD = (
    "no_identity",
    "not_a_workload",
    "other_workload",
    "no_workload",
)


# ---- the pure rule -----------------------------------------------------------------------------


def identities(policy_set: Any) -> dict[str, frozenset[str]]:
    """SPIFFE ID -> refs of the workloads that hold it (several may share a service account)."""
    index: dict[str, set[str]] = {}
    trust_domain = policy_set.mesh.trust_domain
    for workload in policy_set.workloads:
        index.setdefault(workload.spiffe_id(trust_domain), set()).add(workload.ref)
    return {k: frozenset(v) for k, v in index.items()}


def caller_refusal(
    index: Mapping[str, frozenset[str]], peer: str | None, request: Any
) -> tuple[str, str] | None:
    """None if ``peer`` (the verified client certificate's SPIFFE ID) may ask this Check, else
    (kind, why). Pure: no I/O, and it reads only the Check's workload claims."""
    if not peer:
        return NO_IDENTITY, "no client certificate with a SPIFFE ID"
    refs = index.get(peer)
    if not refs:
        return NOT_A_WORKLOAD, f"caller {peer[:200]} is not the identity of a workload of the mesh"
    attrs = request.attributes
    claimed = attrs.context_extensions.get(WORKLOAD_KEY, "")
    destination = attrs.destination.principal
    if destination and destination != peer:
        return OTHER_WORKLOAD, (
            f"caller {peer} asked about destination {destination[:200]}; a sidecar may ask "
            "only about its own workload"
        )
    if claimed and claimed not in refs:
        return OTHER_WORKLOAD, (
            f"caller {peer} asked about workload {claimed[:200]}; a sidecar may ask only about "
            f"its own workload ({', '.join(sorted(refs))})"
        )
    if not claimed and not destination:
        return NO_WORKLOAD, "the Check names no workload (context_extensions.workload)"
    return None


# ---- the gate the gRPC servers call ------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _identity_of_pem(pem: bytes) -> str | None:
    from cryptography import x509

    from meshward.certs.verify import SvidVerificationError, spiffe_id_of

    try:
        return str(spiffe_id_of(x509.load_pem_x509_certificate(pem)))
    except (ValueError, SvidVerificationError):
        return None


def peer_identity(context: Any) -> str | None:
    """The SPIFFE ID of the client certificate gRPC verified (None on a plaintext server).
    Parsed once per distinct certificate: a sidecar keeps its connection and its SVID."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    return _identity_of_pem(bytes(pems[0])) if pems else None


class CallerGate:
    """``gate(request, peer) -> refusal text or None`` against the authorizer's current policy
    set; counts refusals (``meshward_extauthz_refused_checks_total{reason}``) and logs at most one
    line per 10 s, so a flood of forged Checks cannot flood the server log either."""

    def __init__(self, policy_set: Callable[[], Any], *, metrics: Any = None) -> None:
        self._policy_set = policy_set
        self._metrics = metrics
        self._index: tuple[str, dict[str, frozenset[str]]] = ("", {})
        self._lock = threading.Lock()
        self._last_log = 0.0
        self.refused = 0

    def _identities(self) -> dict[str, frozenset[str]]:
        current = self._policy_set()
        version, index = self._index
        if version != current.version:
            index = identities(current)
            self._index = (current.version, index)
        return index

    def __call__(self, request: Any, peer: str | None) -> str | None:
        try:
            refusal = caller_refusal(self._identities(), peer, request)
        except Exception:  # grpcio would swallow it: log, and refuse (fail closed)
            log.exception("checking the caller failed; refusing the Check")
            return "refused: internal error checking the caller"
        if refusal is None:
            return None
        kind, why = refusal
        with self._lock:
            self.refused += 1
            now = time.monotonic()
            loud = now - self._last_log >= 10.0
            if loud:
                self._last_log = now
        if self._metrics is not None:
            self._metrics.refused.labels(kind).inc()
        if loud:
            log.warning("Check refused before any decision: %s", why, extra={"refusal": kind})
        return f"refused: {why}"


# ---- credentials -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """An SVID directory as ``meshward ca issue`` writes it."""

    directory: Path

    @property
    def paths(self) -> tuple[Path, Path, Path]:
        d = self.directory
        return d / KEY_FILE, d / CHAIN_FILE, d / ROOTS_FILE

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(key, chain, roots) PEM bytes; UserError naming what is missing."""
        missing = [p.name for p in self.paths if not p.is_file()]
        if missing:
            raise UserError(
                f"--tls-dir {self.directory}: missing {', '.join(missing)} (write them with "
                "`meshward ca issue --spiffe-id ... --out DIR`)"
            )
        key, chain, roots = (p.read_bytes() for p in self.paths)
        return key, chain, roots

    def stamp(self) -> tuple[float, ...]:
        stamps = []
        for path in self.paths:
            try:
                stamps.append(path.stat().st_mtime)
            except OSError:
                stamps.append(0.0)
        return tuple(stamps)


def certificate_identity(chain_pem: bytes, where: str) -> str:
    """The SPIFFE ID of the first certificate of ``chain_pem``; UserError if it has none."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from meshward.certs.pem import load_certificates

    leaf = load_certificates(chain_pem, where)[0]
    identity = _identity_of_pem(leaf.public_bytes(Encoding.PEM))
    if identity is None:
        raise UserError(f"{where}: the certificate carries no valid SPIFFE ID")
    return identity


def expected_server_identity(policy_set: Any) -> str:
    """The SPIFFE ID sidecars require of ext_authz (its compiled cluster's SAN match)."""
    return extauthz_spiffe_id(policy_set.mesh)


def server_tls(files: TlsFiles, policy_set: Any) -> Any:
    """Dynamic server credentials from ``files`` (client certificates required), after checking
    the certificate is the ext_authz identity the sidecars will require."""
    from meshward.certs.server_tls import ServerTls

    key, chain, roots = files.read()
    identity = certificate_identity(chain, f"--tls-dir {files.directory}")
    expected = expected_server_identity(policy_set)
    if identity != expected:
        raise UserError(
            f"--tls-dir {files.directory}: the certificate is for {identity}, but sidecars "
            f"accept only {expected} as ext_authz; issue one with "
            f"`meshward ca issue --spiffe-id {expected} --out DIR`"
        )
    return ServerTls(key, chain, roots)


def watch_tls(files: TlsFiles, tls: Any, interval: float) -> Callable[[], None]:
    """Poll ``files``; hand a changed, complete set to ``tls`` (new connections use it).
    Returns stop()."""
    stop = threading.Event()
    last = files.stamp()

    def run() -> None:
        nonlocal last
        while not stop.wait(interval):
            stamp = files.stamp()
            if stamp == last:
                continue
            try:
                tls.update(*files.read())
            except (OSError, UserError) as exc:
                log.warning("ext_authz credentials changed but cannot be read: %s", exc)
                continue
            last = stamp
            log.info("ext_authz credentials reloaded", extra={"tls_dir": str(files.directory)})

    thread = threading.Thread(target=run, name="extauthz-tls-watch", daemon=True)
    thread.start()

    def stopper() -> None:
        stop.set()
        with contextlib.suppress(RuntimeError):
            thread.join(interval + 1)

    return stopper


def write_credentials(directory: Path, svid: Any, roots_pem: bytes) -> TlsFiles:
    """Write an SVID (a meshward.certs.Svid) and the trust bundle as ``--tls-dir`` expects."""
    from meshward.certs import files

    files.ensure_dir(directory)
    files.write_private(directory / KEY_FILE, svid.private_key_pem, overwrite=True)
    files.write_public(directory / CHAIN_FILE, svid.cert_chain_pem)
    files.write_public(directory / ROOTS_FILE, roots_pem)
    return TlsFiles(directory)


class CaCredentials:
    """ext_authz's SVID issued from the mesh CA in ``directory`` (``serve --ca``) by the control
    plane's own class (:class:`meshward.certs.server_identity.ServerCertificate`): signed by the
    oldest trusted CA generation (clients may hold an old bundle), renewed at about half life,
    re-trusting clients when the CA on disk changes (``meshward ca rotate``: the CA is reloaded,
    the bundle's new roots verify the sidecars' new SVIDs) and re-issued when its generation is
    no longer trusted, so ext_authz follows a root rotation like the sidecars do.
    The alternative, ``--tls-dir``, keeps the CA key out of ext_authz; then renewing the files
    is the operator's job (they are reloaded when they change)."""

    def __init__(self, directory: Path, spiffe_id: str, *, ttl_seconds: float = 3600.0) -> None:
        from datetime import timedelta

        from meshward.certs.ca import CertificateAuthority
        from meshward.certs.reload import CaReloader
        from meshward.certs.rotation import RotationSchedule
        from meshward.certs.server_identity import ServerCertificate

        self.ca = CertificateAuthority.load(directory)
        self._reloader = CaReloader(directory)
        self.schedule = RotationSchedule()
        self.certificate = ServerCertificate(
            lambda: spiffe_id, timedelta(seconds=ttl_seconds), self.schedule,
            label="ext_authz", log=log,
        )  # fmt: skip
        self._bundle = ""

    def make_tls(self, now: datetime) -> ServerTls:
        """Issue the certificate; the (renewable) TLS config to serve."""
        self._bundle = self.ca.trust_bundle(now=now).version
        return self.certificate.make_tls(self.ca, now)

    def maintain(self, now: datetime) -> None:
        """What the control plane's maintenance does for its own certificate: follow the CA on
        disk, hand a changed bundle to the certificate, renew it when due."""
        self.ca = self._reloader.reload(self.ca)
        bundle = self.ca.trust_bundle(now=now)
        if bundle.version != self._bundle:
            self.certificate.bundle_changed(self.ca, bundle.roots_pem, now)
            self._bundle = bundle.version
            log.info("ext_authz trust bundle changed: clients verified against its roots")
        if self.schedule.seconds_until_next(now) == 0.0:  # its one entry is due
            self.certificate.renew(self.ca, now)

    def watch(self, interval: float) -> Callable[[], None]:
        """:meth:`maintain` every ``interval`` seconds in a thread; returns stop()."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval):
                try:
                    self.maintain(datetime.now(UTC))
                except Exception:  # a broken CA directory must not stop serving
                    log.exception("renewing the ext_authz certificate failed; retrying")

        thread = threading.Thread(target=run, name="extauthz-svid", daemon=True)
        thread.start()

        def stopper() -> None:
            stop.set()
            thread.join(interval + 1)

        return stopper
