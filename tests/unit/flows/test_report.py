"""The report's flow-based parts, from records written to a real SQLite flow store: unused
rules, emergency allows, dry-run readiness, compliance, mTLS coverage, the window; and the
``/report`` query parameters (bad ones are a clear 400, never a traceback)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from meshward.flows import report_query
from meshward.flows.query import QueryError
from meshward.flows.records import ALLOW, DENY, PLAINTEXT, FlowRecord
from meshward.flows.report import NO_EVIDENCE, READY, WOULD_DENY, build
from meshward.flows.report_query import flow_totals
from meshward.flows.report_service import build_report
from meshward.flows.store import FlowStore
from meshward.policy import PolicySet, parse

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def workload(name: str) -> str:
    return f"""---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}
spec:
  ports: [{{name: http, port: 8080, protocol: HTTP}}]
"""


def policy(name: str, app: str, action: str, rules: str, annotations: str = "") -> str:
    return f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: shop, annotations: {{{annotations}}}}}
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  action: {action}
  rules: {rules}
"""


FRONTEND = '\n    - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]'
POLICY = (
    "apiVersion: meshward.dev/v1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
    "spec: {trustDomain: cluster.local, rootNamespace: meshward-system}\n"
    "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
    "metadata: {name: strict-payments, namespace: shop}\n"
    "spec: {selector: {matchLabels: {app: payments}}, mtls: {mode: STRICT}}\n"
    + "".join(workload(n) for n in ("frontend", "orders", "payments", "legacy", "quiet"))
    + policy("orders-allow", "orders", "ALLOW", FRONTEND + "\n    - to: [{operation: {paths: ['/never']}}]")
    + policy("orders-deny-admin", "orders", "DENY", "[{to: [{operation: {paths: ['/admin']}}]}]")
    + policy("payments-allow", "payments", "ALLOW", FRONTEND)
    + policy("payments-dry", "payments", "DENY", FRONTEND, '"istio.io/dry-run": "true"')
    + policy("orders-dry", "orders", "DENY", "[{to: [{operation: {paths: ['/x']}}]}]",
             '"istio.io/dry-run": "true"')
    + policy("quiet-dry", "quiet", "DENY", "[{}]", '"istio.io/dry-run": "true"')
    + policy("legacy-old", "legacy", "ALLOW", FRONTEND, '"meshward.dev/expires-at": "2026-11-30T00:00:00Z"')
    + policy("legacy-soon", "legacy", "ALLOW", FRONTEND, '"meshward.dev/expires-at": "2026-12-01T18:00:00Z"')
    + policy("legacy-later", "legacy", "ALLOW", FRONTEND, '"meshward.dev/expires-at": "2027-06-01T00:00:00Z"')
)  # fmt: skip

BASE = FlowRecord(
    time=NOW - timedelta(minutes=5), source="shop/frontend",
    source_principal="spiffe://cluster.local/ns/shop/sa/frontend", destination="shop/orders",
    port=8080, method="GET", path="/orders", status=200, decision=ALLOW, reason="ALLOW rule",
    policy="shop/orders-allow#0", dry_run="", duration_ms=1, trace_id="", reporter="shop/orders",
    direction="inbound", kind="http",
)  # fmt: skip


@pytest.fixture
def policy_set() -> PolicySet:
    return parse({"mesh.yaml": POLICY})


@pytest.fixture
def store(tmp_path: Path) -> FlowStore:
    store = FlowStore.open(str(tmp_path / "flows.db"))
    records = (
        [BASE] * 60
        + [replace(BASE, destination="shop/payments", policy="shop/payments-allow#0",
                   dry_run="shop/payments-dry")] * 7
        + [replace(BASE, source=PLAINTEXT, source_principal="", destination="shop/legacy",
                   policy="")] * 30
        + [replace(BASE, source="shop/orders", destination="shop/frontend", policy="")] * 3
        + [replace(BASE, decision=DENY, status=403, policy="", path="/orders/x")] * 4
        # an old flow, outside a one-hour window
        + [replace(BASE, time=NOW - timedelta(days=2), policy="shop/orders-deny-admin#0",
                   decision=DENY, status=403)] * 2
    )  # fmt: skip
    store.add(records)
    store.flush(now=NOW)
    return store


def test_the_whole_report(policy_set: PolicySet, store: FlowStore) -> None:
    totals, truncated = flow_totals(store, None)
    assert not truncated
    doc = build(policy_set, totals, now=NOW)
    json.dumps(doc)  # all of it is JSON
    # compliance: 67 allowed by a rule, 33 allowed with no ALLOW policy selecting the callee
    c = doc["compliance"]
    assert (c["allowed"], c["explicit"], c["no_policy"]) == (100, 67, 33)
    assert c["rate"] == 0.67
    assert c["no_policy_destinations"] == [
        {"destination": "shop/legacy", "count": 30},
        {"destination": "shop/frontend", "count": 3},
    ]
    # mTLS: 30 plaintext of 106 requests, all let in by legacy's PERMISSIVE port
    m = doc["mtls"]
    assert (m["requests"], m["plaintext"], m["mtls"]) == (106, 30, 76)
    assert m["plaintext_permissive"] == [
        {"destination": "shop/legacy", "port": 8080, "mode": "PERMISSIVE", "count": 30}
    ]
    # dry-run: payments-dry would deny 7; orders-dry saw traffic and would deny none; quiet-dry
    # saw none at all (no evidence is not readiness)
    dry = {d["policy"]: d for d in doc["dry_run"]}
    assert dry["shop/payments-dry"]["would_deny"] == 7
    assert dry["shop/payments-dry"]["state"] == WOULD_DENY
    assert dry["shop/payments-dry"]["would_deny_pairs"] == ["shop/frontend -> shop/payments"]
    assert dry["shop/orders-dry"]["state"] == READY and dry["shop/orders-dry"]["ready"]
    assert dry["shop/orders-dry"]["requests_seen"] == 66
    assert dry["shop/quiet-dry"]["state"] == NO_EVIDENCE and not dry["shop/quiet-dry"]["ready"]
    # unused: orders-allow#1 (never matched); legacy's emergency allows in force never matched;
    # not the expired one (under emergency), not dry-run rules, not matched ones
    unused = {u["rule"] for u in doc["unused_rules"]}
    assert "shop/orders-allow#1" in unused
    assert {"shop/legacy-soon#0", "shop/legacy-later#0"} <= unused
    assert "shop/orders-allow#0" not in unused and "shop/orders-deny-admin#0" not in unused
    assert not unused & {"shop/legacy-old#0", "shop/payments-dry#0", "shop/quiet-dry#0"}
    # emergency allows against `now`
    states = {e["policy"]: e["state"] for e in doc["emergency"]}
    assert states == {"shop/legacy-old": "expired", "shop/legacy-soon": "expiring",
                      "shop/legacy-later": "in force"}  # fmt: skip
    # the graph: observed and policy edges together
    edges = {(e["source"], e["destination"]): e for e in doc["edges"]}
    assert edges[("shop/frontend", "shop/orders")]["allowed"] == 60
    assert edges[("shop/frontend", "shop/orders")]["denied"] == 6
    assert edges[("shop/frontend", "shop/payments")]["would_deny"] == 7
    assert edges[(PLAINTEXT, "shop/legacy")]["policy_allows"] is False
    assert {"id": PLAINTEXT, "workload": False} in doc["nodes"]
    assert doc["blast_radius"]["shop/frontend"]["transitive_count"] >= 3


def test_the_window_leaves_older_flows_out(policy_set: PolicySet, store: FlowStore) -> None:
    since = NOW - timedelta(hours=1)
    totals, _ = flow_totals(store, since.timestamp())
    doc = build(policy_set, totals, now=NOW, since=since)
    assert doc["window"]["since"] == "2026-12-01T11:00:00Z"
    assert "shop/orders-deny-admin#0" in {u["rule"] for u in doc["unused_rules"]}
    assert doc["mtls"]["requests"] == 104


def test_flow_totals_are_bounded(store: FlowStore) -> None:
    totals, truncated = flow_totals(store, None, limit=2)
    assert len(totals) == 2 and truncated
    assert totals[0].count == 60  # the largest first
    assert report_query.MAX_ROWS <= 100_000


def service(policy_set: PolicySet, store: FlowStore) -> SimpleNamespace:
    return SimpleNamespace(store=store, control=SimpleNamespace(policy=policy_set), reach_cache={})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"since": "yesterday"}, "since must be a number"),
        ({"since": "-5"}, "since must be between"),
        ({"since": "nan"}, "since must be between"),
        ({"since": str(NOW.timestamp() + 10)}, "since must be between"),
        ({"soon": "1e12"}, "soon must be between"),
        ({"limit": "5"}, "unknown parameter 'limit'"),
    ],
)
def test_bad_parameters_are_refused(
    policy_set: PolicySet, store: FlowStore, params: dict[str, str], message: str
) -> None:
    with pytest.raises(QueryError, match=message):
        build_report(service(policy_set, store), params, NOW)


def test_reachability_is_cached_per_version_and_expiry(
    policy_set: PolicySet, store: FlowStore
) -> None:
    svc = service(policy_set, store)
    first = build_report(svc, {"since": "0", "soon": "60"}, NOW)
    assert first["emergency"][1]["state"] == "in force"  # 6 h left, "soon" is one minute
    key = next(iter(svc.reach_cache))
    build_report(svc, {}, NOW + timedelta(minutes=1))
    assert list(svc.reach_cache) == [key]  # same policy, nothing expired since: reused
    # legacy-soon expires at 18:00: the reachability is computed again, without it
    later = build_report(svc, {}, NOW + timedelta(hours=7))
    assert len(svc.reach_cache) == 1 and next(iter(svc.reach_cache)) != key
    assert later["reachability_summary"] == first["reachability_summary"]  # legacy-later stays


def test_a_dense_mesh_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every workload may call every other: counts stay exact, lists stop at their bounds."""
    from meshward.flows import report
    from meshward.testing.topology import worst_case

    monkeypatch.setattr(report, "MAX_EDGES_LISTED", 50)
    monkeypatch.setattr(report, "MAX_RADIUS_LISTED", 7)
    doc = build(worst_case(30), [], now=NOW)
    summary = doc["reachability_summary"]
    assert summary["reachable_pairs"] == summary["pairs"] == 30 * 29
    assert summary["listed"] == len(doc["reachability"]) == 50
    assert len(doc["edges"]) == 50 and doc["edges_truncated"] == 30 * 29 - 50
    radius = doc["blast_radius"]["mesh/svc0000"]
    assert radius["transitive_count"] == 29 and len(radius["transitive"]) == 7
    assert radius["transitive_truncated"] == 22
