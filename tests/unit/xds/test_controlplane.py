"""The control plane's decisions without sockets: node authentication, no workload key made,
per-node secret sources, trust bundle changes, affected-workload pushes (manual clock)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from meshward.certs import CertificateAuthority, RotationSchedule
from meshward.compile import CompileOptions
from meshward.policy import parse
from meshward.xds import typeurls
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.controlplane import ControlPlane
from meshward.xds.nodeid import InvalidNodeId, NodeId
from meshward.xds.server import NodeRejected

POLICY = """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: orders, namespace: shop, labels: {app: orders}}
spec:
  serviceAccount: orders-sa
  ports: [{name: http, port: 8080, protocol: HTTP}]
---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: frontend, namespace: shop, labels: {app: frontend}}
spec:
  ports: [{name: http, port: 8080, protocol: HTTP}]
"""


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def control(clock: Clock) -> ControlPlane:
    ca = CertificateAuthority.ephemeral("cluster.local", now=clock.now - timedelta(minutes=5))
    return ControlPlane(
        parse({"p.yaml": POLICY}),
        ca,
        compiler_for(CompileOptions()),
        svid_ttl=timedelta(minutes=10),
        schedule=RotationSchedule(jitter=0.0),
        wall_clock=clock,
        reload_ca=False,
    )


def test_node_id_format() -> None:
    assert NodeId.parse("shop/orders") == NodeId("shop", "orders")
    assert str(NodeId.parse("shop/orders/7")) == "shop/orders/7"
    assert NodeId.parse("shop/orders/7").workload_ref == "shop/orders"
    for bad in ("orders", "shop/", "a/b/c/d", "shop/or ders", "sidecar~1.2.3.4~x~y"):
        with pytest.raises(InvalidNodeId):
            NodeId.parse(bad)


def test_node_identity_must_match_its_workload(control: ControlPlane) -> None:
    orders = NodeId("shop", "orders", "1")
    control.authorize(orders, "spiffe://cluster.local/ns/shop/sa/orders-sa")  # service account
    with pytest.raises(NodeRejected, match="may not act as node shop/orders/1"):
        control.authorize(orders, "spiffe://cluster.local/ns/shop/sa/frontend")
    with pytest.raises(NodeRejected, match="client certificate"):
        control.authorize(orders, None)
    # A workload the policy set does not (yet) declare: its default identity only.
    control.authorize(NodeId("shop", "new"), "spiffe://cluster.local/ns/shop/sa/new")
    with pytest.raises(NodeRejected):
        control.authorize(NodeId("shop", "new"), "spiffe://cluster.local/ns/other/sa/new")


def secret_of(control: ControlPlane, node: str, name: str) -> secret_pb2.Secret:
    snapshot = control.cache.get(node)
    assert snapshot is not None
    message = secret_pb2.Secret()
    snapshot.resources(typeurls.SECRET)[name].body.Unpack(message)
    return message


async def test_no_svid_or_key_is_made_for_a_node_and_nothing_renews(
    control: ControlPlane, clock: Clock
) -> None:
    """Nodes bring their own SVID (agent or `meshward bootstrap`, by CSR): a connecting node
    gets config and the public trust bundle, never a certificate or key of the control
    plane's making, and time passing renews nothing for it."""
    node = NodeId("shop", "orders")
    await control.node_connected(node)
    first = control.cache.get(str(node))
    assert first is not None
    assert set(first.resources(typeurls.SECRET)) == {"ROOTCA"}
    assert "certificate" not in control.node_details(node)
    assert control.node_details(node)["secrets"] == {"source": "agent"}
    clock.now += timedelta(minutes=9)
    control.maintain(clock.now)
    assert control.cache.get(str(node)) is first  # nothing to renew, nothing pushed
    assert str(node) not in control.schedule


async def test_a_node_reading_files_gets_its_tls_contexts_pointed_there(
    control: ControlPlane,
) -> None:
    """An operator-run Envoy (`meshward bootstrap`) names its secrets directory in its node
    metadata; only its own snapshot's listeners and clusters read secrets from there."""
    from envoy.config.core.v3 import base_pb2

    files = base_pb2.Node(id="shop/orders/op")
    files.metadata.update({"meshward.dev/secrets-dir": "/etc/meshward/orders.shop.op"})
    await control.node_connected(NodeId("shop", "orders", "op"), files)
    await control.node_connected(NodeId("shop", "orders", "agent"))
    by_files = control.cache.get("shop/orders/op")
    by_agent = control.cache.get("shop/orders/agent")
    assert by_files is not None and by_agent is not None

    def bodies(snapshot: object, type_url: str) -> bytes:
        return b"".join(
            r.body.SerializeToString()
            for r in snapshot.resources(type_url).values()  # type: ignore[attr-defined]
        )

    listeners = bodies(by_files, typeurls.LISTENER)
    assert b"/etc/meshward/orders.shop.op/sds-default.json" in listeners
    assert b"meshward-sds" not in listeners
    assert b"/etc/meshward" not in bodies(by_agent, typeurls.LISTENER)
    assert b"meshward-sds" in bodies(by_agent, typeurls.LISTENER)
    assert control.node_details(NodeId("shop", "orders", "op"))["secrets"] == {
        "source": "files",
        "directory": "/etc/meshward/orders.shop.op",
    }
    bad = base_pb2.Node(id="shop/orders/x")
    bad.metadata.update({"meshward.dev/secrets-dir": "../../etc"})
    with pytest.raises(NodeRejected, match="secrets-dir") as refused:
        await control.node_connected(NodeId("shop", "orders", "x"), bad)
    assert refused.value.reason == "invalid-secrets-dir"


async def test_policy_change_touches_only_affected_nodes(control: ControlPlane) -> None:
    await control.node_connected(NodeId("shop", "orders"))
    await control.node_connected(NodeId("shop", "frontend"))
    before = {n: control.cache.get(n) for n in ("shop/orders", "shop/frontend")}
    changed = control.apply_policy(
        parse(
            {
                "p.yaml": POLICY
                + """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-get-only, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
      to: [{operation: {methods: ["GET"]}}]
"""
            }
        )
    )
    assert changed == {"shop/orders"}
    assert control.cache.get("shop/frontend") is before["shop/frontend"]
    after = control.cache.get("shop/orders")
    assert after is not None and after is not before["shop/orders"]


async def test_ca_rotation_pushes_the_new_bundle(tmp_path: Path, clock: Clock) -> None:
    ca = CertificateAuthority.init(
        tmp_path / "ca", "cluster.local", now=clock.now - timedelta(minutes=5)
    )
    control = ControlPlane(
        parse({"p.yaml": POLICY}), ca, compiler_for(CompileOptions()), wall_clock=clock
    )
    await control.node_connected(NodeId("shop", "orders"))
    roots = secret_of(control, "shop/orders", "ROOTCA").validation_context.trusted_ca.inline_bytes
    control.maintain(clock.now)  # remembers the CA state on disk
    rotated = CertificateAuthority.load(tmp_path / "ca")
    rotated.rotate(now=clock.now)
    import os

    state = tmp_path / "ca" / "ca.json"
    os.utime(state, (state.stat().st_atime, state.stat().st_mtime + 5))
    control.maintain(clock.now)
    new_roots = secret_of(
        control, "shop/orders", "ROOTCA"
    ).validation_context.trusted_ca.inline_bytes
    assert new_roots != roots and roots.strip() in new_roots  # old root still trusted, new added


async def test_inconsistent_snapshot_is_refused_and_reported(control: ControlPlane) -> None:
    """A snapshot whose resource names a secret it does not hold is an error, not a listener
    silently held back: the node keeps its last good snapshot and status says why (not
    enforced); the next consistent snapshot clears it."""
    node = NodeId("shop", "orders")
    await control.node_connected(node)
    good = control.cache.get(str(node))
    assert good is not None and "compile_error" not in control.node_details(node)
    rootca = control._rootca
    control._rootca = None  # e.g. a bundle that failed validation
    config = control.configs["shop/orders"]
    listeners = config.resources[typeurls.LISTENER]
    from meshward.compile import CompileOptions as _Options
    from meshward.xds.resources import make_resource

    raw = compiler_for(_Options(), agent_secrets=False)  # its TLS names ROOTCA over ADS
    workload = control.policy.workload("shop/orders")
    assert workload is not None
    from envoy.config.listener.v3 import listener_pb2

    ads_listener = next(
        m for m in raw(control.policy, workload, datetime.now(UTC))
        if isinstance(m, listener_pb2.Listener) and "inbound" in m.name
    )  # fmt: skip
    config.resources[typeurls.LISTENER] = [make_resource(ads_listener)]
    await control.node_connected(node)  # reconnect: the snapshot is rebuilt
    assert control.cache.get(str(node)) is good
    error = control.node_details(node)["compile_error"]
    assert error.startswith("inconsistent snapshot: ") and "names secret" in error
    config.resources[typeurls.LISTENER] = listeners
    control._rootca = rootca
    await control.node_connected(node)
    assert control.cache.get(str(node)) is good  # the same content: nothing new to push
    assert "compile_error" not in control.node_details(node)


EXPIRING = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: emergency
  namespace: shop
  annotations: {{meshward.dev/expires-at: "{at}"}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  action: ALLOW
  rules: [{{to: [{{operation: {{methods: ["GET"]}}}}]}}]
"""


async def test_an_expires_at_recompile_runs_in_the_worker_not_on_the_loop(clock: Clock) -> None:
    """At an expires-at instant the recompile is queued for the compile worker: maintenance
    returns at once (streams keep being served while it compiles), the instant is not asked
    for twice, and the nodes get the recompiled config when it is done."""
    import asyncio
    import threading

    instant = (clock.now + timedelta(seconds=30)).replace(microsecond=0)
    ps = parse({"p.yaml": POLICY + EXPIRING.format(at=instant.strftime("%Y-%m-%dT%H:%M:%SZ"))})
    inner = compiler_for(CompileOptions())
    gate = threading.Event()
    late: list[datetime] = []

    def compiler(policy: object, workload: object, now: datetime) -> object:
        if now >= instant:  # the recompile for the instant: held until the test lets it go
            late.append(now)
            assert gate.wait(30)
        return inner(policy, workload, now)  # type: ignore[arg-type]

    ca = CertificateAuthority.ephemeral("cluster.local", now=clock.now - timedelta(minutes=5))
    control = ControlPlane(ps, ca, compiler, wall_clock=clock, reload_ca=False)  # type: ignore[arg-type]
    node = NodeId("shop", "orders")
    await control.node_connected(node)
    before = control.cache.get(str(node))
    assert control.next_expiry(clock.now) == instant
    clock.now = instant + timedelta(seconds=1)
    control.maintain(clock.now)  # returns with the compile held in the worker
    assert control.next_expiry(clock.now) is None  # queued: not asked for again
    assert control.seconds_until_next(clock.now) > 0  # and the timers do not spin meanwhile
    deadline = asyncio.get_running_loop().time() + 10
    while not late:  # the loop runs while the worker compiles
        assert asyncio.get_running_loop().time() < deadline, "the worker never compiled"
        await asyncio.sleep(0.01)
    assert control.cache.get(str(node)) is before
    gate.set()
    await control.compile_worker.idle()
    after = control.cache.get(str(node))
    assert after is not None and after is not before  # the expired ALLOW: a new route config
    assert after.type_version(typeurls.ROUTE) != before.type_version(typeurls.ROUTE)
    assert control.policy is ps and control.policy_error is None
    control.compile_worker.close()
