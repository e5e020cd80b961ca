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
recompiles every workload. The index is built once per compile of the mesh by the caller
(:func:`mesh_index`) and passed in: no module-global memo.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING

from meshward.compile import names
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


@dataclass(frozen=True)
class MeshIndex:
    """What every workload's compile reads from the whole policy set at one instant, built once
    per compile of the mesh (by its caller) and passed in: the callers -> peers index, the
    registry's (peer, port) positions (default outbound port offsets) and the sorted expiry
    instants. An explicit value instead of a module-global memo, so compile stays pure."""

    peers: PeerIndex
    ports: Mapping[str, int]
    expiries: tuple[datetime, ...]

    def next_expiry(self, now: datetime) -> datetime | None:
        """The first expiry instant after ``now`` anywhere in the set."""
        i = bisect.bisect_right(self.expiries, now)
        return self.expiries[i] if i < len(self.expiries) else None


def mesh_index(policy_set: PolicySet, now: datetime | None = None) -> MeshIndex:
    """The :class:`MeshIndex` of ``policy_set`` at ``now`` (None: ignoring expiry)."""
    keys = sorted(names.peer_key(w, p.port) for w in policy_set.workloads for p in w.ports)
    return MeshIndex(
        peers=build_index(policy_set, now),
        ports=MappingProxyType({key: i for i, key in enumerate(keys)}),
        expiries=expiry_instants(policy_set),
    )


def expiry_instants(policy_set: PolicySet) -> tuple[datetime, ...]:
    return tuple(
        sorted(
            {p.expires_at for p in policy_set.authorization_policies if p.expires_at is not None}
        )
    )


def peers_of(
    policy_set: PolicySet,
    workload: Workload,
    now: datetime | None = None,
    *,
    index: PeerIndex | None = None,
) -> list[Workload]:
    """The workloads ``workload`` may call at ``now`` (None: ignoring expiry), sorted by ref
    (never itself). ``index``: ``build_index(policy_set, now)`` when the caller asks for many
    workloads (built here otherwise)."""
    trust_domain = policy_set.mesh.trust_domain
    if index is None:
        index = build_index(policy_set, now)
    refs = index.callees(workload.principal(trust_domain), workload.namespace)
    refs.discard(workload.ref)
    found = (policy_set.workload(ref) for ref in sorted(refs))
    return [w for w in found if w is not None]
