"""Applied means enforced, against real Envoy sidecars over ADS (issue 12's repro).

The review found a DENY that `meshward policy validate` accepted, the control plane reported as
applied, and every orders sidecar NACKed (an RE2 program of 408 > 100): GET /orders/42 stayed
200. Now the policy is refused up front (validate, control plane: last good version keeps
serving), and a NACK forced anyway shows as NOT ENFORCED in status, metrics and exit codes.
"""

from __future__ import annotations

import argparse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from meshward.cli import main
from meshward.policy import load
from meshward.testing.mesh import Mesh
from meshward.testing.nack import BreakRoutes
from meshward.testing.topology import allow_yaml, shop_yaml
from meshward.testing.waiting import wait_until
from meshward.xds import status_cli

FRONTEND, ORDERS = "shop/frontend", "shop/orders"
BASE = shop_yaml(["frontend", "orders"])
ORDERS_ALLOW = allow_yaml(
    "orders-allow-frontend", "orders",
    callers=["frontend"], methods=["GET", "POST"], paths=["/orders", "/orders/*"],
)  # fmt: skip
LONG = "/x/" + "/".join(["{*}"] * 40) + "/y"
DENY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-deny-%s, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: DENY
  rules: [{to: [{operation: {paths: [%s]}}]}]
"""


def deny(name: str, *paths: str) -> str:
    return DENY % (name, ", ".join(f'"{p}"' for p in paths))


@pytest.fixture(scope="module")
def breaker() -> BreakRoutes:
    return BreakRoutes()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, breaker: BreakRoutes) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("enforced")
    policy_dir = root / "policies"
    policy_dir.mkdir()
    (policy_dir / "base.yaml").write_text(BASE)
    (policy_dir / "orders.yaml").write_text(ORDERS_ALLOW)
    mesh = Mesh(policy_dir, root, [FRONTEND, ORDERS], compiler_hook=breaker)
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def metrics(mesh: Mesh) -> str:
    with urllib.request.urlopen(f"{mesh.xds.admin_url}/metrics", timeout=5) as response:
        return str(response.read().decode())


def status_exit(mesh: Mesh) -> int:
    args = argparse.Namespace(xds=mesh.xds.admin_url, node=None, json=True, timeout=5.0)
    return status_cli.run(args)


def version(mesh: Mesh) -> str:
    return str(mesh.status()["policy"]["version"])


def orders_node(mesh: Mesh) -> dict[str, Any]:
    return next(n for n in mesh.status()["nodes"] if n["node"] == ORDERS)


def converge_to_files(mesh: Mesh) -> str:
    """Wait until the control plane serves what the policy files say and every node ACKed."""
    wanted = load([mesh.policy_dir]).version
    wait_until(lambda: version(mesh) == wanted, what="the edit to be applied")
    mesh.wait_converged(wanted)
    return wanted


def test_the_repro_is_refused_and_the_last_good_version_keeps_serving(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    policies = mesh.policy_dir
    assert mesh.request(FRONTEND, ORDERS, "/orders/42")[0] == 200
    good = version(mesh)
    (policies / "deny.yaml").write_text(deny("42", "/orders/42", LONG))
    # `meshward policy validate` refuses it, naming file, document and field.
    assert main(["policy", "validate", str(policies)]) == 1
    err = capsys.readouterr().err
    assert "deny.yaml#1 spec.rules[0].to[0].operation.paths[1]" in err and "408" in err
    # The control plane refuses it exactly like invalid YAML: status and metrics say so.
    wait_until(lambda: mesh.status()["policy"]["error"] is not None, what="the rejection")
    status = mesh.status()
    assert status["policy"]["version"] == good
    assert "paths[1]" in status["policy"]["error"] and "408" in status["policy"]["error"]
    assert "meshward_xds_policy_error 1.0" in metrics(mesh)
    assert 'meshward_xds_policy_updates_total{result="rejected"}' in metrics(mesh)
    assert status_exit(mesh) == 1
    assert mesh.converged(good)  # nothing was pushed, nothing NACKed
    assert all(n["policy_enforced"] for n in status["nodes"])
    # Fixed, the DENY is applied and enforced by Envoy.
    (policies / "deny.yaml").write_text(deny("42", "/orders/42"))
    converge_to_files(mesh)
    assert mesh.status()["policy"]["error"] is None
    assert mesh.request(FRONTEND, ORDERS, "/orders/42")[0] == 403
    assert mesh.request(FRONTEND, ORDERS, "/orders/43")[0] == 200
    assert status_exit(mesh) == 0


def test_a_forced_nack_reports_not_enforced_until_a_later_edit_goes_through(
    mesh: Mesh, breaker: BreakRoutes, capsys: pytest.CaptureFixture[str]
) -> None:
    policies = mesh.policy_dir
    old = version(mesh)
    breaker.broken.add(ORDERS)
    try:
        (policies / "deny43.yaml").write_text(deny("43", "/orders/43"))
        wait_until(lambda: version(mesh) != old, what="the edit")
        wait_until(lambda: orders_node(mesh)["policy_enforced"] is False, what="NOT ENFORCED")
        node = orders_node(mesh)
        info = node["not_enforced"]
        assert info["types"] == ["RDS"] and info["resources"] == ["inbound|8080|orders.shop"]
        assert "meshward.test.unknown" in info["error"]
        assert any("shop/orders-deny-43" in p and "deny43.yaml#1" in p for p in info["policies"])
        # Envoy kept its old route: the new DENY is not in force, and status says so.
        assert mesh.request(FRONTEND, ORDERS, "/orders/43")[0] == 200
        assert "meshward_xds_nodes_not_enforcing 1.0" in metrics(mesh)
        assert status_exit(mesh) == 1
        args = argparse.Namespace(xds=mesh.xds.admin_url, node=None, json=False, timeout=5.0)
        capsys.readouterr()
        assert status_cli.run(args) == 1
        out = capsys.readouterr().out
        assert "NOT ENFORCED" in out and "orders-deny-43" in out
        frontend = next(n for n in mesh.status()["nodes"] if n["node"] == FRONTEND)
        assert frontend["policy_enforced"]
    finally:
        breaker.broken.discard(ORDERS)
    # The bad resource is fixed: the next, unrelated edit reaches Envoy and is enforced.
    (policies / "deny44.yaml").write_text(deny("44", "/orders/44"))
    converge_to_files(mesh)
    wait_until(lambda: orders_node(mesh)["policy_enforced"], what="enforced again")
    assert "meshward_xds_nodes_not_enforcing 0.0" in metrics(mesh)
    assert mesh.request(FRONTEND, ORDERS, "/orders/44")[0] == 403
    assert mesh.request(FRONTEND, ORDERS, "/orders/43")[0] == 403
    assert status_exit(mesh) == 0
