"""A gRPC server's mTLS (the ADS listener's, ext_authz's): server certificate from the CA, client
certificates required and verified against the trust bundle, both replaceable while the server
runs. It lives with the certificates because both services use it.

grpc asks the fetcher for a new configuration on every handshake; returning None keeps the
current one, so a renewal of the server SVID or a CA rotation applies to new connections without
a restart (open streams keep their session, as TLS does).
"""

from __future__ import annotations

import threading

import grpc


class ServerTls:
    def __init__(self, key_pem: bytes, chain_pem: bytes, roots_pem: bytes) -> None:
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._current = (key_pem, chain_pem, roots_pem)

    @staticmethod
    def _config(
        key_pem: bytes, chain_pem: bytes, roots_pem: bytes
    ) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(key_pem, chain_pem)], root_certificates=roots_pem
        )

    def update(self, key_pem: bytes, chain_pem: bytes, roots_pem: bytes) -> None:
        with self._lock:
            if (key_pem, chain_pem, roots_pem) == self._current:
                return
            self._current = (key_pem, chain_pem, roots_pem)
            self._pending = self._config(key_pem, chain_pem, roots_pem)

    def current(self) -> tuple[bytes, bytes, bytes]:
        """(key, chain, roots) in force: for other listeners that present the same certificate."""
        with self._lock:
            return self._current

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            pending, self._pending = self._pending, None
            return pending

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config(*self._current), self._fetch, require_client_authentication=True
        )
