"""explain: the decision equals evaluate's, and each policy's trace says why it did not match."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshward.policy import Request, evaluate, load, parse
from meshward.policy.cases import build_request
from meshward.policy.explain import explain

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
NOW = datetime(2026, 6, 1, tzinfo=UTC)


def test_traces_name_the_failing_field() -> None:
    ps = load([EXAMPLES])
    w, req = build_request(
        ps, destination="shop/orders", source="shop/scraper", method="POST", path="/orders"
    )
    result = explain(ps, w, req, now=NOW)
    assert result.decision == evaluate(ps, w, req, now=NOW)
    traces = {t.policy: t for t in result.policies}
    assert set(traces) == {"shop/orders-allow-frontend", "shop/shop-allow-scraper-metrics"}
    (rule,) = traces["shop/orders-allow-frontend"].rules
    assert not rule.matched
    assert rule.reason == (
        "from[0].source.principals: peer principal 'cluster.local/ns/shop/sa/metrics-scraper' "
        "does not match ['cluster.local/ns/shop/sa/frontend']"
    )
    (rule,) = traces["shop/shop-allow-scraper-metrics"].rules
    assert rule.reason == "to[0].operation.methods: method 'POST' does not match ['GET']"
    text = result.render()
    assert text.startswith("DENY: no ALLOW policy matched")
    assert "policy shop/orders-allow-frontend [ALLOW] (" in text and "orders.yaml#1)" in text


def test_expired_policies_are_shown_as_expired() -> None:
    ps = load([EXAMPLES])
    w, req = build_request(
        ps, destination="shop/inventory", source="shop/frontend", path="/inventory/x"
    )
    later = datetime(2100, 1, 1, tzinfo=UTC)
    result = explain(ps, w, req, now=later)
    (emergency,) = [
        t for t in result.policies if t.policy == "shop/inventory-emergency-allow-frontend"
    ]
    assert emergency.expired and "expired at 2099-12-31T23:59:59Z" in emergency.note
    assert not result.decision.allowed
    assert "EXPIRED" in result.render()
    live = explain(ps, w, req, now=NOW)
    assert live.decision.policy == "shop/inventory-emergency-allow-frontend"
    assert "applies until 2099-12-31T23:59:59Z" in live.to_json()["policies"][1]["note"]


def test_no_from_entry_matched_lists_each_alternative() -> None:
    ps = parse(
        {
            "a.yaml": "apiVersion: meshward.dev/v1\nkind: Workload\nmetadata: {name: a, namespace: x}\n"
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: p, namespace: x}\nspec:\n  rules:\n  - from:\n"
            "    - source: {namespaces: [a]}\n    - source: {ipBlocks: [10.0.0.0/8]}\n"
            "    when: [{key: 'request.headers[x-a]', values: [b]}]\n"
        }
    )
    w = ps.workload("x/a")
    assert w is not None
    (trace,) = explain(ps, w, Request(source_ip="192.168.0.1"), now=NOW).policies
    assert trace.rules[0].reason.startswith("no `from` entry matched: from[0].source.namespaces")
    assert "from[1].source.ipBlocks: source ip '192.168.0.1'" in trace.rules[0].reason
    (trace,) = explain(ps, w, Request(source_ip="10.0.0.1"), now=NOW).policies
    assert trace.rules[0].reason == "when[0].values: request.headers[x-a] none does not match ['b']"


def test_rejected_path_has_no_traces() -> None:
    ps = load([EXAMPLES])
    w, req = build_request(ps, destination="shop/orders", source="shop/frontend", path="/a%2fb")
    result = explain(ps, w, req, now=NOW)
    assert result.policies == () and result.normalized_path is None
    assert result.to_json()["decision"] == "deny"


def test_a_request_rejected_before_authorization_says_so_and_why() -> None:
    """Not "no authorization policy selects ...": shop/orders has policies, none was evaluated."""
    ps = load([EXAMPLES])
    for path, host, why in (
        ("/a%2fb", None, "escaped slash"),
        ("/x/%2e%2e;/admin", None, "'..' segment with ';' parameters"),
        ("/", "a.shop,admin.internal", "joins several Host headers"),
    ):
        w, req = build_request(
            ps, destination="shop/orders", source="shop/frontend", path=path, host=host
        )
        result = explain(ps, w, req, now=NOW)
        text = result.render()
        assert "no authorization policy selects" not in text, text
        assert "rejected before authorization: the sidecar answers HTTP 400" in text, text
        assert why in text, text
        assert result.rejected is not None and why in result.rejected
        assert result.to_json()["rejected_before_authorization"] == result.rejected
    w, req = build_request(ps, destination="shop/orders", source="shop/frontend", path="/x")
    allowed_or_denied = explain(ps, w, req, now=NOW)
    assert allowed_or_denied.rejected is None
    assert "rejected before authorization" not in allowed_or_denied.render()


def test_token_invalid_is_a_401_only_where_a_request_authentication_applies() -> None:
    """Issue 16: explain can say "invalid token", so the 401 case compares with Envoy."""
    ps = load([EXAMPLES])
    payments, request = build_request(
        ps, destination="shop/payments", source="shop/orders", method="POST", path="/payments"
    )
    result = explain(ps, payments, request, token_invalid=True, now=NOW)
    assert result.status == 401 and not result.decision.allowed
    assert result.to_json()["status"] == 401
    assert "shop/payments-end-user-jwt" in (result.token_rejected or "")
    assert "HTTP 401" in result.render()
    # a rejected path is still a 400 first (the sidecar answers before jwt_authn runs)
    _, bad = build_request(
        ps, destination="shop/payments", source="shop/orders", method="POST", path="/a/%2F/b"
    )
    assert explain(ps, payments, bad, token_invalid=True, now=NOW).status in (400, 401)
    # no RequestAuthentication on orders: nobody checks the token, the policy decides
    orders, plain = build_request(
        ps, destination="shop/orders", source="shop/frontend", method="POST", path="/orders"
    )
    result = explain(ps, orders, plain, token_invalid=True, now=NOW)
    assert result.status == 200 and result.token_rejected is None


def test_explain_cli_token_invalid_and_claims_exclude_each_other(capsys: Any) -> None:
    import json

    import pytest

    from meshward.cli import main

    argv = ["policy", "explain", str(EXAMPLES), "--workload", "shop/payments",
            "--source-workload", "shop/orders", "--method", "POST", "--path", "/payments"]  # fmt: skip
    assert main([*argv, "--token-invalid", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == 401
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--token-invalid", "--claims", "{}"])
    assert exit_info.value.code == 2
