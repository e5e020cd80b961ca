"""The compile-time shortcuts (outbound listeners assembled from shared peer fragments, shared
peer resources) give exactly the bytes of the plain dict -> proto conversion."""

from __future__ import annotations

from typing import Any

import pytest

from meshward.compile import (
    CompileOptions,
    Endpoint,
    Mode,
    compile_mesh,
    compile_workload,
    listeners,
)
from meshward.compile import protos as _protos
from meshward.compile.fragments import FragmentCache, split_fields
from meshward.compile.options import AccessLogFormat
from meshward.policy.model import MtlsMode
from meshward.testing import synth, topology


@pytest.mark.parametrize("mode", [Mode.XDS, Mode.STATIC])
@pytest.mark.parametrize("log", [AccessLogFormat.JSON, AccessLogFormat.TEXT, None])
def test_assembled_outbound_listeners_equal_parsed_ones(
    mode: Mode, log: AccessLogFormat | None
) -> None:
    """Listeners assembled from shared peer fragments and per-caller parts are byte-identical
    to the ones compiled from scratch, for every caller (the first builds the fragments, the
    others reuse them with their own access log and tracing parts)."""
    policy_set = synth.random_policy_set(5, synth.Profile(mtls=MtlsMode.STRICT), tcp=True)
    options = CompileOptions(
        mode=mode,
        access_log_path="/tmp/a.log" if log else None,
        access_log_format=log or AccessLogFormat.JSON,
        otlp=Endpoint("127.0.0.1", 4317),
    )
    cache = FragmentCache(options)
    checked = 0
    for caller in policy_set.workloads:
        for index, peer in enumerate(w for w in policy_set.workloads if w.ref != caller.ref):
            for port in peer.ports:
                for peer_mode in (MtlsMode.STRICT, MtlsMode.DISABLE):
                    bind = Endpoint("127.0.0.1", 15000 + index)
                    built = listeners.outbound(
                        caller,
                        peer,
                        port,
                        bind=bind,
                        peer_mode=peer_mode,
                        options=options,
                        trust_domain=synth.TRUST_DOMAIN,
                    )
                    fast, fragment = cache.outbound(
                        caller,
                        peer,
                        port,
                        bind=bind,
                        peer_mode=peer_mode,
                        trust_domain=synth.TRUST_DOMAIN,
                    )
                    plain = _protos.listener(built.listener)
                    assert _bytes(fast) == _bytes(plain), (caller.ref, peer.ref, port.port)
                    assert _bytes(fragment.cluster) == _bytes(_protos.cluster(built.clusters[0]))
                    if built.route is not None:
                        assert _bytes(fragment.route) == _bytes(_protos.route(built.route))
                    checked += 1
    assert checked >= 40  # HTTP and TCP peers, several callers
    assert len(cache.callers) <= 2 * len(policy_set.workloads)


def _bytes(message: Any) -> bytes:
    data: bytes = message.SerializeToString(deterministic=True)
    return data


def test_split_fields_join_to_the_deterministic_encoding() -> None:
    policy_set = synth.random_policy_set(3, synth.Profile(jwt=True, custom=True), tcp=True)
    compiled = compile_workload(
        policy_set, synth.TARGET_REF, CompileOptions(extauthz=Endpoint("127.0.0.1", 9191))
    )
    for message in (*compiled.listeners, *compiled.routes, *compiled.clusters):
        joined = b"".join(data for _, data in split_fields(message))
        assert joined == _bytes(message)


def test_namespace_wide_allow_shares_each_peer_fragment() -> None:
    """Every caller of a peer gets the same cluster, endpoints and route objects (built once),
    so a namespace-wide ALLOW compiles each peer once, not once per caller."""
    policy_set = topology.worst_case(12)
    mesh = compile_mesh(policy_set, CompileOptions())
    clusters: dict[str, set[int]] = {}
    routes: dict[str, set[int]] = {}
    for compiled in mesh.values():
        assert len(compiled.clusters) == 1 + 11  # its own inbound cluster + every peer
        for cluster in compiled.clusters:
            clusters.setdefault(cluster.name, set()).add(id(cluster))
        for route in compiled.routes:
            routes.setdefault(route.name, set()).add(id(route))
    outbound = {name: ids for name, ids in clusters.items() if name.startswith("outbound")}
    assert len(outbound) == 12
    assert all(len(ids) == 1 for ids in outbound.values())
    assert all(len(ids) == 1 for name, ids in routes.items() if name.startswith("outbound"))


def test_xds_outbound_listeners_are_one_object_per_peer_whatever_the_caller() -> None:
    """In xDS mode the outbound access and flow logs name the caller through the node (its
    metadata, the ALS stream), not a literal: every caller's listener for a peer port is the
    same proto, packed once. With tracing (a per-caller service name) they differ again."""
    policy_set = topology.worst_case(12)
    options = CompileOptions(flow_log_cluster="meshward-xds")
    mesh = compile_mesh(policy_set, options)
    by_name: dict[str, set[int]] = {}
    for compiled in mesh.values():
        for listener in compiled.listeners:
            by_name.setdefault(listener.name, set()).add(id(listener))
    outbound = {name: ids for name, ids in by_name.items() if name.startswith("outbound")}
    assert len(outbound) == 12 and all(len(ids) == 1 for ids in outbound.values())
    sample = next(iter(mesh.values())).listeners[-1]
    assert sample.name.startswith("outbound") and b"xds.node.metadata" in _bytes(sample)

    traced = compile_mesh(policy_set, CompileOptions(otlp=Endpoint("127.0.0.1", 4317)))
    distinct = {
        _bytes(listener)
        for compiled in traced.values()
        for listener in compiled.listeners
        if listener.name == next(iter(outbound))
    }
    assert len(distinct) == 11  # every caller but the peer itself


def test_mesh_compile_equals_workload_by_workload_compile() -> None:
    policy_set = synth.scale_policy_set(30, 120)
    options = CompileOptions(extauthz=Endpoint("127.0.0.1", 9191))
    mesh = compile_mesh(policy_set, options)
    for ref in ("team-000/svc-0003", "team-002/svc-0029"):
        alone = compile_workload(policy_set, ref, options)
        assert mesh[ref].serialize() == alone.serialize()


def test_shared_listeners_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-caller listeners (tracing on: one per caller and peer port) past the cap are
    assembled each time instead of kept; the output is the same."""
    from meshward.compile import fragments

    policy_set = topology.worst_case(8)
    options = CompileOptions(otlp=Endpoint("127.0.0.1", 4317))
    expected = {ref: c.serialize() for ref, c in compile_mesh(policy_set, options).items()}
    monkeypatch.setattr(fragments, "MAX_SHARED_LISTENERS", 5)
    cache = FragmentCache(options)
    for peer in policy_set.workloads[1:]:
        for caller in policy_set.workloads:
            if caller.ref != peer.ref:
                cache.outbound(
                    caller,
                    peer,
                    peer.ports[0],
                    bind=Endpoint("127.0.0.1", 15100),
                    peer_mode=MtlsMode.STRICT,
                    trust_domain=policy_set.mesh.trust_domain,
                )
    assert len(cache.shared) == 5
    capped = compile_mesh(policy_set, options)
    assert {ref: c.serialize() for ref, c in capped.items()} == expected
