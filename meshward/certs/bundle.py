"""Trust bundles: the set of roots a workload accepts for one trust domain.

A bundle holds several roots during a CA rotation (old + new), which is what lets workloads
issued by either root keep talking. It is a value (PEM bytes), so it can be compared, hashed into
an SDS version and pushed as-is as Envoy's ``trusted_ca``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from meshward.certs.pem import certs_to_pem, load_certificates


@dataclass(frozen=True)
class TrustBundle:
    trust_domain: str
    roots_pem: bytes  # concatenated PEM, oldest root first

    @classmethod
    def from_certificates(cls, trust_domain: str, roots: Iterable[x509.Certificate]) -> TrustBundle:
        return cls(trust_domain, certs_to_pem(roots))

    def roots(self) -> list[x509.Certificate]:
        if not self.roots_pem:
            return []
        return load_certificates(self.roots_pem, f"trust bundle for {self.trust_domain}")

    def fingerprints(self) -> list[str]:
        """SHA-256 of each root (hex), oldest first: how operators tell roots apart."""
        return [root.fingerprint(hashes.SHA256()).hex() for root in self.roots()]

    @property
    def version(self) -> str:
        """Content hash: a stable SDS version for the ROOTCA secret."""
        return hashlib.sha256(self.roots_pem).hexdigest()

    def __len__(self) -> int:
        return len(self.roots())
