"""Applied means enforced: which nodes do not enforce the policy set the control plane serves.

A sidecar that NACKs a listener or route keeps its old one, so the authorization rules in it
are the old rules: the new policy is not in force on that node, whatever the control plane
applied. `meshward status` reports such a node as NOT ENFORCED (and exits 1), the metric
``meshward_xds_nodes_not_enforcing`` counts them, and the NACK is logged at error level.

A type counts while the node holds rejected content of it and is behind the desired version;
it stops counting once the node ACKs a version without that content (the resource fixed or
removed), so one bad resource never blocks later edits for good.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meshward.xds import typeurls
from meshward.xds.status import TypeStatus

MAX_DOCUMENTS = 20  # policy documents listed per node (status stays bounded)


def not_enforced(statuses: Iterable[TypeStatus]) -> dict[str, Any] | None:
    """What a node rejected and still does not run, or None when it enforces what it was sent
    (secrets are identity, not policy: an SDS NACK is reported elsewhere)."""
    rejected = [
        s for s in statuses if s.type_url != typeurls.SECRET and s.rejected and not s.in_sync
    ]
    if not rejected:
        return None
    last = max(
        (s.last_nack for s in rejected if s.last_nack is not None),
        key=lambda n: n.at,
        default=None,
    )
    return {
        "types": sorted({typeurls.short(s.type_url) for s in rejected}),
        "resources": sorted({name for s in rejected for name in s.rejected}),
        "error": last.error if last is not None else "",  # already redacted (protocol)
    }


def compile_failure(error: str) -> dict[str, Any]:
    """The NOT ENFORCED record of a node whose workload failed to compile (it keeps its last
    good config)."""
    return {"types": [], "resources": [], "error": f"compile error: {error}"}


def documents(policy_set: Any, workload_ref: str) -> list[str]:
    """The policy documents that shape a workload's sidecar config, as ``kind ns/name
    (file#index)``: its AuthorizationPolicies and RequestAuthentications (bounded)."""
    workload = policy_set.workload(workload_ref)
    if workload is None:
        return []
    found = [
        *(("AuthorizationPolicy", p) for p in policy_set.policies_for(workload)),
        *(("RequestAuthentication", r) for r in policy_set.request_authentications_for(workload)),
    ]
    out = []
    for kind, doc in found[:MAX_DOCUMENTS]:
        origin = doc.origin
        where = f" ({origin.file}#{origin.index})" if origin is not None else ""
        out.append(f"{kind} {doc.namespace}/{doc.name}{where}")
    if len(found) > MAX_DOCUMENTS:
        out.append(f"... and {len(found) - MAX_DOCUMENTS} more")
    return out
