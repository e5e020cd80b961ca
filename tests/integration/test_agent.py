"""`meshward agent` with real agent processes, real Envoy and real mTLS.

The control plane never makes a workload key (whatever its flags). Each agent joins
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
from typing import Any

import pytest

from meshward.agent import envoyproc
from meshward.testing.mesh import Mesh
from meshward.testing.topology import allow_doc, shop_yaml
from meshward.testing.xds_resources import http_request

FRONTEND, ORDERS = "shop/frontend", "shop/orders"
POLICY = shop_yaml(
    ["frontend", "orders"], allow_doc("orders-allow-frontend", "orders", callers=["frontend"])
)


def _mesh(tmp_path: Path, **kwargs: object) -> Mesh:
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    (policy_dir / "mesh.yaml").write_text(POLICY)
    return Mesh(policy_dir, tmp_path, [FRONTEND, ORDERS], **kwargs)  # type: ignore[arg-type]


AGENT_ARGS = ("--renew-fraction", "0.05", "--jitter", "0.02", "--bundle-poll", "1",
              "--health-listen", "127.0.0.1:0")  # fmt: skip
RENEWAL = 3.0  # seconds: 1-minute SVIDs (the CA's minimum) renewed at ~5% of their lifetime


def _started(tmp_path: Path) -> Iterator[Mesh]:
    m = _mesh(
        tmp_path,
        svid_ttl=timedelta(minutes=1),
        agent_args=AGENT_ARGS,
    )
    try:
        m.start()
        yield m
    finally:
        m.stop()
        for ref in m.refs:
            print(f"--- agent {ref}\n{m.agent_log(ref)[-3000:]}")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """One mesh for the tests that leave both agents and Envoys running (they may restart the
    control plane or rotate the CA: the mesh carries on, which is what they check)."""
    yield from _started(tmp_path_factory.mktemp("agent-mesh"))


@pytest.fixture
def own_mesh(tmp_path: Path) -> Iterator[Mesh]:
    """A mesh of its own for a test that kills or stops a sidecar."""
    yield from _started(tmp_path)


def _key_line(mesh: Mesh, ref: str) -> bytes:
    """A line from the middle of the agent's private key (base64 body)."""
    data = (mesh.state_dir(ref) / "svid.pem").read_bytes()
    key = data.split(b"-----END PRIVATE KEY-----")[0]
    return key.splitlines()[1]


def test_agents_join_and_envoy_serves_mtls_with_their_svids(mesh: Mesh) -> None:
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
        # What the node holds: the SVID (key + chain), the bundle, sockets, Envoy's files. No
        # second, longer-lived credential for the control plane: ADS uses the SVID too.
        assert {p.name for p in state.iterdir()} <= {
            "svid.pem", "bundle.pem", "sds.sock", "admin.sock", "status.json", "envoy"
        }  # fmt: skip
        assert "inline_bytes" not in (state / "envoy" / "envoy.json").read_text()
        agent = mesh.agent_status(ref)
        assert agent["spiffe_id"] == f"spiffe://cluster.local/ns/shop/sa/{ref.split('/')[1]}"
    # The control plane made no SVID of its own for these nodes.
    control = mesh.xds.service.control
    assert all(state.secrets_dir is None for state in control.nodes.values())  # the agent's SDS
    assert all("certificate" not in control.node_details(s.node) for s in control.nodes.values())


def test_private_keys_never_reach_the_control_plane(mesh: Mesh) -> None:
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


def test_svids_renew_under_traffic_without_a_failed_request(mesh: Mesh) -> None:
    start = {ref: mesh.agent_status(ref)["serial"] for ref in mesh.refs}
    before = {ref: mesh.agent_status(ref).get("renewals", 0) for ref in mesh.refs}
    failures: list[tuple[int, str]] = []
    sent = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, body = mesh.request(FRONTEND, ORDERS)
        sent += 1
        if status != 200:
            failures.append((status, body[:200]))
        if all(mesh.agent_status(r).get("renewals", 0) >= before[r] + 5 for r in mesh.refs):
            break
        time.sleep(0.02)
    renewals = {ref: mesh.agent_status(ref)["renewals"] - before[ref] for ref in mesh.refs}
    assert all(n >= 5 for n in renewals.values()), renewals
    assert failures == [], f"{len(failures)} of {sent} failed: {failures[:5]}"
    for ref in mesh.refs:
        assert mesh.agent_status(ref)["serial"] != start[ref]
    # ADS reconnects authenticate with the renewed SVID: the nodes stay in sync.
    mesh.wait_converged()


def test_killed_agent_leaves_envoy_serving_and_resumes_without_a_token(own_mesh: Mesh) -> None:
    mesh = own_mesh
    envoy_pid = mesh.agent_status(ORDERS)["envoy"]["pid"]
    mesh.kill_agent(ORDERS)
    for _ in range(20):  # Envoy keeps serving with the certificate it holds
        status, body = mesh.request(FRONTEND, ORDERS)
        assert status == 200, body
        time.sleep(0.05)
    renewed = mesh.agent_status(ORDERS)["renewals"]
    mesh.start_agent(ORDERS, join=False)  # no token: it renews with the SVID on disk
    resumed = mesh.wait_for(  # Envoy reconnected to the new agent's SDS and got the renewal
        ORDERS,
        lambda s: s.get("state") == "serving" and s["renewals"] >= 1 and s["sds"]["pushes"] >= 2,
    )
    assert resumed["envoy"]["pid"] == envoy_pid  # adopted, not a second Envoy
    assert resumed["renewals"] >= 1 and renewed >= 0
    status, body = mesh.request(FRONTEND, ORDERS)
    assert status == 200, body
    # SIGTERM to the agent that adopted Envoy (not its child) still drains and stops it.
    assert mesh.stop_agent(ORDERS) == 0
    deadline = time.monotonic() + 15
    while envoyproc._alive(envoy_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not envoyproc._alive(envoy_pid)


class Traffic:
    """frontend -> orders in a background thread, counting failures, until stopped."""

    def __init__(self, mesh: Mesh) -> None:
        import threading

        self.mesh, self.sent, self.failures = mesh, 0, []  # type: list[tuple[int, str]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            status, body = self.mesh.request(FRONTEND, ORDERS)
            self.sent += 1
            if status != 200:
                self.failures.append((status, body[:200]))
            time.sleep(0.02)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_control_plane_down_across_a_renewal(mesh: Mesh) -> None:
    """Renewals fail while the control plane is down: the agents keep serving their current
    SVIDs, retry with backoff, and renew once it is back; no request fails meanwhile."""
    with Traffic(mesh) as traffic:
        failed_before = {ref: mesh.agent_status(ref)["renewal_failures"] for ref in mesh.refs}
        mesh.restart_control_plane(down=2 * RENEWAL)  # longer than the renewal interval
        for ref in mesh.refs:
            mesh.wait_for(ref, lambda s, r=ref: s["renewal_failures"] > failed_before[r])
        after = {ref: mesh.agent_status(ref)["renewals"] for ref in mesh.refs}
        for ref in mesh.refs:
            mesh.wait_for(ref, lambda s, r=ref: s["renewals"] > after[r] and not s["last_error"])
        # Envoy's ADS retry backoff grows while the control plane is down (6 s): its next
        # attempt can come well after the agents' renewal, more so on a loaded machine.
        mesh.wait_converged(timeout=45.0)
    assert traffic.sent > 50
    assert traffic.failures == [], (
        f"{len(traffic.failures)} of {traffic.sent}: {traffic.failures[:5]}"
    )


def _old_root_client(mesh: Mesh, directory: Path) -> Any:
    """GET / on orders' inbound listener presenting a frontend SVID from the CA as it is now
    (the root that is about to be rotated out); the server is not verified (only its verdict
    on our certificate matters). Returns a call: status, or 0 when the TLS peer refused us."""
    import ssl

    from meshward.certs import CertificateAuthority
    from meshward.testing.sidecar import SidecarConnection

    directory.mkdir(parents=True, exist_ok=True)
    svid = CertificateAuthority.load(mesh.ca_dir).issue(
        "spiffe://cluster.local/ns/shop/sa/frontend"
    )
    (directory / "chain.pem").write_bytes(svid.cert_chain_pem)
    (directory / "key.pem").write_bytes(svid.private_key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(directory / "chain.pem", directory / "key.pem")

    def call() -> int:
        connection = SidecarConnection(mesh.inbound_port(ORDERS), context, timeout=5)
        try:
            return connection.fetch("GET", "/")[0]
        except (OSError, ssl.SSLError):
            return 0
        finally:
            connection.close()

    return call


def test_ca_rotation_under_traffic(mesh: Mesh) -> None:
    """`ca rotate`: agents serve the bundle with both roots, renew onto the new root, and drop
    the old root when its grace period ends; no request fails. A frontend certificate from the
    old root is accepted by orders' sidecar during the grace period and refused after it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from meshward.certs import CertificateAuthority

    old_client = _old_root_client(mesh, mesh.ca_dir.parent / "old-root-client")
    assert old_client() == 200  # before the rotation
    with Traffic(mesh) as traffic:
        # the grace period outlasts five renewals
        new = CertificateAuthority.load(mesh.ca_dir).rotate(grace=timedelta(seconds=5 * RENEWAL))

        def roots(ref: str) -> list[str]:
            pem = (mesh.state_dir(ref) / "bundle.pem").read_bytes()
            return [
                c.fingerprint(hashes.SHA256()).hex() for c in x509.load_pem_x509_certificates(pem)
            ]

        for ref in mesh.refs:  # both roots first
            deadline = time.monotonic() + 30
            while len(roots(ref)) != 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert roots(ref)[1] == new.root_fingerprint
        assert old_client() == 200  # grace period: the old root is still trusted
        for ref in mesh.refs:  # then the new root only, once the grace period is over
            deadline = time.monotonic() + 60
            while len(roots(ref)) != 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert roots(ref) == [new.root_fingerprint]
            chain = (mesh.state_dir(ref) / "svid.pem").read_bytes()
            leaf_issuer = x509.load_pem_x509_certificates(
                chain[chain.index(b"-----BEGIN CERTIFICATE-----") :]
            )[1]
            assert leaf_issuer == new.intermediate  # renewed onto the new root
        time.sleep(2)  # traffic with the new root only
        mesh.wait_converged()
        assert old_client() == 0  # the old root is no longer trusted by orders' sidecar
    assert traffic.sent > 50
    assert traffic.failures == [], (
        f"{len(traffic.failures)} of {traffic.sent}: {traffic.failures[:5]}"
    )


def _healthz(mesh: Mesh, ref: str) -> tuple[int, dict[str, object]]:
    import json

    port = int(mesh.agent_status(ref)["health"].rsplit(":", 1)[1])
    code, body = http_request(port, "/healthz")
    return code, json.loads(body) if code else {}


def test_envoy_that_dies_is_restarted_and_sigterm_drains(own_mesh: Mesh) -> None:
    """...and the health endpoint says so: 200 while serving, 503 naming the dead Envoy until
    the agent has restarted it, 200 again."""
    mesh = own_mesh
    import signal

    code, body = _healthz(mesh, ORDERS)
    assert code == 200 and body["healthy"] is True and body["envoy_running"] is True, body
    assert body["not_after"] == mesh.agent_status(ORDERS)["not_after"]
    first = mesh.agent_status(ORDERS)["envoy"]["pid"]
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (health := _healthz(mesh, ORDERS))[0] != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health[0] == 503, health
    assert any("Envoy is not running" in p for p in health[1]["problems"]), health  # type: ignore[union-attr]
    status = mesh.wait_for(
        ORDERS, lambda s: s["envoy"]["restarts"] >= 1 and s["envoy"]["pid"] != first
    )
    assert status["envoy"]["running"]
    mesh.wait_converged()
    deadline = time.monotonic() + 30
    while mesh.request(FRONTEND, ORDERS)[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert mesh.request(FRONTEND, ORDERS)[0] == 200
    assert _healthz(mesh, ORDERS)[0] == 200
    second = status["envoy"]["pid"]
    assert mesh.stop_agent(ORDERS) == 0  # SIGTERM: drain, stop Envoy, exit 0
    assert mesh.agent_status(ORDERS)["state"] == "stopped"
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)
