"""mTLS client contexts for the standard library's TLS (grpclib clients: the agent's certificate
client, ext_authz's check client, the test ADS client).

grpcio's client insists on matching the server's *DNS* name, and SVIDs carry only a SPIFFE URI,
so these clients use the ssl module, verify the chain against the trust bundle and check the
server's URI SAN themselves.
"""

from __future__ import annotations

import os
import ssl
import tempfile


def client_ssl_context(cert_chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> ssl.SSLContext:
    """mTLS client context from PEM bytes. The ssl module reads keys from files only: on Linux
    the chain and key pass through one anonymous in-memory file (memfd), so the key never
    touches a filesystem; elsewhere through a private temporary directory removed at once.
    An agent builds one per SVID; the memfd path costs ~0.6-0.75x the temporary directory's
    (bench/certs.py, agents' CPU per renewal)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # SVIDs have no DNS names; the URI SAN is checked instead
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=roots_pem.decode())
    if hasattr(os, "memfd_create"):
        _load_from_memory(context, cert_chain_pem, key_pem)
    else:  # pragma: no cover - not Linux
        _load_from_temporary_files(context, cert_chain_pem, key_pem)
    context.set_alpn_protocols(["h2"])
    return context


def _load_from_memory(context: ssl.SSLContext, cert_chain_pem: bytes, key_pem: bytes) -> None:
    fd = os.memfd_create("meshward-client-credentials", os.MFD_CLOEXEC)
    try:
        data = cert_chain_pem.rstrip(b"\n") + b"\n" + key_pem
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        context.load_cert_chain(f"/proc/self/fd/{fd}")  # chain first, then the key
    finally:
        os.close(fd)


def _load_from_temporary_files(
    context: ssl.SSLContext, cert_chain_pem: bytes, key_pem: bytes
) -> None:
    with tempfile.TemporaryDirectory(prefix="meshward-client-") as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key_pem)
        with open(cert_path, "wb") as handle:
            handle.write(cert_chain_pem)
        context.load_cert_chain(cert_path, key_path)
