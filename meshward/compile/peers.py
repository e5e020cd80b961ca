"""Which peers a workload may call: the outbound listeners and clusters it gets.

A workload needs an outbound path to a peer unless the peer's policies can never allow it. The
analysis only looks at the positive ``principals`` and ``namespaces`` of the peer's enforced
ALLOW rules (everything else is assumed to possibly match), so it over-approximates: an extra
cluster is harmless, a missing one is an outage. A peer with no enforced ALLOW policy, or with
an ALLOW rule whose source is not narrowed by principal or namespace, is callable by everyone.

Built once per policy-set version as an index from caller identity to peers, so compiling every
workload of the mesh costs time proportional to the output, not to workloads squared.

With ``now``, policies count as they apply at that instant (``PolicySet.policies_for``): an
expired emergency ALLOW keeps its workload closed but names no caller any more, so callers that
only it made eligible lose their outbound path at the expiry instant, when the control plane
recompiles every workload. The index is memoized per (version, expiries passed).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from meshward.policy.matching import string_predicate
from meshward.policy.model import Action, Rule, Workload

if TYPE_CHECKING:
    from meshward.policy.policyset import PolicySet

Predicate = Callable[[str], bool]


@dataclass
class PeerIndex:
    open: set[str] = field(default_factory=set)  # refs callable by anyone
    by_principal: dict[str, set[str]] = field(default_factory=dict)  # td/ns/x/sa/y -> refs
    by_namespace: dict[str, set[str]] = field(default_factory=dict)
    principal_patterns: list[tuple[Predicate, str]] = field(default_factory=list)
    namespace_patterns: list[tuple[Predicate, str]] = field(default_factory=list)

    def callees(self, principal: str, namespace: str) -> set[str]:
        refs = set(self.open)
        refs |= self.by_principal.get(principal, set())
        refs |= self.by_namespace.get(namespace, set())
        refs.update(ref for pred, ref in self.principal_patterns if pred(principal))
        refs.update(ref for pred, ref in self.namespace_patterns if pred(namespace))
        return refs


def build_index(policy_set: PolicySet, now: datetime | None = None) -> PeerIndex:
    index = PeerIndex()
    for dst in policy_set.workloads:
        if not dst.ports:
            continue
        allow = [
            p
            for p in policy_set.policies_for(dst, now)
            if p.action is Action.ALLOW and not p.dry_run
        ]
        if not allow:
            index.open.add(dst.ref)
            continue
        _index_rules(index, dst.ref, [rule for p in allow for rule in p.rules])
    return index


def _index_rules(index: PeerIndex, ref: str, rules: list[Rule]) -> None:
    for rule in rules:
        if not rule.sources:
            index.open.add(ref)
            return
        for source in rule.sources:
            if source.principals:
                for p in source.principals:
                    if "*" in p:
                        index.principal_patterns.append((string_predicate(p), ref))
                    else:
                        index.by_principal.setdefault(p, set()).add(ref)
            elif source.namespaces:
                for ns in source.namespaces:
                    if "*" in ns:
                        index.namespace_patterns.append((string_predicate(ns), ref))
                    else:
                        index.by_namespace.setdefault(ns, set()).add(ref)
            else:
                index.open.add(ref)
                return


_CACHE: dict[tuple[str, int], PeerIndex] = {}
_LOCK = threading.Lock()
_CACHE_SIZE = 4
_INSTANTS: dict[str, list[datetime]] = {}  # version -> sorted expiry instants


def _expiries_passed(policy_set: PolicySet, now: datetime | None) -> int:
    """How many expiry instants lie at or before ``now`` (-1 without a clock): with the version,
    it identifies the set of expired policies, which only grows with time."""
    if now is None:
        return -1
    return bisect.bisect_right(_instants(policy_set), now)


def next_expiry(policy_set: PolicySet, now: datetime) -> datetime | None:
    """The first expiry instant after ``now`` anywhere in the set: any workload's outbound
    config may change then (a peer's emergency ALLOW expiring)."""
    instants = _instants(policy_set)
    i = bisect.bisect_right(instants, now)
    return instants[i] if i < len(instants) else None


def _instants(policy_set: PolicySet) -> list[datetime]:
    instants = _INSTANTS.get(policy_set.version)
    if instants is None:
        instants = sorted(
            {p.expires_at for p in policy_set.authorization_policies if p.expires_at is not None}
        )
        with _LOCK:
            if len(_INSTANTS) >= _CACHE_SIZE:
                _INSTANTS.pop(next(iter(_INSTANTS)))
            _INSTANTS[policy_set.version] = instants
    return instants


def peer_index(policy_set: PolicySet, now: datetime | None = None) -> PeerIndex:
    """The index for this policy set at ``now``, memoized by content version and expiries."""
    key = (policy_set.version, _expiries_passed(policy_set, now))
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    built = build_index(policy_set, now)
    with _LOCK:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = built
    return built


def peers_of(
    policy_set: PolicySet, workload: Workload, now: datetime | None = None
) -> list[Workload]:
    """The workloads ``workload`` may call at ``now`` (None: ignoring expiry), sorted by ref
    (never itself)."""
    trust_domain = policy_set.mesh.trust_domain
    index = peer_index(policy_set, now)
    refs = index.callees(workload.principal(trust_domain), workload.namespace)
    refs.discard(workload.ref)
    found = (policy_set.workload(ref) for ref in sorted(refs))
    return [w for w in found if w is not None]
