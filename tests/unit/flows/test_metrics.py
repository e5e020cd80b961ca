"""Flow metrics: label sets stay bounded under a flood of distinct callers and policies."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, generate_latest

from meshward.flows import metrics
from meshward.flows.records import DENY, FlowRecord

RECORD = FlowRecord(
    time=datetime(2026, 12, 1, tzinfo=UTC), source="shop/frontend", source_principal="",
    destination="shop/orders", port=8080, method="GET", path="/", status=403, decision=DENY,
    reason="", policy="shop/p#0", dry_run="", duration_ms=2, trace_id="", reporter="shop/orders",
    direction="inbound", kind="http",
)  # fmt: skip


def test_a_flood_of_distinct_pairs_and_policies_keeps_series_bounded() -> None:
    registry = CollectorRegistry()
    m = metrics.FlowMetrics(registry)
    m.observe(
        replace(RECORD, source=f"ns{i}/w", policy=f"ns/p{i}#0")
        for i in range(metrics.MAX_PAIRS + 500)
    )
    text = generate_latest(registry).decode()
    flows = [line for line in text.splitlines() if line.startswith("meshward_flows_total{")]
    denials = [
        line for line in text.splitlines() if line.startswith("meshward_flow_denials_total{")
    ]
    assert len(flows) == metrics.MAX_PAIRS + 1  # and one other -> other
    assert 'source="other"' in text
    assert len(denials) == metrics.MAX_POLICIES + 1
    assert 'meshward_flow_denials_total{policy="other"} 1000.0' in text
    rules = [x for x in text.splitlines() if x.startswith("meshward_flow_rule_decisions_total{")]
    assert len(rules) == metrics.MAX_RULES + 1
    assert (
        'meshward_flow_rule_decisions_total{decision="deny",policy="other",rule="other"} 500.0'
        in text
    )
