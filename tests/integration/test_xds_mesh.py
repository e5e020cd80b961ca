"""Real Envoy sidecars configured only over ADS by Meshward's control plane.

One mesh per module: frontend, orders, payments and inventory, each an echo backend behind its
own Envoy. Two sidecars speak SotW ADS, two delta ADS. Policy edits go through the watched policy
directory, exactly as an operator's would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshward.testing.mesh import Mesh
from meshward.testing.nack import BreakRoutes
from meshward.testing.topology import shop_yaml
from meshward.testing.waiting import wait_until

FRONTEND, ORDERS, PAYMENTS, INVENTORY = (
    "shop/frontend",
    "shop/orders",
    "shop/payments",
    "shop/inventory",
)

BASE = (
    shop_yaml(["frontend", "orders", "payments", "inventory"])
    + """---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: inventory-permissive, namespace: shop}
spec:
  selector: {matchLabels: {app: inventory}}
  mtls: {mode: PERMISSIVE}
"""
)

ORDERS_ALLOW = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
      to: [{operation: {methods: [%s], paths: ["/orders", "/orders/*"]}}]
"""

PAYMENTS_POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments-allow-shop, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules: [{from: [{source: {namespaces: ["shop"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments-deny-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]}]
"""

DRY_RUN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: orders-deny-frontend-trial
  namespace: shop
  annotations: {"istio.io/dry-run": "true"}
spec:
  selector: {matchLabels: {app: orders}}
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]}]
"""


# The first DENY policy of shop/orders (the demo's live edit): before, the chain had rules only
# for the RBAC ALLOW filter; every inbound chain has the RBAC DENY filter anyway.
ORDERS_DENY_POST = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-deny-frontend-post, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: DENY
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
      to: [{operation: {methods: ["POST"]}}]
"""

# Policy edits and what frontend -> orders answers after them: (write_policies arguments,
# {(method, path): status}). The base policy allows GET and POST.
EDITS: dict[str, tuple[dict[str, str], dict[tuple[str, str], int]]] = {
    "rule-edit": (
        {"orders_methods": '"POST"'},
        {("GET", "/orders/1"): 403, ("POST", "/orders"): 200},
    ),
    "first-deny": (
        {"extra": ORDERS_DENY_POST},
        {("POST", "/orders"): 403, ("GET", "/orders/1"): 200},
    ),
}


def write_policies(
    directory: Path, *, orders_methods: str = '"GET", "POST"', extra: str = ""
) -> None:
    (directory / "policies.yaml").write_text(
        ORDERS_ALLOW % orders_methods
        + "---\n"
        + PAYMENTS_POLICIES
        + (("---\n" + extra) if extra else "")
    )


def decisions_until(mesh: Mesh, source: str, target: str, path: str, status: int) -> int:
    """Send requests until one answers ``status``; return how many answered otherwise."""
    for stale in range(5):
        if mesh.request(source, target, path)[0] == status:
            return stale
    raise AssertionError(f"{source} -> {target} {path} never answered {status}")


@pytest.fixture(scope="module")
def faults() -> BreakRoutes:
    return BreakRoutes()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, faults: BreakRoutes) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("xds-mesh")
    policy_dir = root / "policies"
    policy_dir.mkdir()
    (policy_dir / "base.yaml").write_text(BASE)
    write_policies(policy_dir)
    mesh = Mesh(
        policy_dir,
        root,
        [FRONTEND, ORDERS, PAYMENTS, INVENTORY],
        delta={ORDERS, INVENTORY},
        compiler_hook=faults,
        drift_threshold=1.0,
    )
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture
def policies(mesh: Mesh) -> Iterator[Path]:
    """The policy directory; restored (and converged) after the test."""
    original = policy_version(mesh)
    yield mesh.policy_dir
    for stray in mesh.policy_dir.glob("broken*.yaml"):
        stray.unlink()
    write_policies(mesh.policy_dir)
    wait_until(
        lambda: mesh.status()["policy"]["error"] is None and mesh.converged(original),
        what="the original policy to be back",
    )
    decisions_until(mesh, FRONTEND, ORDERS, "/orders/1", 200)  # draining connections closed


def policy_version(mesh: Mesh) -> str:
    return str(mesh.status()["policy"]["version"])


def wait_new_policy(mesh: Mesh, old: str) -> str:
    wait_until(lambda: policy_version(mesh) != old, what="the edit to be applied")
    new = policy_version(mesh)
    mesh.wait_converged(new)
    return new


def test_both_ads_variants_are_in_use(mesh: Mesh) -> None:
    modes = {n["node"]: n["streams"][0]["mode"] for n in mesh.status()["nodes"]}
    assert modes == {FRONTEND: "sotw", PAYMENTS: "sotw", ORDERS: "delta", INVENTORY: "delta"}
    for envoy in mesh.envoys.values():  # nothing static besides the ADS cluster
        dump = envoy.config_dump()
        dynamic = [c for c in dump["configs"] if "dynamic_active_clusters" in c]
        assert dynamic and dynamic[0]["dynamic_active_clusters"]


def test_frontend_to_orders_is_allowed_over_mtls(mesh: Mesh) -> None:
    status, body = mesh.request(FRONTEND, ORDERS, "/orders/42")
    assert status == 200, body
    echoed = json.loads(body)
    assert echoed["service"] == "orders"
    # The orders sidecar verified the caller's SVID and told the app who it was.
    assert (
        "URI=spiffe://cluster.local/ns/shop/sa/frontend"
        in echoed["headers"]["x-forwarded-client-cert"]
    )


def test_frontend_to_payments_is_denied_by_the_named_policy(mesh: Mesh) -> None:
    status, body = mesh.request(FRONTEND, PAYMENTS, "/charge", method="POST")
    assert status == 403 and body == "RBAC: access denied"
    expected = "rbac_access_denied_matched_policy[ns[shop]-policy[payments-deny-frontend]-rule[0]]"
    wait_until(
        lambda: any(e.get("response_code_details") == expected for e in mesh.access_log(PAYMENTS)),
        what="the denial in the payments access log",
    )


def test_plaintext_is_refused_under_strict_and_accepted_under_permissive(mesh: Mesh) -> None:
    status, _error = mesh.plaintext(ORDERS, "/orders/1")
    assert status == 0, f"STRICT listener answered plaintext: {status}"
    status, body = mesh.plaintext(INVENTORY, "/stock")
    assert status == 200 and json.loads(body)["service"] == "inventory"


def _type(mesh: Mesh, ref: str, kind: str) -> dict[str, Any]:
    node = next(n for n in mesh.status()["nodes"] if n["node"] == ref)
    return dict(next(t for t in node["streams"][0]["types"] if t["type"] == kind))


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_policy_edit_applies_to_open_connections_at_their_next_request(
    mesh: Mesh, policies: Path, edit: str
) -> None:
    """The rules live in the route config and every inbound chain has the same RBAC filters:
    an edit (a rule change, or the workload's first DENY policy) is an RDS push, the listener
    is untouched, and a kept-alive connection (the test's own, and the frontend sidecar's
    pooled one) gets the new decision on its very next request. No drain, no stale request,
    no Envoy restart."""
    from meshward.testing.sidecar import SidecarConnection, client_context

    pids = {ref: envoy.pid for ref, envoy in mesh.envoys.items()}
    pushes_before = {n["node"]: n["streams"][0] for n in mesh.status()["nodes"]}
    lds_before = _type(mesh, ORDERS, "LDS")
    rds_before = _type(mesh, ORDERS, "RDS")
    modified_before = mesh.envoys[ORDERS].stat("listener_manager.listener_modified")
    context = client_context(
        mesh.ca, "spiffe://cluster.local/ns/shop/sa/frontend", mesh.workdir, alpn=["http/1.1"]
    )
    kept = SidecarConnection(mesh.inbound_port(ORDERS), context)
    arguments, expected = EDITS[edit]
    try:
        assert kept.fetch("GET", "/orders/1")[0] == 200
        socket_before = kept.sock
        assert mesh.request(FRONTEND, ORDERS, "/orders/1")[0] == 200  # pools a connection
        assert mesh.request(FRONTEND, ORDERS, "/orders", method="POST")[0] == 200
        old = policy_version(mesh)
        write_policies(policies, **arguments)
        wait_new_policy(mesh, old)
        # Zero stale requests, on the same TCP/TLS connection as before the edit.
        for (method, path), status in expected.items():
            assert kept.fetch(method, path)[0] == status, (method, path)
            assert kept.sock is socket_before
    finally:
        kept.close()
    # The frontend sidecar's pooled connection: the very first request after the edit.
    for (method, path), status in expected.items():
        assert mesh.request(FRONTEND, ORDERS, path, method=method)[0] == status, (method, path)
    # Only the route config changed: same listener version, no listener update in Envoy.
    lds_after, rds_after = _type(mesh, ORDERS, "LDS"), _type(mesh, ORDERS, "RDS")
    assert lds_after["acked"] == lds_before["acked"] and lds_after["pushes"] == lds_before["pushes"]
    assert rds_after["acked"] != rds_before["acked"] and rds_after["pushes"] > rds_before["pushes"]
    assert mesh.envoys[ORDERS].stat("listener_manager.listener_modified") == modified_before
    assert {ref: envoy.pid for ref, envoy in mesh.envoys.items()} == pids
    assert all(envoy.running() for envoy in mesh.envoys.values())
    # Only the orders sidecar's config changed: nobody else was pushed anything.
    after = {n["node"]: n["streams"][0] for n in mesh.status()["nodes"]}
    for ref in (FRONTEND, PAYMENTS, INVENTORY):
        before_pushes = {t["type"]: t["pushes"] for t in pushes_before[ref]["types"]}
        after_pushes = {t["type"]: t["pushes"] for t in after[ref]["types"]}
        for kind in ("CDS", "LDS", "RDS", "EDS"):
            assert after_pushes.get(kind) == before_pushes.get(kind), (ref, kind)


def test_invalid_edit_changes_nothing(mesh: Mesh, policies: Path) -> None:
    old = policy_version(mesh)
    (policies / "broken.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: bad, namespace: shop}\nspec: {action: PERMIT}\n"
    )
    wait_until(lambda: mesh.status()["policy"]["error"] is not None, what="the rejection")
    status = mesh.status()
    assert status["policy"]["version"] == old
    assert "PERMIT" in status["policy"]["error"]
    assert mesh.converged(old)
    assert mesh.request(FRONTEND, ORDERS, "/orders/1")[0] == 200


def test_nacked_route_leaves_traffic_on_the_old_version(
    mesh: Mesh, policies: Path, faults: BreakRoutes
) -> None:
    old = policy_version(mesh)
    faults.broken.add(ORDERS)
    try:
        write_policies(policies, orders_methods='"POST"')  # would deny GET, if applied
        wait_until(lambda: policy_version(mesh) != old, what="the edit")
        wait_until(lambda: _type(mesh, ORDERS, "RDS")["last_nack"] is not None, what="the NACK")
        rds = _type(mesh, ORDERS, "RDS")
        assert rds["rejected"] == ["inbound|8080|orders.shop"], rds
        assert "meshward.test.unknown" in rds["last_nack"]["error"]
        assert not rds["in_sync"]
        # The rejected route's old version keeps serving: GET is still allowed.
        assert mesh.request(FRONTEND, ORDERS, "/orders/1")[0] == 200
        wait_until(lambda: _type(mesh, ORDERS, "RDS")["drift"], timeout=5, what="drift")
        rejected = sum(
            v for k, v in mesh.envoys[ORDERS].stats().items() if k.endswith(".update_rejected")
        )
        assert rejected >= 1
    finally:
        faults.broken.discard(ORDERS)
    mesh.xds.call(mesh.xds.service.control.refresh)  # the fixed compiler output goes out
    mesh.wait_converged(policy_version(mesh))
    assert decisions_until(mesh, FRONTEND, ORDERS, "/orders/1", 403) == 0


def test_dry_run_counts_shadow_denials_and_denies_nothing(mesh: Mesh, policies: Path) -> None:
    """The workload's first dry-run policy is also only a route change: its shadow rules count
    from the very next request."""
    lds_before = _type(mesh, ORDERS, "LDS")
    old = policy_version(mesh)
    write_policies(policies, extra=DRY_RUN)
    wait_new_policy(mesh, old)
    assert _type(mesh, ORDERS, "LDS")["acked"] == lds_before["acked"]

    def shadow_denied() -> int:
        stats = mesh.envoys[ORDERS].stats()
        return sum(
            v for k, v in stats.items() if "dry_run_deny" in k and k.endswith("shadow_denied")
        )

    before = shadow_denied()
    for _ in range(3):
        assert mesh.request(FRONTEND, ORDERS, "/orders/1")[0] == 200
    shadow = {k: v for k, v in mesh.envoys[ORDERS].stats().items() if "shadow" in k}
    assert shadow_denied() == before + 3, shadow
