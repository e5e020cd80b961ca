"""One policy version as the Check steps read it: the policy set plus a per-workload plan
(what the workload's policies read, which JWT rules apply), computed once per version per
workload. Immutable once built; the Authorizer swaps snapshots atomically on update.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshward.extauthz.cache_key import (
    HEADER_PREFIX,
    AttributesRead,
    RequestFacts,
    attributes_read,
    key_function,
)
from meshward.policy.model import DenialDetails, JwtEnforcement, JwtRule, Protocol, Workload


@dataclass(frozen=True)
class PreparedWorkload:
    """Everything a Check needs about one workload under one policy version, computed once."""

    workload: Workload
    reads: AttributesRead
    key_of: Callable[[RequestFacts], tuple[object, ...]] | None
    jwt_rules: tuple[JwtRule, ...]
    rules_id: int
    rule_owners: Mapping[JwtRule, tuple[str, int]]  # rule -> (RequestAuthentication ref, index)
    payload_headers: tuple[str, ...]  # every outputPayloadToHeader name (set or removed)
    expiries: tuple[float, ...]  # epoch seconds
    reads_headers: bool = False

    def next_expiry(self, now: float) -> float | None:
        index = bisect_right(self.expiries, now)
        return self.expiries[index] if index < len(self.expiries) else None

    def token_owner(self) -> tuple[str | None, int | None]:
        """The RequestAuthentication a 401 names: the only one, or none when several apply."""
        owners = {owner for owner, _ in self.rule_owners.values()}
        if len(self.jwt_rules) == 1:
            ref, index = self.rule_owners[self.jwt_rules[0]]
            return ref, index
        if len(owners) == 1:
            return next(iter(owners)), None
        return None, None


class Snapshot:
    """``custom_hook``: a CUSTOM provider is installed (it may read anything, so nothing it
    decides is cacheable); ``rules_id``: the verifier's id for a set of JWT rules."""

    def __init__(
        self,
        policy_set: Any,
        *,
        custom_hook: bool = False,
        rules_id: Callable[[Sequence[JwtRule]], int] = lambda rules: 0,
    ) -> None:
        self.policy_set = policy_set
        self.version: str = policy_set.version
        self.verbose = policy_set.mesh.denial_details is DenialDetails.VERBOSE
        # Envoy's jwt_authn verifies tokens (MeshConfig jwtEnforcement: native): claims come
        # from the Check's metadata context, never from a token we verify again.
        self.jwt_native = policy_set.mesh.jwt_enforcement is JwtEnforcement.NATIVE
        self._custom_hook = custom_hook
        self._rules_id = rules_id
        self._plans: dict[str, PreparedWorkload | None] = {}
        self._by_principal: dict[str, list[str]] | None = None
        self._lock = threading.Lock()

    def plan(self, ref: str) -> PreparedWorkload | None:
        try:
            return self._plans[ref]
        except KeyError:
            pass
        with self._lock:
            if ref not in self._plans:
                workload = self.policy_set.workload(ref)
                self._plans[ref] = None if workload is None else self._build(workload)
            return self._plans[ref]

    def _build(self, workload: Workload) -> PreparedWorkload:
        policies = self.policy_set.policies_for(workload)  # expired included: a superset is safe
        plan = attributes_read(
            policies,
            custom_hook=self._custom_hook,
            tcp_ports=any(p.protocol is Protocol.TCP for p in workload.ports),
        )
        rules: list[JwtRule] = []
        owners: dict[JwtRule, tuple[str, int]] = {}
        for ra in self.policy_set.request_authentications_for(workload):
            for index, rule in enumerate(ra.jwt_rules):
                rules.append(rule)
                owners.setdefault(rule, (f"{ra.namespace}/{ra.name}", index))
        jwt_rules = tuple(rules)
        return PreparedWorkload(
            workload=workload,
            reads=plan,
            key_of=key_function(plan.attributes) if plan.attributes is not None else None,
            jwt_rules=jwt_rules,
            rules_id=self._rules_id(jwt_rules),
            rule_owners=owners,
            payload_headers=tuple(
                sorted(
                    {
                        r.output_payload_to_header.lower()
                        for r in jwt_rules
                        if r.output_payload_to_header
                    }
                )
            ),
            expiries=tuple(e.timestamp() for e in plan.expiries),
            reads_headers=any(a.startswith(HEADER_PREFIX) for a in plan.attributes or ()),
        )

    def workload_for_principal(self, principal: str) -> tuple[str | None, str]:
        """(ref, "") or (None, why not): the destination SPIFFE ID must name one workload."""
        if self._by_principal is None:
            index: dict[str, list[str]] = {}
            trust_domain = self.policy_set.mesh.trust_domain
            for workload in self.policy_set.workloads:
                index.setdefault(workload.spiffe_id(trust_domain), []).append(workload.ref)
            self._by_principal = index
        refs = self._by_principal.get(principal, [])
        if len(refs) == 1:
            return refs[0], ""
        if not refs:
            return None, f"no workload has identity {principal}"
        return (
            None,
            f"identity {principal} is shared by {', '.join(refs)}; set context_extensions.workload",
        )
