"""Lint warns about policy that loads but probably does not do what was meant."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from meshward.policy import PolicyError, parse
from meshward.policy.lint import lint

WORKLOADS = """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {ports: [{port: 8080}]}
---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {ports: [{port: 5432, protocol: TCP}]}
"""


def ap(name: str, spec: str, meta: str = "") -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata:\n  name: {name}\n  namespace: shop\n{meta}spec:\n{spec}"
    )


def warnings(*docs: str) -> list[str]:
    ps = parse({"w.yaml": WORKLOADS, "p.yaml": "\n---\n".join(docs)})
    return [str(w) for w in lint(ps, now=datetime(2026, 1, 1, tzinfo=UTC))]


def test_clean_policy_has_no_warnings() -> None:
    assert (
        warnings(
            ap(
                "ok",
                "  selector: {matchLabels: {app: api}}\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/shop/sa/db]}}]\n"
                "    to: [{operation: {methods: [GET], paths: ['/api/*']}}]\n",
            )
        )
        == []
    )


def test_selects_no_workload() -> None:
    (w,) = warnings(
        ap(
            "ghost",
            "  selector: {matchLabels: {app: ghost}}\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n",
        )
    )
    assert w.startswith("p.yaml#1 spec.selector: selects no declared workload")


def test_allow_everything_from_anywhere() -> None:
    (w,) = warnings(ap("open", "  selector: {matchLabels: {app: api}}\n  rules: [{}]\n"))
    assert (
        w
        == "p.yaml#1 spec.rules[0]: allows every request from anywhere, including unauthenticated callers"
    )


def test_expired_emergency_rule() -> None:
    meta = "  annotations: {meshward.dev/expires-at: '2025-01-01T00:00:00Z'}\n"
    found = warnings(
        ap(
            "old",
            "  selector: {matchLabels: {app: api}}\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n",
            meta,
        )
    )
    (w,) = [w for w in found if "expired at" in w]
    assert "emergency rule expired at 2025-01-01T00:00:00Z" in w
    # It is api's only ALLOW: deleting it would open api to everyone, and lint says so.
    assert "opens the workload" in w
    assert any("only ALLOW policy selecting shop/api" in w for w in found)


def test_rules_that_can_never_match() -> None:
    found = warnings(
        ap(
            "never",
            "  selector: {matchLabels: {app: api}}\n  rules:\n"
            "  - from: [{source: {principals: ['*'], notPrincipals: ['*']}}]\n"
            "  - to: [{operation: {ports: ['9999']}}]\n"
            "  - from: [{source: {requestPrincipals: ['*']}}]\n"
            "  - when: [{key: source.namespace, values: [a], notValues: [a]}]\n"
            "  - to: [{operation: {methods: [get]}}]\n",
        )
    )
    text = "\n".join(found)
    assert "spec.rules[0].from[0].source: principals with notPrincipals '*' never matches" in text
    assert (
        "spec.rules[1].to[0].operation.ports: none of [9999] is a port of the selected workloads"
        in text
    )
    assert (
        "spec.rules[2]: reads end-user JWT attributes but no RequestAuthentication applies" in text
    )
    assert "spec.rules[3].when[0]: 'a' is in both values and notValues: never matches" in text
    assert "spec.rules[4].to[0].operation.methods: 'get' is not a standard HTTP method" in text


def test_values_istio_accepts_but_lint_questions() -> None:
    text = "\n".join(
        warnings(
            ap(
                "odd",
                "  selector: {matchLabels: {app: api}}\n  rules:\n"
                "  - from: [{source: {principals: [principal, other.domain/ns/a/sa/b]}}]\n"
                "    to: [{operation: {methods: ['P*'], hosts: ['*.example.com']}}]\n",
            )
        )
    )
    assert "'principal' is not a SPIFFE identity" in text
    assert "names trust domain 'other.domain', but the mesh's is 'cluster.local'" in text
    assert "wildcard method 'P*'" in text
    assert "wildcard host '*.example.com'" in text


def test_not_hosts_wildcards_name_not_hosts_and_fit_its_meaning() -> None:
    for action, advice in (("DENY", "escapes the DENY"), ("ALLOW", "excludes only the Hosts")):
        found = warnings(
            ap(
                f"nh-{action.lower()}",
                f"  selector: {{matchLabels: {{app: api}}}}\n  action: {action}\n  rules:\n"
                "  - to: [{operation: {notHosts: ['*.example.com'], paths: ['/a/*']}}]\n",
            )
        )
        mine = [w for w in found if "'*.example.com'" in w]
        assert len(mine) == 1, found
        assert "spec.rules[0].to[0].operation.notHosts:" in mine[0], mine
        assert advice in mine[0] and "you may not own" not in mine[0]


def test_deny_on_exact_path_and_http_fields_on_tcp() -> None:
    text = "\n".join(
        warnings(
            ap(
                "deny",
                "  selector: {matchLabels: {app: api}}\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin]}}]\n",
            ),
            ap(
                "tcp",
                "  selector: {matchLabels: {app: db}}\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n",
            ),
        )
    )
    assert "DENY on exact path '/admin' misses '/admin/x'" in text
    assert "uses HTTP attributes but every selected workload port is TCP: it never matches" in text


def test_an_unknown_kind_is_an_error_not_a_warning() -> None:
    """It used to be skipped with a warning: `kind: AuthorisationPolicy` was a DENY policy that
    `meshward xds serve` silently did not enforce."""
    with pytest.raises(PolicyError) as info:
        warnings(
            "apiVersion: security.istio.io/v1\nkind: AuthorisationPolicy\nmetadata: {name: x}\n"
        )
    [problem] = [str(p) for p in info.value.problems]
    assert problem.startswith("p.yaml#1 kind: unknown kind 'AuthorisationPolicy' (did you mean ")
    assert "'AuthorizationPolicy'?)" in problem


def test_a_principal_no_declared_workload_runs_as_is_flagged() -> None:
    found = warnings(
        ap(
            "typo",
            "  selector: {matchLabels: {app: api}}\n  rules:\n"
            "  - from: [{source: {principals: [cluster.local/ns/shop/sa/dbb, cluster.local/ns/shop/sa/db,"
            " cluster.local/ns/shop/sa/*, cluster.local/ns/other/sa/db]}}]\n"
            "  - from: [{source: {notPrincipals: [spiffe://cluster.local/ns/shop/sa/ghost]}}]\n",
        )
    )
    assert found == [
        "p.yaml#1 spec.rules[0].from[0].source.principals: 'cluster.local/ns/other/sa/db': no "
        "declared workload runs as service account 'db' in namespace 'other', so it matches no "
        "mesh workload",
        "p.yaml#1 spec.rules[0].from[0].source.principals: 'cluster.local/ns/shop/sa/dbb': no "
        "declared workload runs as service account 'dbb' in namespace 'shop', so it matches no "
        "mesh workload (did you mean 'cluster.local/ns/shop/sa/db'?)",
        "p.yaml#1 spec.rules[1].from[0].source.notPrincipals: 'cluster.local/ns/shop/sa/ghost': "
        "no declared workload runs as service account 'ghost' in namespace 'shop', so it "
        "excludes no mesh workload",
    ]
    # without declared workloads there is nothing to compare with
    ps = parse(
        {
            "p.yaml": ap(
                "x", "  rules:\n  - from: [{source: {principals: [cluster.local/ns/a/sa/b]}}]\n"
            )
        }
    )
    assert not [
        str(w) for w in lint(ps, now=datetime.now(UTC)) if "no declared workload runs as" in str(w)
    ]
