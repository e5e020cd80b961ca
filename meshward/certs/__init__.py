"""Workload identity: a CA issuing SPIFFE X.509 SVIDs, their rotation, and trust bundles.

Names are re-exported lazily: `meshward --help` imports ``meshward.certs.cli`` (and so this
package) and must not pay for importing cryptography.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshward.lazy import lazy_getattr

if TYPE_CHECKING:
    from meshward.certs.bundle import TrustBundle
    from meshward.certs.ca import (
        DEFAULT_GRACE,
        DEFAULT_SVID_TTL,
        CaGeneration,
        CertificateAuthority,
        Svid,
    )
    from meshward.certs.lifetime import Lifetime, Validity, remaining_lifetime
    from meshward.certs.rotation import ExpiryStatus, Renewal, RotationSchedule
    from meshward.certs.spiffe import InvalidSpiffeId, SpiffeId, parse_spiffe_id, spiffe_id
    from meshward.certs.verify import SvidVerificationError, spiffe_id_of, verify_svid

_EXPORTS = {
    "TrustBundle": "meshward.certs.bundle",
    "DEFAULT_GRACE": "meshward.certs.ca",
    "DEFAULT_SVID_TTL": "meshward.certs.ca",
    "CaGeneration": "meshward.certs.ca",
    "CertificateAuthority": "meshward.certs.ca",
    "Svid": "meshward.certs.ca",
    "Lifetime": "meshward.certs.lifetime",
    "Validity": "meshward.certs.lifetime",
    "remaining_lifetime": "meshward.certs.lifetime",
    "ExpiryStatus": "meshward.certs.rotation",
    "Renewal": "meshward.certs.rotation",
    "RotationSchedule": "meshward.certs.rotation",
    "InvalidSpiffeId": "meshward.certs.spiffe",
    "SpiffeId": "meshward.certs.spiffe",
    "parse_spiffe_id": "meshward.certs.spiffe",
    "spiffe_id": "meshward.certs.spiffe",
    "SvidVerificationError": "meshward.certs.verify",
    "spiffe_id_of": "meshward.certs.verify",
    "verify_svid": "meshward.certs.verify",
}

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_SVID_TTL",
    "CaGeneration",
    "CertificateAuthority",
    "ExpiryStatus",
    "InvalidSpiffeId",
    "Lifetime",
    "Renewal",
    "RotationSchedule",
    "SpiffeId",
    "Svid",
    "SvidVerificationError",
    "TrustBundle",
    "Validity",
    "parse_spiffe_id",
    "remaining_lifetime",
    "spiffe_id",
    "spiffe_id_of",
    "verify_svid",
]


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
