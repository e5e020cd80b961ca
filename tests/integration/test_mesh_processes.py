"""The one mesh builder with its control plane as a real `meshward xds serve` process (what the
demo and the fault tests run): ports picked at run time, apps as processes, and a control plane
that is stopped and started again comes back on the addresses the agents already point at."""

from __future__ import annotations

from pathlib import Path

from meshward.testing.mesh import Mesh
from meshward.testing.topology import allow_doc, shop_yaml

FRONTEND, ORDERS = "shop/frontend", "shop/orders"
POLICY = shop_yaml(
    ["frontend", "orders"], allow_doc("orders-allow-frontend", "orders", callers=["frontend"])
)


def test_a_process_control_plane_restarts_where_the_agents_point(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    (policy_dir / "mesh.yaml").write_text(POLICY)
    mesh = Mesh(policy_dir, tmp_path, [FRONTEND, ORDERS], control_plane="process", apps="process")
    with mesh:
        components = set(mesh.launcher.components)
        assert {"xds", "frontend", "orders", "frontend-sidecar", "orders-sidecar"} <= components
        assert "extauthz" not in components  # only when asked for
        assert not mesh.ads_address.endswith(":0") and mesh.xds is None
        assert mesh.request(FRONTEND, ORDERS)[0] == 200
        xds_pid = mesh.launcher["xds"].pid
        ads, admin = mesh.ads_address, mesh.admin_url

        mesh.restart_control_plane(down=0.5)
        assert mesh.launcher["xds"].pid != xds_pid
        assert (mesh.ads_address, mesh.admin_url) == (ads, admin)
        assert mesh.status()["policy"]["version"]  # the new process answers there
        # Envoy keeps serving its config meanwhile; it reconnects after its ADS retry backoff
        # (tests/faults waits for that, under traffic)
        assert mesh.request(FRONTEND, ORDERS)[0] == 200
    assert not mesh.launcher.components  # every process stopped
