"""The compile in a worker process of its own (meshward.xds.compile_process): the same packed
configs as compiling here, only what changed comes back, a dead worker is replaced and rebuilt,
one that keeps dying fails closed (the configs in force stay, status and metrics say why).
Real worker processes, killed with real signals; real gRPC and mTLS for the end-to-end case."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from meshward.certs import CertificateAuthority
from meshward.compile import CompileOptions, Endpoint
from meshward.policy import PolicySet
from meshward.policy.model import Action, AuthorizationPolicy, Operation, Rule
from meshward.policy.policyset import selects
from meshward.testing import topology
from meshward.xds import typeurls
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.compile_process import CompileProcess, _Worker
from meshward.xds.compiling import Compiled, CompileFailed, LocalCompile, mesh_compiler
from meshward.xds.service import XdsService

#: ext_authz known (a CUSTOM edit compiles), no tracing (callers share their outbound parts)
OPTIONS = CompileOptions(extauthz=Endpoint("127.0.0.1", 9191))
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def fleet() -> PolicySet:
    return topology.fleet(topology.FleetShape(services=12, namespace_size=4, callers=3))


def with_policies(ps: PolicySet, policies: list[AuthorizationPolicy]) -> PolicySet:
    return PolicySet.create(
        mesh=ps.mesh,
        workloads=ps.workloads,
        authorization_policies=policies,
        peer_authentications=ps.peer_authentications,
        request_authentications=ps.request_authentications,
    )


def deny_debug(ps: PolicySet, path: str = "/debug") -> PolicySet:
    """A root-namespace DENY: every workload's inbound route changes (a mesh-wide edit)."""
    deny = AuthorizationPolicy(
        namespace=ps.mesh.root_namespace,
        name="deny-debug",
        action=Action.DENY,
        rules=(Rule(operations=(Operation(paths=(path,)),)),),
    )
    kept = [p for p in ps.authorization_policies if p.name != "deny-debug"]
    return with_policies(ps, [*kept, deny])


def flat(configs: Any) -> dict[str, Any]:
    """Everything a node is served from a config: each resource's bytes and references."""
    return {
        ref: (
            [
                (
                    r.type_url,
                    r.name,
                    r.hash,
                    r.body.SerializeToString(),
                    r.secrets,
                    r.clusters,
                    r.routes,
                    r.endpoints,
                )
                for items in config.resources.values()
                for r in items
            ],
            config.error,
        )
        for ref, config in configs.items()
    }


def full(ps: PolicySet, now: datetime) -> dict[str, Any]:
    """The oracle: a from-scratch compile in this process."""
    return flat(LocalCompile(mesh_compiler(compiler_for(OPTIONS)))(ps, now, {}).configs)


def kill(pid: int | None) -> None:
    assert pid is not None
    os.kill(pid, signal.SIGKILL)


def test_process_compile_equals_a_full_compile_and_reports_only_changes(
    process: CompileProcess,
) -> None:
    ps = fleet()
    first = process(ps, T0, {})
    assert flat(first.configs) == full(ps, T0)
    assert first.changed == {w.ref for w in ps.workloads}
    # One policy's methods: only its callee's config changes.
    policies = list(ps.authorization_policies)
    target = next(p for p in policies if p.selector is not None)
    rule = dataclasses.replace(target.rules[0], operations=(Operation(methods=("PUT",)),))
    policies[policies.index(target)] = dataclasses.replace(target, rules=(rule,))
    one = with_policies(ps, policies)
    second = process(one, T0, first.configs)
    assert flat(second.configs) == full(one, T0)
    callees = {
        w.ref
        for w in ps.workloads
        if w.namespace == target.namespace and selects(target.selector, w.labels)
    }
    assert second.changed == callees
    untouched = next(ref for ref in second.configs if ref not in callees)
    assert second.configs[untouched] is first.configs[untouched]  # nothing rebuilt for it
    # Mesh-wide, then time passing: still byte-identical.
    mesh = deny_debug(one)
    third = process(mesh, T0 + timedelta(minutes=1), second.configs)
    assert flat(third.configs) == full(mesh, T0 + timedelta(minutes=1))
    assert third.changed == {w.ref for w in ps.workloads}
    # The parent holds only the newest result's resources (bounded by the mesh).
    held = {(r.type_url, r.name, r.hash) for c in third.configs.values()
            for items in c.resources.values() for r in items}  # fmt: skip
    assert process.status()["resources"] == len(held)
    assert set(process._table) == held  # (the worker named the keys it dropped)


def test_the_worker_names_the_keys_no_workload_holds_any_more() -> None:
    """The parent drops them from its table without walking every workload's resources."""
    worker = _Worker(OPTIONS, False)
    ps = fleet()
    first = worker.compile(ps, T0, {}, False)
    assert first.dropped == () and set(first.bodies) == set(worker.live)
    before = set(worker.live)
    second = worker.compile(deny_debug(ps), T0, {}, False)
    assert set(second.dropped) == before - set(worker.live) != set()
    assert set(second.bodies) == set(worker.live) - before
    assert len(second.dropped) == len(set(second.dropped))


def test_a_killed_worker_is_replaced_and_rebuilt(process: CompileProcess) -> None:
    ps = fleet()
    installed = process(ps, T0, {})
    restarts = process.restarts
    kill(process.pid)
    edited = deny_debug(ps, "/admin")
    after = process(edited, T0, installed.configs)
    assert process.restarts == restarts + 1
    assert "BrokenProcessPool" in (process.status()["last_error"] or "")
    assert flat(after.configs) == full(edited, T0)
    assert after.changed == {w.ref for w in ps.workloads}
    # The new worker's state is incremental again: an unchanged set changes nothing.
    again = process(edited, T0, after.configs)
    assert again.changed == set()


class Killer:
    """Kills every worker process of ``process`` as soon as it appears (a worker that keeps
    dying: out of memory on every try, say), until stopped."""

    def __init__(self, process: CompileProcess) -> None:
        self.process = process
        self.stop = threading.Event()
        self.killed = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            pool = self.process._pool
            for pid in list(getattr(pool, "_processes", None) or {}):
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.killed += 1
                except ProcessLookupError:
                    pass
            self.stop.wait(0.005)

    def __enter__(self) -> Killer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def test_a_worker_that_keeps_dying_gives_no_result(process: CompileProcess) -> None:
    ps = fleet()
    installed = process(ps, T0, {})
    failures = process.failures
    with Killer(process) as killer, pytest.raises(CompileFailed, match="died twice"):
        process(deny_debug(ps), T0, installed.configs)
    assert killer.killed >= 2
    assert process.failures == failures + 1
    # Nothing partial: the next compile (a live worker again) is whole and byte-identical.
    after = process(deny_debug(ps), T0, installed.configs)
    assert flat(after.configs) == full(deny_debug(ps), T0)


def test_an_evaluated_policy_set_goes_to_the_worker(process: CompileProcess) -> None:
    """The control plane evaluates its set (flows, status) before an expires-at recompile sends
    it to the worker: the evaluator's cached plans (closures) must not stop it."""
    from meshward.policy import Request, evaluate

    ps = deny_debug(fleet())
    workload = ps.workloads[0]
    evaluate(ps, workload, Request(method="GET", path="/debug"), now=T0)
    assert ps.plans
    failures = process.failures
    assert flat(process(ps, T0, {}).configs) == full(ps, T0)
    assert process.failures == failures


class _Unpicklable(PolicySet):
    def __reduce__(self) -> Any:
        import pickle

        raise pickle.PicklingError("this set does not pickle")


def test_a_compile_the_worker_cannot_take_is_compiled_here(process: CompileProcess) -> None:
    """Fail closed on time: a compile the live worker refuses is done whole in this process
    (not skipped: a skipped expires-at recompile would keep an expired allow in force)."""
    ps = fleet()
    installed = process(ps, T0, {})
    edited = deny_debug(ps)
    odd = _Unpicklable(
        edited.mesh, edited.workloads, edited.authorization_policies,
        edited.peer_authentications, edited.request_authentications, edited.version,
    )  # fmt: skip
    failures = process.failures
    here = process(odd, T0, installed.configs)
    assert flat(here.configs) == full(edited, T0)
    assert here.changed == {w.ref for w in ps.workloads}
    assert process.failures == failures + 1
    assert "does not pickle" in (process.status()["last_error"] or "")
    # The worker's own view is intact: its next answer is whole and byte-identical.
    after = process(edited, T0, here.configs)
    assert flat(after.configs) == full(edited, T0) and after.changed == set()


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.ephemeral(topology.TRUST_DOMAIN)


async def test_the_control_plane_keeps_its_configs_when_the_worker_keeps_dying(
    ca: CertificateAuthority,
) -> None:
    ps = fleet()
    svc = XdsService(ps, ca, compiler_for(OPTIONS, process=True), admin=None)
    await svc.start()
    try:
        control = svc.control
        assert control.status()["compiler"]["mode"] == "process"
        before: dict[str, Any] = dict(control.configs)
        compile_process = control._compile
        assert isinstance(compile_process, CompileProcess)
        edited = deny_debug(ps)
        with Killer(compile_process):
            control.apply_policy_later(edited)
            await control.compile_worker.idle()
        assert control.policy is ps  # the edit was never installed
        assert control.configs == before
        assert "died twice" in (control.policy_error or "")
        registry = control.metrics.registry
        failed = registry.get_sample_value(
            "meshward_xds_policy_updates_total", {"result": "compile_failed"}
        )
        assert failed == 1.0
        assert control.status()["compiler"]["failures"] == 1
        # The next change compiles in a fresh worker and is installed.
        control.apply_policy_later(edited)
        await control.compile_worker.idle()
        assert control.policy is edited
        assert control.policy_error is None
        assert flat(control.configs) == full(edited, control._compiled_at)
    finally:
        await svc.stop()


async def test_a_node_gets_a_change_compiled_in_the_worker_process(
    ca: CertificateAuthority,
) -> None:
    from meshward.certs.client_tls import client_ssl_context
    from meshward.testing.ads_client import AdsClient

    ps = fleet()
    svc = XdsService(ps, ca, compiler_for(OPTIONS, process=True), admin=None)
    await svc.start()
    workload = ps.workloads[0]
    svid = ca.issue(workload.spiffe_id(topology.TRUST_DOMAIN))
    client = AdsClient(
        "127.0.0.1",
        svc.port or 0,
        f"{workload.ref}/0",
        client_ssl_context(svid.cert_chain_pem, svid.private_key_pem, ca.trust_bundle().roots_pem),
        server_identity=svc.server_identity,
        subscriptions={
            typeurls.CLUSTER: (),
            typeurls.LISTENER: (),
            typeurls.SECRET: ("default", "ROOTCA"),
        },
        follow_routes=True,
    )
    task = asyncio.create_task(client.run())
    try:

        async def routes_with(text: bytes) -> None:
            for _ in range(3000):  # bounded: a failure detector, not a timing assertion
                routes = client.view(typeurls.ROUTE).resources
                if routes and any(text in r.value for r in routes.values()):
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"no route with {text!r} reached the node")

        await routes_with(b"")
        svc.control.apply_policy_later(deny_debug(ps, "/only-in-the-edit"))
        await routes_with(b"/only-in-the-edit")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await svc.stop()


def test_compiled_results_carry_no_compile_state(process: CompileProcess) -> None:
    """The parent holds packed resources only: the protos and the incremental state stay in
    the worker (the parent's memory is not the compile's)."""
    compiled = process(fleet(), T0, {})
    assert isinstance(compiled, Compiled)
    assert compiled.state is None and not compiled.packed


def test_a_policy_set_goes_as_a_delta_and_stands_for_the_same_set() -> None:
    from meshward.testing.policy_edits import addressed_fleet, edits
    from meshward.xds.compile_process import StaleBase, apply_policy_delta, policy_delta

    old = addressed_fleet()
    for name, new in edits(old).items():
        sent = policy_delta(old, new)
        assert sent is not None
        assert sum(map(len, sent.changed.values())) + sum(map(len, sent.removed.values())) <= 2
        rebuilt = apply_policy_delta(old, sent)
        assert rebuilt == new and rebuilt.version == new.version, name
        assert rebuilt.canonical_documents() == new.canonical_documents()
        with pytest.raises(StaleBase):
            apply_policy_delta(new, sent)  # not its base
    # what a delta cannot say goes whole
    twice = PolicySet(old.mesh, (*old.workloads, old.workloads[0]), old.authorization_policies,
                      (), (), "0" * 64)  # fmt: skip
    assert policy_delta(old, twice) is None


def test_edits_reach_the_worker_as_deltas_and_a_new_worker_gets_the_whole_set(
    process: CompileProcess,
) -> None:
    ps = fleet()
    first = process(ps, T0, {})
    sent = process.deltas
    edited = deny_debug(ps, "/one")
    second = process(edited, T0, first.configs)
    assert process.deltas == sent + 1  # the edit went as a delta
    assert flat(second.configs) == full(edited, T0)
    kill(process.pid)  # the new worker holds no base: the next edit goes whole
    again = deny_debug(ps, "/two")
    third = process(again, T0, second.configs)
    assert flat(third.configs) == full(again, T0)
    # a base the worker does not hold (told wrong): it refuses, the whole set goes
    process._worker_policy = deny_debug(ps, "/not-what-it-holds")
    fourth = process(edited, T0, third.configs)
    assert flat(fourth.configs) == full(edited, T0)


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_the_worker_heap_is_frozen_and_collected_when_it_has_grown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gc
    import weakref

    from meshward.xds import compile_process as cp

    monkeypatch.setattr(cp, "_REFERENCE", [])
    try:
        node = _Node()
        alive = weakref.ref(node)
        assert cp._settle() is False  # the first compile's heap: frozen, no collection
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert alive() is not None  # a frozen cycle waits for the thaw
        assert cp._settle() is False  # not grown: frozen again, nothing collected
        assert alive() is not None
        monkeypatch.setattr(cp, "_REFERENCE", [1])  # as if the heap had grown past GROWTH
        monkeypatch.setattr(cp, "FLOOR", 0)
        assert cp._settle() is True
        assert alive() is None
        assert cp._REFERENCE[0] > 1
    finally:
        gc.unfreeze()
