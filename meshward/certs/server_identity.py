"""A server's own certificate from the mesh CA: the ADS server's (meshward.xds) and ext_authz's
(``extauthz serve --ca``), one class for both.

The server certificate is signed by the *oldest* CA generation still trusted, so clients that
verify it with a bundle written before a `meshward ca rotate` still accept it; it moves to the
next generation when that root is dropped, and renews at ~50% of its lifetime
(:class:`meshward.certs.RotationSchedule`). Client certificates are verified against every root
trusted now.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from meshward.certs.server_tls import ServerTls

SERVER_KEY = "@ads-server"  # the server certificate's entry in the rotation schedule


class ServerCertificate:
    """Issues, renews and re-trusts a server's certificate; ``tls`` is what the gRPC server
    serves (renewable in place, so a renewal needs no restart). ``label`` and ``log`` name the
    server in the renewal's log line."""

    def __init__(
        self,
        spiffe_id: Callable[[], str],
        ttl: timedelta,
        schedule: Any,
        *,
        label: str = "ADS server",
        log: logging.Logger | None = None,
    ) -> None:
        self.spiffe_id = spiffe_id  # asked at each issue: the policy's root namespace may change
        self.ttl = ttl
        self.schedule = schedule  # meshward.certs.RotationSchedule
        self.label = label
        self.log = log or logging.getLogger("meshward.xds")
        self.tls: ServerTls | None = None
        self.svid: Any = None
        self.generation: int | None = None  # the CA generation that signed it

    def _issue(self, ca: Any, now: datetime) -> Any:
        generation = ca.oldest_trusted_generation(now)
        svid = ca.issue(self.spiffe_id(), ttl=self.ttl, now=now, generation=generation.number)
        self.svid = svid
        self.generation = generation.number
        self.schedule.track(SERVER_KEY, svid)
        return svid

    def make_tls(self, ca: Any, now: datetime) -> ServerTls:
        """Issue the certificate and return its (renewable) TLS config."""
        svid = self._issue(ca, now)
        bundle = ca.trust_bundle(now=now)
        self.tls = ServerTls(svid.private_key_pem, svid.cert_chain_pem, bundle.roots_pem)
        return self.tls

    def renew(self, ca: Any, now: datetime, *, reason: str = "rotation") -> None:
        svid = self._issue(ca, now)
        if self.tls is not None:
            bundle = ca.trust_bundle(now=now)
            self.tls.update(svid.private_key_pem, svid.cert_chain_pem, bundle.roots_pem)
        self.log.info(
            "%s certificate renewed (%s) by CA generation %d, expires %s",
            self.label, reason, self.generation, svid.not_after.isoformat(),
        )  # fmt: skip

    def bundle_changed(self, ca: Any, roots_pem: bytes, now: datetime) -> None:
        """The trust bundle changed: verify clients against its roots, and move to a newer
        generation if the one that signed this certificate is no longer trusted."""
        if self.tls is None or self.svid is None:
            return
        if self.generation != ca.oldest_trusted_generation(now).number:
            self.renew(ca, now, reason="its CA generation is no longer trusted")
        else:
            self.tls.update(self.svid.private_key_pem, self.svid.cert_chain_pem, roots_pem)
