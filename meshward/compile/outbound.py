"""The outbound half of a workload's config: a listener, cluster, route and endpoints per port
of every peer it may call, built from per-peer work done once per compile.

A namespace-wide ALLOW over N services (or no policy at all) gives every caller every other
peer: N^2 (caller, peer) pairs. Per peer port, once per compile (:class:`PeerTable`): its mTLS
mode, default outbound binding, the assembled listener and shared fragment
(meshward.compile.fragments) and their names. Per pair only lookups remain; and a caller
that may call every other peer (and listens where callers do by default) gets the mesh-wide
sorted lists with its own entries cut out (:meth:`PeerTable.everyone_else`), tuple slices
instead of a loop over its peers.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from meshward.compile import authz, listeners, names, spliced
from meshward.compile.fragments import FragmentCache
from meshward.compile.options import CompileOptions, Endpoint
from meshward.compile.peers import MeshIndex, peers_of
from meshward.policy.model import MtlsMode, Workload, WorkloadPort

if TYPE_CHECKING:
    from meshward.policy.policyset import PolicySet

#: "Every other peer" lists kept per compile (one per distinct caller part; with tracing on
#: every caller's part differs, and callers past this take the per-pair path).
MAX_EVERYONE = 8


@dataclass(frozen=True)
class Part:
    """One half of a workload's resources, inbound or outbound, each tuple sorted by name.

    The halves change for different reasons: the inbound half with the policies selecting the
    workload (authorization), the outbound half with who it may call and how those peers are
    reached. The incremental compiler (meshward.compile.incremental) recompiles each on its own.
    ``parsed``: (kind, name) -> (JSON source, proto, its packed ``Any`` values) of this half,
    so the next compile of the half reuses every resource whose source did not change (same
    object, no parsing) and every unchanged ``Any`` of one that did.
    """

    listeners: tuple[Any, ...] = ()
    routes: tuple[Any, ...] = ()
    clusters: tuple[Any, ...] = ()
    endpoints: tuple[Any, ...] = ()
    tls_used: bool = False
    placement: authz.AuthzPlacement | None = None  # inbound only
    next_change: datetime | None = None  # inbound only
    parsed: Mapping[tuple[str, str], Any] = field(default_factory=dict, repr=False)
    # listeners, routes, clusters, endpoints as runs of mesh-wide tuples (meshward.compile.
    # spliced), when the half is one (PeerTable.everyone_else); None: nothing shared
    runs: tuple[spliced.Runs, ...] | None = field(default=None, compare=False, repr=False)


@dataclass(eq=False)
class PeerPort:
    """One port of a peer as every caller of it sees it in one compile: computed once per
    peer, not once per (caller, peer) pair (a namespace-wide ALLOW over N services has N^2
    pairs). ``bind``: where a caller without its own binding listens for it; ``outbound``:
    (the listener, the shared fragment) by the identity of a caller's part
    (meshward.compile.fragments), for callers listening at ``bind``."""

    peer: Workload
    port: WorkloadPort
    mode: MtlsMode
    index: int
    bind: Endpoint
    http: bool
    outbound: dict[int, tuple[Any, Any, Names]] = field(default_factory=dict)


#: a listener's name, its cluster's, its route's ("" for none), its endpoints' cluster names
Names = tuple[str, str, str, tuple[str, ...]]


class PeerTable:
    """Each peer's ports, mTLS modes and default outbound bindings for one compile (one policy
    set, options and registry index), shared by every caller's outbound half."""

    def __init__(
        self, policy_set: PolicySet, options: CompileOptions, index: Mapping[str, int]
    ) -> None:
        self._policy_set = policy_set
        self._options = options
        self._index = index
        self._by_ref: dict[str, tuple[Workload, tuple[PeerPort, ...]]] = {}
        self._every: tuple[PeerPort, ...] | None = None  # every peer port, by ref and port
        self._ported = 0
        self._kinds = 0  # how many kinds (HTTP, TCP) the peer ports come in
        self._everyone: dict[tuple[int | None, int | None], _Everyone] = {}

    def ports(self, peer: Workload) -> tuple[PeerPort, ...]:
        hit = self._by_ref.get(peer.ref)
        if hit is not None and hit[0] is peer:
            return hit[1]
        options = self._options
        entries = []
        for port in sorted(peer.ports, key=lambda p: p.port):
            index = self._index[names.peer_key(peer, port.port)]
            entries.append(
                PeerPort(
                    peer=peer,
                    port=port,
                    mode=self._policy_set.mtls_mode(peer, port.port),
                    index=index,
                    bind=Endpoint(options.outbound_host, options.outbound_base_port + index),
                    http=listeners.is_http(port),
                )
            )
        found = tuple(entries)
        self._by_ref[peer.ref] = (peer, found)
        return found

    def _all(self) -> tuple[PeerPort, ...]:
        if self._every is None:
            ported = [w for w in self._policy_set.workloads if w.ports]
            self._every = tuple(
                e for w in sorted(ported, key=lambda w: w.ref) for e in self.ports(w)
            )
            self._ported = len(ported)
            self._kinds = len({e.http for e in self._every})
        return self._every

    def is_everyone_else(self, workload: Workload, callees: set[str]) -> bool:
        """``callees`` (refs of workloads with ports, never ``workload`` itself) is every
        workload with ports but ``workload``."""
        self._all()
        return len(callees) == self._ported - (1 if workload.ports else 0)

    def everyone_else(self, workload: Workload, fragments: FragmentCache) -> Part | None:
        """The outbound half of a caller of every other peer at the default bindings: the
        mesh-wide lists for its part, its own entries cut out (None: too many distinct
        parts this compile; take the per-pair path)."""
        every = self._all()
        trust_domain = self._policy_set.mesh.trust_domain
        parts: dict[bool, int] = {}
        for entry in every:  # the caller's part per kind (HTTP, TCP): one outbound() each
            if entry.http not in parts and entry.peer.ref != workload.ref:
                fragments.outbound(
                    workload, entry.peer, entry.port, bind=entry.bind, peer_mode=entry.mode,
                    trust_domain=trust_domain,
                )  # fmt: skip
                parts[entry.http] = fragments.part_id(workload.ref, entry.http)
                if len(parts) == self._kinds:  # not every entry: that was O(N) per caller
                    break
        key = (parts.get(True), parts.get(False))
        found = self._everyone.get(key)
        if found is None:
            if len(self._everyone) >= MAX_EVERYONE:
                return None
            found = _everyone(
                (entry, self._outbound(workload, entry, parts, fragments)) for entry in every
            )
            self._everyone[key] = found
        ref = workload.ref
        runs = tuple(
            spliced.without(items, owners.get(ref, ()))
            for items, owners in zip(found.lists, found.owners, strict=True)
        )
        lists = [spliced.flat(r) for r in runs]
        return Part(
            listeners=lists[0],
            routes=lists[1],
            clusters=lists[2],
            endpoints=lists[3],
            tls_used=found.tls_total - found.tls.get(ref, 0) > 0,
            runs=runs,
        )

    def _outbound(
        self, workload: Workload, entry: PeerPort, parts: dict[bool, int], fragments: FragmentCache
    ) -> tuple[Any, Any, Names]:
        part = parts.get(entry.http)
        hit = entry.outbound.get(part) if part is not None else None
        if hit is None:
            listener, fragment = fragments.outbound(
                workload, entry.peer, entry.port, bind=entry.bind, peer_mode=entry.mode,
                trust_domain=self._policy_set.mesh.trust_domain,
            )  # fmt: skip
            hit = (listener, fragment, _names(listener, fragment))
            part = parts[entry.http] = fragments.part_id(workload.ref, entry.http)
            entry.outbound[part] = hit
        return hit


#: (a peer port, where the caller's outbound listener for it binds)
Target = tuple[PeerPort, Endpoint]


def outbound_targets(
    policy_set: PolicySet,
    workload: Workload,
    options: CompileOptions,
    index: Mapping[str, int],
    *,
    now: datetime | None = None,
    peers: Iterable[Workload] | None = None,
    table: PeerTable | None = None,
) -> list[Target]:
    """What the outbound half is compiled from: every port of every peer ``workload`` may
    call, with the peer's mTLS mode and the outbound listener's address. ``index``: the
    registry's (peer, port) positions (the default outbound port offsets); ``peers``: the
    result of :func:`peers_of` when the caller has it already; ``table``: the compile's
    :class:`PeerTable` (same set, options and index), so per-peer work is done once."""
    if not options.outbound:
        return []
    if table is None:
        table = PeerTable(policy_set, options, index)
    bound = options.bindings.get(workload.ref)
    targets: list[Target] = []
    for peer in peers_of(policy_set, workload, now) if peers is None else peers:
        for entry in table.ports(peer):
            bind = entry.bind
            if bound is not None:
                bind = options.outbound_endpoint(workload, peer, entry.port.port, entry.index)
            targets.append((entry, bind))
    return targets


def compile_outbound(
    workload: Workload, targets: Iterable[Target], fragments: FragmentCache, trust_domain: str
) -> Part:
    """The outbound half: per target, a listener assembled for this caller and the peer's
    shared cluster, route and endpoints (meshward.compile.fragments). A caller listening
    where callers do by default gets what the first such caller with the same part got (the
    target's :class:`PeerPort` keeps it): per pair, a lookup, no hashing of the peer."""
    listeners_: list[tuple[str, Any]] = []
    routes: list[tuple[str, Any]] = []
    clusters: list[tuple[str, Any]] = []
    endpoints: list[tuple[str, Any]] = []
    tls_used = False
    parts: dict[bool, int] = {}  # this caller's part identity, HTTP and TCP
    for entry, bind in targets:
        default = bind is entry.bind
        part = parts.get(entry.http)
        hit = entry.outbound.get(part) if default and part is not None else None
        if hit is None:
            listener, fragment = fragments.outbound(
                workload, entry.peer, entry.port, bind=bind, peer_mode=entry.mode,
                trust_domain=trust_domain,
            )  # fmt: skip
            hit = (listener, fragment, _names(listener, fragment))
            part = parts[entry.http] = fragments.part_id(workload.ref, entry.http)
            if default:
                entry.outbound[part] = hit
        listener, fragment, (listener_name, cluster_name, route_name, endpoint_names) = hit
        listeners_.append((listener_name, listener))
        clusters.append((cluster_name, fragment.cluster))
        if fragment.route is not None:
            routes.append((route_name, fragment.route))
        if fragment.endpoints:
            endpoints.extend(zip(endpoint_names, fragment.endpoints, strict=True))
        tls_used = tls_used or fragment.tls
    return Part(
        listeners=_by_name(listeners_),
        routes=_by_name(routes),
        clusters=_by_name(clusters),
        endpoints=_by_name(endpoints),
        tls_used=tls_used,
    )


def _names(listener: Any, fragment: Any) -> Names:
    return (
        listener.name,
        fragment.cluster.name,
        fragment.route.name if fragment.route is not None else "",
        tuple(e.cluster_name for e in fragment.endpoints),
    )


def _by_name(items: list[tuple[str, Any]]) -> tuple[Any, ...]:
    """:func:`_sorted` with the names known: the same order (a stable sort by name)."""
    items.sort(key=_FIRST)
    return tuple(map(_SECOND, items))


_FIRST = operator.itemgetter(0)
_SECOND = operator.itemgetter(1)


@dataclass(frozen=True)
class _Everyone:
    """Every peer port's outbound resources for callers of one part, sorted as a caller's
    half is, with where each workload's own entries sit (cut out for it)."""

    lists: tuple[tuple[Any, ...], ...]  # listeners, routes, clusters, endpoints
    owners: tuple[Mapping[str, tuple[int, ...]], ...]  # per list: ref -> positions
    tls: Mapping[str, int]  # ref -> its ports whose cluster speaks mTLS
    tls_total: int


def _everyone(entries: Iterable[tuple[PeerPort, tuple[Any, Any, Names]]]) -> _Everyone:
    rows: tuple[list[tuple[str, Any, str]], ...] = ([], [], [], [])
    tls: dict[str, int] = {}
    for entry, (listener, fragment, (lname, cname, rname, enames)) in entries:
        ref = entry.peer.ref
        rows[0].append((lname, listener, ref))
        if fragment.route is not None:
            rows[1].append((rname, fragment.route, ref))
        rows[2].append((cname, fragment.cluster, ref))
        rows[3].extend((n, e, ref) for n, e in zip(enames, fragment.endpoints, strict=True))
        if fragment.tls:
            tls[ref] = tls.get(ref, 0) + 1
    lists = []
    owners = []
    for row in rows:
        row.sort(key=_FIRST)  # stable: as each caller's sort of its subset
        lists.append(tuple(map(_SECOND, row)))
        where: dict[str, list[int]] = {}
        for i, (_, _, ref) in enumerate(row):
            where.setdefault(ref, []).append(i)
        owners.append({ref: tuple(at) for ref, at in where.items()})
    return _Everyone(tuple(lists), tuple(owners), tls, sum(tls.values()))


def callee_refs(policy_set: PolicySet, workload: Workload, index: MeshIndex) -> set[str]:
    """The refs of the peers ``workload`` may call (the set :func:`peers_of` lists)."""
    trust_domain = policy_set.mesh.trust_domain
    refs = index.peers.callees(workload.principal(trust_domain), workload.namespace)
    refs.discard(workload.ref)
    return refs


def outbound_half(
    policy_set: PolicySet,
    workload: Workload,
    options: CompileOptions,
    index: MeshIndex,
    fragments: FragmentCache,
    table: PeerTable,
    *,
    now: datetime | None,
    refs: set[str] | None = None,
) -> Part:
    """``workload``'s outbound half; ``refs``: :func:`callee_refs` when the caller has them."""
    trust_domain = policy_set.mesh.trust_domain
    if not options.outbound:
        return compile_outbound(workload, [], fragments, trust_domain)
    if refs is None:
        refs = callee_refs(policy_set, workload, index)
    if options.bindings.get(workload.ref) is None and table.is_everyone_else(workload, refs):
        part = table.everyone_else(workload, fragments)
        if part is not None:
            return part
    peers = peers_of(policy_set, workload, now, index=index.peers)
    targets = outbound_targets(policy_set, workload, options, index.ports, peers=peers, table=table)
    return compile_outbound(workload, targets, fragments, trust_domain)


__all__ = [
    "Part",
    "PeerPort",
    "PeerTable",
    "Target",
    "callee_refs",
    "compile_outbound",
    "outbound_half",
    "outbound_targets",
]
