"""A workload SVID obtained once, on the node, for an Envoy the operator runs (no agent).

What `meshward bootstrap` does for its credentials, with the agent's own pieces: the key is born
here (:func:`meshward.agent.identity.new_key`), the SVID comes from a CSR to the control plane's
certificate service (:mod:`meshward.agent.certclient`): ``Join`` with a one-time join token on
first contact, ``Renew`` over mTLS with the current SVID afterwards. The result is kept by a
:class:`meshward.agent.identity.CredentialStore` (key + chain in one 0600 file, replaced
atomically; the bundle beside it), the files Envoy reads through file-based SDS
(:mod:`meshward.xds.filesds`). Nothing renews by itself here: that is the agent's job, or the
operator's (``meshward bootstrap --renew`` from cron).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from meshward.agent.certclient import (
    JOIN,
    RENEW,
    CertCallFailed,
    call,
    credentials_from_reply,
    mtls_context,
    server_only_context,
)
from meshward.agent.identity import Credentials, CredentialStore, make_csr, new_key
from meshward.errors import UserError


@dataclass(frozen=True)
class NodeIdentity:
    workload: str  # NS/NAME
    instance: str
    spiffe_id: str
    server_identity: str  # the control plane's SPIFFE ID


async def _obtain(
    who: NodeIdentity, address: str, method: str, context: Any, extra: dict[str, str]
) -> Credentials:
    key = new_key()
    request = {"workload": who.workload, "instance": who.instance,
               "csr": make_csr(key, who.spiffe_id).decode(), **extra}  # fmt: skip
    reply = await call(address, method, request, context=context, server_id=who.server_identity)
    return credentials_from_reply(key, reply, address, who.spiffe_id)


def current(store: CredentialStore, who: NodeIdentity) -> Credentials | None:
    """The SVID in the store if it is still valid and this workload's; None if there is none or
    it expired; UserError if it belongs to another identity (a directory mix-up)."""
    held = store.load()
    if held is None or held.not_after <= datetime.now(UTC):
        return None
    if held.spiffe_id != who.spiffe_id:
        raise UserError(
            f"{store.directory} holds an SVID for {held.spiffe_id}, not {who.spiffe_id}; "
            "use another --out or --instance"
        )
    return held


def join(
    store: CredentialStore, who: NodeIdentity, address: str, token: str, roots_pem: bytes
) -> Credentials:
    """First contact: a new key, a CSR with the join token; the credentials, saved."""
    store.ensure()
    try:
        fresh = asyncio.run(
            _obtain(who, address, JOIN, server_only_context(roots_pem), {"token": token})
        )
    except CertCallFailed as exc:
        raise UserError(f"joining the mesh at {address} failed: {exc}") from None
    store.save(fresh)
    return fresh


def renew(store: CredentialStore, who: NodeIdentity, xds: str) -> Credentials:
    """A new key and SVID, authenticated by the current one (mTLS on the ADS port); saved
    (atomically: Envoy, watching the directory, picks them up)."""
    held = current(store, who)
    if held is None:
        raise UserError(
            f"no valid SVID in {store.directory} to renew with (none, or it expired): join "
            "again with a new token (`meshward ca join-token`, then `meshward bootstrap --join "
            "... --join-token-file ... --root-cert ...`)"
        )
    context = mtls_context(held.chain_pem, held.key_pem, held.bundle_pem)
    try:
        fresh = asyncio.run(_obtain(who, xds, RENEW, context, {}))
    except CertCallFailed as exc:
        raise UserError(
            f"renewal at {xds} failed ({exc}); the current SVID stays in place until "
            f"{held.not_after:%Y-%m-%d %H:%M:%SZ}: try again before then"
        ) from None
    store.save(fresh)
    return fresh
