from __future__ import annotations

import json
from datetime import UTC, datetime
from types import ModuleType

import pytest

from meshward.flows import evidence


def verdict(text: str) -> evidence.Verdict:
    result = evidence.verdict_from_access_log(json.loads(text))
    assert result is not None
    return result


@pytest.mark.parametrize(
    ("policy_id", "expected"),
    [
        ("ns[shop]-policy[orders-allow-frontend]-rule[0]", ("shop/orders-allow-frontend", 0)),
        ("ns[a]-policy[web-2]-rule[10]", ("a/web-2", 10)),
        ("none", (None, None)),
        ("", (None, None)),
        ("meshward-something-else", ("meshward-something-else", None)),
    ],
)
def test_parse_policy_id(policy_id: str, expected: tuple[str | None, int | None]) -> None:
    assert evidence.parse_policy_id(policy_id) == expected


def test_rbac_default_deny(S: ModuleType) -> None:
    v = verdict(S.ORDERS_DENY_NONE)
    assert (v.allowed, v.status, v.decider, v.policy, v.rule) == (
        False, 403, evidence.RBAC, None, None,
    )  # fmt: skip
    assert "no ALLOW rule matched" in v.reason
    assert v.trace_id == S.T_RBAC_NONE and v.workload == "shop/orders"
    assert v.source == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert v.time == datetime(2026, 11, 21, 3, 8, 16, 184000, tzinfo=UTC)


def test_rbac_deny_rule_and_dry_run(S: ModuleType) -> None:
    v = verdict(S.PAYMENTS_RBAC_DENY)
    assert (v.decider, v.policy, v.rule) == (evidence.RBAC, "shop/payments-deny-admin", 0)
    assert v.rule_ref == "shop/payments-deny-admin#0"
    assert v.would_deny == ("shop/payments-deny-scraper",)


def test_rbac_allow_enforced(S: ModuleType) -> None:
    v = verdict(S.ORDERS_ALLOW)
    assert v.allowed and (v.decider, v.policy, v.rule) == (
        evidence.RBAC, "shop/orders-allow-frontend", 0,
    )  # fmt: skip
    assert v.would_deny == ()


def test_allow_by_native_shadow_rule_when_extauthz_gates(S: ModuleType) -> None:
    """payments: native ALLOW rules run as shadow and gate ext_authz; the shadow id names them."""
    v = verdict(S.PAYMENTS_SHADOW_ALLOW)
    assert v.allowed and (v.decider, v.policy, v.rule) == (
        evidence.RBAC, "shop/shop-allow-scraper-metrics", 0,
    )  # fmt: skip
    assert v.would_deny == ("shop/payments-deny-scraper",)


def test_extauthz_allow_and_deny(S: ModuleType) -> None:
    allow = verdict(S.PAYMENTS_EXT_ALLOW)
    assert allow.allowed and allow.decider == evidence.EXTAUTHZ
    assert (allow.policy, allow.rule) == ("shop/payments-allow-orders-with-user", 0)
    assert "alice" in allow.reason
    deny = verdict(S.PAYMENTS_EXT_DENY)
    assert not deny.allowed and deny.decider == evidence.EXTAUTHZ
    # the service lists the ALLOW policies it tried when none matched: that is "no rule"
    assert (deny.policy, deny.rule) == (None, None)
    assert deny.reason.startswith("no ALLOW policy matched")


def test_extauthz_error_is_fail_closed(S: ModuleType) -> None:
    v = verdict(
        S.line(direction="inbound", workload="shop/payments", response_code=403,
               response_code_details="ext_authz_error", response_flags="UAEX")
    )  # fmt: skip
    assert not v.allowed and v.decider == evidence.EXTAUTHZ and "fail closed" in v.reason


def test_outbound_lines_are_not_decisions(S: ModuleType) -> None:
    v = verdict(S.ORDERS_OUTBOUND)
    assert v.direction == "outbound" and v.decider == evidence.UPSTREAM and v.policy is None


def test_indexed_allow_reports_the_real_rule(S: ModuleType) -> None:
    v = verdict(
        S.line(direction="inbound", workload="a/b", response_code=200,
               response_code_details="via_upstream",
               rbac={"enforced_effective_policy_id": "meshward-indexed-allow",
                     "enforced_engine_result": "allowed",
                     "meshward_indexed_allow_shadow_effective_policy_id": "ns[a]-policy[p]-rule[3]"})
    )  # fmt: skip
    assert (v.policy, v.rule) == ("a/p", 3)


def test_no_policy_at_all(S: ModuleType) -> None:
    v = verdict(
        S.line(direction="inbound", workload="a/b", response_code=200,
               response_code_details="via_upstream", rbac=None, ext_authz=None)
    )  # fmt: skip
    assert v.allowed and v.decider == evidence.NO_POLICY


def test_verdicts_skip_noise_and_torn_lines(S: ModuleType) -> None:
    lines = evidence.verdicts(S.ORDERS_LOG)
    assert [v.direction for v in lines] == ["inbound", "inbound", "outbound"]
    assert evidence.verdict_from_access_log({"no": "response code"}) is None


def test_decision_log(S: ModuleType) -> None:
    records = evidence.decisions(S.DECISION_LOG + "\n" + S.line(source="other", event="x"))
    assert [r.event for r in records] == ["decision", "decision", "decision", "dry-run"]
    allow, deny, deny_only, dry = records
    assert not allow.denied and deny.denied and deny_only.denied and not dry.denied
    assert (allow.policy, allow.rule) == ("shop/payments-allow-orders-with-user", 0)
    assert (deny.policy, deny.rule) == (None, None)  # no rule matched
    assert dry.would_deny and dry.dry_run_policy == "shop/payments-jwt-tightening"


def test_with_decision_log_adds_extauthz_dry_runs_by_trace(S: ModuleType) -> None:
    records = evidence.decisions(S.DECISION_LOG)
    v = evidence.with_decision_log(verdict(S.PAYMENTS_EXT_ALLOW), records)
    assert v.would_deny == ("shop/payments-jwt-tightening",)
    other = evidence.with_decision_log(verdict(S.ORDERS_ALLOW), records)
    assert other.would_deny == ()


def test_parse_time(S: ModuleType) -> None:
    assert evidence.parse_time("2026-01-02T03:04:05.678Z") == datetime(
        2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC
    )
    assert evidence.parse_time("not a time") is None and evidence.parse_time(None) is None
