"""Prometheus metrics of the control plane, in a registry of its own (one per server instance,
so tests and benchmarks can run several servers in one process).

Counters and the latency histogram are updated as events happen; gauges that describe current
state (connected nodes, drift, certificate expiry) are computed when scraped, from the same
fleet counts the admin endpoint's summary serves, so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshward.telemetry.fleet import FleetMetrics
from meshward.xds import typeurls

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class XdsMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.pushes = Counter(
            "meshward_xds_pushes", "xDS responses sent", ["type"], registry=self.registry
        )
        self.push_latency = Histogram(
            "meshward_xds_push_latency_seconds",
            "From a node's desired content changing (or its request) to its ACK",
            ["type"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.acks = Counter("meshward_xds_acks", "ACKs received", ["type"], registry=self.registry)
        self.nacks = Counter(
            "meshward_xds_nacks", "NACKs received (Envoy rejected resources)", ["type"],
            registry=self.registry,
        )  # fmt: skip
        self.rejected_streams = Counter(
            "meshward_xds_rejected_streams",
            "ADS streams refused by node authentication",
            ["reason"],
            registry=self.registry,
        )
        self.secret_denials = Counter(
            "meshward_xds_secret_denials",
            "Requests for secrets that are not the node's own (audited, nothing sent)",
            registry=self.registry,
        )
        self.policy_updates = Counter(
            "meshward_xds_policy_updates",
            "Policy changes applied (result=applied) or rejected as invalid (result=rejected)",
            ["result"],
            registry=self.registry,
        )
        self.jwks_fetches = Counter(
            "meshward_xds_jwks_fetches",
            "JWKS fetches for jwt_authn (result=ok|error; an error keeps the last good keys)",
            ["result"],
            registry=self.registry,
        )
        self.svid_requests = Counter(
            "meshward_xds_svid_requests",
            "Certificate service requests (Join/Renew/Bundle) by outcome: ok, error (internal) "
            "or the refusal reason (a fixed set: identity, token, limits, malformed CSR)",
            ["method", "result"],
            registry=self.registry,
        )
        self.svid_issuance = Histogram(
            "meshward_xds_svid_issuance_seconds",
            "Time to answer a CSR (Join or Renew) that was signed",
            ["method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.nodes_collected = Counter(
            "meshward_xds_nodes_collected",
            "Disconnected nodes forgotten after --node-gc-after",
            registry=self.registry,
        )
        self.streams_closed = Counter(
            "meshward_xds_streams_closed",
            "ADS streams the server closed (reason=not-reading: a push went unread too long)",
            ["reason"],
            registry=self.registry,
        )
        self.fleet = FleetMetrics()
        # The children of the per-message series for the types served, each looked up once (on
        # first use, so a series appears only once it counts something): every push and every
        # ACK of a fan-out counts, and ``labels()`` (a lock, a key tuple, a dict lookup) was a
        # measurable part of the loop's per-message time. Other type URLs (a node may ask for
        # anything) go through ``labels()`` every time; no child is kept for them (bounded).
        self._pushes: dict[str, Any] = {}
        self._acks: dict[str, tuple[Any, Any]] = {}

    def push(self, type_url: str) -> None:
        child = self._pushes.get(type_url)
        if child is None:
            child = self.pushes.labels(typeurls.short(type_url))
            if type_url in typeurls.SHORT:
                self._pushes[type_url] = child
        child.inc()

    def ack(self, type_url: str, latency: float) -> None:
        children = self._acks.get(type_url)
        if children is None:
            label = typeurls.short(type_url)
            children = (self.acks.labels(label), self.push_latency.labels(label))
            if type_url in typeurls.SHORT:
                self._acks[type_url] = children
        children[0].inc()
        children[1].observe(latency)

    def nack(self, type_url: str) -> None:
        self.nacks.labels(typeurls.short(type_url)).inc()

    def add_state(
        self, status: Callable[[], Mapping[str, Any]], ca: Callable[[], Any] | None = None
    ) -> None:
        """Gauges computed at scrape time from ``XdsService.metrics_state`` (fleet counts and
        light per-node health, not the per-node status documents); ``ca`` returns the
        CertificateAuthority for the CA expiry gauges."""
        self.registry.register(_StateCollector(status, self.fleet, ca))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(
        self,
        status: Callable[[], Mapping[str, Any]],
        fleet: FleetMetrics,
        ca: Callable[[], Any] | None,
    ) -> None:
        self._status = status
        self._fleet = fleet
        self._ca = ca

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        status = self._status()  # XdsService.metrics_state: counts, no per-node documents
        fleet = status["fleet"]
        connected = GaugeMetricFamily(
            "meshward_xds_connected_nodes", "Nodes with at least one open ADS stream"
        )
        connected.add_metric([], fleet["connected"])
        yield connected
        streams = GaugeMetricFamily("meshward_xds_streams", "Open ADS streams", labels=["mode"])
        for mode, count in sorted(fleet["streams"].items()):
            streams.add_metric([mode], count)
        yield streams
        drift = GaugeMetricFamily(
            "meshward_xds_drifting_nodes",
            "Nodes whose ACKed version differs from the desired one for longer than the threshold",
        )
        node_drift_flags: Mapping[str, bool] = status["node_drift"]  # the first nodes by name
        drift.add_metric([], fleet["drifting"])
        yield drift
        not_enforcing = GaugeMetricFamily(
            "meshward_xds_nodes_not_enforcing",
            "Connected nodes that rejected (NACKed) a listener or route of the desired version "
            "and so do not enforce the policy set in force",
        )
        not_enforcing.add_metric([], fleet["not_enforced"])
        yield not_enforcing
        jwks = status.get("jwks") or {}
        failing = GaugeMetricFamily(
            "meshward_xds_jwks_failing",
            "jwksUris whose last fetch failed (the last good keys, if any, are still served)",
        )
        failing.add_metric([], len(jwks.get("failing", [])))
        yield failing
        node_drift = GaugeMetricFamily(
            "meshward_xds_node_drift",
            "1 when the node drifts (the first 2,000 connected nodes by name and up to 2,000 "
            "drifting nodes; meshward_xds_drifting_nodes counts them all)",
            labels=["node"],
        )
        for name, flag in node_drift_flags.items():
            node_drift.add_metric([name], 1 if flag else 0)
        yield node_drift
        policy = status.get("policy") or {}
        version = GaugeMetricFamily(
            "meshward_xds_policy_info", "The policy version in force", labels=["version"]
        )
        if policy.get("version"):
            version.add_metric([policy["version"]], 1)
        yield version
        error = GaugeMetricFamily(
            "meshward_xds_policy_error", "1 while the latest policy change is rejected"
        )
        error.add_metric([], 1 if policy.get("error") else 0)
        yield error
        yield from self._fleet.families(status, self._ca() if self._ca is not None else None)
