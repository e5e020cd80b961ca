"""Expiry re-push against real Envoy sidecars: at an emergency ALLOW's expires-at instant every
affected node gets new config - the callee's inbound RBAC and the callers' outbound listeners -
and expiry never opens the workload (the default deny stays)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from meshward.testing.mesh import Mesh
from meshward.testing.topology import shop_yaml

FRONTEND, ORDERS, INVENTORY = "shop/frontend", "shop/orders", "shop/inventory"
OUTBOUND = "outbound|8080||inventory.shop"

BASE = shop_yaml(["frontend", "orders", "inventory"], mtls=None)
EMERGENCY = """
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
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("expiry")
    policy_dir = root / "policies"
    policy_dir.mkdir()
    (policy_dir / "base.yaml").write_text(BASE)
    mesh = Mesh(policy_dir, root, [FRONTEND, ORDERS, INVENTORY])
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def listeners(mesh: Mesh, ref: str) -> set[str]:
    dump = mesh.envoys[ref].config_dump()
    names = set()
    for config in dump["configs"]:
        for entry in config.get("dynamic_listeners", []):
            if "active_state" in entry:
                names.add(entry["name"])
    return names


def test_callers_outbound_follows_the_expiry_and_the_default_deny_stays(mesh: Mesh) -> None:
    # No policy: inventory is open, every caller has an outbound listener to it.
    assert OUTBOUND in listeners(mesh, ORDERS)
    expires = int(time.time()) + 4
    stamp = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    old = mesh.status()["policy"]["version"]
    (mesh.policy_dir / "emergency.yaml").write_text(EMERGENCY.format(at=stamp))
    deadline = time.monotonic() + 15
    while mesh.status()["policy"]["version"] == old and time.monotonic() < deadline:
        time.sleep(0.05)
    mesh.wait_converged(mesh.status()["policy"]["version"])
    assert time.time() < expires - 0.5, "the machine is too slow for this test's timing"
    # In force: the emergency ALLOW is inventory's only ALLOW: frontend only.
    assert mesh.request(FRONTEND, INVENTORY, "/x")[0] == 200
    assert OUTBOUND not in listeners(mesh, ORDERS)  # orders may not call inventory now
    assert mesh.plaintext(INVENTORY, "/x")[0] == 403
    # Past the instant: frontend's outbound listener goes away (nobody may call inventory).
    gone_at = None
    while time.time() < expires + 3:
        if OUTBOUND not in listeners(mesh, FRONTEND):
            gone_at = time.time()
            break
        time.sleep(0.05)
    assert gone_at is not None, "frontend kept its outbound listener to inventory"
    assert gone_at >= expires, "the listener went away before the emergency rule expired"
    assert gone_at <= expires + 1.0, f"the outbound listener left {gone_at - expires:.3f}s late"
    print(f"frontend's outbound listener to inventory left {gone_at - expires:+.3f}s from expiry")
    # Expiry never opened inventory: plaintext and orders (no listener) are still refused.
    assert mesh.plaintext(INVENTORY, "/x")[0] == 403
    assert OUTBOUND not in listeners(mesh, ORDERS)
    status = mesh.status()
    assert all(n["policy_enforced"] for n in status["nodes"])
