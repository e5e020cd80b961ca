"""Incremental compile: only the affected halves of the affected workloads are recompiled, and
the result is byte-identical to a full compile, whatever the sequence of edits."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshward.compile import CompileOptions, Endpoint, compile_workload
from meshward.compile.fragments import FragmentCache
from meshward.compile.incremental import CompileState, compile_incremental
from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    MtlsMode,
    Operation,
    PeerAuthentication,
    Protocol,
    Rule,
    Source,
    Workload,
    WorkloadPort,
)
from meshward.policy.policyset import PolicySet
from meshward.testing import topology

OPTIONS = CompileOptions(extauthz=Endpoint("127.0.0.1", 9191), otlp=Endpoint("127.0.0.1", 4317))
T0 = datetime(2030, 1, 1, tzinfo=UTC)
SHAPE = topology.FleetShape(services=9, namespace_size=4, callers=3)


def base() -> PolicySet:
    return topology.fleet(SHAPE)


def rebuild(ps: PolicySet, **changes: Any) -> PolicySet:
    return PolicySet.create(
        mesh=ps.mesh,
        workloads=changes.get("workloads", ps.workloads),
        authorization_policies=changes.get("policies", ps.authorization_policies),
        peer_authentications=changes.get("peer_authentications", ps.peer_authentications),
        request_authentications=ps.request_authentications,
    )


def full(ps: PolicySet, options: CompileOptions, now: datetime | None) -> dict[str, Any]:
    """The oracle: every workload compiled from scratch (an exception is its outcome)."""
    out: dict[str, Any] = {}
    memo: dict[tuple[str, str], Any] = {}
    fragments = FragmentCache(options)
    for w in ps.workloads:
        try:
            out[w.ref] = compile_workload(ps, w, options, now=now, _memo=memo, fragments=fragments)
        except Exception as exc:
            out[w.ref] = f"{type(exc).__name__}: {exc}"
    return out


def assert_equal(state: CompileState, expected: dict[str, Any]) -> None:
    got: dict[str, Any] = dict(state.results) | dict(state.errors)
    assert set(got) == set(expected)
    for ref, want in expected.items():
        have = got[ref]
        if isinstance(want, str):
            assert have == want, ref
            continue
        assert not isinstance(have, str), (ref, have)
        assert have.serialize() == want.serialize(), ref
        assert have.secret_names == want.secret_names, ref
        assert have.next_change == want.next_change, ref
        assert have.placement == want.placement, ref
        assert have.policy_version == want.policy_version, ref
        assert have.to_json() == want.to_json(), ref


def callers_policy(ps: PolicySet, ref: str) -> AuthorizationPolicy:
    ns, name = ref.split("/")
    return next(p for p in ps.authorization_policies if p.ref == f"{ns}/{name}-callers")


def replace_policy(
    ps: PolicySet, old: AuthorizationPolicy, new: AuthorizationPolicy | None
) -> PolicySet:
    policies = [p for p in ps.authorization_policies if p is not old]
    if new is not None:
        policies.append(new)
    return rebuild(ps, policies=policies)


def with_principals(
    policy: AuthorizationPolicy, principals: tuple[str, ...]
) -> AuthorizationPolicy:
    rule = policy.rules[0]
    return dataclasses.replace(
        policy, rules=(dataclasses.replace(rule, sources=(Source(principals=principals),)),)
    )


def test_first_compile_equals_full_compile() -> None:
    ps = base()
    state, recompiled = compile_incremental(ps, OPTIONS, now=T0)
    assert_equal(state, full(ps, OPTIONS, T0))
    assert recompiled.inbound == recompiled.outbound == {w.ref for w in ps.workloads}


def test_same_content_recompiles_nothing() -> None:
    ps = base()
    state, _ = compile_incremental(ps, OPTIONS, now=T0)
    again = rebuild(ps)  # new objects, same content
    state2, recompiled = compile_incremental(again, OPTIONS, now=T0, previous=state)
    assert recompiled.workloads == frozenset()
    assert all(state2.results[r] is state.results[r] for r in state.results)


def test_authorization_edit_recompiles_the_callee_inbound_half_only() -> None:
    """Methods of one service's ALLOW: its route changes, its listener is the same proto,
    nobody's outbound half is touched."""
    ps = base()
    state, _ = compile_incremental(ps, OPTIONS, now=T0)
    target = ps.workloads[2].ref
    policy = callers_policy(ps, target)
    rule = policy.rules[0]
    edited = dataclasses.replace(
        policy,
        rules=(dataclasses.replace(rule, operations=(Operation(methods=("DELETE",)),)),),
    )
    ps2 = replace_policy(ps, policy, edited)
    state2, recompiled = compile_incremental(ps2, OPTIONS, now=T0, previous=state)
    assert recompiled.inbound == {target}
    assert recompiled.outbound == frozenset()
    assert_equal(state2, full(ps2, OPTIONS, T0))
    old, new = state.results[target], state2.results[target]
    inbound_listener = next(m for m in old.listeners if m.name.startswith("inbound"))
    assert any(m is inbound_listener for m in new.listeners)  # reused, not rebuilt
    assert [r.SerializeToString() for r in old.routes] != [
        r.SerializeToString() for r in new.routes
    ]


def test_who_may_call_edit_recompiles_the_callers_outbound_half() -> None:
    ps = base()
    state, _ = compile_incremental(ps, OPTIONS, now=T0)
    target = ps.workloads[1]  # team000/svc0000 (monitoring/prometheus sorts first)
    policy = callers_policy(ps, target.ref)
    named = set(policy.rules[0].sources[0].principals)
    newcomer = next(
        w
        for w in ps.workloads
        if w.ref != target.ref
        and w.principal(topology.TRUST_DOMAIN) not in named
        and w.namespace not in (target.namespace, topology.MONITOR_NAMESPACE)
    )
    edited = with_principals(policy, (*sorted(named), newcomer.principal(topology.TRUST_DOMAIN)))
    ps2 = replace_policy(ps, policy, edited)
    state2, recompiled = compile_incremental(ps2, OPTIONS, now=T0, previous=state)
    assert recompiled.inbound == {target.ref}
    assert recompiled.outbound == {newcomer.ref}
    assert_equal(state2, full(ps2, OPTIONS, T0))


def test_peer_mtls_change_recompiles_its_callers() -> None:
    ps = base()
    state, _ = compile_incremental(ps, OPTIONS, now=T0)
    peer = ps.workloads[1]
    strict = PeerAuthentication(
        namespace=peer.namespace, name="strict", selector={"app": peer.name}, mode=MtlsMode.DISABLE
    )
    ps2 = rebuild(ps, peer_authentications=[strict])
    state2, recompiled = compile_incremental(ps2, OPTIONS, now=T0, previous=state)
    callers = {ref for ref, out in state.outbound.items() if peer.ref in out.callees}
    assert callers and recompiled.outbound == callers
    assert recompiled.inbound == {peer.ref}
    assert_equal(state2, full(ps2, OPTIONS, T0))


# ---- property: random edit sequences ------------------------------------------------------

EDITS = (
    "methods",
    "add_caller",
    "remove_caller",
    "drop_policy",
    "namespace_allow",
    "mtls",
    "mtls_disable",
    "address",
    "port",
    "add_workload",
    "remove_workload",
    "expiry",
    "custom",
    "now",
)
#: A few random edits in a row, each an edit kind and a seed: what the property tests replay.
EDIT_SEQUENCES = st.lists(
    st.tuples(st.sampled_from(EDITS), st.integers(min_value=0, max_value=1000)),
    min_size=1,
    max_size=4,
)


def apply_edit(ps: PolicySet, edit: str, pick: int, now: datetime) -> tuple[PolicySet, datetime]:
    workloads = list(ps.workloads)
    policies = list(ps.authorization_policies)
    w = workloads[pick % len(workloads)]
    td = topology.TRUST_DOMAIN
    if edit == "methods" and policies:
        p = policies[pick % len(policies)]
        if p.rules:
            rule = dataclasses.replace(
                p.rules[0], operations=(Operation(methods=(("GET", "PUT", "POST")[pick % 3],)),)
            )
            policies[pick % len(policies)] = dataclasses.replace(p, rules=(rule, *p.rules[1:]))
    elif edit in ("add_caller", "remove_caller"):
        own = [p for p in policies if p.selector == {"app": w.name} and p.namespace == w.namespace]
        if own and own[0].rules and own[0].rules[0].sources:
            p = own[0]
            names = list(p.rules[0].sources[0].principals)
            other = workloads[(pick * 7 + 3) % len(workloads)].principal(td)
            if edit == "add_caller" and other not in names:
                names.append(other)
            elif edit == "remove_caller" and len(names) > 1:
                names.pop(pick % len(names))
            policies[policies.index(p)] = with_principals(p, tuple(names))
    elif edit == "drop_policy" and policies:
        policies.pop(pick % len(policies))
    elif edit == "namespace_allow":
        policies.append(
            AuthorizationPolicy(
                namespace=w.namespace,
                name=f"ns-allow-{pick}",
                action=Action.ALLOW,
                rules=(
                    Rule(
                        sources=(
                            Source(namespaces=(workloads[pick // 2 % len(workloads)].namespace,)),
                        )
                    ),
                ),
            )
        )
    elif edit in ("mtls", "mtls_disable"):
        mode = (MtlsMode.STRICT, MtlsMode.DISABLE, MtlsMode.PERMISSIVE)[pick % 3]
        if edit == "mtls_disable":
            mode = MtlsMode.DISABLE
        selector = {"app": w.name} if pick % 2 else None
        pas = [p for p in ps.peer_authentications if p.namespace != w.namespace]
        pas.append(
            PeerAuthentication(namespace=w.namespace, name="pa", selector=selector, mode=mode)
        )
        return rebuild(ps, peer_authentications=pas), now
    elif edit == "address":
        workloads[workloads.index(w)] = dataclasses.replace(w, address=f"10.0.0.{pick % 250}")
    elif edit == "port":
        ports = list(w.ports)
        if len(ports) > 1:
            ports.pop()
        else:
            ports.append(WorkloadPort("tcp", 7000 + pick % 3, Protocol.TCP))
        workloads[workloads.index(w)] = dataclasses.replace(w, ports=tuple(ports))
    elif edit == "add_workload":
        workloads.append(
            Workload(
                namespace=w.namespace,
                name=f"extra{pick}",
                labels={"app": f"extra{pick}"},
                service_account=f"extra{pick}",
                ports=(WorkloadPort("http", 8080, Protocol.HTTP),),
            )
        )
    elif edit == "remove_workload" and len(workloads) > 2:
        workloads.remove(w)
    elif edit == "expiry" and policies:
        p = policies[pick % len(policies)]
        policies[pick % len(policies)] = dataclasses.replace(
            p, expires_at=T0 + timedelta(minutes=pick % 4)
        )
    elif edit == "custom":
        policies.append(
            AuthorizationPolicy(
                namespace=w.namespace,
                name=f"custom-{pick}",
                action=Action.CUSTOM,
                provider="meshward",
                selector={"app": w.name},
                rules=(Rule(operations=(Operation(paths=("/custom",)),)),),
            )
        )
    elif edit == "now":
        return ps, now + timedelta(minutes=1 + pick % 2)
    return rebuild(ps, workloads=workloads, policies=policies), now


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    edits=EDIT_SEQUENCES,
    extauthz=st.booleans(),
)
def test_incremental_equals_full_compile_over_random_edits(
    edits: list[tuple[str, int]], extauthz: bool
) -> None:
    options = OPTIONS if extauthz else CompileOptions(access_log_path=None)
    ps, now = base(), T0
    state, _ = compile_incremental(ps, options, now=now)
    for edit, pick in edits:
        ps, now = apply_edit(ps, edit, pick, now)
        state, _ = compile_incremental(ps, options, now=now, previous=state)
        assert_equal(state, full(ps, options, now))


def test_fragment_cache_stays_bounded_by_the_registry() -> None:
    """Flood of edits to one peer (a new address each time) and workloads leaving: the shared
    fragments kept are those of the registry as it is now, not every version ever seen."""
    ps = base()
    state, _ = compile_incremental(ps, OPTIONS, now=T0)
    live = len(state.fragments.peers)
    peer = ps.workloads[1]
    for i in range(30):
        workloads = [
            dataclasses.replace(w, address=f"10.1.0.{i}") if w.ref == peer.ref else w
            for w in ps.workloads
        ]
        ps = rebuild(ps, workloads=workloads)
        state, _ = compile_incremental(ps, OPTIONS, now=T0, previous=state)
        assert len(state.fragments.peers) <= live
    fewer = rebuild(ps, workloads=ps.workloads[:4])
    state, _ = compile_incremental(fewer, OPTIONS, now=T0, previous=state)
    refs = {w.ref for w in fewer.workloads}
    assert {key[0].ref for key in state.fragments.peers} <= refs
    assert {ref for ref, _ in state.fragments.callers} <= refs
    assert_equal(state, full(fewer, OPTIONS, T0))


@pytest.fixture(scope="module")
def compile_process() -> Iterator[Any]:
    """One worker process for every example: its state carries over between examples, so each
    example's first compile is incremental from whatever the previous one left."""
    from meshward.xds.compile_adapter import compiler_for

    made = compiler_for(OPTIONS, process=True).config_compiler()
    yield made
    made.close()


def packed(configs: Any) -> dict[str, Any]:
    return {
        ref: (
            [
                (r.type_url, r.name, r.hash, r.body.value)
                for items in c.resources.values()
                for r in items
            ],
            c.error,
        )
        for ref, c in configs.items()
    }


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=EDIT_SEQUENCES)
def test_the_compile_process_equals_a_full_compile_over_random_edits(
    compile_process: Any, edits: list[tuple[str, int]]
) -> None:
    """The process path (meshward.xds.compile_process): incremental in the worker, only the
    changes sent back, rebuilt in the parent; byte-identical to a full compile here, and
    ``changed`` is exactly the workloads whose served resources differ."""
    from meshward.xds.compile_adapter import compiler_for
    from meshward.xds.compiling import LocalCompile, mesh_compiler

    ps, now = base(), T0
    installed = compile_process(ps, now, {}).configs
    for edit, pick in edits:
        ps, now = apply_edit(ps, edit, pick, now)
        compiled = compile_process(ps, now, installed)
        oracle = LocalCompile(mesh_compiler(compiler_for(OPTIONS)))(ps, now, {}).configs
        assert packed(compiled.configs) == packed(oracle)
        before, after = packed(installed), packed(compiled.configs)
        assert compiled.changed == {
            ref for ref in before.keys() | after.keys() if before.get(ref) != after.get(ref)
        }
        installed = compiled.configs
