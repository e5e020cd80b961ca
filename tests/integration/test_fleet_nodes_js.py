"""bench/xds_fleet.py's simulated nodes in Node.js (bench/fleet_js/fleet_nodes.js) against a real
`meshward xds serve`: a small fleet through both implementations, so the cheaper clients are
known to be the same nodes on the wire (same subscriptions, same resources delivered, updates
followed, the server's identity checked). A benchmark whose clients quietly asked for less
would report a faster control plane that does not exist.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a directory of scripts, imported as bench.*
    sys.path.insert(0, str(ROOT))

from bench.fleet_workers import JS_DIR, NodeFleet, Worker  # noqa: E402
from bench.xds_fleet import (  # noqa: E402
    Server,
    Target,
    changed_files,
    one_policy_edit,
    policy_files,
    policy_set,
    prepare,
    target,
    write_files,
)
from meshward.testing.processes import Launcher  # noqa: E402

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (JS_DIR / "node_modules" / "protobufjs").is_dir(),
    reason="Node.js or bench/fleet_js/node_modules missing (`make fleet-js`)",
)

SERVICES, REPLICAS = 12, 2


@dataclass
class Fleet:
    work: Path
    launcher: Launcher
    server: Server
    ps: Any
    nodes: list[str]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("fleet")
    ps = policy_set("fleet", SERVICES)
    nodes = prepare(work, ps, REPLICAS)
    with Launcher(work, quiet=True) as launcher:
        server = Server(work, launcher, target(ps).ads_port)
        yield Fleet(work, launcher, server, ps, nodes)


def connect(fleet: Fleet, impl: str, ads: str, name: str) -> dict[str, Any]:
    """Every node of the fleet through ``impl`` (two processes, as the bench runs them), until
    each is configured; the fleet is stopped (its streams closed) before this returns."""
    nodes = NodeFleet(fleet.work, fleet.launcher, fleet.server, ads, 2, name=name, impl=impl)
    try:
        return nodes.ask("connect")
    finally:
        nodes.stop()


@pytest.mark.parametrize("ads", ["delta", "sotw"])
def test_node_fleet_gets_what_the_python_fleet_gets(fleet: Fleet, ads: str) -> None:
    """Every node configured (CDS, LDS, then the EDS and RDS names they reference), and the
    resources delivered to the whole fleet the same count as Python's nodes got."""
    python = connect(fleet, "python", ads, f"py-{ads}-")
    node = connect(fleet, "node", ads, f"js-{ads}-")
    assert python["failures"] == {} and node["failures"] == {}
    # each node holds clusters, endpoints, listeners and routes: well over 4 per node
    assert python["resources"] > 4 * len(fleet.nodes)
    assert node["resources"] == python["resources"]


def test_policy_edit_reaches_the_affected_nodes(fleet: Fleet) -> None:
    """A one-policy edit: its callee's replicas get a new route (``wait`` returns), and the
    control plane records their ACKs of it."""
    nodes = NodeFleet(fleet.work, fleet.launcher, fleet.server, "delta", 2, name="edit-",
                      impl="node")  # fmt: skip
    try:
        nodes.ask("connect")
        edited, callee = one_policy_edit(fleet.ps)
        affected = [n for n in fleet.nodes if n.startswith(callee + "/")]
        assert len(affected) == REPLICAS
        nodes.ask("mark")
        files = changed_files(fleet.work / "policies", policy_files(edited))
        start = time.time()
        write_files(fleet.work / "policies", files)
        answer = nodes.ask(f"wait {json.dumps(affected)} 20")
        assert answer["last_wall"] > start and answer["resources"] >= len(affected)
        assert REPLICAS <= nodes.ask("touched")["nodes"] < len(fleet.nodes)
        # the same nodes, already updated: a second wait is answered at once
        assert nodes.ask(f"wait {json.dumps(affected)} 1")["last_wall"] == answer["last_wall"]
        with pytest.raises(RuntimeError, match="nodes updated"):
            nodes.ask("mark")
            nodes.ask(f"wait {json.dumps(affected)} 0.3")  # nothing new since the mark
    finally:
        nodes.stop()
        write_files(fleet.work / "policies", changed_files(fleet.work / "policies",
                                                           policy_files(fleet.ps)))  # fmt: skip


def test_probe_is_answered(fleet: Fleet) -> None:
    """The stall probe (delta: a new nonexistent route name every time) gets its answers."""
    probe = Worker(fleet.work, fleet.launcher, "js-probe", fleet.server, "delta", impl="node")
    try:
        assert probe.ask("probe on") == {"probing": True}
        time.sleep(0.5)
        answer = probe.ask("probe off")
        assert answer["answers"] >= 3
        assert len(answer["waits"]) >= answer["answers"]
        assert 0 < answer["max_stall"] < 5
    finally:
        probe.stop()


def test_server_with_another_identity_is_refused(fleet: Fleet) -> None:
    """The nodes verify the server's SPIFFE ID (its URI SAN), not just its chain: the real
    server, expected under another identity, is refused by every node."""
    other = fleet.server.identity.replace("/sa/", "/sa/not-")
    assert other != fleet.server.identity
    nodes = NodeFleet(fleet.work, fleet.launcher, Target(fleet.server.ads_port, other), "delta",
                      1, name="wrong-", impl="node")  # fmt: skip
    try:
        with pytest.raises(RuntimeError, match="ServerIdentityMismatch"):
            nodes.ask("connect")
    finally:
        nodes.stop()
