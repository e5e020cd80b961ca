"""PolicySet: the validated policy plus the indexes every consumer needs per workload.

Lookups are cached per (namespace, labels), so the cost of finding a workload's policies does
not grow with policies that select other workloads once the workload has been seen."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar

from meshward.policy import canonical
from meshward.policy.errors import Problem
from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    MeshConfig,
    MtlsMode,
    PeerAuthentication,
    RequestAuthentication,
    Workload,
)

_T = TypeVar("_T", AuthorizationPolicy, PeerAuthentication, RequestAuthentication)
WorkloadKey = tuple[str, frozenset[tuple[str, str]]]


def expired(policy: AuthorizationPolicy, now: datetime) -> bool:
    return policy.expires_at is not None and policy.expires_at <= now


def as_of(
    policies: Iterable[AuthorizationPolicy], now: datetime
) -> tuple[AuthorizationPolicy, ...]:
    """The policies as they apply at ``now``. An expired emergency rule stops applying, but
    expiry only ever narrows access: an expired enforced ALLOW stays as an ALLOW that matches
    nothing (no rules), so it still counts as "an ALLOW policy selects this workload" and the
    default deny it brought stays. Otherwise the expiry of a workload's only ALLOW would open
    the workload to everyone. Expired DENY, AUDIT, CUSTOM and dry-run policies are dropped."""
    out: list[AuthorizationPolicy] = []
    for policy in policies:
        if not expired(policy, now):
            out.append(policy)
        elif policy.action is Action.ALLOW and not policy.dry_run:
            out.append(replace(policy, rules=()))
    return tuple(out)


def workload_key(workload: Workload) -> WorkloadKey:
    return (workload.namespace, frozenset(workload.labels.items()))


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    return selector is None or all(labels.get(k) == v for k, v in selector.items())


def _audited(policy: Any) -> Any:
    """A policy as it acts on a workload of an audit namespace: dry-run (CUSTOM excepted: an
    ext_authz call has no dry-run form, so it stays enforced rather than silently dropped)."""
    if policy.action is Action.CUSTOM or policy.dry_run:
        return policy
    return replace(policy, dry_run=True)


def _by_name(item: Any) -> tuple[str, str]:
    return (item.namespace, item.name)


class _Scoped:
    """Objects of one kind grouped by namespace, selected per workload with a cache."""

    def __init__(
        self, items: Iterable[_T], root_namespace: str, audit: frozenset[str] = frozenset()
    ) -> None:
        self.root = root_namespace
        self.audit = audit  # namespaces whose workloads see every policy as dry-run
        self.by_namespace: dict[str, list[Any]] = {}
        for item in items:
            self.by_namespace.setdefault(item.namespace, []).append(item)
        self.cache: dict[WorkloadKey, tuple[Any, ...]] = {}

    def select(self, workload: Workload) -> tuple[Any, ...]:
        key = workload_key(workload)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        candidates = list(self.by_namespace.get(workload.namespace, ()))
        if workload.namespace != self.root:
            candidates += self.by_namespace.get(self.root, ())
        chosen = tuple(
            sorted((c for c in candidates if selects(c.selector, workload.labels)), key=_by_name)
        )
        if workload.namespace in self.audit:
            chosen = tuple(_audited(c) for c in chosen)
        self.cache[key] = chosen
        return chosen


@dataclass(frozen=True)
class PolicySet:
    mesh: MeshConfig
    workloads: tuple[Workload, ...]
    authorization_policies: tuple[AuthorizationPolicy, ...]
    peer_authentications: tuple[PeerAuthentication, ...]
    request_authentications: tuple[RequestAuthentication, ...]
    version: str  # sha256 hex of the canonical form
    # Non-fatal findings from loading (unknown kinds); not part of the version.
    warnings: tuple[Problem, ...] = field(default=(), compare=False)
    # Indexes and caches, built here and never part of equality or the version.
    _workloads: dict[str, Workload] = field(init=False, repr=False, compare=False)
    _authz: _Scoped = field(init=False, repr=False, compare=False)
    _peers: _Scoped = field(init=False, repr=False, compare=False)
    _requests: _Scoped = field(init=False, repr=False, compare=False)
    # Per-workload compiled evaluation plans, owned by meshward.policy.evaluator.
    plans: dict[Any, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        root = self.mesh.root_namespace
        object.__setattr__(self, "_workloads", {w.ref: w for w in self.workloads})
        object.__setattr__(
            self, "_authz", _Scoped(self.authorization_policies, root, self.mesh.audit_namespaces)
        )
        object.__setattr__(self, "_peers", _Scoped(self.peer_authentications, root))
        object.__setattr__(self, "_requests", _Scoped(self.request_authentications, root))
        object.__setattr__(self, "plans", {})

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (to the compile worker process) as its documents only: the indexes are
        rebuilt on arrival and the evaluation plans, which hold closures and are a cache, stay
        behind (a set the control plane had evaluated could not be pickled)."""
        fields = (
            self.mesh,
            self.workloads,
            self.authorization_policies,
            self.peer_authentications,
            self.request_authentications,
            self.version,
            self.warnings,
        )
        return (PolicySet, fields)

    @classmethod
    def create(
        cls,
        *,
        mesh: MeshConfig | None = None,
        workloads: Iterable[Workload] = (),
        authorization_policies: Iterable[AuthorizationPolicy] = (),
        peer_authentications: Iterable[PeerAuthentication] = (),
        request_authentications: Iterable[RequestAuthentication] = (),
        warnings: tuple[Problem, ...] = (),
    ) -> PolicySet:
        """Build a set from model objects: fills workload service accounts, sorts everything and
        computes the version. (`parse`/`load` call this after validating.)"""
        mesh = mesh or MeshConfig()
        ws = tuple(
            sorted(
                (
                    w
                    if w.service_account
                    else Workload(
                        namespace=w.namespace,
                        name=w.name,
                        labels=w.labels,
                        service_account=w.name,
                        address=w.address,
                        ports=w.ports,
                        origin=w.origin,
                    )
                    for w in workloads
                ),
                key=_by_name,
            )
        )
        aps = tuple(sorted(authorization_policies, key=_by_name))
        pas = tuple(sorted(peer_authentications, key=_by_name))
        ras = tuple(sorted(request_authentications, key=_by_name))
        docs = canonical.documents(mesh, ws, aps, pas, ras)
        return cls(
            mesh=mesh,
            workloads=ws,
            authorization_policies=aps,
            peer_authentications=pas,
            request_authentications=ras,
            version=canonical.version_of(docs),
            warnings=warnings,
        )

    # ---- lookups

    def workload(self, ref: str) -> Workload | None:
        """``ns/name`` -> the declared Workload."""
        return self._workloads.get(ref)

    def policies_for(
        self, workload: Workload, now: datetime | None = None
    ) -> tuple[AuthorizationPolicy, ...]:
        """Authorization policies selecting the workload (its namespace, and the root namespace
        mesh-wide), sorted by namespace/name, as they act on it: all dry-run in an audit
        namespace (MeshConfig enforcement); with `now`, as they apply at that instant (see
        :func:`as_of`: expiry narrows, never widens). Every consumer (evaluator, compiler,
        ext_authz) reads policies through here, so audit mode means the same everywhere."""
        chosen: tuple[AuthorizationPolicy, ...] = self._authz.select(workload)
        if now is None:
            return chosen
        return as_of(chosen, now)

    def request_authentications_for(self, workload: Workload) -> tuple[RequestAuthentication, ...]:
        chosen: tuple[RequestAuthentication, ...] = self._requests.select(workload)
        return chosen

    def peer_authentications_for(self, workload: Workload) -> tuple[PeerAuthentication, ...]:
        chosen: tuple[PeerAuthentication, ...] = self._peers.select(workload)
        return chosen

    def mtls_mode(self, workload: Workload, port: int) -> MtlsMode:
        """Resolved mode, never UNSET: port-level > workload selector > namespace-wide > root
        namespace > PERMISSIVE. Among equals the first by name wins (deterministic)."""
        root = self.mesh.root_namespace
        chosen = self.peer_authentications_for(workload)
        own = [p for p in chosen if p.namespace == workload.namespace]
        for peer in own:
            if peer.selector is not None:
                mode = peer.port_level.get(port, MtlsMode.UNSET)
                if mode is not MtlsMode.UNSET:
                    return mode
                if peer.mode is not MtlsMode.UNSET:
                    return peer.mode
        for scope in (workload.namespace, root):
            for peer in chosen:
                if (
                    peer.namespace == scope
                    and peer.selector is None
                    and peer.mode is not MtlsMode.UNSET
                ):
                    return peer.mode
        return MtlsMode.PERMISSIVE

    # ---- canonical form

    def canonical_documents(self) -> list[dict[str, Any]]:
        return canonical.documents(
            self.mesh,
            self.workloads,
            self.authorization_policies,
            self.peer_authentications,
            self.request_authentications,
        )

    def dump(self) -> str:
        """Canonical YAML; `parse({"x.yaml": ps.dump()}).version == ps.version`."""
        return canonical.dump_documents(self.canonical_documents())
