"""Real lines from a `meshward demo --state` run (sidecar access logs and the ext_authz decision
log), trimmed of fields the readers ignore. Shared by the evidence and denials tests."""

from __future__ import annotations

import json
from typing import Any

T_RBAC_NONE = "a3d8579cdda6a47e8655d31c1d4ab174"
T_RBAC_DENY = "1be04b3f3e24e31acc7b0340c0c19a83"
T_EXT_DENY = "44f0a1819f7c9a51247df3c200a09348"
T_EXT_ALLOW = "93a0a5960606b26d97aa0ca951114bd6"
T_SHADOW_ALLOW = "e71f968b1afb38d6fc709f65c455b86f"


def line(**fields: Any) -> str:
    return json.dumps(fields, separators=(",", ":"))


ORDERS_ALLOW = line(
    direction="inbound", workload="shop/orders", method="GET", path="/orders/42",
    peer_principal="spiffe://cluster.local/ns/shop/sa/frontend", response_code=200,
    response_code_details="via_upstream", ext_authz=None, trace_id="4eb2d705caad2ea7404d68d34bc28df6",
    request_id="fb549e88-63cb-9a92-beff-844b3396c1b4", time="2026-11-21T03:08:16.135Z",
    rbac={"enforced_effective_policy_id": "ns[shop]-policy[orders-allow-frontend]-rule[0]",
          "enforced_engine_result": "allowed"},
)  # fmt: skip
ORDERS_DENY_NONE = line(
    direction="inbound", workload="shop/orders", method="DELETE", path="/orders/42",
    peer_principal="spiffe://cluster.local/ns/shop/sa/frontend", response_code=403,
    response_code_details="rbac_access_denied_matched_policy[none]", ext_authz=None,
    rbac={"enforced_engine_result": "denied"}, trace_id=T_RBAC_NONE,
    request_id="4e338cdf-08a3-9ed1-83cf-a331f64ce696", time="2026-11-21T03:08:16.184Z",
)  # fmt: skip
ORDERS_OUTBOUND = line(
    direction="outbound", workload="shop/orders", method="POST", path="/payments",
    peer_principal=None, response_code=403, response_code_details="via_upstream", rbac=None,
    ext_authz=None, trace_id=T_EXT_DENY, upstream_cluster="outbound|8080||payments.shop",
    request_id="048f9999-2b1b-9a7e-afec-4150cee03384", time="2026-11-21T03:08:16.205Z",
)  # fmt: skip
PAYMENTS_EXT_ALLOW = line(
    direction="inbound", workload="shop/payments", method="POST", path="/payments",
    peer_principal="spiffe://cluster.local/ns/shop/sa/orders", response_code=200,
    response_code_details="via_upstream", trace_id=T_EXT_ALLOW,
    request_id="fddf70e5-6488-9971-b980-9b1cdd5c2880", time="2026-11-21T03:08:16.193Z",
    ext_authz={"cache": "miss", "decision": "allow", "policy": "shop/payments-allow-orders-with-user",
               "rule": 0, "user": "https://auth.shop.example/alice"},
    rbac={"enforced_engine_result": "allowed", "meshward_dry_run_deny_shadow_engine_result": "allowed",
          "meshward_native_allow_shadow_engine_result": "denied"},
)  # fmt: skip
PAYMENTS_EXT_DENY = line(
    direction="inbound", workload="shop/payments", method="POST", path="/payments",
    peer_principal="spiffe://cluster.local/ns/shop/sa/orders", response_code=403,
    response_code_details="ext_authz_denied", response_flags="UAEX", trace_id=T_EXT_DENY,
    request_id="048f9999-2b1b-9a7e-afec-4150cee03384", time="2026-11-21T03:08:16.206Z",
    ext_authz={"decision": "deny", "status": 403, "workload": "shop/payments",
               "policy": "shop/payments-allow-orders-with-user,shop/shop-allow-scraper-metrics",
               "reason": "no ALLOW policy matched (ALLOW policies selecting shop/payments: ...)"},
    rbac={"enforced_engine_result": "allowed", "meshward_native_allow_shadow_engine_result": "denied"},
)  # fmt: skip
PAYMENTS_RBAC_DENY = line(
    direction="inbound", workload="shop/payments", method="GET", path="/admin",
    peer_principal="spiffe://cluster.local/ns/shop/sa/metrics-scraper", response_code=403,
    response_code_details="rbac_access_denied_matched_policy[ns[shop]-policy[payments-deny-admin]-rule[0]]",
    ext_authz=None, trace_id=T_RBAC_DENY, request_id="5eb05b63-527f-90f0-967d-cd909fc42801",
    time="2026-11-21T03:08:16.225Z",
    rbac={"enforced_effective_policy_id": "ns[shop]-policy[payments-deny-admin]-rule[0]",
          "enforced_engine_result": "denied",
          "meshward_dry_run_deny_shadow_effective_policy_id": "ns[shop]-policy[payments-deny-scraper]-rule[0]",
          "meshward_dry_run_deny_shadow_engine_result": "denied"},
)  # fmt: skip
PAYMENTS_SHADOW_ALLOW = line(
    direction="inbound", workload="shop/payments", method="GET", path="/metrics",
    peer_principal="spiffe://cluster.local/ns/shop/sa/metrics-scraper", response_code=200,
    response_code_details="via_upstream", ext_authz=None, trace_id=T_SHADOW_ALLOW,
    request_id="ff539fd8-fb84-9840-9d9d-923e555ee229", time="2026-11-21T03:08:16.288Z",
    rbac={"enforced_engine_result": "allowed",
          "meshward_dry_run_deny_shadow_effective_policy_id": "ns[shop]-policy[payments-deny-scraper]-rule[0]",
          "meshward_dry_run_deny_shadow_engine_result": "denied",
          "meshward_native_allow_shadow_effective_policy_id": "ns[shop]-policy[shop-allow-scraper-metrics]-rule[0]",
          "meshward_native_allow_shadow_engine_result": "allowed"},
)  # fmt: skip

DECISION_ALLOW = line(
    ts="2026-11-21T03:08:16.201Z", level="info", logger="meshward.extauthz.decision", msg="allowed",
    event="decision", decision="allow", status=200, workload="shop/payments",
    policy="shop/payments-allow-orders-with-user", rule=0,
    reason="allowed by ALLOW policy shop/payments-allow-orders-with-user rule 0",
    source_principal="spiffe://cluster.local/ns/shop/sa/orders", user="https://auth.shop.example/alice",
    method="POST", path="/payments", trace_id=T_EXT_ALLOW, source="extauthz",
)  # fmt: skip
DECISION_DENY = line(
    ts="2026-11-21T03:08:16.207Z", level="warning", logger="meshward.extauthz.decision",
    msg="denied: no ALLOW policy matched", event="decision", decision="deny", status=403,
    workload="shop/payments", policy="shop/payments-allow-orders-with-user,shop/shop-allow-scraper-metrics",
    rule=None, reason="no ALLOW policy matched (ALLOW policies selecting shop/payments: a, b)",
    source_principal="spiffe://cluster.local/ns/shop/sa/orders", user=None, method="POST",
    path="/payments", trace_id=T_EXT_DENY, source="extauthz",
)  # fmt: skip
DECISION_DENY_ONLY = line(  # a denial whose access-log line is not available (no trace in logs)
    ts="2026-11-21T03:09:00.000Z", event="decision", decision="deny", status=401,
    workload="shop/payments", policy=None, rule=None, reason="token expired",
    source_principal="spiffe://cluster.local/ns/shop/sa/orders", user=None, method="POST",
    path="/payments", trace_id="ffff0000ffff0000ffff0000ffff0000", source="extauthz",
)  # fmt: skip
DECISION_DRY_RUN = line(
    ts="2026-11-21T03:08:16.300Z", event="dry-run", decision="allow", status=200,
    workload="shop/payments", policy="shop/payments-allow-orders-with-user", rule=0, reason="",
    source_principal="spiffe://cluster.local/ns/shop/sa/orders", user="https://auth.shop.example/alice",
    method="POST", path="/payments", trace_id=T_EXT_ALLOW, source="extauthz",
    dry_run_policy="shop/payments-jwt-tightening", dry_run_action="DENY", dry_run_rule=0,
    would_deny=True,
)  # fmt: skip

ENVOY_NOISE = "[2026-11-21 03:08:16.000][12][warning][config] something Envoy said"

ORDERS_LOG = "\n".join([ORDERS_ALLOW, ENVOY_NOISE, ORDERS_DENY_NONE, ORDERS_OUTBOUND, "{torn"])
PAYMENTS_LOG = "\n".join(
    [PAYMENTS_EXT_ALLOW, PAYMENTS_EXT_DENY, PAYMENTS_RBAC_DENY, PAYMENTS_SHADOW_ALLOW]
)
DECISION_LOG = "\n".join([DECISION_ALLOW, DECISION_DENY, DECISION_DENY_ONLY, DECISION_DRY_RUN])
