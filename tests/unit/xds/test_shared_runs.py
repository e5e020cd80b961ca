"""The control plane's compile stage over runs of shared tuples (meshward.compile.spliced): the
Envoy-limits backstop, the agent-secret rewrite, packing and fingerprinting do their
per-message work once per shared mesh-wide tuple, and give exactly what the flat passes give:
the same bytes, the same refusals, the same ``changed`` sets, in this process and through the
compile worker process."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings

from meshward.compile import CompileOptions, compile_workload, spliced
from meshward.compile.envoy_limits import resource_problems
from meshward.policy import parse
from meshward.policy.model import Action, AuthorizationPolicy, Operation, Rule
from meshward.policy.policyset import PolicySet
from meshward.xds.agentsds import SecretsFromAgent, secrets_from_agent
from meshward.xds.compile_adapter import MeshCompiler, compiler_for
from meshward.xds.compile_process import CompileProcess
from meshward.xds.compiling import (
    LocalCompile,
    Messages,
    WorkloadConfig,
    fingerprint_of,
    mesh_compiler,
)
from meshward.xds.resources import Resource
from tests.unit.compile.test_envoy_limits import LONG, WORKLOAD, deny
from tests.unit.compile.test_incremental import EDIT_SEQUENCES, T0, apply_edit
from tests.unit.compile.test_outbound import mixed
from tests.unit.xds.test_compile_process import OPTIONS, flat

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def root_deny(ps: PolicySet) -> PolicySet:
    """A root-namespace DENY selecting every workload: every inbound half recompiled."""
    deny_all = AuthorizationPolicy(
        namespace=ps.mesh.root_namespace,
        name="deny-debug",
        action=Action.DENY,
        rules=(Rule(operations=(Operation(paths=("/debug",)),)),),
    )
    return PolicySet.create(
        mesh=ps.mesh,
        workloads=ps.workloads,
        authorization_policies=[*ps.authorization_policies, deny_all],
        peer_authentications=ps.peer_authentications,
    )


def serialized(messages: Any) -> list[bytes]:
    return [m.SerializeToString(deterministic=True) for m in messages]


def shared_tuples(outcome: Any) -> set[int]:
    assert isinstance(outcome, Messages)
    return {id(shared) for shared, start, stop, _ in outcome.runs if stop > start}


def test_handed_messages_are_the_flat_rewrite_and_share_one_rewritten_tuple() -> None:
    """Each workload is handed exactly the agent-secret rewrite of its flat messages, made of
    slices of a few rewritten mesh-wide tuples that every caller shares; a mesh-wide inbound
    edit reuses those tuples (the outbound halves did not change)."""
    compiler = MeshCompiler(CompileOptions())
    ps = mixed(9)
    state, out = compiler.mesh(ps, NOW, None)
    for ref, result in state.results.items():
        flat_messages = [m for group in result.by_type().values() for m in group]
        assert serialized(out[ref]) == serialized(secrets_from_agent(flat_messages)), ref
        assert len(out[ref]) == len(flat_messages)
    first = set().union(*(shared_tuples(o) for o in out.values()))
    assert 1 <= len(first) <= 2 * 4  # per distinct caller part (HTTP-only, with TCP) and kind
    state, again = compiler.mesh(root_deny(ps), NOW, state)
    for ref, result in state.results.items():
        flat_messages = [m for group in result.by_type().values() for m in group]
        assert serialized(again[ref]) == serialized(secrets_from_agent(flat_messages)), ref
    assert set().union(*(shared_tuples(o) for o in again.values())) == first


def test_a_refused_message_in_a_shared_tuple_refuses_every_workload_holding_it() -> None:
    """A message Envoy would refuse (a 408-instruction regex, checked by RE2 itself) in a
    shared tuple: every workload whose runs include it gets the refusal, in the order the flat
    check lists it; the one whose cut leaves it out does not; the tuple is checked once."""
    bad = compile_workload(
        parse({"w.yaml": WORKLOAD, "d.yaml": deny(LONG)}), "shop/orders", CompileOptions()
    )
    ok = compile_workload(parse({"w.yaml": WORKLOAD}), "shop/orders", CompileOptions())
    (refused,) = bad.routes
    (fine,) = ok.routes
    shared = (fine, refused, fine)
    holders = {
        "all": spliced.without(shared, ()),
        "cut-out": spliced.without(shared, (1,)),
        "own-first": ((spliced.EMPTY, 0, 0, (fine,)), *spliced.without(shared, (0,))),
    }
    compiler = MeshCompiler(CompileOptions())
    checked: dict[int, Any] = {}
    checked_shared: dict[int, Any] = {}
    found = {}
    for name, runs in holders.items():
        result = dataclasses.replace(
            ok,
            workload=name,
            listeners=(),
            clusters=(),
            endpoints=(),
            routes=spliced.flat(runs),
            runs=((), runs, (), ()),
        )
        found[name] = compiler._problems(result, checked, checked_shared)
        assert found[name] == resource_problems(result), name
    assert found["all"] and found["own-first"] and not found["cut-out"]
    assert all("408" in p for p in found["all"])
    assert list(checked_shared) == [id(shared)]


def test_shared_rewrites_keep_identity_and_are_bounded_under_a_flood() -> None:
    compiler = compiler_for(CompileOptions())
    ps = mixed(6)
    workload = ps.workloads[0]
    messages = tuple(compiler(ps, workload, NOW))
    rewrite = SecretsFromAgent(max_shared=4)
    once = rewrite.shared(messages)
    assert rewrite.shared(messages) is once  # same tuple in, same rewritten tuple out
    assert all(a is b for a, b in zip(once, rewrite(list(messages)), strict=True))
    for i in range(50):  # a flood of distinct tuples
        rewrite.shared(messages[: i % len(messages)] + messages[i % len(messages) :])
    assert len(rewrite._shared) <= 4
    assert len(rewrite) <= rewrite.max_entries


def test_fingerprints_compare_by_content_whatever_their_runs() -> None:
    keys = tuple(("t", f"n{i}", "h") for i in range(6))
    one = WorkloadConfig(fingerprint=fingerprint_of(keys))
    split = WorkloadConfig(fingerprint=((keys, 0, 2), (keys[2:], 0, 4)))
    same_split = WorkloadConfig(fingerprint=((keys, 0, 2), (keys, 2, 6)))
    other = WorkloadConfig(fingerprint=((keys, 0, 2), (keys, 3, 6)))
    changed = WorkloadConfig(fingerprint=((keys, 0, 2), ((*keys[2:5], ("t", "n5", "x")), 0, 4)))
    assert one.same_resources(split) and split.same_resources(one)
    assert split.same_resources(same_split) and one.flat_keys() == split.flat_keys() == keys
    assert not one.same_resources(other) and not other.same_resources(one)
    assert not split.same_resources(changed) and not one.same_resources(None)
    assert WorkloadConfig().flat_keys() == () and WorkloadConfig().same_resources(WorkloadConfig())
    # With their Resources (the compile process's parent: new key tuples every answer, one
    # Resource per key): the same objects are the same resources; other objects with the same
    # keys too; another key is not.
    rows = tuple(Resource(type_url=t, name=n, hash=h, body=None) for t, n, h in keys)
    copy = tuple(Resource(type_url=t, name=n, hash=h, body=None) for t, n, h in keys)
    answer = WorkloadConfig(fingerprint=((keys, 0, 6),), rows=(rows,))
    later = WorkloadConfig(fingerprint=((tuple(list(keys)), 0, 6),), rows=(rows,))
    parsed_again = WorkloadConfig(fingerprint=((tuple(list(keys)), 0, 6),), rows=(copy,))
    moved = WorkloadConfig(fingerprint=((changed.flat_keys(), 0, 6),), rows=(copy,))
    assert answer.same_resources(later) and answer.same_resources(parsed_again)
    assert not answer.same_resources(moved) and not moved.same_resources(answer)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(edits=EDIT_SEQUENCES)
def test_the_stage_over_random_edits_equals_a_fresh_compile(
    process: CompileProcess, edits: list[tuple[str, int]]
) -> None:
    """A worst-case mesh through random edits, packed from runs in this process and in the
    worker process: byte for byte what a compile from scratch serves, ``changed`` exactly the
    workloads whose served resources differ, and every caller gets the same Resource objects
    for a peer's cluster and endpoints (packed once)."""
    ps, now = mixed(6), T0
    local = LocalCompile(mesh_compiler(compiler_for(OPTIONS)))
    here = local(ps, now, {}, quiet=True).configs
    there = process(ps, now, {}, full=True, quiet=True).configs
    for edit, pick in [("root_deny", 0), *edits]:
        if edit == "root_deny":
            ps = root_deny(ps)
        else:
            ps, now = apply_edit(ps, edit, pick, now)
        oracle = flat(LocalCompile(mesh_compiler(compiler_for(OPTIONS)))(ps, now, {}).configs)
        for installed, stage in ((here, local), (there, process)):
            compiled = stage(ps, now, installed, quiet=True)
            assert flat(compiled.configs) == oracle
            before, after = flat(installed), flat(compiled.configs)
            assert compiled.changed == {
                ref for ref in before.keys() | after.keys() if before.get(ref) != after.get(ref)
            }
            if stage is local:
                here = compiled.configs
                # Bounded: the shared packings kept are those of tuples a config in force holds.
                in_force = {
                    id(shared)
                    for c in here.values()
                    if isinstance(c.source, Messages)
                    for shared, start, stop, _ in c.source.runs
                    if stop > start
                }
                assert set(compiled.shared) <= in_force
                by_key: dict[Any, int] = {}
                for config in here.values():
                    held = [r for items in config.resources.values() for r in items]
                    assert [r.key for r in held] == list(config.flat_keys())
                    for r in held:  # a peer's cluster and endpoints: one Resource for all
                        if r.name.startswith("outbound|"):
                            assert by_key.setdefault(r.key, id(r)) == id(r)
            else:
                there = compiled.configs
