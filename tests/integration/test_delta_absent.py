"""Delta ADS with a real Envoy: a subscribed name the control plane does not have is answered
(``removed_resources``) instead of left for Envoy's ``initial_fetch_timeout``.

The probe is an operator-run sidecar's own bootstrap (delta ADS, mTLS with its SVID files) with
no CDS/LDS and one static EDS cluster whose load assignment no snapshot holds. Envoy initializes
that cluster before anything else and stays PRE_INITIALIZING until the EDS name is answered or
its fetch timeout (set to 120 s here) fires: LIVE within seconds means the answer came.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshward.envoy.process import EnvoyProcess
from meshward.testing.mesh import Mesh
from meshward.testing.topology import shop_yaml

ORDERS = "shop/orders"
GHOST = "shop/ghost-endpoints"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("delta-absent")
    policy_dir = root / "policies"
    policy_dir.mkdir()
    (policy_dir / "mesh.yaml").write_text(shop_yaml(["orders"]))
    mesh = Mesh(policy_dir, root, [ORDERS], sidecars="bootstrap", delta={ORDERS})
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def probe_config(mesh: Mesh) -> dict[str, object]:
    config = dict(mesh.envoys[ORDERS].config)
    config.pop("admin", None)  # the probe's own admin socket
    config["node"] = {**config["node"], "id": f"{ORDERS}/absent-probe"}
    dynamic = dict(config["dynamic_resources"])
    assert dynamic["ads_config"]["api_type"] == "DELTA_GRPC"
    config["dynamic_resources"] = {"ads_config": dynamic["ads_config"]}  # no CDS, no LDS
    static = dict(config["static_resources"])
    static["clusters"] = [
        *static.get("clusters", []),
        {
            "name": "ghost",
            "type": "EDS",
            "connect_timeout": "1s",
            "eds_cluster_config": {
                "service_name": GHOST,
                "eds_config": {
                    "ads": {},
                    "resource_api_version": "V3",
                    "initial_fetch_timeout": "120s",
                },
            },
        },
    ]
    static.pop("listeners", None)
    config["static_resources"] = static
    return config


def test_envoy_is_told_at_once_that_a_subscribed_endpoint_name_does_not_exist(
    mesh: Mesh, tmp_path: Path
) -> None:
    probe = EnvoyProcess(probe_config(mesh), name="absent-probe", workdir=tmp_path / "probe")
    try:
        probe.start(timeout=20)  # waits for LIVE: 20 s at most, far below the 120 s timeout
        stats = probe.stats("cluster.ghost.")
    finally:
        probe.stop()
    assert stats["cluster.ghost.update_empty"] == 1, stats  # the answer: "no such resource"
    assert stats["cluster.ghost.init_fetch_timeout"] == 0, stats
    assert stats["cluster.ghost.membership_total"] == 0, stats
