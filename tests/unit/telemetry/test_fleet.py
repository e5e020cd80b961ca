"""Fleet metrics from status documents: rollouts, drift events, bounded per-node series."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from meshward.telemetry import fleet

APPLIED = "2026-12-01T10:00:00+00:00"
T0 = 1796119200.0  # APPLIED as Unix time


def iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat()


def node(
    name: str,
    *,
    in_sync: bool = True,
    drift: bool = False,
    lds_acked: float | None = None,
    sds_acked: float | None = None,
) -> dict[str, Any]:
    lds = {"type": "LDS", "in_sync": in_sync, "acked_at": iso(lds_acked) if lds_acked else None}
    sds = {"type": "SDS", "in_sync": True, "acked_at": iso(sds_acked) if sds_acked else None}
    return {
        "node": name,
        "connected": True,
        "drift": drift,
        "policy_enforced": True,
        "streams": [
            {
                "types": [lds, sds],
                "ads_credentials": {"not_after": "2026-12-02T10:00:00+00:00"},
            }
        ],
    }


def status(version: str, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"policy": {"version": version, "applied_at": APPLIED}, "nodes": nodes}


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
    metrics = fleet.FleetMetrics()
    behind = status("v1", [node("a", lds_acked=T0 + 1), node("b", in_sync=False)])
    assert scrape(metrics, behind)["meshward_xds_policy_rollout_pending"] == 1
    # b ACKs at +3 s; a secret ACK at +9 s (a rotation) is not the policy arriving
    synced = [node("a", lds_acked=T0 + 1, sds_acked=T0 + 9), node("b", lds_acked=T0 + 3)]
    samples = scrape(metrics, status("v1", synced))
    assert samples["meshward_xds_policy_rollout_pending"] == 0
    assert samples["meshward_xds_policy_rollout_seconds_count"] == 1
    assert samples["meshward_xds_policy_rollout_seconds_sum"] == 3.0
    assert samples['meshward_xds_node_last_ack_timestamp_seconds{node="a"}'] == T0 + 9
    assert samples['meshward_xds_node_last_ack_timestamp_seconds{node="b"}'] == T0 + 3
    again = scrape(metrics, status("v1", synced))
    assert again["meshward_xds_policy_rollout_seconds_count"] == 1  # once per version


def test_a_superseded_rollout_is_counted_not_timed() -> None:
    metrics = fleet.FleetMetrics()
    scrape(metrics, status("v1", [node("a", in_sync=False)]))
    samples = scrape(metrics, status("v2", [node("a", in_sync=False)]))
    assert samples['meshward_xds_policy_rollouts_total{result="superseded"}'] == 1
    assert samples["meshward_xds_policy_generation"] == 2
    assert samples["meshward_xds_policy_rollout_seconds_count"] == 0


def test_no_connected_node_means_the_rollout_is_still_pending() -> None:
    metrics = fleet.FleetMetrics()
    assert scrape(metrics, status("v1", []))["meshward_xds_policy_rollout_pending"] == 1


def test_drift_events_count_nodes_entering_drift() -> None:
    metrics = fleet.FleetMetrics()
    scrape(metrics, status("v1", [node("a", drift=True)]))
    scrape(metrics, status("v1", [node("a", drift=True), node("b", drift=True)]))
    scrape(metrics, status("v1", [node("a"), node("b")]))
    samples = scrape(metrics, status("v1", [node("a", drift=True)]))
    assert samples["meshward_xds_drift_events_total"] == 3  # a, b, a again


def test_a_flood_of_nodes_keeps_per_node_series_bounded() -> None:
    metrics = fleet.FleetMetrics()
    count = fleet.MAX_NODE_SERIES + 700
    nodes = [node(f"ns/w{i:05}", lds_acked=T0) for i in range(count)]
    samples = scrape(metrics, status("v1", nodes))
    for name in (
        "meshward_xds_node_in_sync",
        "meshward_xds_node_policy_enforced",
        "meshward_xds_node_credential_expiry_timestamp_seconds",
        "meshward_xds_node_last_ack_timestamp_seconds",
    ):
        assert sum(1 for k in samples if k.startswith(name + "{")) == fleet.MAX_NODE_SERIES
    assert samples["meshward_xds_node_series_dropped"] == 700
    assert samples['meshward_xds_node_credential_expiry_timestamp_seconds{node="ns/w00000"}'] == (
        T0 + 86400
    )


def test_many_policy_versions_leave_no_series_behind() -> None:
    metrics = fleet.FleetMetrics()
    for i in range(500):
        samples = scrape(metrics, status(f"v{i}", [node("a")]))
    assert samples["meshward_xds_policy_generation"] == 500
    assert not [k for k in samples if "v1" in k]
    assert len(samples) < 60


def test_counts_kept_on_events_drive_rollouts_and_drift_events_without_node_documents() -> None:
    """The control plane's path (meshward.xds.fleetcounts.metrics_view): counts, the latest
    policy ACK and the drifting nodes by name; per-node documents only for the first nodes."""
    metrics = fleet.FleetMetrics()

    def doc(in_sync: int, last_ack: float | None, drifting: list[str]) -> dict[str, Any]:
        return {
            **status("v1", []),
            "fleet": {"connected": 3, "in_sync": in_sync},
            "last_policy_ack": iso(last_ack) if last_ack else None,
            "drifting_nodes": drifting,
        }

    samples = scrape(metrics, doc(2, T0 + 1, ["a"]))
    assert samples["meshward_xds_policy_rollout_pending"] == 1
    assert samples["meshward_xds_drift_events_total"] == 1
    samples = scrape(metrics, doc(3, T0 + 4, []))
    assert samples["meshward_xds_policy_rollout_pending"] == 0
    assert samples["meshward_xds_policy_rollout_seconds_sum"] == 4.0
    assert samples["meshward_xds_drift_events_total"] == 1
    samples = scrape(metrics, {**doc(3, T0 + 4, []), "fleet": {"connected": 2700, "in_sync": 2700}})
    assert samples["meshward_xds_node_series_dropped"] == 700  # counted, not listed
