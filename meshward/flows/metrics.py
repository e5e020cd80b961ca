"""Prometheus metrics of the flows, with bounded label sets.

- ``meshward_flows_total{source,destination,decision}``: requests (and refused connections)
  per caller and callee workload. Sources and destinations are workloads of the policy set,
  ``unknown`` or ``plaintext`` already (meshward.flows.records); on top of that at most
  :data:`MAX_PAIRS` (source, destination) pairs get their own series, the rest count as
  ``other`` -> ``other``, so no caller can grow the series count.
- ``meshward_flow_denials_total{policy}``: denials by deciding policy (``none``: no rule
  matched); at most :data:`MAX_POLICIES` policies, then ``other``.
- ``meshward_flow_rule_decisions_total{policy,rule,decision}``: decisions by deciding rule
  (``policy``/``rule`` ``none`` when no rule decided); at most :data:`MAX_RULES` (policy, rule)
  pairs, then ``other``: the debug dashboard's "which rule decided" without the flow store.
- ``meshward_flow_enforcement_seconds{decision}``: request durations as the callee's sidecar
  measured them (a histogram: heatmaps and quantiles are PromQL's job).
- ``meshward_flow_collector_refused_total{reason}`` / ``..._dropped_total{reason}``: what the
  collector refused or dropped (fixed reason sets).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from meshward.flows.records import DENY, FlowRecord

MAX_PAIRS = 1000
MAX_POLICIES = 500
MAX_RULES = 1000
OTHER = "other"
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class FlowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.flows = Counter(
            "meshward_flows",
            "Requests and refused connections seen by the sidecars, by caller and callee workload",
            ["source", "destination", "decision"],
            registry=registry,
        )
        self.denials = Counter(
            "meshward_flow_denials",
            "Denied requests and connections by deciding policy",
            ["policy"],
            registry=registry,
        )
        self.rules = Counter(
            "meshward_flow_rule_decisions",
            "Requests and connections by deciding policy rule (none: no rule decided)",
            ["policy", "rule", "decision"],
            registry=registry,
        )
        self.latency = Histogram(
            "meshward_flow_enforcement_seconds",
            "Request duration at the callee's sidecar (enforcement included)",
            ["decision"],
            buckets=BUCKETS,
            registry=registry,
        )
        self._pairs: set[tuple[str, str]] = set()
        self._policies: set[str] = set()
        self._rules: set[tuple[str, str]] = set()

    def observe(self, records: Iterable[FlowRecord]) -> None:
        for r in records:
            pair = (r.source, r.destination)
            if pair not in self._pairs:
                if len(self._pairs) >= MAX_PAIRS:
                    pair = (OTHER, OTHER)
                else:
                    self._pairs.add(pair)
            self.flows.labels(pair[0], pair[1], r.decision).inc()
            if r.decision == DENY:
                policy = r.policy.split("#", 1)[0] or "none"
                if policy not in self._policies:
                    if len(self._policies) >= MAX_POLICIES:
                        policy = OTHER
                    else:
                        self._policies.add(policy)
                self.denials.labels(policy).inc()
            name, _, index = r.policy.partition("#")
            rule = (name or "none", index if name else "none")
            if rule not in self._rules:
                if len(self._rules) >= MAX_RULES:
                    rule = (OTHER, OTHER)
                else:
                    self._rules.add(rule)
            self.rules.labels(rule[0], rule[1], r.decision).inc()
            if r.kind == "http" and r.direction == "inbound":
                self.latency.labels(r.decision).observe(r.duration_ms / 1000)

    def add_collector(
        self, registry: CollectorRegistry, status: Callable[[], Mapping[str, Any]]
    ) -> None:
        registry.register(_CollectorState(status))


class _CollectorState(Collector):
    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self.status = status

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        refused = CounterMetricFamily(
            "meshward_flow_collector_refused", "Flow log streams refused", labels=["reason"]
        )
        for reason, count in sorted(status.get("refused", {}).items()):
            refused.add_metric([reason], count)
        dropped = CounterMetricFamily(
            "meshward_flow_collector_dropped", "Flow log entries dropped", labels=["reason"]
        )
        for reason, count in sorted(status.get("dropped", {}).items()):
            dropped.add_metric([reason], count)
        store = status.get("store", {})
        for key in ("dropped_pending", "folded_paths", "dropped_denials", "flush_errors"):
            dropped.add_metric([f"store_{key}"], store.get(key, 0))
        yield refused
        yield dropped
