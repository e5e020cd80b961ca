"""The ADS server's certificate: :mod:`meshward.certs.server_identity` (shared with ext_authz,
which may not import meshward.xds); this name stays for meshward/xds/controlplane.py's import."""

from meshward.certs.server_identity import SERVER_KEY, ServerCertificate

__all__ = ["SERVER_KEY", "ServerCertificate"]
