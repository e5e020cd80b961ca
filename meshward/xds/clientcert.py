"""What the ADS server remembers of a stream's client certificate, and what it means after a CA
rotation (pure).

A sidecar's ADS credentials (client certificate and trust bundle) are the files `meshward
bootstrap` wrote; they trust only the roots that existed then. After `meshward ca rotate` they
keep working while the old root stays trusted (the control plane presents a server certificate
from the oldest trusted generation, and accepts client certificates of any trusted root), but
once the old root is dropped a sidecar that was not re-bootstrapped can no longer reconnect. The
CA generation that signed the client certificate (known when the stream opens) tells which
sidecars still need `meshward bootstrap`: `meshward status` flags them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

OK, RETIRING, UNTRUSTED = "ok", "root-retiring", "untrusted"


@dataclass(frozen=True)
class ClientCertificate:
    ca_generation: int | None  # None: signed by no generation the CA still holds
    not_after: datetime


def credentials_status(
    cert: ClientCertificate,
    generations: Iterable[Any],  # meshward.certs.CaGeneration
    now: datetime,
) -> dict[str, Any]:
    """``state``: ok, root-retiring (its root will be dropped at ``root_trusted_until``) or
    untrusted (its root is gone: the node cannot reconnect); ``warning`` says what to do."""
    generation = next((g for g in generations if g.number == cert.ca_generation), None)
    until = generation.trusted_until if generation is not None else None
    if generation is None or not generation.trusted(now):
        state = UNTRUSTED
        warning = (
            "ADS credentials chain to a CA root that is no longer trusted: this sidecar cannot "
            "reconnect once its stream ends; an agent renews by itself, an operator-run Envoy "
            "needs a new join (`meshward bootstrap` with a join token)"
        )
    elif until is not None:
        state = RETIRING
        warning = (
            f"ADS credentials chain to CA generation {generation.number}, whose root is dropped "
            f"at {until.isoformat(timespec='seconds')}: its next SVID comes from the new root (an "
            "agent renews by itself; for an operator-run Envoy run `meshward bootstrap --renew` "
            "before then, Envoy reloads the files), or it cannot reconnect afterwards"
        )
    else:
        state, warning = OK, None
    return {
        "ca_generation": cert.ca_generation,
        "not_after": cert.not_after.isoformat(),
        "root_trusted_until": until.isoformat() if until is not None else None,
        "state": state,
        "warning": warning,
    }
