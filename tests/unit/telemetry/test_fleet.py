"""Fleet metrics from status documents: rollouts, drift events, bounded per-node series."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from meshward.telemetry import fleet

APPLIED = "2026-12-01T10:00:00+00:00"
T0 = 1796119200.0  # APPLIED as Unix time


def node(name: str, *, in_sync: bool = True, drift: bool = False) -> dict[str, Any]:
    return {
        "node": name,
        "connected": True,
        "drift": drift,
        "policy_enforced": True,
        "streams": [
            {
                "types": [{"type": "LDS", "in_sync": in_sync}, {"type": "SDS", "in_sync": True}],
                "ads_credentials": {"not_after": "2026-12-02T10:00:00+00:00"},
            }
        ],
    }


def status(version: str, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"policy": {"version": version, "applied_at": APPLIED}, "nodes": nodes}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def scrape(metrics: fleet.FleetMetrics, doc: dict[str, Any]) -> dict[str, float]:
    class Once(Collector):
        def collect(self) -> Any:
            return metrics.families(doc)

    registry = CollectorRegistry()
    registry.register(Once())
    text = generate_latest(registry).decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_a_rollout_is_timed_to_the_last_ack_that_brought_the_fleet_in_sync() -> None:
    clock = Clock()
    metrics = fleet.FleetMetrics(clock)
    behind = status("v1", [node("a"), node("b", in_sync=False)])
    assert scrape(metrics, behind)["meshward_xds_policy_rollout_pending"] == 1
    clock.now = T0 + 3.0
    metrics.acked("LDS")
    clock.now = T0 + 9.0
    metrics.acked("SDS")  # a secret ACK (rotation) is not the policy arriving
    samples = scrape(metrics, status("v1", [node("a"), node("b")]))
    assert samples["meshward_xds_policy_rollout_pending"] == 0
    assert samples["meshward_xds_policy_rollout_seconds_count"] == 1
    assert samples["meshward_xds_policy_rollout_seconds_sum"] == 3.0
    again = scrape(metrics, status("v1", [node("a"), node("b")]))
    assert again["meshward_xds_policy_rollout_seconds_count"] == 1  # once per version


def test_a_superseded_rollout_is_counted_not_timed() -> None:
    metrics = fleet.FleetMetrics(Clock())
    scrape(metrics, status("v1", [node("a", in_sync=False)]))
    samples = scrape(metrics, status("v2", [node("a", in_sync=False)]))
    assert samples['meshward_xds_policy_rollouts_total{result="superseded"}'] == 1
    assert samples["meshward_xds_policy_generation"] == 2
    assert samples["meshward_xds_policy_rollout_seconds_count"] == 0


def test_no_connected_node_means_the_rollout_is_still_pending() -> None:
    metrics = fleet.FleetMetrics(Clock())
    assert scrape(metrics, status("v1", []))["meshward_xds_policy_rollout_pending"] == 1


def test_drift_events_count_nodes_entering_drift() -> None:
    metrics = fleet.FleetMetrics(Clock())
    scrape(metrics, status("v1", [node("a", drift=True)]))
    scrape(metrics, status("v1", [node("a", drift=True), node("b", drift=True)]))
    scrape(metrics, status("v1", [node("a"), node("b")]))
    samples = scrape(metrics, status("v1", [node("a", drift=True)]))
    assert samples["meshward_xds_drift_events_total"] == 3  # a, b, a again


def test_a_flood_of_nodes_keeps_per_node_series_bounded() -> None:
    metrics = fleet.FleetMetrics(Clock())
    count = fleet.MAX_NODE_SERIES + 700
    samples = scrape(metrics, status("v1", [node(f"ns/w{i:05}") for i in range(count)]))
    for name in (
        "meshward_xds_node_in_sync",
        "meshward_xds_node_policy_enforced",
        "meshward_xds_node_credential_expiry_timestamp_seconds",
    ):
        assert sum(1 for k in samples if k.startswith(name + "{")) == fleet.MAX_NODE_SERIES
    assert samples["meshward_xds_node_series_dropped"] == 700
    assert samples['meshward_xds_node_credential_expiry_timestamp_seconds{node="ns/w00000"}'] == (
        T0 + 86400
    )


def test_many_policy_versions_leave_no_series_behind() -> None:
    metrics = fleet.FleetMetrics(Clock())
    for i in range(500):
        samples = scrape(metrics, status(f"v{i}", [node("a")]))
    assert samples["meshward_xds_policy_generation"] == 500
    assert not [k for k in samples if "v1" in k]
    assert len(samples) < 60
