"""Faults under steady traffic on a mesh of real processes (see conftest.FaultMesh): nothing the
policy denies ever gets through, allowed flows keep working wherever the fault allows it, and
the mesh heals by itself.

One mesh for the module; each test leaves the policy files and processes as it found them.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from meshward.testing.traffic import (
    Flow,
    SteadyTraffic,
    failed_allowed,
    summarize,
    wrongly_allowed,
)
from meshward.testing.waiting import wait_until

FRONTEND, ORDERS, PAYMENTS, INVENTORY = (
    "shop/frontend",
    "shop/orders",
    "shop/payments",
    "shop/inventory",
)
EXTAUTHZ_FLOWS = frozenset({"pay-ok", "pay-no-token", "pay-read-scope"})
RATE = 60.0  # requests/s in total over the flows


def meshward_status(mesh: Any) -> tuple[int, dict[str, Any]]:
    """`meshward status --json` against the control plane: (exit code, document)."""
    done = subprocess.run(
        [sys.executable, "-m", "meshward", "status", "--xds", f"127.0.0.1:{mesh.admin_port}",
         "--json"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}


@pytest.fixture
def policies(fault_mesh: Any) -> Iterator[Path]:
    """The live policy directory; the original files are put back (and in force) afterwards."""
    mesh = fault_mesh
    original = mesh.policy_version()
    originals = {p.name for p in mesh.policy_dir.iterdir()}
    yield mesh.policy_dir
    for extra in mesh.policy_dir.iterdir():
        if extra.name not in originals:
            extra.unlink()
    mesh.write_policies()
    wait_until(
        lambda: mesh.policy_version() == original and mesh.status()["policy"]["error"] is None,
        15, "the original policy back in force",
    )  # fmt: skip
    mesh.wait_converged(original)
    wait_until(lambda: mesh.extauthz_version() == original[:12], 15, "ext_authz back")


def test_extauthz_killed_fails_closed_and_service_resumes_by_itself(fault_mesh: Any) -> None:
    mesh = fault_mesh
    with SteadyTraffic(mesh.flows(), rate=RATE) as traffic:
        traffic.wait_for(lambda o: o.flow.name == "pay-ok" and o.ok, after=0, timeout=10)
        time.sleep(1.0)
        killing = time.monotonic()
        mesh.kill("extauthz")
        down = time.monotonic()
        time.sleep(3.0)
        restarting = time.monotonic()  # the new process may answer before it says it is ready
        mesh.start_extauthz()
        back = time.monotonic()
        first_ok = traffic.wait_for(
            lambda o: o.flow.name == "pay-ok" and o.ok, after=back, timeout=15
        )
        time.sleep(1.5)
    outcomes = traffic.outcomes
    assert len(outcomes) > 200, summarize(outcomes)
    # Fail closed: nothing the policy denies got through, before, during or after the outage.
    assert not wrongly_allowed(outcomes), summarize(wrongly_allowed(outcomes))
    # Every request ext_authz would have decided while it was down was denied (403, Envoy's
    # failure_mode_allow: false), allowed ones included.
    while_down = [
        o for o in traffic.between(down + 0.05, restarting) if o.flow.name in EXTAUTHZ_FLOWS
    ]
    assert while_down and all(o.status == 403 for o in while_down), summarize(while_down)
    assert any(o.flow.name == "pay-ok" for o in while_down)
    # Flows Envoy decides natively never noticed.
    native = [o for o in outcomes if o.flow.name not in EXTAUTHZ_FLOWS]
    assert all(o.as_expected for o in native), summarize([o for o in native if not o.as_expected])
    # Back without restarting Envoy: once the first allowed payment passes, every one does.
    after = [o for o in traffic.between(first_ok.started) if o.flow.name in EXTAUTHZ_FLOWS]
    assert all(o.as_expected for o in after), summarize(after)
    assert first_ok.started - back < 10
    # Before the kill nothing allowed failed (a request still in flight when ext_authz died
    # fails closed, as it must: only those answered before are counted).
    before = [o for o in traffic.between(0, killing) if o.started + o.latency < killing]
    assert not failed_allowed(before), summarize(before)


# -- control plane killed and restarted -------------------------------------------------------------
CONFIG_STATS = (
    "listener_manager.listener_added",
    "listener_manager.listener_modified",
    "listener_manager.listener_removed",
    "listener_manager.listener_create_success",
    "cluster_manager.cluster_added",
    "cluster_manager.cluster_modified",
    "cluster_manager.cluster_removed",
)


def config_stats(envoy: Any) -> dict[str, int]:
    """What Envoy counts when it applies a listener, route or cluster change."""
    stats = envoy.stats()
    picked = {name: int(stats.get(name, 0)) for name in CONFIG_STATS}
    picked["rds.config_reload"] = sum(
        int(v) for k, v in stats.items() if ".rds." in k and k.endswith(".config_reload")
    )
    return picked


def acked_versions(status: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {
        (node["node"], t["type"]): t["acked"]
        for node in status["nodes"]
        for stream in node["streams"]
        for t in stream["types"]
    }


@pytest.fixture(scope="module")
def control_plane_restart(fault_mesh: Any) -> dict[str, Any]:
    """Kill -9 the control plane under steady traffic, keep it down for 3 s, start it again on
    the same ports and wait until every sidecar is back in sync. Before that, one policy edit
    is applied (as on any control plane that has run for a while); it is reverted afterwards."""
    mesh = fault_mesh
    orders = mesh.policy_dir / "orders.yaml"
    original_text = orders.read_text()
    old = mesh.policy_version()
    orders.write_text(original_text.replace('["GET", "POST"]', '["GET", "POST", "PUT"]'))
    wait_until(lambda: mesh.policy_version() != old, 10, "the edit")
    mesh.wait_converged(mesh.policy_version())
    before_status = mesh.status()
    before = {ref: config_stats(envoy) for ref, envoy in mesh.envoys.items()}
    with SteadyTraffic(mesh.flows(), rate=RATE) as traffic:
        time.sleep(1.0)
        mesh.kill("xds")
        down = time.monotonic()
        time.sleep(3.0)
        mesh.start_xds()
        mesh.wait_converged(before_status["policy"]["version"], timeout=45)
        back = time.monotonic()
        time.sleep(1.0)
    record = {
        "traffic": traffic,
        "down": down,
        "back": back,
        "before_status": before_status,
        "after_status": mesh.status(),
        "before": before,
        "after": {ref: config_stats(envoy) for ref, envoy in mesh.envoys.items()},
    }
    orders.write_text(original_text)  # clean up now: module fixtures are torn down late
    wait_until(lambda: mesh.policy_version() == old, 10, "the revert")
    mesh.wait_converged(old)
    return record


def test_control_plane_outage_keeps_enforcing_the_last_config(
    control_plane_restart: dict[str, Any],
) -> None:
    record = control_plane_restart
    traffic: SteadyTraffic = record["traffic"]
    outcomes = traffic.outcomes
    outage = traffic.between(record["down"], record["back"])
    assert len(outage) > 100, summarize(outage)
    assert not wrongly_allowed(outcomes), summarize(wrongly_allowed(outcomes))
    assert not failed_allowed(outcomes), summarize(failed_allowed(outcomes))
    assert all(o.as_expected for o in outcomes), summarize(
        [o for o in outcomes if not o.as_expected]
    )


def test_control_plane_restart_applies_nothing_to_envoy(
    control_plane_restart: dict[str, Any],
) -> None:
    """Reconnected sidecars were sent what they already had: Envoy added, modified or removed
    no listener, route or cluster (its own counters), and every node is in sync again."""
    record = control_plane_restart
    for ref, before in record["before"].items():
        assert record["after"][ref] == before, ref
    nodes = {n["node"]: n for n in record["after_status"]["nodes"]}
    assert all(nodes[ref]["connected"] for ref in record["before"])
    assert (
        record["after_status"]["policy"]["version"] == record["before_status"]["policy"]["version"]
    )


def test_control_plane_restart_resyncs_to_the_same_versions(
    control_plane_restart: dict[str, Any],
) -> None:
    """Deterministic versions: after the restart every node ACKs, for listeners, routes,
    clusters and endpoints, the very versions it had ACKed before (nothing new to apply), and
    is sent none of them again (SotW: its first request reports the version it holds; delta:
    its initial_resource_versions match)."""
    record = control_plane_restart
    before = {
        key: version
        for key, version in acked_versions(record["before_status"]).items()
        if key[1] != "SDS"  # a restarted control plane issues each node a new SVID
    }
    after = acked_versions(record["after_status"])
    changed = {key: (v, after.get(key)) for key, v in before.items() if after.get(key) != v}
    assert not changed, changed
    # Resynced without a push: the new control plane sent those types nothing at all.
    pushed = {
        (node["node"], t["type"]): t["pushes"]
        for node in record["after_status"]["nodes"]
        for stream in node["streams"]
        for t in stream["types"]
        if t["type"] != "SDS"
    }
    assert pushed and not any(pushed.values()), pushed


# -- invalid policy, NACKed resource ----------------------------------------------------------------
INVALID_ORDERS = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
    to: [{operation: {methods: ["GET", "POST", "DELETE"], paths: ["/orders", "/orders/*"]}}]
  - to: [{operation: {metods: ["GET"]}}]
"""


def test_invalid_policy_is_rejected_and_the_running_version_keeps_serving(
    fault_mesh: Any, policies: Path
) -> None:
    """An edit that would allow DELETE but has a typo elsewhere: nothing of it applies
    anywhere (control plane, ext_authz), `meshward status` shows why and exits 1."""
    mesh = fault_mesh
    old = mesh.policy_version()
    with SteadyTraffic(mesh.flows(), rate=RATE) as traffic:
        time.sleep(0.5)
        (policies / "orders.yaml").write_text(INVALID_ORDERS)
        wait_until(lambda: mesh.status()["policy"]["error"], 10, "the rejection")
        code, document = meshward_status(mesh)
        time.sleep(1.0)  # several more polls of both watchers: still rejected, nothing applied
    assert code == 1
    assert "metods" in document["policy"]["error"] and "orders.yaml" in document["policy"]["error"]
    assert document["policy"]["version"] == old
    assert mesh.extauthz_version() == old[:12]
    assert mesh.in_sync()
    outcomes = traffic.outcomes
    assert not wrongly_allowed(outcomes), summarize(wrongly_allowed(outcomes))
    assert all(o.as_expected for o in outcomes), summarize(
        [o for o in outcomes if not o.as_expected]
    )


def orders_port_added(text: str) -> str:
    marker = "metadata: {name: orders, namespace: shop, labels: {app: orders}}\nspec:\n"
    ports = "  ports: [{name: http, port: 8080, protocol: HTTP}]\n"
    assert marker + ports in text
    return text.replace(
        marker + ports,
        marker + "  ports: [{name: http, port: 8080, protocol: HTTP}, {name: admin, port: 9090}]\n",
    )


@pytest.fixture(scope="module")
def nacked_change(fault_mesh: Any) -> dict[str, Any]:
    """Under steady traffic, orders (a delta ADS node) gains a port whose listen address another
    process holds: Envoy cannot bind the new listener and NACKs it. Then the change is reverted
    and the squatter leaves. Records what the control plane and the traffic saw."""
    mesh = fault_mesh
    workloads = mesh.policy_dir / "workloads.yaml"
    original_text = workloads.read_text()
    old = mesh.policy_version()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", mesh.spare_listen_port))
    squatter.listen()
    rejected_before = mesh.envoys[ORDERS].stat("listener_manager.lds.update_rejected") or 0
    record: dict[str, Any] = {}
    try:
        with SteadyTraffic(mesh.flows(), rate=RATE) as traffic:
            time.sleep(0.5)
            workloads.write_text(orders_port_added(original_text))
            wait_until(lambda: mesh.policy_version() != old, 10, "the edit")
            wait_until(lambda: orders_type(mesh, "LDS")["last_nack"], 10, "the NACK")
            wait_until(lambda: mesh.node(ORDERS)["drift"], 10, "drift to be flagged")
            record["status_code"], record["status_document"] = meshward_status(mesh)
            time.sleep(0.5)
        record["traffic"] = traffic
        record["lds"] = orders_type(mesh, "LDS")
        record["nodes"] = {n["node"]: n for n in mesh.status()["nodes"]}
        record["rejected"] = mesh.envoys[ORDERS].stat("listener_manager.lds.update_rejected")
        record["rejected_before"] = rejected_before
        # Any node that has run for a while has had its SVID renewed since its listeners last
        # changed (every ~30 min with 1 h SVIDs): wait for one renewal of orders' SVID here.
        issued = record["issued"] = mesh.agent_status(ORDERS)["renewals"]
        wait_until(lambda: mesh.agent_status(ORDERS)["renewals"] > issued, 30, "an SVID renewal")
    finally:
        squatter.close()
        workloads.write_text(original_text)
    wait_until(lambda: mesh.policy_version() == old, 10, "the revert")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not mesh.in_sync():
        time.sleep(0.05)
    record["in_sync_after_revert"] = mesh.in_sync()
    record["after_revert"] = orders_type(mesh, "LDS"), orders_type(mesh, "RDS")
    if not mesh.in_sync():  # would be a delta resync bug (the test below fails): clean up
        mesh.restart_sidecar(ORDERS)
    mesh.wait_converged(old)
    return record


def orders_type(mesh: Any, kind: str) -> dict[str, Any]:
    node = mesh.node(ORDERS)
    return dict(next(t for t in node["streams"][0]["types"] if t["type"] == kind))


def test_a_resource_envoy_nacks_leaves_the_old_version_serving(
    nacked_change: dict[str, Any],
) -> None:
    """Envoy applies the rest and keeps serving; the control plane records the NACK (status,
    drift, `meshward status` exit 1) and does not resend the rejected listener."""
    record = nacked_change
    lds = record["lds"]
    assert lds["rejected"] == ["inbound|9090|orders.shop"]
    assert "inbound|9090|orders.shop" in lds["last_nack"]["error"]
    assert "already in use" in lds["last_nack"]["error"]
    assert not lds["in_sync"] and lds["nacks"] == 1  # not resent over and over
    assert record["status_code"] == 1
    assert [n["node"] for n in record["status_document"]["nodes"] if n["drift"]] == [ORDERS]
    assert record["rejected"] > record["rejected_before"]
    for ref in (FRONTEND, PAYMENTS, INVENTORY):  # they applied their part (outbound for 9090)
        assert not record["nodes"][ref]["drift"], ref
    outcomes = record["traffic"].outcomes
    assert len(outcomes) > 100
    assert not wrongly_allowed(outcomes), summarize(wrongly_allowed(outcomes))
    assert all(o.as_expected for o in outcomes), summarize(
        [o for o in outcomes if not o.as_expected]
    )


def test_a_delta_node_is_back_in_sync_once_the_nacked_change_is_reverted(
    nacked_change: dict[str, Any],
) -> None:
    assert nacked_change["in_sync_after_revert"], nacked_change["after_revert"]


# -- half-written policy directory ------------------------------------------------------------------
PERMISSIVE_ORDERS = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-allow-everyone, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: ALLOW
  rules: [{}]
"""


class VersionRecorder:
    """Every policy version the control plane and ext_authz report, sampled every 20 ms."""

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh
        self.seen: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.seen.add(("xds", self.mesh.policy_version()[:12]))
            self.seen.add(("extauthz", self.mesh.extauthz_version()))

    def __enter__(self) -> VersionRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_half_written_policy_directory_is_never_applied(fault_mesh: Any, policies: Path) -> None:
    """Editor temp files with a permissive policy are never read; orders.yaml rewritten in
    place, a chunk at a time (an empty orders.yaml would be valid and leave orders open to
    everyone), is applied only once complete."""
    mesh = fault_mesh
    old = mesh.policy_version()
    # Both servers start on the version in force (an earlier test's change may still be
    # reaching ext_authz), so every version recorded below comes from this test's writes.
    wait_until(lambda: mesh.extauthz_version() == old[:12], 10, "ext_authz on the version in force")
    orders = policies / "orders.yaml"
    final = orders.read_text().replace('["GET", "POST"]', '["GET", "POST", "PATCH"]')
    with SteadyTraffic(mesh.flows(), rate=RATE) as traffic, VersionRecorder(mesh) as versions:
        for junk in (".orders.yaml.swp", "#orders.yaml#", ".#orders.yaml", "orders.yaml~",
                     "orders.yaml.tmp", "4913"):  # fmt: skip
            (policies / junk).write_text(PERMISSIVE_ORDERS)
        (policies / ".orders.yaml.swx").write_text("{{{ not yaml")
        time.sleep(6 * 0.2)  # six polls of both watchers
        assert mesh.policy_version() == old and mesh.status()["policy"]["error"] is None
        with orders.open("w") as file:  # truncates: from here on the file is incomplete
            for start in range(0, len(final), 24):
                file.write(final[start : start + 24])
                file.flush()
                time.sleep(0.05)  # a slow writer, but never still for a whole poll interval
        wait_until(lambda: mesh.policy_version() != old, 10, "the completed file")
        new = mesh.policy_version()
        mesh.wait_converged(new)
        wait_until(lambda: mesh.extauthz_version() == new[:12], 10, "ext_authz on the new version")
        time.sleep(0.3)
    assert versions.seen <= {(server, v[:12]) for server in ("xds", "extauthz") for v in (old, new)}
    outcomes = traffic.outcomes
    assert not wrongly_allowed(outcomes), summarize(wrongly_allowed(outcomes))
    assert all(o.as_expected for o in outcomes), summarize(
        [o for o in outcomes if not o.as_expected]
    )


# -- emergency allow expiry ---------------------------------------------------------------------------
EMERGENCY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: inventory-emergency-allow-frontend
  namespace: shop
  annotations: {{meshward.dev/expires-at: "{at}"}}
spec:
  selector: {{matchLabels: {{app: inventory}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/shop/sa/frontend"]}}}}]
    to: [{{operation: {{methods: ["GET"], paths: ["/inventory/*"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: payments-emergency-allow-any-scope
  namespace: shop
  annotations: {{meshward.dev/expires-at: "{at}"}}
spec:
  selector: {{matchLabels: {{app: payments}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/shop/sa/orders"], requestPrincipals: ["*"]}}}}]
    to: [{{operation: {{methods: ["POST"], paths: ["/payments"]}}}}]
"""


def test_an_expired_emergency_allow_stops_allowing_within_a_second(
    fault_mesh: Any, policies: Path
) -> None:
    """Two emergency allows expiring at the same instant: one decided by Envoy RBAC
    (frontend -> inventory), one by ext_authz (a token without the payments:write scope).
    Both allow until expires-at; no request sent later than expires-at + 1 s is allowed. The
    frontend may call inventory only through its emergency rule, so at expiry its sidecar loses
    the outbound listener too (callers' config follows the expiry): late calls are refused
    before they leave the frontend; orders keeps its path to payments and gets 403."""
    mesh = fault_mesh
    read = {"authorization": f"Bearer {mesh.read_token}"}
    flows = [
        Flow("inventory-frontend", mesh.outbound(FRONTEND, INVENTORY), "GET", "/inventory/1"),
        Flow("pay-read-scope", mesh.outbound(ORDERS, PAYMENTS), "POST", "/payments", read),
    ]
    old = mesh.policy_version()
    expires = int(time.time()) + 5
    stamp = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    (policies / "emergency.yaml").write_text(EMERGENCY.format(at=stamp))
    with SteadyTraffic(flows, rate=80) as traffic:
        wait_until(lambda: mesh.policy_version() != old, 5, "the emergency allows")
        while time.time() < expires + 2.0:
            time.sleep(0.1)
    outcomes = traffic.outcomes
    for flow in ("inventory-frontend", "pay-read-scope"):
        mine = [o for o in outcomes if o.flow.name == flow]
        allowed = [o for o in mine if o.ok]
        assert allowed, f"{flow}: the emergency allow never applied: {summarize(mine)}"
        last = max(o.wall for o in allowed)
        assert last <= expires + 1.0, f"{flow}: allowed {last - expires:.3f}s after expires-at"
        late = [o for o in mine if o.wall >= expires + 1.0]
        if flow == "inventory-frontend":
            refused = [o for o in late if o.status == 0 and "ConnectionRefused" in o.detail]
            assert late and refused == late, summarize(late)
        else:
            assert late and all(o.status == 403 and o.policy_denial for o in late), summarize(late)
        # While in force it allowed every request (after it first reached the sidecar).
        window = [o for o in mine if min(a.wall for a in allowed) <= o.wall < expires - 0.2]
        assert all(o.ok for o in window), summarize(window)
        print(f"{flow}: last allowed {last - expires:+.3f}s from expires-at")


# -- SVID and CA root rotation ------------------------------------------------------------------------
def envoy_identity(envoy: Any) -> tuple[int, int]:
    """(CA generation that signed the sidecar's SVID, number of roots it trusts), read from the
    secrets Envoy holds (config_dump; private keys are redacted there)."""
    from cryptography import x509

    dump = json.loads(envoy.admin("/config_dump?resource=dynamic_active_secrets"))
    chain_generation, roots = 0, 0
    for entry in dump["configs"]:
        secret = entry.get("secret", {})
        if "tls_certificate" in secret:
            pem = base64.b64decode(secret["tls_certificate"]["certificate_chain"]["inline_bytes"])
            intermediate = x509.load_pem_x509_certificates(pem)[1]
            name = intermediate.subject.rfc4514_string()
            chain_generation = int(name.split(" g", 1)[1].split(" ", 1)[0])
        if "validation_context" in secret:
            trusted = secret["validation_context"]["trusted_ca"]
            pem = (
                base64.b64decode(trusted["inline_bytes"])
                if "inline_bytes" in trusted
                else (trusted["inline_string"].encode())
            )
            roots = len(x509.load_pem_x509_certificates(pem))
    return chain_generation, roots


def ads_credentials_state(mesh: Any, ref: str) -> str:
    return str(mesh.node(ref)["streams"][0]["ads_credentials"]["state"])


def test_svid_and_ca_root_rotation_under_steady_mtls_traffic_drop_nothing(
    fault_mesh: Any,
) -> None:
    """`meshward ca rotate --grace 20s` under traffic: the control plane reloads the CA, the
    agents fetch the bundle with old and new roots, renew every SVID from the new root (SVIDs
    keep rotating every few seconds throughout) and drop the old root when the grace period
    ends. Not one request fails. `meshward status` flags every sidecar whose ADS stream was
    authenticated with a certificate chaining to the old root: retiring during the grace
    period, untrusted after it."""
    mesh = fault_mesh
    refs = list(mesh.envoys)
    issued = {ref: mesh.agent_status(ref)["renewals"] for ref in refs}
    with SteadyTraffic(mesh.flows(), rate=RATE) as traffic:
        time.sleep(0.5)
        rotated = subprocess.run(
            [sys.executable, "-m", "meshward", "ca", "rotate", "--dir", str(mesh.ca_dir),
             "--grace", "20s"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert rotated.returncode == 0, rotated.stderr
        rotated_at = time.monotonic()
        wait_until(
            lambda: all(envoy_identity(mesh.envoys[ref]) == (2, 2) for ref in refs),
            30, "new-root SVIDs and both roots on every sidecar",
        )  # fmt: skip
        # Their ADS streams were opened with old-root SVIDs: flagged.
        during = {ref: ads_credentials_state(mesh, ref) for ref in refs}
        wait_until(
            lambda: all(envoy_identity(mesh.envoys[ref]) == (2, 1) for ref in refs),
            40, "the old root dropped after the grace period",
        )  # fmt: skip
        dropped_at = time.monotonic()
        time.sleep(1.0)
        after = {ref: ads_credentials_state(mesh, ref) for ref in refs}
    outcomes = traffic.outcomes
    assert dropped_at - rotated_at >= 19  # the old root stayed trusted for the grace period
    assert set(during.values()) == {"root-retiring"}, during  # `meshward status`: RETIRING
    assert set(after.values()) == {"untrusted"}, after
    # SVID rotation went on all along (several renewals per sidecar, old root and new).
    assert all(mesh.agent_status(ref)["renewals"] >= issued[ref] + 2 for ref in refs)
    assert len(outcomes) > 1000, summarize(outcomes)
    assert not failed_allowed(outcomes), summarize(failed_allowed(outcomes))
    assert not wrongly_allowed(outcomes), summarize(wrongly_allowed(outcomes))
    assert all(o.as_expected for o in outcomes), summarize(
        [o for o in outcomes if not o.as_expected]
    )


def test_sidecar_ads_credentials_from_before_a_ca_rotation_reach_a_restarted_control_plane(
    fault_mesh: Any, tmp_path: Path
) -> None:
    """An SVID and bundle as a node holds them (its agent, or `meshward bootstrap`), then
    `meshward ca rotate` (grace 1 h: the old root stays trusted), then the control plane
    restarts: a sidecar holding those credentials must still complete the ADS TLS handshake. Runs last: it would leave the
    control plane unreachable for the module's sidecars if the server certificate came from
    the new root."""
    import ssl

    from meshward.certs import CertificateAuthority

    mesh = fault_mesh
    ca = CertificateAuthority.load(mesh.ca_dir)
    directory = tmp_path
    svid = ca.issue("spiffe://cluster.local/ns/shop/sa/frontend")  # (the test's own key)
    (directory / "xds-cert.pem").write_bytes(svid.cert_chain_pem)
    (directory / "xds-key.pem").write_bytes(svid.private_key_pem)
    (directory / "xds-ca.pem").write_bytes(ca.trust_bundle().roots_pem)
    rotated = subprocess.run(
        [sys.executable, "-m", "meshward", "ca", "rotate", "--dir", str(mesh.ca_dir),
         "--grace", "1h"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    mesh.kill("xds")
    mesh.start_xds()
    context = ssl.create_default_context(cafile=str(directory / "xds-ca.pem"))
    context.check_hostname = False  # the server's SPIFFE ID is checked by Envoy, not here
    context.load_cert_chain(directory / "xds-cert.pem", directory / "xds-key.pem")
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", mesh.ads_port), timeout=5) as sock,
        context.wrap_socket(sock) as tls,
    ):
        assert tls.version() is not None
        # TLS 1.3: the server's verdict on the client certificate comes with its first bytes
        # (its HTTP/2 SETTINGS after our preface), or as an alert.
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        assert tls.recv(9)
