"""Compiles run off the event loop: while a policy change is being compiled, the ADS streams
keep being served (a new node is answered, ACKs are processed), and the result is installed
when it is ready. Each distinct proto is packed once. Real gRPC and mTLS, simulated clients."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from typing import Any

import pytest

from meshward.certs import CertificateAuthority
from meshward.certs.client_tls import client_ssl_context
from meshward.compile import CompileOptions
from meshward.policy import PolicySet, parse
from meshward.testing.ads_client import AdsClient
from meshward.testing.topology import workloads_yaml
from meshward.xds import typeurls
from meshward.xds.compile_adapter import MeshCompiler
from meshward.xds.compiling import Outcome, compile_configs, mesh_compiler, paced
from meshward.xds.service import XdsService

WORKLOADS = workloads_yaml(["frontend", "orders", "payments"])
POLICY = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
      to: [{operation: {methods: [%s]}}]
"""
SUBSCRIPTIONS = {
    typeurls.CLUSTER: (),
    typeurls.LISTENER: (),
    typeurls.SECRET: ("default", "ROOTCA"),
}


def policy(methods: str) -> PolicySet:
    return parse({"mesh.yaml": WORKLOADS + POLICY % methods})


class BlockingCompiler(MeshCompiler):
    """The real compiler, except that the compile of ``block`` signals ``started`` and then
    waits for ``release``: a mesh-wide recompile as long as the test wants."""

    def __init__(self) -> None:
        super().__init__(CompileOptions())
        self.block: str | None = None
        self.started = threading.Event()
        self.release = threading.Event()
        self.threads: set[str] = set()

    def mesh(
        self, policy: PolicySet, now: datetime, previous: Any
    ) -> tuple[Any, dict[str, Outcome]]:
        self.threads.add(threading.current_thread().name)
        if policy.version == self.block:
            self.started.set()
            self.release.wait(60)
        state, out = super().mesh(policy, now, previous)
        return state, dict(out)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.ephemeral("cluster.local")


@pytest.fixture
def compiler() -> BlockingCompiler:
    return BlockingCompiler()


@pytest.fixture
async def service(
    ca: CertificateAuthority, compiler: BlockingCompiler
) -> AsyncIterator[XdsService]:
    svc = XdsService(policy('"GET"'), ca, compiler, admin=None)
    await svc.start()
    try:
        yield svc
    finally:
        compiler.release.set()
        await svc.stop()


def open_client(
    service: XdsService, ca: CertificateAuthority, node: str
) -> tuple[AdsClient, asyncio.Task[None]]:
    namespace, name = node.split("/")[:2]
    svid = ca.issue(f"spiffe://cluster.local/ns/{namespace}/sa/{name}")
    client = AdsClient(
        "127.0.0.1",
        service.port or 0,
        node,
        client_ssl_context(svid.cert_chain_pem, svid.private_key_pem, ca.trust_bundle().roots_pem),
        server_identity=service.server_identity,
        subscriptions=dict(SUBSCRIPTIONS),
        follow_routes=True,
    )
    return client, asyncio.create_task(client.run())


async def until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Bounded wait (a failure detector, not a timing assertion)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def configured(client: AdsClient) -> bool:
    listeners = client.view(typeurls.LISTENER).resources
    return bool(listeners) and bool(client.view(typeurls.ROUTE).resources)


async def test_streams_are_served_while_a_policy_change_compiles(
    service: XdsService, ca: CertificateAuthority, compiler: BlockingCompiler
) -> None:
    first, first_task = open_client(service, ca, "shop/orders")
    second_task: asyncio.Task[None] | None = None
    try:
        await until(lambda: configured(first), "the first node's config")
        routes_before = dict(first.view(typeurls.ROUTE).resources)
        old_version = service.control.policy.version
        new = policy('"GET", "POST"')
        compiler.block = new.version
        # The policy watcher's path: its thread hands the change to the loop.
        on_change, _ = service.control.watcher_callbacks(asyncio.get_running_loop())
        await asyncio.to_thread(on_change, new)
        assert await asyncio.to_thread(compiler.started.wait, 30), "the compile never started"

        # The compile is in progress (blocked in the worker): the loop still serves streams.
        second, second_task = open_client(service, ca, "shop/payments")
        await until(lambda: configured(second), "a new node answered during the compile")
        acked = first.view(typeurls.LISTENER).responses
        first.subscribe(typeurls.ROUTE, [*first.subscriptions[typeurls.ROUTE], "nonexistent"])
        await until(
            lambda: (
                first.view(typeurls.ROUTE).responses > 0
                and service.control.policy.version == old_version
            ),
            "a subscription change answered during the compile",
        )
        assert compiler.started.is_set() and not compiler.release.is_set()
        assert service.control.policy.version == old_version  # not installed yet
        assert first.view(typeurls.LISTENER).responses == acked

        compiler.release.set()
        await until(
            lambda: service.control.policy.version == new.version, "the new policy installed"
        )
        await until(
            lambda: first.view(typeurls.ROUTE).resources != routes_before, "the new rules pushed"
        )
        assert compiler.threads - {threading.main_thread().name}, "compiled on the loop thread"
    finally:
        for task in (first_task, second_task):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (first_task, second_task) if t), return_exceptions=True)


async def test_the_newest_policy_wins_when_changes_queue_up(
    service: XdsService, compiler: BlockingCompiler
) -> None:
    middle, last = policy('"PUT"'), policy('"DELETE"')
    compiler.block = middle.version
    service.control.apply_policy_later(middle)
    assert await asyncio.to_thread(compiler.started.wait, 30)
    service.control.apply_policy_later(policy('"PATCH"'))  # replaced before it runs
    service.control.apply_policy_later(last)
    compiler.release.set()
    await service.control.compile_worker.idle()
    assert service.control.policy.version == last.version


async def test_a_synchronous_apply_after_a_queued_one_is_not_undone(
    service: XdsService, compiler: BlockingCompiler
) -> None:
    queued, direct = policy('"PUT"'), policy('"HEAD"')
    compiler.block = queued.version
    service.control.apply_policy_later(queued)
    assert await asyncio.to_thread(compiler.started.wait, 30)

    def release_soon() -> None:
        compiler.release.set()

    # The synchronous apply waits for the worker's compile (one compile at a time), then wins.
    asyncio.get_running_loop().call_later(0.05, release_soon)
    changed = await asyncio.to_thread(service.control.apply_policy, direct)
    assert changed == {"shop/orders"}
    await service.control.compile_worker.idle()
    assert service.control.policy.version == direct.version


def test_each_shared_proto_is_packed_once() -> None:
    """A peer's cluster is one proto shared by every caller: every node of every caller gets
    the same Resource object (packed and hashed once), and so does the next compile when the
    proto did not change."""
    compile_mesh = mesh_compiler(MeshCompiler(CompileOptions()))
    ps = policy('"GET"')
    now = datetime(2030, 1, 1)
    first = compile_configs(compile_mesh, ps, now, None, {}, {})
    cluster = "outbound|8080||payments.shop"
    holders = [
        r
        for config in first.configs.values()
        for r in config.resources[typeurls.CLUSTER]
        if r.name == cluster
    ]
    assert len(holders) == 2 and holders[0] is holders[1]
    again = compile_configs(
        compile_mesh, policy('"POST"'), now, first.state, first.configs, first.packed
    )
    assert again.changed == {"shop/orders"}
    kept = next(
        r for r in again.configs["shop/frontend"].resources[typeurls.CLUSTER] if r.name == cluster
    )
    assert kept is holders[0]


async def test_paced_fanout_lets_other_streams_run_between_batches() -> None:
    """After a worker compile, nodes are woken a batch at a time: other tasks (the streams'
    answers) run between batches instead of queuing behind every node's push."""
    progress: list[str] = []

    def steps() -> Iterator[object]:
        for i in range(10):
            progress.append(f"node{i}")
            yield i

    async def other_stream() -> None:
        await asyncio.sleep(0)
        progress.append("answer")

    task = asyncio.create_task(other_stream())
    await paced(steps(), batch=3, pause=0)
    await task
    assert "answer" in progress and progress.index("answer") < progress.index("node9")


async def test_paced_fanout_waits_for_the_pushes_in_flight() -> None:
    """With a backlog, the next batch is woken only once the pushes of the earlier ones have
    drained to at most one batch: pushes in flight stay bounded."""
    in_flight = [0]
    peak = [0]

    def steps() -> Iterator[object]:
        for i in range(12):
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            yield i

    async def drain() -> None:
        while True:
            await asyncio.sleep(0.003)
            in_flight[0] = max(0, in_flight[0] - 1)

    drainer = asyncio.create_task(drain())
    try:
        await paced(steps(), batch=3, pause=0.001, backlog=lambda: in_flight[0])
    finally:
        drainer.cancel()
    assert peak[0] <= 3 + 3  # at most one batch waiting plus the batch being woken


async def test_the_push_backlog_returns_to_zero(
    service: XdsService, ca: CertificateAuthority
) -> None:
    """Every stream woken by a change is counted until its pushes are written, then not."""
    first, first_task = open_client(service, ca, "shop/orders")
    second, second_task = open_client(service, ca, "shop/payments")
    try:
        await until(lambda: configured(first) and configured(second), "both configured")
        service.control.apply_policy(policy('"GET", "PUT"'))
        assert service.control.cache.pushing >= 1  # woken (synchronously), nothing written yet
        await until(lambda: service.control.cache.pushing == 0, "the pushes written")
        assert service.control.cache.pushing == 0
    finally:
        for task in (first_task, second_task):
            task.cancel()
        await asyncio.gather(first_task, second_task, return_exceptions=True)
    await until(lambda: service.control.cache.pushing == 0, "streams closed")


def test_packed_protos_are_only_those_in_force() -> None:
    """The id -> Resource map is rebuilt each compile: after many edits it holds no more than
    the resources of the configs in force (bounded, whatever the history)."""
    compile_mesh = mesh_compiler(MeshCompiler(CompileOptions()))
    now = datetime(2030, 1, 1)
    compiled = compile_configs(compile_mesh, policy('"GET"'), now, None, {}, {})
    for i in range(20):
        methods = '"GET"' if i % 2 else '"POST"'
        compiled = compile_configs(
            compile_mesh, policy(methods), now, compiled.state, compiled.configs, compiled.packed
        )
        in_force = {
            id(r) for c in compiled.configs.values() for rs in c.resources.values() for r in rs
        }
        assert len(compiled.packed) == len(in_force)


def test_a_one_policy_edit_repacks_only_the_workloads_it_changed() -> None:
    """Unchanged workloads keep their packed config (the same object: not packed or
    fingerprinted again); the result equals a compile from scratch."""
    from meshward.testing import topology

    fleet = topology.fleet(40)
    compiler = MeshCompiler(CompileOptions())
    now = datetime(2026, 1, 1)
    first = compile_configs(compiler.mesh, fleet, now, None, {}, {}, quiet=True)
    policies = list(fleet.authorization_policies)
    target = next(p for p in policies if p.selector is not None)
    policies.remove(target)
    edited = PolicySet.create(
        mesh=fleet.mesh,
        workloads=fleet.workloads,
        authorization_policies=policies,
    )
    second = compile_configs(
        compiler.mesh, edited, now, first.state, first.configs, first.packed, quiet=True
    )
    assert second.changed and len(second.changed) < len(second.configs) // 4
    for ref, config in second.configs.items():
        assert (config is first.configs[ref]) == (ref not in second.changed)
    fresh = compile_configs(MeshCompiler(CompileOptions()).mesh, edited, now, None, {}, {})
    assert {r: c.fingerprint for r, c in second.configs.items()} == {
        r: c.fingerprint for r, c in fresh.configs.items()
    }


def test_the_configs_replaced_are_let_go_of_one_per_fanout_step() -> None:
    """The old configs are dropped one entry per step of the fan-out (then one per step of
    their own), never all at once: a mesh-wide edit's old configs freed at once paused the
    loop for 170 ms at 1,000 services."""
    from meshward.xds.compiling import releasing

    retired = {f"ns/w{i}": object() for i in range(5)}
    sizes = []
    for step in releasing(iter([True, True]), retired):
        sizes.append((step, len(retired)))
    assert sizes == [(True, 5), (True, 4), (False, 2), (False, 1), (False, 0)]
    assert not retired
