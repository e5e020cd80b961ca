"""Who is on the other end of a gRPC call: the client certificate grpc verified and its SPIFFE ID.

Shared by every mTLS service on the control plane's ports (ADS, certificate service, flow
collector), which authorize by that identity.
"""

from __future__ import annotations

from typing import Any


def peer_certificate(context: Any) -> Any | None:
    """The client certificate grpc verified (an x509.Certificate), or None without one."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return None
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(pems[0])
    except ValueError:
        return None


def peer_identity(context: Any, certificate: Any | None = None) -> str | None:
    """The SPIFFE ID in the client certificate grpc verified, or None without one."""
    certificate = certificate if certificate is not None else peer_certificate(context)
    if certificate is None:
        return None
    from meshward.certs.verify import SvidVerificationError, spiffe_id_of

    try:
        return str(spiffe_id_of(certificate))
    except (ValueError, SvidVerificationError):
        return None
