"""Evaluator semantics, Istio as the reference: every field and its not* twin, each action, the
CUSTOM -> DENY -> ALLOW order, scoping, dry-run, expiry, audit, TCP ports and path attacks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from meshward.policy import (
    Action,
    AuthorizationPolicy,
    Decision,
    PolicySet,
    Request,
    Rule,
    Workload,
    evaluate,
    parse,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
WORKLOADS = """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: httpbin, namespace: foo, labels: {app: httpbin, version: v1}}
spec:
  address: 10.0.0.5
  ports: [{name: http, port: 8000}, {name: db, port: 9000, protocol: TCP}]
---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: other, namespace: foo, labels: {app: other}}
spec: {ports: [{port: 8000}]}
---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: web, namespace: bar, labels: {app: httpbin}}
spec: {ports: [{port: 8000}]}
"""
PEER = "spiffe://cluster.local/ns/client/sa/sleep"


def policy_set(*policies: str) -> PolicySet:
    return parse({"w.yaml": WORKLOADS, "p.yaml": "\n---\n".join(policies)})


def ap(
    spec: str,
    *,
    name: str = "p",
    namespace: str = "foo",
    annotations: dict[str, str] | None = None,
) -> str:
    meta = ""
    if annotations:
        meta = "  annotations:\n" + "".join(f"    {k}: '{v}'\n" for k, v in annotations.items())
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\n{meta}spec:\n{spec}"
    )


def request(**overrides: Any) -> Request:
    base: dict[str, Any] = {
        "method": "GET",
        "path": "/",
        "host": "httpbin.foo",
        "destination_port": 8000,
        "source_principal": PEER,
        "source_ip": "10.1.2.3",
        "destination_ip": "10.0.0.5",
    }
    base.update(overrides)
    return Request(**base)


def decide(
    ps: PolicySet, workload: str = "foo/httpbin", *, now: datetime = NOW, **overrides: Any
) -> Decision:
    w = ps.workload(workload)
    assert w is not None
    return evaluate(ps, w, request(**overrides), now=now)


CLAIMS = {
    "iss": "https://issuer.example",
    "sub": "alice",
    "aud": ["api", "web"],
    "azp": "spa",
    "groups": ["dev", "ops"],
    "scope": "read write",
    "org": {"team": {"name": "payments"}},
    "level": 3,
}

# (field yaml under `source:` / `operation:` / a `when` entry, request that matches, one that
# does not). Each is checked as the single rule of an ALLOW policy.
SOURCE_CASES = [
    ("principals: [cluster.local/ns/client/sa/sleep]", {}, {"source_principal": PEER + "x"}),
    ("principals: [spiffe://cluster.local/ns/client/sa/sleep]", {}, {"source_principal": None}),
    (
        "principals: [cluster.local/ns/client/*]",
        {},
        {"source_principal": "spiffe://cluster.local/ns/x/sa/sleep"},
    ),
    ("principals: ['*/sa/sleep']", {}, {"source_principal": PEER + "y"}),
    ("principals: ['*']", {}, {"source_principal": None}),
    (
        "notPrincipals: [cluster.local/ns/client/sa/other]",
        {},
        {"source_principal": "spiffe://cluster.local/ns/client/sa/other"},
    ),
    ("notPrincipals: ['*']", {"source_principal": None}, {}),
    ("principals: [principal]", {"source_principal": "spiffe://principal"}, {}),
    ("requestPrincipals: [https://issuer.example/alice]", {"claims": CLAIMS}, {"claims": None}),
    ("requestPrincipals: ['*']", {"claims": CLAIMS}, {"claims": None}),
    (
        "requestPrincipals: ['https://issuer.example/*']",
        {"claims": CLAIMS},
        {"claims": {**CLAIMS, "iss": "https://evil"}},
    ),
    ("notRequestPrincipals: ['*/alice']", {"claims": None}, {"claims": CLAIMS}),
    ("namespaces: [client]", {}, {"source_principal": "spiffe://cluster.local/ns/other/sa/sleep"}),
    ("namespaces: ['cli*']", {}, {"source_principal": None}),
    ("namespaces: ['*']", {}, {"source_principal": None}),
    ("notNamespaces: [client]", {"source_principal": "spiffe://cluster.local/ns/x/sa/y"}, {}),
    ("ipBlocks: [10.1.0.0/16]", {}, {"source_ip": "10.2.0.1"}),
    ("ipBlocks: [10.1.2.3]", {}, {"source_ip": None}),
    ("notIpBlocks: [10.1.0.0/16]", {"source_ip": "192.168.0.1"}, {}),
    (
        "remoteIpBlocks: [203.0.113.0/24]",
        {"remote_ip": "203.0.113.9"},
        {"remote_ip": "198.51.100.1"},
    ),
    ("remoteIpBlocks: [10.1.2.3]", {}, {"source_ip": "10.9.9.9"}),  # falls back to source ip
    ("notRemoteIpBlocks: [203.0.113.0/24]", {}, {"remote_ip": "203.0.113.9"}),
    ("ipBlocks: ['2001:db8::/32']", {"source_ip": "2001:db8::1"}, {"source_ip": "2001:db9::1"}),
    (
        "serviceAccounts: [client/sleep]",
        {},
        {"source_principal": "spiffe://cluster.local/ns/client/sa/other"},
    ),
    (
        "serviceAccounts: [sleep]",
        {"source_principal": "spiffe://cluster.local/ns/foo/sa/sleep"},
        {},
    ),
    (
        "notServiceAccounts: [client/sleep]",
        {"source_principal": "spiffe://cluster.local/ns/client/sa/x"},
        {},
    ),
]
OPERATION_CASES = [
    ("hosts: [httpbin.foo]", {"host": "HTTPBIN.foo"}, {"host": "other"}),
    ("hosts: ['*.foo']", {}, {"host": "httpbin.bar"}),
    ("hosts: ['httpbin.*']", {}, {"host": "web.foo"}),
    ("hosts: ['*']", {}, {"host": ""}),
    ("notHosts: ['*.bar']", {}, {"host": "x.BAR"}),
    ("ports: ['8000']", {}, {"destination_port": 8001}),
    ("notPorts: ['8000']", {"destination_port": 8001}, {}),
    ("methods: [GET, HEAD]", {"method": "HEAD"}, {"method": "POST"}),
    ("methods: [get]", {"method": "get"}, {"method": "GET"}),  # case-sensitive
    ("methods: ['P*']", {"method": "PUT"}, {"method": "GET"}),
    ("methods: ['*']", {}, {"method": ""}),
    ("notMethods: [DELETE]", {}, {"method": "DELETE"}),
    ("paths: [/api]", {"path": "/api?x=1"}, {"path": "/api/"}),
    ("paths: ['/api/*']", {"path": "/api/v1"}, {"path": "/api"}),
    ("paths: ['/api*']", {"path": "/api"}, {"path": "/ap"}),
    ("paths: ['*.json']", {"path": "/a/b.json"}, {"path": "/a/b.jsonx"}),
    ("paths: ['/users/{*}/profile']", {"path": "/users/7/profile"}, {"path": "/users/7/8/profile"}),
    ("paths: ['/static/{**}']", {"path": "/static/a/b/c.css"}, {"path": "/other"}),
    ("notPaths: ['/admin*']", {"path": "/api"}, {"path": "/x/../admin/users"}),
]
WHEN_CASES = [
    (
        "{key: 'request.headers[X-Team]', values: [payments]}",
        {"headers": {"x-team": "payments"}},
        {"headers": {}},
    ),
    (
        "{key: 'request.headers[x-team]', values: [payments]}",
        {"headers": {"x-team": "ops,payments"}},
        {"headers": {"x-team": "ops,paymentsx"}},
    ),
    (
        "{key: 'request.headers[x-team]', values: ['pay*']}",
        {"headers": {"x-team": "ops,payroll"}},
        {"headers": {"x-team": "ops"}},
    ),
    (
        "{key: 'request.headers[x-team]', values: ['*']}",
        {"headers": {"x-team": ""}},
        {"headers": {}},
    ),
    (
        "{key: 'request.headers[x-team]', notValues: [ops]}",
        {"headers": {}},
        {"headers": {"x-team": "ops"}},
    ),
    ("{key: source.ip, values: [10.1.0.0/16]}", {}, {"source_ip": "10.9.0.1"}),
    ("{key: source.ip, notValues: [10.1.0.0/16]}", {"source_ip": "10.9.0.1"}, {}),
    ("{key: remote.ip, values: [203.0.113.1]}", {"remote_ip": "203.0.113.1"}, {}),
    ("{key: source.namespace, values: [client]}", {}, {"source_principal": None}),
    (
        "{key: source.namespace, notValues: ['cl*']}",
        {"source_principal": "spiffe://cluster.local/ns/x/sa/y"},
        {},
    ),
    (
        "{key: source.principal, values: [cluster.local/ns/client/sa/sleep]}",
        {},
        {"source_principal": None},
    ),
    ("{key: source.principal, notValues: ['*']}", {"source_principal": None}, {}),
    (
        "{key: request.auth.principal, values: [https://issuer.example/alice]}",
        {"claims": CLAIMS},
        {"claims": None},
    ),
    ("{key: request.auth.principal, notValues: ['*']}", {}, {"claims": CLAIMS}),
    (
        "{key: request.auth.audiences, values: [web]}",
        {"claims": CLAIMS},
        {"claims": {**CLAIMS, "aud": "api"}},
    ),
    (
        "{key: request.auth.audiences, notValues: [api]}",
        {"claims": {**CLAIMS, "aud": "x"}},
        {"claims": CLAIMS},
    ),
    (
        "{key: request.auth.presenter, values: [spa]}",
        {"claims": CLAIMS},
        {"claims": {**CLAIMS, "azp": "cli"}},
    ),
    (
        "{key: 'request.auth.claims[groups]', values: [ops]}",
        {"claims": CLAIMS},
        {"claims": {**CLAIMS, "groups": ["dev"]}},
    ),
    (
        "{key: 'request.auth.claims[groups]', notValues: [ops]}",
        {"claims": {**CLAIMS, "groups": []}},
        {"claims": CLAIMS},
    ),
    (
        "{key: 'request.auth.claims[scope]', values: [write]}",
        {"claims": CLAIMS},
        {"claims": {**CLAIMS, "scope": "read"}},
    ),
    (
        "{key: 'request.auth.claims[iss]', values: ['*.example']}",
        {"claims": CLAIMS},
        {"claims": None},
    ),
    (
        "{key: 'request.auth.claims[org][team][name]', values: [payments]}",
        {"claims": CLAIMS},
        {"claims": {**CLAIMS, "org": {"team": "payments"}}},
    ),
    (
        "{key: 'request.auth.claims[level]', values: ['*']}",
        {"claims": {**CLAIMS, "level": "3"}},
        {"claims": CLAIMS},
    ),  # non-string claims never match
    ("{key: destination.ip, values: [10.0.0.0/24]}", {}, {"destination_ip": "10.0.1.5"}),
    ("{key: destination.ip, notValues: [10.0.0.5]}", {"destination_ip": "10.0.0.6"}, {}),
    ("{key: destination.port, values: ['8000']}", {}, {"destination_port": 8080}),
    ("{key: destination.port, notValues: ['8000']}", {"destination_port": 8080}, {}),
    ("{key: connection.sni, values: ['*.foo.svc']}", {"sni": "httpbin.foo.svc"}, {"sni": None}),
    ("{key: connection.sni, notValues: [evil.com]}", {}, {"sni": "evil.com"}),
]


def _check(spec: str, hit: dict[str, Any], miss: dict[str, Any]) -> None:
    ps = policy_set(ap(spec))
    yes, no = decide(ps, **hit), decide(ps, **miss)
    assert yes.allowed, (spec, yes.reason)
    assert (yes.policy, yes.rule, yes.action) == ("foo/p", 0, Action.ALLOW)
    assert not no.allowed, (spec, no.reason)
    assert no.policy is None and no.reason.startswith("no ALLOW policy matched")


@pytest.mark.parametrize(("field", "hit", "miss"), SOURCE_CASES)
def test_source_fields(field: str, hit: dict[str, Any], miss: dict[str, Any]) -> None:
    _check(f"  rules:\n  - from:\n    - source: {{{field}}}\n", hit, miss)


@pytest.mark.parametrize(("field", "hit", "miss"), OPERATION_CASES)
def test_operation_fields(field: str, hit: dict[str, Any], miss: dict[str, Any]) -> None:
    _check(f"  rules:\n  - to:\n    - operation: {{{field}}}\n", hit, miss)


@pytest.mark.parametrize(("condition", "hit", "miss"), WHEN_CASES)
def test_when_keys(condition: str, hit: dict[str, Any], miss: dict[str, Any]) -> None:
    _check(f"  rules:\n  - when:\n    - {condition}\n", hit, miss)


def test_fields_and_together_and_list_items_or() -> None:
    ps = policy_set(
        ap(
            "  rules:\n  - from:\n    - source: {namespaces: [client], ipBlocks: [10.1.0.0/16]}\n"
            "    - source: {principals: [cluster.local/ns/ops/sa/admin]}\n"
            "    to:\n    - operation: {methods: [GET], paths: [/a]}\n"
            "    - operation: {methods: [POST], paths: [/b]}\n"
        )
    )
    assert decide(ps, path="/a").allowed
    assert decide(ps, method="POST", path="/b").allowed
    assert not decide(ps, method="POST", path="/a").allowed  # within an operation: AND
    assert not decide(ps, source_ip="192.168.1.1").allowed
    admin = "spiffe://cluster.local/ns/ops/sa/admin"
    assert decide(ps, source_principal=admin, source_ip="192.168.1.1", path="/a").allowed  # OR


def test_rules_or_and_the_first_matching_rule_is_reported() -> None:
    ps = policy_set(
        ap(
            "  rules:\n  - to: [{operation: {paths: [/a]}}]\n  - to: [{operation: {paths: ['/*']}}]\n"
        )
    )
    assert decide(ps, path="/a").rule == 0
    assert decide(ps, path="/b").rule == 1


def test_no_policy_allows_and_empty_allow_denies_everything() -> None:
    assert decide(policy_set()).allowed
    assert decide(policy_set()).reason.startswith("no ALLOW policy selects foo/httpbin")
    deny_all = policy_set(ap("  {}\n"))
    assert not decide(deny_all).allowed
    allow_all = policy_set(ap("  rules: [{}]\n"))
    assert decide(allow_all, source_principal=None).allowed


def test_deny_beats_allow_and_deny_without_rules_matches_nothing() -> None:
    ps = policy_set(
        ap("  rules: [{}]\n", name="allow"),
        ap("  action: DENY\n  rules:\n  - to: [{operation: {methods: [DELETE]}}]\n", name="deny"),
        ap("  action: DENY\n", name="empty-deny"),
    )
    d = decide(ps, method="DELETE")
    assert (d.allowed, d.policy, d.rule, d.action) == (False, "foo/deny", 0, Action.DENY)
    assert d.reason == "denied by DENY policy foo/deny rule 0"
    assert decide(ps).allowed


def test_custom_first_and_fail_closed_without_a_provider() -> None:
    ps = policy_set(
        ap(
            "  action: CUSTOM\n  provider: {name: opa}\n  rules:\n  - to: [{operation: {paths: ['/ext*']}}]\n",
            name="ext",
        ),
        ap("  action: DENY\n  rules:\n  - to: [{operation: {paths: [/ext/deny]}}]\n", name="deny"),
    )
    w = ps.workload("foo/httpbin")
    assert w is not None
    d = evaluate(ps, w, request(path="/ext/x"), now=NOW)
    assert (d.allowed, d.policy, d.action) == (False, "foo/ext", Action.CUSTOM)
    assert "fail closed" in d.reason
    calls: list[str] = []

    def provider(policy: AuthorizationPolicy, req: Request) -> tuple[bool, str]:
        calls.append(req.path)
        return (req.path != "/ext/no", "provider says so")

    assert evaluate(ps, w, request(path="/ext/ok"), now=NOW, custom=provider).allowed
    no = evaluate(ps, w, request(path="/ext/no"), now=NOW, custom=provider)
    assert (no.allowed, no.action) == (False, Action.CUSTOM) and "provider says so" in no.reason
    # CUSTOM allowed, then DENY still applies
    d = evaluate(ps, w, request(path="/ext/deny"), now=NOW, custom=provider)
    assert (d.allowed, d.policy) == (False, "foo/deny")
    # a request the CUSTOM rules do not match never reaches the provider
    calls.clear()
    assert evaluate(ps, w, request(path="/plain"), now=NOW, custom=provider).allowed
    assert calls == []


def test_audit_marks_but_never_decides() -> None:
    ps = policy_set(ap("  action: AUDIT\n  rules:\n  - to: [{operation: {methods: [POST]}}]\n"))
    d = decide(ps, method="POST")
    assert d.allowed and d.audit and d.audit_policies == ("foo/p",) and d.policy is None
    assert not decide(ps).audit


def test_selector_and_namespace_scoping() -> None:
    ps = policy_set(
        ap("  selector: {matchLabels: {app: other}}\n", name="other-only"),
        ap("  action: DENY\n  rules: [{}]\n", namespace="bar", name="bar-deny"),
        ap("  selector: {matchLabels: {app: httpbin, version: v2}}\n", name="v2-only"),
    )
    assert decide(ps).allowed  # none of these select foo/httpbin
    assert not decide(ps, "foo/other").allowed
    assert not decide(ps, "bar/web").allowed
    w = ps.workload("foo/httpbin")
    assert w is not None and ps.policies_for(w) == ()


def test_root_namespace_policies_apply_mesh_wide() -> None:
    ps = policy_set(
        ap(
            "  action: DENY\n  rules:\n  - to: [{operation: {paths: [/secret]}}]\n",
            namespace="meshward-system",
            name="mesh-deny",
        ),
        ap(
            "  selector: {matchLabels: {app: httpbin}}\n  action: AUDIT\n  rules: [{}]\n",
            namespace="meshward-system",
            name="audit-httpbin",
        ),
    )
    for ref in ("foo/httpbin", "foo/other", "bar/web"):
        d = decide(ps, ref, path="/secret")
        assert (d.allowed, d.policy) == (False, "meshward-system/mesh-deny")
    assert decide(ps, "bar/web").audit  # root-namespace selector reaches other namespaces
    assert not decide(ps, "foo/other").audit


def test_root_namespace_comes_from_mesh_config() -> None:
    mesh = "apiVersion: meshward.dev/v1\nkind: MeshConfig\nspec: {rootNamespace: istio-system}\n"
    deny = ap("  action: DENY\n  rules: [{}]\n", namespace="istio-system")
    ps = parse({"w.yaml": WORKLOADS, "m.yaml": mesh, "p.yaml": deny})
    assert not decide(ps).allowed
    assert decide(policy_set(deny)).allowed  # istio-system is an ordinary namespace by default


def test_dry_run_is_evaluated_but_never_enforced() -> None:
    dry = {"istio.io/dry-run": "true"}
    ps = policy_set(
        ap("  action: DENY\n  rules:\n  - to: [{operation: {methods: [POST]}}]\n", annotations=dry)
    )
    d = decide(ps, method="POST")
    assert d.allowed
    (r,) = d.dry_run
    assert (r.policy, r.action, r.matched, r.rule, r.would_deny) == (
        "foo/p",
        Action.DENY,
        True,
        0,
        True,
    )
    assert not decide(ps).dry_run[0].would_deny

    allow = policy_set(ap("  rules:\n  - to: [{operation: {paths: [/ok]}}]\n", annotations=dry))
    assert decide(allow).allowed  # a dry-run ALLOW does not switch on deny-by-default
    assert decide(allow).dry_run[0].would_deny
    assert not decide(allow, path="/ok").dry_run[0].would_deny

    both = policy_set(
        ap("  rules:\n  - to: [{operation: {paths: [/ok]}}]\n", annotations=dry, name="tight"),
        ap("  rules:\n  - to: [{operation: {paths: ['/*']}}]\n", name="loose"),
    )
    d = decide(both, path="/other")
    assert d.allowed and d.policy == "foo/loose"
    assert not d.dry_run[0].would_deny  # another enforced ALLOW still admits it


def test_dry_run_false_is_enforced() -> None:
    ps = policy_set(
        ap("  action: DENY\n  rules: [{}]\n", annotations={"istio.io/dry-run": "false"})
    )
    assert not decide(ps).allowed


def test_expired_emergency_rules_stop_applying() -> None:
    until = {"meshward.dev/expires-at": "2026-01-01T12:00:00Z"}
    ps = policy_set(
        ap("  rules:\n  - to: [{operation: {paths: [/ok]}}]\n", name="base"),
        ap(
            "  rules:\n  - to: [{operation: {paths: [/break-glass]}}]\n",
            name="emergency",
            annotations=until,
        ),
    )
    before = datetime(2026, 1, 1, 11, 59, 59, tzinfo=UTC)
    at = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert decide(ps, path="/break-glass", now=before).policy == "foo/emergency"
    assert not decide(ps, path="/break-glass", now=at).allowed
    w = ps.workload("foo/httpbin")
    assert w is not None
    assert [p.name for p in ps.policies_for(w)] == ["base", "emergency"]
    # Expired, the emergency ALLOW stays as an ALLOW matching nothing (expiry never widens).
    assert [(p.name, len(p.rules)) for p in ps.policies_for(w, now=at)] == [
        ("base", 1),
        ("emergency", 0),
    ]
    # the caller's clock decides: an expiry one second before it no longer applies
    far = {"meshward.dev/expires-at": (datetime.now(UTC) - timedelta(seconds=1)).isoformat()}
    expired = policy_set(ap("  action: DENY\n  rules: [{}]\n", annotations=far))
    wx = expired.workload("foo/httpbin")
    assert wx is not None and evaluate(expired, wx, request(), now=datetime.now(UTC)).allowed


def test_tcp_ports_follow_istio() -> None:
    """On a TCP port an ALLOW rule needing HTTP attributes never matches, and a DENY rule's
    HTTP-only fields are dropped (so it denies more)."""
    ps = policy_set(
        ap(
            "  rules:\n  - to: [{operation: {methods: [GET], ports: ['9000']}}]\n  - from: [{source: {namespaces: [client]}}]\n    to: [{operation: {ports: ['9000']}}]\n",
            name="allow",
        ),
    )
    d = decide(ps, destination_port=9000)
    assert (d.allowed, d.rule) == (True, 1)
    assert not decide(
        ps, destination_port=9000, source_principal="spiffe://cluster.local/ns/x/sa/y"
    ).allowed
    deny = policy_set(
        ap(
            "  action: DENY\n  rules:\n  - to: [{operation: {methods: [DELETE], ports: ['9000']}}]\n"
        )
    )
    assert not decide(deny, destination_port=9000, method="GET").allowed
    assert decide(deny, destination_port=8000, method="GET").allowed


def test_strict_mtls_refuses_plaintext_before_authorization() -> None:
    pa = (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: strict, namespace: foo}\nspec: {mtls: {mode: STRICT}}\n"
    )
    ps = policy_set(pa)
    d = decide(ps, source_principal=None)
    assert not d.allowed and d.reason.startswith("plaintext connection refused")
    assert decide(ps).allowed
    assert decide(policy_set(), source_principal=None).allowed  # PERMISSIVE by default


DENY_ADMIN = "  action: DENY\n  rules:\n  - to: [{operation: {paths: ['/admin', '/admin/*']}}]\n"


@pytest.mark.parametrize(
    "path",
    [
        "/admin",
        "/admin/",
        "/api/../admin",
        "//admin",
        "/./admin/x",
        "/%2e%2e/admin",
        "/x/%2E%2E/admin/users",
        "/%61dmin",
        "/x\\..\\admin",
    ],
)
def test_path_attacks_are_normalized_before_matching(path: str) -> None:
    d = decide(
        policy_set(DENY_ADMIN.replace("  action", "  action", 1) and ap(DENY_ADMIN)), path=path
    )
    assert (d.allowed, d.policy) == (False, "foo/p"), path


def test_paths_are_case_sensitive_so_deny_by_allow_list() -> None:
    # /ADMIN is a different path: an exact DENY does not see it, which is why allow-lists matter.
    ps = policy_set(ap(DENY_ADMIN))
    assert decide(ps, path="/ADMIN").allowed
    allow_list = policy_set(
        ap(DENY_ADMIN, name="deny"),
        ap("  rules:\n  - to: [{operation: {paths: ['/api/*']}}]\n", name="allow"),
    )
    assert not decide(allow_list, path="/ADMIN").allowed


def test_matrix_params_are_part_of_the_path() -> None:
    # Envoy keeps ";params": an exact DENY misses /admin;x, a prefix DENY catches it.
    exact = policy_set(ap("  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin]}}]\n"))
    assert decide(exact, path="/admin;x").allowed
    prefix = policy_set(
        ap("  action: DENY\n  rules:\n  - to: [{operation: {paths: ['/admin*']}}]\n")
    )
    assert not decide(prefix, path="/admin;x").allowed


@pytest.mark.parametrize("path", ["/admin%2Fx", "/x%2f..%2fadmin", "/x%5C..%5Cadmin", "/a#frag"])
def test_rejected_paths_are_denied_without_a_policy(path: str) -> None:
    d = decide(policy_set(), path=path)
    assert not d.allowed and d.policy is None
    assert d.reason.startswith("rejected before authorization (HTTP 400)")


def test_request_principal_needs_both_iss_and_sub() -> None:
    ps = policy_set(ap("  rules:\n  - from: [{source: {requestPrincipals: ['*']}}]\n"))
    assert not decide(ps, claims={"iss": "x"}).allowed
    assert decide(ps, claims={"iss": "x", "sub": "y"}).allowed


def test_non_spiffe_peer_matches_only_star() -> None:
    ps = policy_set(ap("  rules:\n  - from: [{source: {principals: ['*']}}]\n"))
    assert decide(ps, source_principal="CN=legacy").allowed
    exact = policy_set(ap("  rules:\n  - from: [{source: {principals: ['CN=legacy']}}]\n"))
    assert not decide(exact, source_principal="CN=legacy").allowed


def test_upper_case_header_names_in_requests_are_tolerated() -> None:
    ps = policy_set(ap("  rules:\n  - when: [{key: 'request.headers[X-A]', values: [b]}]\n"))
    assert decide(ps, headers={"X-A": "b"}).allowed


def test_plans_are_cached_and_only_selecting_policies_are_compiled() -> None:
    unrelated = [
        ap("  action: DENY\n  rules: [{}]\n", name=f"n{i}", namespace=f"ns{i}") for i in range(300)
    ]
    ps = policy_set(ap("  rules: [{}]\n"), *unrelated)
    w = ps.workload("foo/httpbin")
    assert w is not None
    assert decide(ps).allowed
    compiled = [k for k in ps.plans if k[0] == "policy"]
    assert compiled == [("policy", "foo", "p", False)]
    assert ps.policies_for(w) is ps.policies_for(w)


def test_model_objects_can_be_evaluated_without_yaml() -> None:
    w = Workload(namespace="a", name="b")
    ps = PolicySet.create(
        workloads=[w],
        authorization_policies=[AuthorizationPolicy(namespace="a", name="x", rules=(Rule(),))],
    )
    assert ps.workload("a/b") == Workload(namespace="a", name="b", service_account="b")
    assert evaluate(ps, w, Request(), now=NOW).allowed


def test_an_evaluated_policy_set_pickles_as_its_documents() -> None:
    """The control plane evaluates its policy set (flows, status) and then sends it to the
    compile worker process: the evaluation plans hold closures, so they must stay behind (an
    expires-at recompile once failed on exactly this)."""
    import pickle

    ps = policy_set(
        ap(
            "  selector: {matchLabels: {app: httpbin}}\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n"
        )
    )
    assert decide(ps).allowed and not decide(ps, method="POST").allowed
    assert ps.plans  # evaluation cached its plan on the set
    copy = pickle.loads(pickle.dumps(ps))
    assert copy == ps and copy.version == ps.version and copy.plans == {}
    assert decide(copy).allowed and not decide(copy, method="POST").allowed
