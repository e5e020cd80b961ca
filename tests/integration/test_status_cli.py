"""`meshward status` against a running demo mesh (real control plane, five real Envoy sidecars):
it finds the demo the way `meshward denials` does, takes the demo's ADS address too, and says
so when --node names no node."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meshward.cli import main
from meshward.demo.state import record_last

WORKLOADS = ["shop/frontend", "shop/inventory", "shop/orders", "shop/payments", "shop/scraper"]


def test_status_finds_the_running_demo_and_refuses_unknown_nodes(
    demo_mesh: Any,  # the shared demo mesh (tests/integration/conftest.py)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MESHWARD_DEMO_LAST", str(tmp_path / "last"))
    mesh = demo_mesh.mesh
    assert mesh.state is not None and mesh.state.ads is not None
    record_last(demo_mesh.state_dir)  # what `meshward demo` does once its mesh is up
    capsys.readouterr()
    # no --xds: the running demo's admin endpoint (it used to try only 127.0.0.1:15011)
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert sorted(n["node"] for n in status["nodes"]) == WORKLOADS
    # the demo's ADS address works too (its admin port is not ADS + 1)
    assert main(["status", "--xds", mesh.state.ads, "--node", "shop/orders", "--json"]) == 0
    [node] = json.loads(capsys.readouterr().out)["nodes"]
    assert node["node"] == "shop/orders"
    # a node that is not there is an error naming the nodes there are (it used to print
    # "no nodes have connected" and exit 0)
    assert main(["status", "--node", "shop/order"]) == 1
    err = capsys.readouterr().err
    assert "no node shop/order in this control plane's status" in err
    assert "did you mean 'shop/orders'?" in err
    assert "5 node(s): " + ", ".join(WORKLOADS) in err
    assert "no nodes have connected" not in err
    assert main(["status", "--node", "shop/orders", "--node", "nope/x"]) == 1
    assert "no node nope/x" in capsys.readouterr().err
