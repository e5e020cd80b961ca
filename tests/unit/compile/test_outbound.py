"""The outbound half's shared paths (meshward.compile.outbound) against the per-pair path:
a caller of every other peer gets, from the mesh-wide lists with its own entries cut out,
exactly what compiling its targets one by one gives (byte for byte, same order), with mixed
HTTP/TCP ports, mixed mTLS modes, per-caller parts (tracing on) and bound callers."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from meshward.compile import CompileOptions, Endpoint, compile_mesh
from meshward.compile.fragments import FragmentCache
from meshward.compile.options import WorkloadBinding
from meshward.compile.outbound import (
    MAX_EVERYONE,
    PeerTable,
    callee_refs,
    compile_outbound,
    outbound_half,
    outbound_targets,
)
from meshward.compile.peers import mesh_index, peers_of
from meshward.policy.model import MtlsMode, PeerAuthentication, Protocol, WorkloadPort
from meshward.policy.policyset import PolicySet
from meshward.testing import topology


def mixed(services: int) -> PolicySet:
    """The worst case (everyone may call everyone else), with a TCP port on every third
    service and mTLS disabled on every fourth."""
    ps = topology.worst_case(services)
    workloads = [
        dataclasses.replace(w, ports=(*w.ports, WorkloadPort("tcp", 9000, Protocol.TCP)))
        if i % 3 == 0
        else w
        for i, w in enumerate(ps.workloads)
    ]
    disabled = [
        PeerAuthentication(
            namespace=w.namespace,
            name=f"pa-{w.name}",
            selector=dict(w.labels),
            mode=MtlsMode.DISABLE,
        )
        for i, w in enumerate(workloads)
        if i % 4 == 1
    ]
    return PolicySet.create(
        mesh=ps.mesh,
        workloads=workloads,
        authorization_policies=ps.authorization_policies,
        peer_authentications=disabled,
    )


def serialized(part: Any) -> tuple[Any, ...]:
    return (
        *(
            tuple(m.SerializeToString(deterministic=True) for m in items)
            for items in (part.listeners, part.routes, part.clusters, part.endpoints)
        ),
        part.tls_used,
    )


def per_pair(ps: PolicySet, options: CompileOptions) -> dict[str, tuple[Any, ...]]:
    """The oracle: each caller's targets compiled one by one, nothing shared between callers."""
    index = mesh_index(ps)
    out = {}
    for w in ps.workloads:
        fragments = FragmentCache(options)
        table = PeerTable(ps, options, index.ports)
        peers = peers_of(ps, w, index=index.peers)
        targets = outbound_targets(ps, w, options, index.ports, peers=peers, table=table)
        out[w.ref] = serialized(compile_outbound(w, targets, fragments, ps.mesh.trust_domain))
    return out


def shared(ps: PolicySet, options: CompileOptions) -> tuple[dict[str, Any], PeerTable]:
    index = mesh_index(ps)
    fragments = FragmentCache(options)
    table = PeerTable(ps, options, index.ports)
    out = {
        w.ref: serialized(outbound_half(ps, w, options, index, fragments, table, now=None))
        for w in ps.workloads
    }
    return out, table


@pytest.mark.parametrize(
    "options",
    [
        CompileOptions(),
        CompileOptions(access_log_path=None),
        CompileOptions(otlp=Endpoint("127.0.0.1", 4317)),  # tracing: a part per caller
    ],
    ids=["xds-default", "no-access-log", "tracing"],
)
def test_every_other_peer_lists_equal_the_per_pair_compile(options: CompileOptions) -> None:
    ps = mixed(14)
    index = mesh_index(ps)
    table = PeerTable(ps, options, index.ports)
    assert all(table.is_everyone_else(w, callee_refs(ps, w, index)) for w in ps.workloads)
    got, table = shared(ps, options)
    assert got == per_pair(ps, options)
    # Bounded: one list set per distinct caller part, at most MAX_EVERYONE of them (with
    # tracing every caller's part differs; past the bound callers take the per-pair path).
    assert 1 <= len(table._everyone) <= MAX_EVERYONE


def test_a_caller_with_its_own_bindings_or_fewer_peers_takes_the_per_pair_path() -> None:
    ps = topology.fleet(topology.FleetShape(services=12, namespace_size=4, callers=3))
    index = mesh_index(ps)
    table = PeerTable(ps, CompileOptions(), index.ports)
    assert not all(table.is_everyone_else(w, callee_refs(ps, w, index)) for w in ps.workloads)
    got, _ = shared(ps, CompileOptions())
    assert got == per_pair(ps, CompileOptions())
    worst = mixed(8)
    caller, peer = worst.workloads[0], worst.workloads[1]
    bound = CompileOptions(
        bindings={
            caller.ref: WorkloadBinding(outbound={f"{peer.ref}:8080": Endpoint("127.0.0.9", 15999)})
        }
    )
    got, _ = shared(worst, bound)
    assert got == per_pair(worst, bound)
    assert b"127.0.0.9" in b"".join(got[caller.ref][0])


def test_compile_mesh_equals_compiling_each_workload_alone() -> None:
    """compile_mesh shares everything between callers; compile_workload alone shares nothing."""
    from meshward.compile import compile_workload

    ps = mixed(10)
    options = CompileOptions()
    mesh = compile_mesh(ps, options)
    for w in ps.workloads:
        assert mesh[w.ref].serialize() == compile_workload(ps, w, options).serialize()
