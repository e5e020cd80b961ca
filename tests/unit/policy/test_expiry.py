"""Expiry narrows, never widens: an expired emergency ALLOW still counts as an ALLOW selecting
its workload (the default deny stays) but matches nothing - in the evaluator, explain, the
compiled RBAC (checked with the Envoy model; the real-Envoy test is in tests/integration) and
the callers' outbound config."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from meshward.compile import CompileOptions, Mode, compile_workload
from meshward.compile.workload import to_dict
from meshward.policy import Request, evaluate, parse
from meshward.policy.explain import explain
from meshward.policy.lint import lint
from meshward.testing import simulate

EXPIRES = datetime(2030, 1, 1, 12, tzinfo=UTC)
BEFORE = EXPIRES - timedelta(seconds=1)
AT = EXPIRES

DOCS = """
apiVersion: meshward.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: cluster.local, rootNamespace: meshward-system}
""" + "".join(
    f"""---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}
spec: {{ports: [{{port: 8080}}]}}
"""
    for name in ("frontend", "inventory", "orders")
)
EMERGENCY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: inventory-emergency
  namespace: shop
  annotations: {meshward.dev/expires-at: "2030-01-01T12:00:00Z"}
spec:
  selector: {matchLabels: {app: inventory}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
    to: [{operation: {methods: [GET]}}]
"""
ORDERS_ONLY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: inventory-orders, namespace: shop}
spec:
  selector: {matchLabels: {app: inventory}}
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/orders"]}}]}]
"""
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"


def sole() -> Any:
    return parse({"mesh.yaml": DOCS, "emergency.yaml": EMERGENCY})


def request(principal: str | None) -> Request:
    return Request(
        method="GET", path="/inventory/1", destination_port=8080, source_principal=principal
    )


def test_the_sole_allow_expiring_keeps_the_default_deny() -> None:
    ps = sole()
    inventory = ps.workload("shop/inventory")
    assert inventory is not None
    assert evaluate(ps, inventory, request(FRONTEND), now=BEFORE).allowed
    assert not evaluate(ps, inventory, request(ORDERS), now=BEFORE).allowed
    for who in (FRONTEND, ORDERS, None):  # plaintext callers included
        decision = evaluate(ps, inventory, request(who), now=AT)
        assert not decision.allowed, who
        assert "shop/inventory-emergency (expired)" in decision.reason
    # policies_for: the expired ALLOW stays, matching nothing.
    (kept,) = ps.policies_for(inventory, AT)
    assert kept.name == "inventory-emergency" and kept.rules == ()


def test_explain_says_the_default_deny_stays() -> None:
    ps = sole()
    inventory = ps.workload("shop/inventory")
    assert inventory is not None
    result = explain(ps, inventory, request(FRONTEND), now=AT)
    assert not result.decision.allowed
    (trace,) = result.policies
    assert trace.expired and "still counts as an ALLOW" in trace.note


def test_an_expired_deny_still_stops_applying() -> None:
    deny = EMERGENCY.replace("action: ALLOW", "action: DENY").replace("inventory-emergency", "lock")
    ps = parse({"mesh.yaml": DOCS, "deny.yaml": deny})
    inventory = ps.workload("shop/inventory")
    assert inventory is not None
    assert not evaluate(ps, inventory, request(FRONTEND), now=BEFORE).allowed
    assert evaluate(ps, inventory, request(FRONTEND), now=AT).allowed
    assert ps.policies_for(inventory, AT) == ()


def _inbound(ps: Any, ref: str, now: datetime) -> dict[str, Any]:
    resources = compile_workload(ps, ref, CompileOptions(mode=Mode.STATIC), now=now)
    name = f"inbound|8080|{ref.split('/')[1]}.shop"
    return next(to_dict(m) for m in resources.listeners if m.name == name)


def _compiled_status(ps: Any, now: datetime, peer: str | None) -> int:
    conn = simulate.Connection(
        method="GET", path="/inventory/1", host="inventory", headers={}, port=8080, peer_uri=peer
    )
    return simulate.run(_inbound(ps, "shop/inventory", now), conn).status


def test_compiled_rbac_agrees() -> None:
    ps = sole()
    assert _compiled_status(ps, BEFORE, FRONTEND) == 200
    assert _compiled_status(ps, BEFORE, ORDERS) == 403
    for peer in (FRONTEND, ORDERS, None):
        assert _compiled_status(ps, AT, peer) == 403, peer


def _outbound_names(ps: Any, ref: str, now: datetime) -> set[str]:
    resources = compile_workload(ps, ref, CompileOptions(), now=now)
    return {m.name for m in resources.listeners if m.name.startswith("outbound")}


def test_callers_lose_the_outbound_path_the_expired_allow_gave_them() -> None:
    ps = parse({"mesh.yaml": DOCS, "emergency.yaml": EMERGENCY, "orders.yaml": ORDERS_ONLY})
    to_inventory = "outbound|8080||inventory.shop"
    assert to_inventory in _outbound_names(ps, "shop/frontend", BEFORE)
    assert to_inventory not in _outbound_names(ps, "shop/frontend", AT)
    assert to_inventory in _outbound_names(ps, "shop/orders", AT)  # its own ALLOW stays
    # The sole-ALLOW case: nobody can call inventory after expiry, nobody keeps a path.
    alone = sole()
    assert to_inventory in _outbound_names(alone, "shop/frontend", BEFORE)
    assert to_inventory not in _outbound_names(alone, "shop/frontend", AT)
    assert to_inventory not in _outbound_names(alone, "shop/orders", AT)


def test_lint_warns_about_an_emergency_allow_that_is_the_only_allow() -> None:
    warnings = [str(w) for w in lint(sole(), now=BEFORE)]
    assert any(
        "emergency.yaml#1" in w and "only ALLOW" in w and "shop/inventory" in w for w in warnings
    ), warnings
    both = parse({"mesh.yaml": DOCS, "emergency.yaml": EMERGENCY, "orders.yaml": ORDERS_ONLY})
    assert not any("only ALLOW" in str(w) for w in lint(both, now=BEFORE))
