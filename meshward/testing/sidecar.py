"""Run a workload's compiled config in a real Envoy, with no control plane: for tests and benches.

Not used by the compiler itself (which does no I/O). A :class:`StaticSidecar` compiles the
workload in ``Mode.STATIC`` with runtime ports from the kernel, inlines its SVID and the trust
bundle as static secrets and starts Envoy. :func:`client_context` gives an ``ssl.SSLContext``
presenting a SPIFFE identity, so tests speak to the sidecar as any workload of the mesh.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshward.compile.bootstrap import static_bootstrap
from meshward.compile.options import CompileOptions, Endpoint, Mode, PortBinding, WorkloadBinding
from meshward.compile.workload import WorkloadResources, compile_workload
from meshward.envoy import EnvoyProcess, EnvoyStartError
from meshward.lifecycle import StartStop
from meshward.net import LOOPBACK, free_port

if TYPE_CHECKING:
    from meshward.certs.ca import CertificateAuthority
    from meshward.policy.policyset import PolicySet


def node_svid(ca: CertificateAuthority, spiffe_id: str) -> Any:
    """An SVID as a node holds it: its key made here (as `meshward agent` and `meshward
    bootstrap` make it), the certificate signed from its CSR; a :class:`meshward.certs.Svid`
    with the key attached. Nothing in the product makes a workload's key for it."""
    from dataclasses import replace as with_key

    from meshward.agent.identity import key_pem, make_csr, new_key

    key = new_key()
    svid = ca.issue_for_csr(make_csr(key, spiffe_id), spiffe_id)
    return with_key(svid, private_key_pem=key_pem(key))


def workload_secrets(ca: CertificateAuthority, spiffe_id: str) -> list[Any]:
    """The ``default`` and ``ROOTCA`` Secrets for one identity (inlined into a static
    bootstrap: no control plane here)."""
    from meshward.certs.sds import tls_certificate_secret, validation_context_secret

    return [
        tls_certificate_secret(node_svid(ca, spiffe_id)),
        validation_context_secret(ca.trust_bundle()),
    ]


def client_context(
    ca: CertificateAuthority,
    spiffe_id: str | None,
    directory: Path,
    *,
    alpn: list[str] | None = None,
) -> ssl.SSLContext:
    """A TLS client context trusting the mesh CA and, unless ``spiffe_id`` is None, presenting
    an SVID for it. The server's SPIFFE ID is checked by callers that care (no hostname check)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.load_verify_locations(cadata=ca.trust_bundle().roots_pem.decode())
    if spiffe_id is not None:
        svid = node_svid(ca, spiffe_id)
        stem = hashlib.sha256(spiffe_id.encode()).hexdigest()[:16]
        cert = directory / f"{stem}.crt"
        key = directory / f"{stem}.key"
        cert.write_bytes(svid.cert_chain_pem)
        key.write_bytes(svid.private_key_pem)
        key.chmod(0o600)
        context.load_cert_chain(cert, key)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


class StaticSidecar(StartStop):
    """One workload's inbound sidecar in a real Envoy, loaded statically.

    ``app_ports`` maps each declared port to where the application listens on 127.0.0.1.
    """

    def __init__(
        self,
        policy_set: PolicySet,
        workload: str,
        ca: CertificateAuthority,
        app_ports: Mapping[int, int],
        *,
        options: CompileOptions | None = None,
        workdir: Path | None = None,
        name: str | None = None,
        log_level: str = "warning",
    ) -> None:
        found = policy_set.workload(workload)
        if found is None:
            raise KeyError(workload)
        self.workload = found
        self.policy_set = policy_set
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="meshward-sidecar-"))
        self._app_ports = dict(app_ports)
        self._base = options or CompileOptions(access_log_path=str(self.workdir / "access.log"))
        self._name = name or found.name
        self._log_level = log_level
        spiffe_id = found.spiffe_id(policy_set.mesh.trust_domain)
        self._secrets = workload_secrets(ca, spiffe_id)
        self._build()

    def _build(self) -> None:
        """Compile with fresh runtime ports and prepare (not start) the Envoy."""
        self.runtime_ports = {p.port: free_port() for p in self.workload.ports}
        binding = WorkloadBinding(
            ports={
                declared: PortBinding(
                    listen=Endpoint(LOOPBACK, runtime),
                    app=Endpoint(LOOPBACK, self._app_ports[declared]),
                )
                for declared, runtime in self.runtime_ports.items()
            }
        )
        self.options = replace(
            self._base,
            mode=Mode.STATIC,
            outbound=False,
            bindings={**self._base.bindings, self.workload.ref: binding},
        )
        self.resources: WorkloadResources = compile_workload(
            self.policy_set, self.workload, self.options
        )
        self.config = static_bootstrap(self.resources, self._secrets)
        self.envoy = EnvoyProcess(
            self.config,
            name=self._name,
            workdir=self.workdir / "envoy",
            log_level=self._log_level,
        )

    def port(self, declared: int) -> int:
        return self.runtime_ports[declared]

    def start(self, timeout: float = 30.0) -> StaticSidecar:
        """Start Envoy; if another process took a runtime port meanwhile, pick new ports."""
        for attempt in range(3):
            try:
                self.envoy.start(timeout=timeout)
                return self
            except EnvoyStartError as exc:
                if "already in use" not in str(exc) or attempt == 2:
                    raise
                self.envoy.stop()
                self._build()
        return self

    def stop(self) -> None:
        self.envoy.stop()


class SidecarConnection(http.client.HTTPConnection):
    """Keep-alive HTTP/1.1 to a sidecar on 127.0.0.1, over mTLS when ``context`` is given, with
    an explicit SNI (``None``: none). Reconnects by itself after the server closes."""

    def __init__(
        self,
        port: int,
        context: ssl.SSLContext | None = None,
        *,
        sni: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(LOOPBACK, port, timeout=timeout)
        self._context = context
        self._sni = sni

    def connect(self) -> None:
        super().connect()
        if self._context is not None:
            self.sock = self._context.wrap_socket(self.sock, server_hostname=self._sni)

    def fetch(
        self, method: str, path: str, headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, headers); retries once if a kept-alive connection was closed."""
        for attempt in (0, 1):
            try:
                self.request(method, path, headers=dict(headers or {}))
                response = self.getresponse()
                body = response.read()
                return response.status, body, {k.lower(): v for k, v in response.getheaders()}
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")


def wait_for_access_log(path: Path, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The first ``count`` JSON lines of a sidecar's access log, once Envoy has flushed them."""
    deadline = time.monotonic() + timeout
    entries: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if path.exists():
            entries = [json.loads(line) for line in path.read_text().splitlines() if line]
            if len(entries) >= count:
                return entries
        time.sleep(0.05)
    raise AssertionError(f"{len(entries)} access-log entries after {timeout}s, wanted {count}")
