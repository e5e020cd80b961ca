"""ext_authz over mTLS for tests, benchmarks and the demo: credentials from a real CA, an
in-process service, and a client presenting a workload's SVID."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshward.compile.names import extauthz_spiffe_id
from meshward.extauthz.callers import TlsFiles, write_credentials

if TYPE_CHECKING:
    from meshward.certs.ca import CertificateAuthority
    from meshward.extauthz.server import Running, ServeOptions
    from meshward.policy.model import MeshConfig

SERVICE_TTL_HOURS = 24

# The policy material of the ext_authz tests (Istio's ext_authz example: httpbin in namespace
# foo), written once for the unit tests, the service tests and the real-Envoy tests.
HTTPBIN_YAML = """\
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: httpbin, namespace: foo, labels: {app: httpbin}}
spec: {ports: [{name: http, port: 8000}]}
"""
ADMINS_YAML = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: admins, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
    when: [{key: "request.auth.claims[groups]", values: ["admin"]}]
  - to: [{operation: {paths: ["/public*"]}}]
"""


def mesh_yaml(*, verbose: bool = False, jwt: str = "extauthz") -> str:
    """The MeshConfig: denial bodies naming policy, rule and reason when ``verbose`` (the
    default is quiet), JWTs verified by ext_authz (``jwt="native"``: by Envoy's jwt_authn)."""
    details = "verbose" if verbose else "quiet"
    return f"""\
apiVersion: meshward.dev/v1
kind: MeshConfig
metadata: {{name: mesh}}
spec: {{denialDetails: {details}, jwtEnforcement: {jwt}}}
"""


def issue_tls(ca: CertificateAuthority, spiffe_id: str, directory: Path) -> TlsFiles:
    """An SVID for ``spiffe_id`` and the trust bundle, written as ``--tls-dir`` expects."""
    from datetime import timedelta

    svid = ca.issue(spiffe_id, ttl=timedelta(hours=SERVICE_TTL_HOURS))
    return write_credentials(directory, svid, ca.trust_bundle().roots_pem)


def issue_service_tls(ca: CertificateAuthority, mesh: MeshConfig, directory: Path) -> TlsFiles:
    """The ext_authz server's credentials (the identity compiled sidecars pin)."""
    return issue_tls(ca, extauthz_spiffe_id(mesh), directory)


def start_mtls(
    options: ServeOptions, ca: CertificateAuthority, mesh: MeshConfig, directory: Path
) -> Running:
    """``start_service`` over mTLS with fresh server credentials under ``directory``."""
    from meshward.extauthz.server import start_service

    files = issue_service_tls(ca, mesh, directory / "extauthz-tls")
    return start_service(replace(options, tls_dir=files.directory))


def client_for(
    ca: CertificateAuthority, spiffe_id: str, directory: Path, port: int, mesh: MeshConfig
) -> Any:
    """A :class:`meshward.extauthz.client.CheckClient` calling as ``spiffe_id``."""
    from meshward.extauthz.client import CheckClient

    key, chain, roots = issue_tls(ca, spiffe_id, directory).read()
    return CheckClient(
        "127.0.0.1",
        port,
        cert_chain_pem=chain,
        key_pem=key,
        roots_pem=roots,
        server_id=extauthz_spiffe_id(mesh),
    )


def sidecar_tls(ca: CertificateAuthority, spiffe_id: str, mesh: MeshConfig) -> dict[str, Any]:
    """The ext_authz cluster's transport socket for a static sidecar (meshward.extauthz.
    envoyconfig.sidecar) of the workload with ``spiffe_id``."""
    from meshward.extauthz.envoyconfig import extauthz_upstream_tls

    svid = ca.issue(spiffe_id)
    return extauthz_upstream_tls(
        cert_chain=svid.cert_chain_pem.decode(),
        private_key=svid.private_key_pem.decode(),
        roots=ca.trust_bundle().roots_pem.decode(),
        server_id=extauthz_spiffe_id(mesh),
    )
