"""The whole-set index a compile reads (peers, port registry, expiries) is an explicit value
the caller builds and passes in, not a module-global memo: compile stays pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from meshward.compile import CompileOptions, Endpoint, compile_mesh, compile_workload
from meshward.compile import peers as peers_module
from meshward.compile.peers import mesh_index
from meshward.policy import load

ROOT = Path(__file__).resolve().parents[3]
OPTIONS = CompileOptions(extauthz=Endpoint("127.0.0.1", 9191))
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def _bytes(resources: object) -> list[bytes]:
    groups = ("listeners", "routes", "clusters", "endpoints")
    return [m.SerializeToString(deterministic=True) for g in groups for m in getattr(resources, g)]


def test_passed_index_gives_the_same_bytes_as_one_built_per_workload() -> None:
    policy_set = load([ROOT / "examples"])
    mesh = compile_mesh(policy_set, OPTIONS, now=NOW)
    for workload in policy_set.workloads:
        alone = compile_workload(policy_set, workload, OPTIONS, now=NOW)
        assert _bytes(alone) == _bytes(mesh[workload.ref])
        assert alone.next_change == mesh[workload.ref].next_change


def test_the_index_passed_in_is_the_one_used() -> None:
    """An index built at another instant decides: proof that no hidden cache answers instead."""
    policy_set = load([ROOT / "examples"])
    workload = policy_set.workloads[0]
    empty = mesh_index(policy_set, NOW)
    empty = type(empty)(type(empty.peers)(), empty.ports, (NOW + timedelta(hours=1),))
    result = compile_workload(policy_set, workload, OPTIONS, now=NOW, index=empty)
    assert result.next_change is None or result.next_change <= NOW + timedelta(hours=1)
    full = compile_workload(policy_set, workload, OPTIONS, now=NOW)
    assert len(result.clusters) < len(full.clusters)  # no peers in the index: no outbound


def test_no_module_level_cache_or_lock() -> None:
    state = {
        name: value
        for name, value in vars(peers_module).items()
        if isinstance(value, dict | list | set) and not name.startswith("__")
    }
    assert state == {}
    assert "threading" not in vars(peers_module)
