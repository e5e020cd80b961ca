"""Fleet metrics derived from the control plane's status at scrape time: policy rollouts, drift
events, certificate and CA expiry, and per-node health, all with bounded label sets.

They are computed from the same status document the admin endpoint serves (so the two can
never disagree), ACK times included. Why each one exists:

- ``meshward_xds_policy_rollout_seconds`` (histogram): from a policy version being applied to the
  latest ACK (of a non-secret type) among the connected nodes, observed at the first scrape that
  finds every connected node in sync with it: "how long
  until a change is enforced everywhere", the number an operator is asked after a change. A
  rollout that a newer version supersedes before it completes is counted in
  ``meshward_xds_policy_rollouts_total{result="superseded"}``, not observed.
- ``meshward_xds_policy_rollout_pending``: 1 while the version in force is not ACKed fleet-wide.
- ``meshward_xds_policy_generation``: how many policy versions this process has applied (a
  number, so a dashboard can show changes without one series per version string).
- ``meshward_xds_drift_events_total``: nodes entering drift (a counter: alerts use increase()).
- ``meshward_ca_expiry_timestamp_seconds{certificate="root|intermediate"}``: when the earliest
  trusted root and the active intermediate expire; ``meshward_xds_server_cert_expiry_timestamp_seconds``
  for the ADS server's own SVID.
- per node, at most :data:`MAX_NODE_SERIES` nodes (sorted by name; the rest are only counted in
  ``meshward_xds_node_series_dropped``): ``meshward_xds_node_in_sync{node}``,
  ``meshward_xds_node_policy_enforced{node}``,
  ``meshward_xds_node_last_ack_timestamp_seconds{node}`` (sidecar health: when it last ACKed
  anything) and
  ``meshward_xds_node_credential_expiry_timestamp_seconds{node}`` (the earliest expiry of the
  client certificates its ADS streams presented: the agent's credential).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

MAX_NODE_SERIES = 2000
ROLLOUT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
SECRET_TYPES = frozenset({"SDS"})


def _timestamp(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


class FleetMetrics:
    """State kept between scrapes (the rollout in progress, the nodes drifting last time) and the
    families derived from each status document. Thread-safe: scrapes may overlap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rollout = Histogram(
            "meshward_xds_policy_rollout_seconds",
            "From a policy version being applied to the ACK that brought every connected node "
            "in sync with it",
            buckets=ROLLOUT_BUCKETS,
            registry=None,
        )
        self.rollouts = Counter(
            "meshward_xds_policy_rollouts",
            "Policy rollouts by outcome (completed: every connected node ACKed; superseded: a "
            "newer version was applied first)",
            ["result"],
            registry=None,
        )
        self.drift_events = Counter(
            "meshward_xds_drift_events", "Nodes entering drift", registry=None
        )
        self._version: str | None = None
        self._applied_at: float | None = None
        self._pending = False
        self._generation = 0
        self._drifting: set[str] = set()

    def families(
        self, status: Mapping[str, Any], ca: Any = None
    ) -> Iterator[Metric]:  # ca: meshward.certs.CertificateAuthority
        nodes: list[Mapping[str, Any]] = list(status.get("nodes", []))
        sync = fleet_sync(status)
        with self._lock:
            self._track_rollout(status.get("policy") or {}, sync)
            self._track_drift(sync.drifting)
            pending, generation = self._pending, self._generation
        yield from self.rollout.collect()
        yield from self.rollouts.collect()
        yield from self.drift_events.collect()
        yield _gauge(
            "meshward_xds_policy_rollout_pending",
            "1 while the policy version in force is not ACKed by every connected node",
            1 if pending else 0,
        )
        yield _gauge(
            "meshward_xds_policy_generation",
            "Policy versions applied by this control plane process (the first one is 1)",
            generation,
        )
        yield from _expiry_families(status, ca)
        yield from _node_families(nodes, (status.get("fleet") or {}).get("connected"))

    # -- state between scrapes -------------------------------------------------------------
    def _track_rollout(self, policy: Mapping[str, Any], sync: FleetSync) -> None:
        version = policy.get("version")
        if not version:
            return
        if version != self._version:
            if self._pending:
                self.rollouts.labels("superseded").inc()
            self._version = version
            self._applied_at = _timestamp(policy.get("applied_at"))
            self._generation += 1
            self._pending = True
        if not self._pending or not sync.in_sync:
            return
        self._pending = False
        self.rollouts.labels("completed").inc()
        if self._applied_at is not None:
            self.rollout.observe(max(0.0, sync.last_policy_ack - self._applied_at))

    def _track_drift(self, drifting: frozenset[str]) -> None:
        new = len(drifting - self._drifting)
        if new:
            self.drift_events.inc(new)
        self._drifting = set(drifting)


@dataclass(frozen=True)
class FleetSync:
    """What the rollout and drift tracking read: every connected node in sync (and at least
    one connected), the latest policy ACK (Unix time), the drifting nodes."""

    in_sync: bool
    last_policy_ack: float
    drifting: frozenset[str]


def fleet_sync(status: Mapping[str, Any]) -> FleetSync:
    """From the counts the control plane keeps on events (``fleet``, ``last_policy_ack``,
    ``drifting_nodes``: meshward.xds.fleetcounts.metrics_view, O(1) plus the drifting names),
    or, for a status document without them, recomputed from its per-node documents."""
    fleet = status.get("fleet")
    if fleet is not None:
        return FleetSync(
            in_sync=fleet["connected"] > 0 and fleet["in_sync"] == fleet["connected"],
            last_policy_ack=_timestamp(status.get("last_policy_ack")) or 0.0,
            drifting=frozenset(status.get("drifting_nodes", ())),
        )
    nodes = list(status.get("nodes", []))
    return FleetSync(
        in_sync=_fleet_in_sync(nodes),
        last_policy_ack=max(
            (_last_ack(n, policy_only=True) for n in nodes if n.get("connected")), default=0.0
        ),
        drifting=frozenset(str(n["node"]) for n in nodes if n.get("drift")),
    )


def _fleet_in_sync(nodes: Iterable[Mapping[str, Any]]) -> bool:
    """Every connected node has every requested type ACKed at its desired version (a fleet with
    no connected node is not "in sync": nobody enforces the version yet)."""
    connected = False
    for node in nodes:
        if not node.get("connected"):
            continue
        connected = True
        if not _node_in_sync(node):
            return False
    return connected


def _node_in_sync(node: Mapping[str, Any]) -> bool:
    return all(t.get("in_sync") for s in node.get("streams", []) for t in s.get("types", []))


def _last_ack(node: Mapping[str, Any], *, policy_only: bool = False) -> float:
    """The node's latest ACK as Unix time (0: none); ``policy_only``: secrets (rotations) left
    out, since they do not carry policy."""
    times = [
        _timestamp(t.get("acked_at")) or 0.0
        for s in node.get("streams", [])
        for t in s.get("types", [])
        if not (policy_only and t.get("type") in SECRET_TYPES)
    ]
    return max(times, default=0.0)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def _expiry_families(status: Mapping[str, Any], ca: Any) -> Iterator[Metric]:
    family = GaugeMetricFamily(
        "meshward_ca_expiry_timestamp_seconds",
        "When the earliest trusted CA root and the active intermediate expire (Unix time)",
        labels=["certificate"],
    )
    if ca is not None:
        now = datetime.now().astimezone()
        roots = [g.root.not_valid_after_utc for g in ca.generations if g.trusted(now)]
        if roots:
            family.add_metric(["root"], min(roots).timestamp())
        intermediate = ca.active_generation.intermediate.not_valid_after_utc
        family.add_metric(["intermediate"], intermediate.timestamp())
    yield family
    server = GaugeMetricFamily(
        "meshward_xds_server_cert_expiry_timestamp_seconds",
        "When the ADS server's own SVID expires (Unix time; it renews itself before then)",
    )
    not_after = _timestamp((status.get("server_certificate") or {}).get("not_after"))
    if not_after is not None:
        server.add_metric([], not_after)
    yield server


def _node_families(nodes: list[Mapping[str, Any]], total: int | None = None) -> Iterator[Metric]:
    """Per-node series for the first MAX_NODE_SERIES connected nodes by name; ``total``: how
    many nodes are connected, when ``nodes`` holds only those first ones."""
    in_sync = GaugeMetricFamily(
        "meshward_xds_node_in_sync",
        "1 when every type the connected node subscribed to is ACKed at its desired version",
        labels=["node"],
    )
    enforced = GaugeMetricFamily(
        "meshward_xds_node_policy_enforced",
        "1 when the connected node enforces the policy set in force (0: it NACKed a listener "
        "or route, or its workload failed to compile)",
        labels=["node"],
    )
    last_ack = GaugeMetricFamily(
        "meshward_xds_node_last_ack_timestamp_seconds",
        "When the connected node last ACKed a response (Unix time)",
        labels=["node"],
    )
    credential = GaugeMetricFamily(
        "meshward_xds_node_credential_expiry_timestamp_seconds",
        "When the earliest client certificate the node's ADS streams presented expires (the "
        "agent's credential; Unix time)",
        labels=["node"],
    )
    connected = sorted((n for n in nodes if n.get("connected")), key=lambda n: str(n["node"]))
    for node in connected[:MAX_NODE_SERIES]:
        name = str(node["node"])
        in_sync.add_metric([name], 1 if _node_in_sync(node) else 0)
        enforced.add_metric([name], 1 if node.get("policy_enforced") else 0)
        acked = _last_ack(node)
        if acked:
            last_ack.add_metric([name], acked)
        expiries = [
            _timestamp((s.get("ads_credentials") or {}).get("not_after"))
            for s in node.get("streams", [])
        ]
        known = [e for e in expiries if e is not None]
        if known:
            credential.add_metric([name], min(known))
    yield in_sync
    yield enforced
    yield last_ack
    yield credential
    yield _gauge(
        "meshward_xds_node_series_dropped",
        f"Connected nodes beyond the first {MAX_NODE_SERIES} (by name), left out of the "
        "per-node series (the fleet-wide gauges still count them)",
        max(0, (len(connected) if total is None else total) - MAX_NODE_SERIES),
    )
