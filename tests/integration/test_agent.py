"""`meshward agent` with real agent processes, real Envoy and real mTLS.

The control plane runs with ``--secrets agent``: it never makes a workload key. Each agent joins
with a one-time token, serves its SVID over SDS on a Unix socket, and starts its Envoy; frontend
calls orders through both sidecars (mTLS both ways, RBAC on the SPIFFE ID).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from meshward.testing.agentmesh import AgentMesh
from meshward.xds.testing import http_request

pytestmark = pytest.mark.envoy

FRONTEND, ORDERS = "shop/frontend", "shop/orders"
POLICY = """
apiVersion: meshward.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: cluster.local}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: meshward-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]}]
""" + "".join(
    f"""---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}
spec:
  ports: [{{name: http, port: 8080, protocol: HTTP}}]
"""
    for name in ("frontend", "orders")
)


def _mesh(tmp_path: Path, **kwargs: object) -> AgentMesh:
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    (policy_dir / "mesh.yaml").write_text(POLICY)
    return AgentMesh(policy_dir, tmp_path, [FRONTEND, ORDERS], **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[AgentMesh]:
    # 1-minute SVIDs renewed at ~10% of their lifetime: a renewal every ~6 s.
    m = _mesh(
        tmp_path,
        svid_ttl=timedelta(minutes=1),
        agent_args=("--renew-fraction", "0.1", "--jitter", "0.02", "--bundle-poll", "1"),
    )
    try:
        m.start()
        yield m
    finally:
        m.stop()
        for ref in m.refs:
            print(f"--- agent {ref}\n{m.agent_log(ref)[-3000:]}")


def _key_line(mesh: AgentMesh, ref: str) -> bytes:
    """A line from the middle of the agent's private key (base64 body)."""
    data = (mesh.state_dir(ref) / "svid.pem").read_bytes()
    key = data.split(b"-----END PRIVATE KEY-----")[0]
    return key.splitlines()[1]


def test_agents_join_and_envoy_serves_mtls_with_their_svids(mesh: AgentMesh) -> None:
    status, body = mesh.request(FRONTEND, ORDERS)
    assert status == 200, body
    # orders' sidecar saw frontend's agent-provided SVID (mTLS), and presented its own.
    assert "URI=spiffe://cluster.local/ns/shop/sa/frontend" in body
    assert "By=spiffe://cluster.local/ns/shop/sa/orders" in body
    # Without a client certificate the inbound listener refuses (STRICT mTLS).
    assert http_request(mesh.inbound_port(ORDERS), "/")[0] == 0
    for ref in mesh.refs:
        state = mesh.state_dir(ref)
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(state / "svid.pem").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(state / "sds.sock").st_mode) == 0o600
        agent = mesh.agent_status(ref)
        assert agent["spiffe_id"] == f"spiffe://cluster.local/ns/shop/sa/{ref.split('/')[1]}"
    # The control plane made no SVID of its own for these nodes.
    control = mesh.xds.service.control
    assert all(state.svid is None and not state.secrets for state in control.nodes.values())


def test_private_keys_never_reach_the_control_plane(mesh: AgentMesh) -> None:
    """Scan what the control plane holds (state, snapshots), logs, serves (status) and stores
    (CA directory, spent tokens) for the agents' keys: none, and no private key at all."""
    import json

    control = mesh.xds.service.control
    held = [repr(vars(control)).encode(), json.dumps(mesh.xds.status(), default=str).encode()]
    served = 0
    for node in list(control.cache.nodes()):  # every byte ADS serves these nodes
        snapshot = control.cache.get(node)
        assert snapshot is not None
        for type_url in snapshot.types:
            for resource in snapshot.resources(type_url).values():
                held.append(resource.body.SerializeToString() if resource.body else b"")
                served += 1
    assert served > 0
    blob = b"\n".join(held)
    files = b"".join(p.read_bytes() for p in mesh.ca_dir.rglob("*") if p.is_file())
    for ref in mesh.refs:
        line = _key_line(mesh, ref)
        assert line not in blob
        assert line not in files
        assert line not in mesh.agent_log(ref).encode()  # the agent does not log it either
    assert b"PRIVATE KEY" not in blob


def test_svids_renew_under_traffic_without_a_failed_request(mesh: AgentMesh) -> None:
    start = {ref: mesh.agent_status(ref)["serial"] for ref in mesh.refs}
    failures: list[tuple[int, str]] = []
    sent = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, body = mesh.request(FRONTEND, ORDERS)
        sent += 1
        if status != 200:
            failures.append((status, body[:200]))
        if all(mesh.agent_status(ref).get("renewals", 0) >= 4 for ref in mesh.refs):
            break
        time.sleep(0.02)
    renewals = {ref: mesh.agent_status(ref)["renewals"] for ref in mesh.refs}
    assert all(n >= 4 for n in renewals.values()), renewals
    assert failures == [], f"{len(failures)} of {sent} failed: {failures[:5]}"
    for ref in mesh.refs:
        assert mesh.agent_status(ref)["serial"] != start[ref]
    # ADS reconnects authenticate with the renewed SVID: the nodes stay in sync.
    mesh.wait_converged()


def test_killed_agent_leaves_envoy_serving_and_resumes_without_a_token(mesh: AgentMesh) -> None:
    envoy_pid = mesh.agent_status(ORDERS)["envoy"]["pid"]
    mesh.kill_agent(ORDERS)
    for _ in range(20):  # Envoy keeps serving with the certificate it holds
        status, body = mesh.request(FRONTEND, ORDERS)
        assert status == 200, body
        time.sleep(0.05)
    renewed = mesh.agent_status(ORDERS)["renewals"]
    mesh.start_agent(ORDERS, join=False)  # no token: it renews with the SVID on disk
    resumed = mesh.wait_for(
        ORDERS, lambda s: s.get("state") == "serving" and s["renewals"] >= 1 and s["pid"] != 0
    )
    assert resumed["envoy"]["pid"] == envoy_pid  # adopted, not a second Envoy
    assert resumed["renewals"] >= 1 and renewed >= 0
    status, body = mesh.request(FRONTEND, ORDERS)
    assert status == 200, body
