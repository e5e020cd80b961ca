"""The `meshward policy test` case format and request building."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshward.errors import UserError
from meshward.policy import PolicyError, load
from meshward.policy.cases import build_request, parse_cases, run_case

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
HEAD = "apiVersion: meshward.dev/v1\nkind: PolicyTests\n"


def test_case_fields_and_defaults() -> None:
    (case,) = parse_cases(
        "c.yaml",
        HEAD + "now: 2030-01-01T00:00:00Z\ncases:\n"
        "  - {to: shop/orders, principal: cluster.local/ns/shop/sa/frontend, expect: allow,"
        " headers: {X-A: 1}, audit: false, dryRunDenies: [b, a], policy: none}\n",
    )
    assert case.name == "cases[0]" and case.method == "GET" and case.path == "/"
    assert case.now == datetime(2030, 1, 1, tzinfo=UTC)
    assert case.headers == {"X-A": "1"} and case.dry_run_denies == ("a", "b")
    assert case.expect_policy and case.policy is None
    assert case.where == "c.yaml#1 cases[0]"
    ps = load([EXAMPLES])
    workload, request = case.build(ps)
    assert workload.ref == "shop/orders"
    assert request.source_principal == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert request.destination_port == 8080 and request.host == "orders"
    assert request.headers == {"x-a": "1"}
    result = run_case(ps, case, now=datetime.now(UTC))
    assert not result.passed  # GET / is not an orders path
    assert "decision: - expected 'allow'" in result.render()


def test_from_resolves_a_workload_identity_and_address() -> None:
    ps = load([EXAMPLES])
    _, request = build_request(ps, destination="shop/payments", source="shop/orders")
    assert request.source_principal == "spiffe://cluster.local/ns/shop/sa/orders"
    assert request.source_ip == "127.0.0.1"
    with pytest.raises(UserError, match="unknown source workload"):
        build_request(ps, destination="shop/payments", source="shop/ghost")


def test_case_file_problems_are_listed_together() -> None:
    with pytest.raises(PolicyError) as info:
        parse_cases(
            "c.yaml",
            HEAD + "cases:\n  - {expect: allow, from: a/b, principal: x, port: http}\n"
            "---\nkind: Other\n",
        )
    text = "\n".join(str(p) for p in info.value.problems)
    assert "c.yaml#1 cases[0].to: required" in text
    assert "c.yaml#1 cases[0]: set either from (a workload) or principal, not both" in text
    assert "c.yaml#1 cases[0].port: expected a port number" in text
    assert "c.yaml#2 kind: expected a PolicyTests document" in text
