"""Lint for emergency rules (``meshward.dev/expires-at``): an emergency ALLOW that is the only
ALLOW selecting a workload.

Any ALLOW policy makes its workload default-deny. If the emergency rule is the workload's only
ALLOW, then while it is in force it denies every caller it does not name (likely an outage for
the regular callers), and after it expires it still counts as an ALLOW (expiry never widens
access), so the workload stays closed to everyone until a regular ALLOW policy is added.
"""

from __future__ import annotations

from collections.abc import Iterator

from meshward.policy.errors import Problem
from meshward.policy.model import Action, AuthorizationPolicy
from meshward.policy.policyset import PolicySet

FIELD = "metadata.annotations[meshward.dev/expires-at]"


def sole_emergency_allows(policy_set: PolicySet) -> Iterator[Problem]:
    alone: dict[AuthorizationPolicy, list[str]] = {}
    for workload in policy_set.workloads:
        allows = [
            p
            for p in policy_set.policies_for(workload)
            if p.action is Action.ALLOW and not p.dry_run
        ]
        if allows and all(p.expires_at is not None for p in allows):
            for policy in allows:
                alone.setdefault(policy, []).append(workload.ref)
    for policy, refs in alone.items():
        origin = policy.origin
        where = ", ".join(refs[:5]) + (f" and {len(refs) - 5} more" if len(refs) > 5 else "")
        yield Problem(
            origin.file if origin else "?",
            origin.index if origin else 0,
            FIELD,
            f"emergency ALLOW is the only ALLOW policy selecting {where}: while in force it "
            "denies every caller it does not name, and after it expires the workload stays "
            "closed to everyone (expiry never widens access); add the regular ALLOW policy",
        )
