"""The compiler's entry points: a policy set and a workload in, Envoy resources out.

Pure: no I/O, no clock (pass ``now`` to drop expired emergency policies), and the same input
gives byte-identical output (resources sorted by name, names derived from the input only,
serialized with ``deterministic=True``).
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from meshward.compile import authz, listeners, names, spliced, tls
from meshward.compile import protos as _protos
from meshward.compile.fragments import FragmentCache
from meshward.compile.options import CompileOptions, Mode
from meshward.compile.outbound import Part, PeerTable, outbound_half
from meshward.compile.peers import MeshIndex, mesh_index
from meshward.errors import UserError
from meshward.policy.model import JwtEnforcement, MtlsMode, Workload

if TYPE_CHECKING:
    from meshward.policy.policyset import PolicySet

Json = dict[str, Any]

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


@dataclass(frozen=True)
class WorkloadResources:
    """Everything one sidecar needs, except the secrets' content (served by SDS by name)."""

    workload: str  # "ns/name"
    policy_version: str
    mode: Mode
    listeners: tuple[Any, ...]  # envoy.config.listener.v3.Listener, sorted by name
    routes: tuple[Any, ...]  # RouteConfiguration (xDS mode; inline in static mode)
    clusters: tuple[Any, ...]  # Cluster
    endpoints: tuple[Any, ...]  # ClusterLoadAssignment (xDS mode; inline in static mode)
    secret_names: tuple[str, ...]  # SDS names referenced: ("ROOTCA", "default") or ()
    placement: authz.AuthzPlacement  # where each rule of its inbound policies runs
    # Earliest expiry that can change this output (its own policies; with outbound, any
    # policy's, since a peer's emergency ALLOW decides whether it may call that peer).
    next_change: datetime | None
    # listeners, routes, clusters, endpoints as runs of mesh-wide tuples (meshward.compile.
    # spliced) when the outbound half was one; None: nothing shared. Not part of equality.
    runs: tuple[spliced.Runs, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def extauthz(self) -> bool:
        """The inbound HTTP chains have an ext_authz filter (rules that need it, or tokens to
        verify)."""
        return self.placement.uses_extauthz

    def by_type(self) -> dict[str, tuple[Any, ...]]:
        """Type URL -> messages, for the xDS server."""
        return {
            CLUSTER: self.clusters,
            ENDPOINT: self.endpoints,
            LISTENER: self.listeners,
            ROUTE: self.routes,
        }

    def runs_by_type(self) -> dict[str, spliced.Runs]:
        """:meth:`by_type` as runs (meshward.compile.spliced): the passes over a workload's
        messages do their per-message work once per shared tuple, not once per holder."""
        if self.runs is None:
            return {t: spliced.own(m) for t, m in self.by_type().items()}
        listeners_, routes, clusters, endpoints = self.runs
        return {CLUSTER: clusters, ENDPOINT: endpoints, LISTENER: listeners_, ROUTE: routes}

    def serialize(self) -> bytes:
        """Every resource, deterministically serialized and concatenated (for equality tests)."""
        out = bytearray()
        for type_url, messages in sorted(self.by_type().items()):
            for message in messages:
                data = message.SerializeToString(deterministic=True)
                out += f"{type_url}\n{len(data)}\n".encode() + data
        return bytes(out)

    def to_json(self) -> Json:
        """Envoy's JSON form of every resource (golden files, ``meshward policy compile``)."""
        return {
            "workload": self.workload,
            "policy_version": self.policy_version,
            "mode": self.mode.value,
            "secret_names": list(self.secret_names),
            "listeners": [to_dict(m) for m in self.listeners],
            "routes": [to_dict(m) for m in self.routes],
            "clusters": [to_dict(m) for m in self.clusters],
            "endpoints": [to_dict(m) for m in self.endpoints],
        }


def to_dict(message: Any) -> Json:
    result: Json = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def compile_workload(
    policy_set: PolicySet,
    workload: Workload | str,
    options: CompileOptions | None = None,
    *,
    now: datetime | None = None,
    _memo: dict[tuple[str, str], Any] | None = None,
    fragments: FragmentCache | None = None,
    index: MeshIndex | None = None,
    _table: PeerTable | None = None,
) -> WorkloadResources:
    """Compile one workload's sidecar config (inbound, outbound, infrastructure clusters).

    ``now``: policies whose ``meshward.dev/expires-at`` has passed are left out, and
    ``next_change`` says when the next one expires (recompile and push then). None keeps every
    policy (a pure function of the policy set alone). Raises UserError for an unknown workload
    ref, or when a rule needs ext_authz and ``options.extauthz`` is unset.

    ``fragments``: outbound fragments shared with other workloads' compiles (same options);
    the cluster, endpoints and route of a peer are then the same proto objects in every
    caller's result (read-only). None: a private cache.

    ``index``: ``mesh_index(policy_set, now)`` (the same arguments) when compiling many
    workloads of one set; None builds it here.
    """
    options = options or CompileOptions()
    memo = _memo if _memo is not None else {}
    if fragments is None or fragments.options != options:
        fragments = FragmentCache(options)
    if isinstance(workload, str):
        found = policy_set.workload(workload)
        if found is None:
            raise UserError(
                f"no workload {workload!r} in the policy set; declare it (kind: Workload) or "
                "check the NAMESPACE/NAME spelling"
            )
        workload = found
    if index is None:
        index = mesh_index(policy_set, now)
    inbound = compile_inbound(policy_set, workload, options, now=now, memo=memo)
    if _table is None:
        _table = PeerTable(policy_set, options, index.ports)
    outbound = outbound_half(policy_set, workload, options, index, fragments, _table, now=now)
    return assemble(
        workload,
        policy_set.version,
        options,
        inbound,
        outbound,
        outbound_change=outbound_change(index, options, now),
    )


def compile_inbound(
    policy_set: PolicySet,
    workload: Workload,
    options: CompileOptions,
    *,
    now: datetime | None,
    memo: dict[tuple[str, str], Any],
) -> Part:
    """The inbound half: a listener (and route) per declared port with the authorization
    filters and rules, the local application's clusters, and the ext_authz and OTLP clusters.
    ``memo``: (kind, name) -> (JSON source, proto, its ``Any`` values), shared with other
    compiles (read-only protos; see :func:`_shared`)."""
    trust_domain = policy_set.mesh.trust_domain
    policies = policy_set.policies_for(workload, now)
    placement = authz.place(
        policies,
        policy_set.request_authentications_for(workload),
        jwt_native=policy_set.mesh.jwt_enforcement is JwtEnforcement.NATIVE,
    )
    port_map = options.runtime_ports(workload)
    built: list[listeners.Built] = []
    tls_used = False
    for port in sorted(workload.ports, key=lambda p: p.port):
        mode = policy_set.mtls_mode(workload, port.port)
        tls_used = tls_used or mode is not MtlsMode.DISABLE
        build = listeners.inbound_http if listeners.is_http(port) else listeners.inbound_tcp
        built.append(
            build(
                workload,
                port,
                placement=placement,
                port_map=port_map,
                mode=mode,
                options=options,
                trust_domain=trust_domain,
            )
        )
    clusters = [c for b in built for c in b.clusters]
    if placement.uses_extauthz and any(listeners.is_http(p) for p in workload.ports):
        if options.extauthz is None:
            raise UserError(
                f"workload {workload.ref} needs the ext_authz service "
                f"({placement.extauthz_reasons[0]}) but no ext_authz address was given; "
                "set it (e.g. --extauthz 127.0.0.1:9191)"
            )
        # mTLS to ext_authz with the workload's own SVID (ext_authz answers a sidecar only about
        # its own workload), pinned to ext_authz's identity (issue 13).
        extauthz = listeners.grpc_cluster(names.CLUSTER_EXTAUTHZ, options.extauthz, options)
        extauthz["transport_socket"] = tls.upstream_tls(
            options.mode, names.extauthz_spiffe_id(policy_set.mesh), alpn=["h2"]
        )
        clusters.append(extauthz)
        tls_used = True
    if options.otlp is not None:
        clusters.append(listeners.grpc_cluster(names.CLUSTER_OTLP, options.otlp, options))
    expiries = [
        p.expires_at
        for p in policies
        if p.expires_at is not None and (now is None or p.expires_at > now)
    ]
    used: dict[tuple[str, str], Any] = {}
    return Part(
        listeners=_sorted(_shared(memo, used, "listener", b.listener) for b in built),
        routes=_sorted(_shared(memo, used, "route", b.route) for b in built if b.route),
        clusters=_sorted(_shared(memo, used, "cluster", c) for c in clusters),
        endpoints=_sorted(
            (_shared(memo, used, "endpoint", e) for b in built for e in b.endpoints),
            key="cluster_name",
        ),
        tls_used=tls_used,
        placement=placement,
        next_change=min(expiries) if expiries else None,
        parsed=used,
    )


def _merged(few: tuple[Any, ...], many: tuple[Any, ...], key: str = "name") -> tuple[Any, ...]:
    """``_sorted([*few, *many])`` for two tuples sorted by ``key``, with ``key`` read only
    O(len(few) log len(many)) times: a caller's outbound half lists every peer it may call
    (N of them), its inbound half a few resources."""
    if not few:
        return many
    get = operator.attrgetter(key)
    out: list[Any] = []
    start = 0
    for message in few:  # equal keys: ``few`` first, as the stable sort of few + many
        at = bisect.bisect_left(many, get(message), lo=start, key=get)
        out.extend(many[start:at])
        out.append(message)
        start = at
    out.extend(many[start:])
    return tuple(out)


def outbound_change(
    index: MeshIndex, options: CompileOptions, now: datetime | None
) -> datetime | None:
    """When a caller's outbound half may next change: the next expiry anywhere in the set (a
    peer's emergency ALLOW decides whether it may call that peer)."""
    return index.next_expiry(now) if options.outbound and now is not None else None


def assemble(
    workload: Workload,
    version: str,
    options: CompileOptions,
    inbound: Part,
    outbound: Part,
    *,
    outbound_change: datetime | None = None,
) -> WorkloadResources:
    """One workload's resources from its two halves; ``outbound_change``: see
    :func:`outbound_change`."""
    assert inbound.placement is not None
    mine = (inbound.listeners, inbound.routes, inbound.clusters, inbound.endpoints)
    theirs = (outbound.listeners, outbound.routes, outbound.clusters, outbound.endpoints)
    keys = ("name", "name", "name", "cluster_name")
    runs: tuple[spliced.Runs, ...] | None = None
    if outbound.runs is None:
        merged = tuple(_merged(a, b, k) for a, b, k in zip(mine, theirs, keys, strict=True))
    else:
        both = [
            spliced.merged(a, b, r, k)
            for a, b, r, k in zip(mine, theirs, outbound.runs, keys, strict=True)
        ]
        merged = tuple(m for m, _ in both)
        runs = tuple(r for _, r in both)
    return WorkloadResources(
        workload=workload.ref,
        policy_version=version,
        mode=options.mode,
        listeners=merged[0],
        routes=merged[1],
        clusters=merged[2],
        endpoints=merged[3],
        secret_names=(
            (names.SECRET_ROOTCA, names.SECRET_DEFAULT)
            if inbound.tls_used or outbound.tls_used
            else ()
        ),
        placement=inbound.placement,
        next_change=earliest(inbound.next_change, outbound_change),
        runs=runs,
    )


def earliest(*instants: datetime | None) -> datetime | None:
    known = [t for t in instants if t is not None]
    return min(known) if known else None


def compile_mesh(
    policy_set: PolicySet,
    options: CompileOptions | None = None,
    *,
    now: datetime | None = None,
) -> dict[str, WorkloadResources]:
    """Every workload of the mesh, by ref.

    Resources that are the same for every caller (a peer's outbound cluster, endpoints and
    route) are built once and shared (meshward.compile.fragments): the same proto objects in
    every caller's result, to be treated as read-only.
    """
    memo: dict[tuple[str, str], Any] = {}
    options = options or CompileOptions()
    fragments = FragmentCache(options)
    index = mesh_index(policy_set, now)
    table = PeerTable(policy_set, options, index.ports)
    return {
        w.ref: compile_workload(
            policy_set,
            w,
            options,
            now=now,
            _memo=memo,
            fragments=fragments,
            index=index,
            _table=table,
        )
        for w in policy_set.workloads
    }


def _shared(
    memo: dict[tuple[str, str], Any], used: dict[tuple[str, str], Any], kind: str, data: Json
) -> Any:
    """The proto for ``data``: the memo's (kind, name) entry when its source equals ``data``
    (the same object, read-only: shared, packed once), else parsed, reusing the entry's
    unchanged ``Any`` values (an RBAC edit changes one engine of a route).

    Keyed by name and compared with ``==``, not keyed by a canonical JSON dump: a dump of every
    listener and route was a fifth of a mesh-wide edit's inbound compile, and a changed source
    now costs no dump at all (dict comparison stops at the first difference). ``==`` equates
    ``True``, ``1`` and ``1.0``; see :mod:`meshward.compile.fastparse` for why that cannot
    change the bytes. The sources kept are never mutated after this call."""
    key = (kind, str(data.get("cluster_name" if kind == "endpoint" else "name", "")))
    hit = memo.get(key)
    if hit is None or hit[0] != data:
        message, anys = _protos.parse_reusing(kind, data, hit[2] if hit is not None else {})
        hit = (data, message, anys)
        memo[key] = hit
    used[key] = hit
    return hit[1]


def authz_placement(
    policy_set: PolicySet, workload: Workload, *, now: datetime | None = None
) -> authz.AuthzPlacement:
    """The plan step: where each rule applying to ``workload`` runs (HTTP and TCP), and why."""
    return authz.place(
        policy_set.policies_for(workload, now),
        policy_set.request_authentications_for(workload),
        jwt_native=policy_set.mesh.jwt_enforcement is JwtEnforcement.NATIVE,
    )


def _sorted(messages: Iterable[Any], *, key: str = "name") -> tuple[Any, ...]:
    return tuple(sorted(messages, key=lambda m: getattr(m, key)))


__all__ = [
    "CLUSTER",
    "ENDPOINT",
    "LISTENER",
    "ROUTE",
    "SECRET",
    "WorkloadResources",
    "authz_placement",
    "compile_mesh",
    "compile_workload",
]
