"""`policy suggest`'s generation (pure): exactly what was observed allowed, nothing wider.

The property test is the contract: over a small finite universe of requests, the enforced
suggestion allows a request IF AND ONLY IF an observed allowed flow covers it (same caller,
callee, port, method, and a path its template matches). "If" is coverage (every observed flow,
and unseen ids under a folded path, allowed); "only if" is least privilege (a never-observed
caller, method, port or path is denied). A workload nobody was observed calling therefore
denies every caller (allow-nothing), rather than staying open for want of a policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from meshward.compile.envoy_limits import check_policy_set
from meshward.flows.suggest import Mode, ObservedFlow, Suggestion, suggest
from meshward.flows.suggest_check import coverage, files, replay, with_policies, would_deny
from meshward.policy import parse
from meshward.policy.evaluator import evaluate
from meshward.policy.model import AuthorizationPolicy, Request
from meshward.policy.paths import compiled_path_template, is_path_template
from meshward.policy.policyset import PolicySet

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
T = NOW.timestamp()
DAY = 86400.0


def _workload(ns: str, name: str, *, sa: str | None = None, labels: str = "") -> str:
    spec = "{ports: [{name: http, port: 8080}, {name: admin, port: 9090}, {name: db, port: 5432, protocol: TCP}]"
    spec += f", serviceAccount: {sa}}}" if sa else "}"
    return f"""
apiVersion: meshward.dev/v1
kind: Workload
metadata: {{name: {name}, namespace: {ns}, labels: {labels or "{app: " + name + "}"}}}
spec: {spec}
"""


def _set(*docs: str) -> PolicySet:
    return parse({"mesh.yaml": "---".join(docs)})


SHOP = _set(
    _workload("shop", "frontend"),
    _workload("shop", "orders"),
    _workload("shop", "payments"),
    _workload("batch", "report"),
    _workload("batch", "export"),
)


def flow(src: str, dst: str, method: str, path: str, *, port: int = 8080, count: int = 5,
         first: float = T - DAY, decision: str = "allow") -> ObservedFlow:  # fmt: skip
    return ObservedFlow(src, dst, port, method, path, count, first, T - 60, decision)


def allowed(ps: PolicySet, src: str, dst: str, method: str, path: str, port: int = 8080) -> bool:
    s, d = ps.workload(src), ps.workload(dst)
    assert s is not None and d is not None
    request = Request(method=method, path=path, host=d.name, destination_port=port,
                      source_principal=s.spiffe_id("cluster.local"), source_ip=s.address)  # fmt: skip
    return evaluate(ps, d, request, now=NOW).allowed


def policy_for(result: Suggestion, ref: str) -> AuthorizationPolicy:
    return result.policies[result.workloads.index(ref)]


def enforced(ps: PolicySet, flows: list[ObservedFlow]) -> PolicySet:
    result = suggest(ps, flows, now=NOW, mode=Mode.ENFORCE)
    return with_policies(ps, result.enforced(), keep_existing=False)


def test_exactly_what_was_seen_with_ids_generalized() -> None:
    flows = [
        flow("shop/frontend", "shop/orders", "GET", "/orders/{*}"),
        flow("shop/frontend", "shop/orders", "POST", "/orders"),
        flow("shop/payments", "shop/orders", "GET", "/orders/{*}/status"),
    ]
    ps = enforced(SHOP, flows)
    assert allowed(ps, "shop/frontend", "shop/orders", "GET", "/orders/42")
    assert allowed(ps, "shop/frontend", "shop/orders", "GET", "/orders/999999")  # never seen id
    assert allowed(ps, "shop/frontend", "shop/orders", "POST", "/orders")
    assert allowed(ps, "shop/payments", "shop/orders", "GET", "/orders/7/status")
    # never wider: no cross product of methods and paths, no other caller, port or path
    assert not allowed(ps, "shop/frontend", "shop/orders", "POST", "/orders/42")
    assert not allowed(ps, "shop/frontend", "shop/orders", "GET", "/orders")
    assert not allowed(ps, "shop/payments", "shop/orders", "GET", "/orders/42")
    assert not allowed(ps, "shop/frontend", "shop/orders", "GET", "/orders/42/status")
    assert not allowed(ps, "shop/frontend", "shop/orders", "GET", "/orders/42", port=9090)
    assert not allowed(ps, "batch/report", "shop/orders", "GET", "/orders/42")  # never observed


def test_denied_flows_are_never_evidence() -> None:
    flows = [
        flow("shop/frontend", "shop/orders", "GET", "/orders"),
        flow("batch/report", "shop/orders", "DELETE", "/orders", decision="deny"),
        flow("shop/payments", "shop/orders", "GET", "/x", decision="error"),
    ]
    result = suggest(SHOP, flows, now=NOW)
    policy = policy_for(result, "shop/orders")
    assert "report" not in repr(policy) and "payments" not in repr(policy)
    assert [f.source for f in result.used] == ["shop/frontend"]


def test_a_namespace_only_when_all_its_workloads_were_seen_with_the_same_access() -> None:
    both = [
        flow("batch/report", "shop/orders", "GET", "/orders"),
        flow("batch/export", "shop/orders", "GET", "/orders"),
        flow("shop/frontend", "shop/orders", "GET", "/orders"),
    ]
    [rule] = policy_for(suggest(SHOP, both, now=NOW), "shop/orders").rules
    namespaces = [s.namespaces for s in rule.sources if s.namespaces]
    principals = [p for s in rule.sources for p in s.principals]
    assert namespaces == [("batch",)]
    assert principals == ["cluster.local/ns/shop/sa/frontend"]  # shop: not every workload seen
    # export seen with another method: the two batch workloads differ, so no namespace
    differ = [*both[:1], flow("batch/export", "shop/orders", "POST", "/orders"), both[2]]
    policy = policy_for(suggest(SHOP, differ, now=NOW), "shop/orders")
    assert all(not s.namespaces for r in policy.rules for s in r.sources)


def test_tcp_flows_allow_their_port_only() -> None:
    flows = [flow("shop/orders", "shop/payments", "", "", port=5432)]
    result = suggest(SHOP, flows, now=NOW, mode=Mode.ENFORCE)
    [rule] = policy_for(result, "shop/payments").rules
    assert [(o.ports, o.methods, o.paths) for o in rule.operations] == [((5432,), (), ())]
    assert coverage(SHOP, result, now=NOW).percent == 100.0


def test_what_cannot_be_expressed_is_skipped_and_said() -> None:
    ps = _set(
        _workload("shop", "frontend"),
        _workload("shop", "orders"),
        _workload("shop", "twin-a", labels="{app: twin}"),
        _workload("shop", "twin-b", labels="{app: twin, extra: x}"),
    )
    flows = [
        flow("unknown", "shop/orders", "GET", "/a"),
        flow("plaintext", "shop/orders", "GET", "/a"),
        flow("shop/frontend", "shop/orders", "*", "{other}"),
        flow("shop/frontend", "shop/orders", "GET", "/files*"),
        flow("shop/frontend", "shop/twin-a", "GET", "/a"),  # its labels select twin-b too
        flow("shop/frontend", "shop/gone", "GET", "/a"),
        flow("shop/frontend", "shop/orders", "GET", "/a", port=1234),
        flow("shop/frontend", "shop/orders", "", "", port=8080),  # no method and path on HTTP
        flow("shop/frontend", "shop/orders", "GET", "/ok"),
    ]
    result = suggest(ps, flows, now=NOW)
    kinds = sorted(n.kind for n in result.skipped)
    assert kinds == ["folded-paths", "incomplete", "shared-selector", "unknown-caller",
                     "unknown-caller", "unknown-destination", "unknown-port",
                     "wildcard-path"]  # fmt: skip
    # twin-a's callers could not be expressed: it is left alone, not closed; frontend and
    # twin-b (its own labels select only it) were called by nobody: allow-nothing
    assert result.workloads == ("shop/frontend", "shop/orders", "shop/twin-b")
    assert result.closed == ("shop/frontend", "shop/twin-b")
    assert [(f.method, f.path) for f in result.used] == [("GET", "/ok")]


def test_thin_evidence_warnings() -> None:
    flows = [
        flow("shop/frontend", "shop/orders", "GET", "/a", count=1),
        flow("batch/report", "shop/orders", "GET", "/b", first=T - 100),
    ]
    result = suggest(SHOP, flows, now=NOW, since=NOW - timedelta(days=1))
    kinds = sorted(n.kind for n in result.warnings if n.kind != "no-callers")
    assert kinds == ["recent-caller", "seen-once"]
    deep = suggest(SHOP, [flow("shop/frontend", "shop/orders", "GET", "/a/b/c/d/e/f/g/h/{**}")],
                   now=NOW)  # fmt: skip
    assert [n.kind for n in deep.warnings if n.kind == "deep-path"] == ["deep-path"]
    assert allowed(enforced(SHOP, list(deep.used)), "shop/frontend", "shop/orders", "GET",
                   "/a/b/c/d/e/f/g/h/i/j")  # fmt: skip
    short = suggest(SHOP, flows, now=NOW, since=NOW - timedelta(minutes=10))
    assert "short-window" in {n.kind for n in short.warnings}
    shared = _set(_workload("shop", "a", sa="common"), _workload("shop", "b", sa="common"),
                  _workload("shop", "orders"))  # fmt: skip
    result = suggest(shared, [flow("shop/a", "shop/orders", "GET", "/x")], now=NOW)
    [note] = [n for n in result.warnings if n.kind == "shared-identity"]
    assert "shop/b" in note.message


def test_warnings_are_bounded() -> None:
    flows = [flow("shop/frontend", "shop/orders", "GET", f"/p{i}", count=1) for i in range(500)]
    result = suggest(SHOP, flows, now=NOW)
    once = [n for n in result.warnings if n.kind == "seen-once"]
    assert len(once) == 201 and once[-1].message == "... and 300 more seen-once notes"


def test_files_are_dry_run_by_default_validate_and_load_back() -> None:
    flows = [flow("shop/frontend", "shop/orders", "GET", "/orders/{*}")]
    result = suggest(SHOP, flows, now=NOW, namespace="shop")
    texts = files(result)
    assert list(texts) == ["shop.frontend.yaml", "shop.orders.yaml", "shop.payments.yaml"]
    assert 'istio.io/dry-run: "true"' in texts["shop.orders.yaml"] or (
        "istio.io/dry-run: 'true'" in texts["shop.orders.yaml"]
    )
    loaded = parse({"base.yaml": SHOP.dump(), **texts})
    check_policy_set(loaded)  # what `policy validate` (and the control plane) also requires
    [policy] = [p for p in loaded.authorization_policies if p.name == "suggested-orders"]
    assert policy.dry_run and policy.rules == policy_for(result, "shop/orders").rules
    # dry-run: nothing is denied yet, the would-be denial is reported
    d = replay(loaded, flow("shop/payments", "shop/orders", "GET", "/orders/{*}"), now=NOW)
    assert d.allowed and [r.would_deny for r in d.dry_run] == [True]
    enforce = files(suggest(SHOP, flows, now=NOW, mode=Mode.ENFORCE))["shop.orders.yaml"]
    closed = texts["shop.payments.yaml"]
    assert "allow nothing" in closed and "rules" not in closed.split("apiVersion", 1)[1]
    [nothing] = [p for p in loaded.authorization_policies if p.name == "suggested-payments"]
    assert nothing.dry_run and nothing.rules == () and nothing.selector == {"app": "payments"}
    assert "dry-run" not in enforce.split("apiVersion", 1)[1]


def test_coverage_and_would_deny() -> None:
    flows = [flow("shop/frontend", "shop/orders", "GET", "/orders/{*}")]
    result = suggest(SHOP, flows, now=NOW)
    cov = coverage(SHOP, result, now=NOW)
    assert (cov.total, cov.allowed, cov.percent) == (1, 1, 100.0)
    closing = would_deny(SHOP, result, now=NOW)
    pairs = {(c.source, c.destination) for c in closing.changes}
    assert ("shop/payments", "shop/orders") in pairs and ("batch/report", "shop/orders") in pairs
    assert all(c.before.allowed and not c.after.allowed for c in closing.changes)
    assert not any(c.source == "shop/frontend" and c.probe.method == "GET" and c.probe.port == 8080
                   and c.probe.path.startswith("/orders/") for c in closing.changes)  # fmt: skip
    assert any(c.source == "shop/frontend" and c.probe.port == 9090 for c in closing.changes)


# ---------------------------------------------------------------------------- the property

REFS = ["shop/frontend", "shop/orders", "batch/report", "batch/export"]
PROPERTY_SET = _set(*(_workload(*ref.split("/")) for ref in REFS))
TEMPLATES = ["/a", "/b", "/a/{*}", "/b/{*}/c"]
CONCRETE = ["/a", "/b", "/a/1", "/a/zz9", "/b/7/c", "/b/7/d"]
PORTS = [8080, 9090]
METHODS = ["GET", "POST"]

flows_strategy = st.lists(
    st.builds(
        flow,
        src=st.sampled_from(REFS),
        dst=st.sampled_from(REFS),
        method=st.sampled_from(METHODS),
        path=st.sampled_from(TEMPLATES),
        port=st.sampled_from(PORTS),
        count=st.integers(1, 3),
    ),
    max_size=10,
)


def _covers(template: str, path: str) -> bool:
    if is_path_template(template):
        return compiled_path_template(template).fullmatch(path) is not None
    return template == path


@settings(max_examples=40, deadline=None)
@given(flows_strategy)
def test_allowed_if_and_only_if_observed(flows: list[ObservedFlow]) -> None:
    result = suggest(PROPERTY_SET, flows, now=NOW, mode=Mode.ENFORCE)
    assert coverage(PROPERTY_SET, result, now=NOW).percent == 100.0
    ps = with_policies(PROPERTY_SET, result.enforced(), keep_existing=False)
    uncalled = {ref for ref in REFS if not any(f.destination == ref for f in flows)}
    assert set(result.closed) == uncalled and set(result.workloads) == set(REFS)
    for dst in REFS:
        for src in REFS:
            for port in PORTS:
                for method in METHODS:
                    for path in CONCRETE:
                        seen = any(
                            (f.source, f.destination, f.port, f.method) == (src, dst, port, method)
                            and _covers(f.path, path)
                            for f in flows
                        )
                        got = allowed(ps, src, dst, method, path, port)
                        assert got == seen, (src, dst, port, method, path)
                        if dst in uncalled:  # least privilege for nobody: deny every caller
                            assert not got


def test_what_flows_do_not_record_is_called_out() -> None:
    jwt_allow = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-with-user, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
    - from: [{source: {requestPrincipals: ["https://issuer.example/*"]}}]
      when: [{key: "request.auth.claims[role]", values: ["buyer"]}]
"""
    ps = _set(*(_workload(*r.split("/")) for r in ("shop/frontend", "shop/orders")), jwt_allow)
    result = suggest(ps, [flow("shop/frontend", "shop/orders", "GET", "/x")], now=NOW)
    [note] = [n for n in result.warnings if n.kind == "unrecorded-requirements"]
    assert "shop/orders-with-user also requires conditions (when), end-user tokens" in note.message
    from meshward.flows.suggest_check import existing_allows

    assert existing_allows(ps, result) == ("shop/orders-with-user",)
    # added next to it, the suggestion narrows nothing; replacing it, others lose access
    # (shop/frontend, called by nobody, is closed: that is narrowed, but it is another workload)
    assert {c.destination for c in would_deny(ps, result, now=NOW).changes} == {"shop/frontend"}
    replacing = would_deny(ps, result, now=NOW, replacing=True)
    assert replacing.changes and all(c.before.allowed for c in replacing.changes)
    # e.g. a buyer's token on a path the window never saw
    assert any(c.probe.claims is not None and c.probe.path != "/x" for c in replacing.changes)


def test_a_workload_nobody_called_gets_allow_nothing_in_scope_only() -> None:
    flows = [
        flow("shop/frontend", "shop/orders", "GET", "/orders"),
        flow("plaintext", "shop/frontend", "GET", "/"),  # called, if inexpressibly: left alone
        # last seen before the window
        ObservedFlow("shop/orders", "batch/report", 8080, "GET", "/r", 5, T - 3 * DAY, T - 2 * DAY),
    ]
    since = NOW - timedelta(days=1)
    result = suggest(SHOP, flows, now=NOW, since=since, namespace="shop")
    assert result.closed == ("shop/payments",)  # batch is out of scope, frontend was called
    assert result.workloads == ("shop/orders", "shop/payments")
    nothing = policy_for(result, "shop/payments")
    assert (nothing.rules, nothing.dry_run, nothing.name) == ((), True, "suggested-payments")
    [note] = [n for n in result.warnings if n.kind == "no-callers"]
    assert note.message.startswith(
        "no callers observed for shop/payments in the window: suggested allow-nothing"
    )
    # every namespace: batch/report was called only before the window, so it is closed too
    every = suggest(SHOP, flows, now=NOW, since=since, mode=Mode.ENFORCE)
    assert every.closed == ("batch/export", "batch/report", "shop/payments")
    assert not any(p.dry_run for p in every.policies)
    ps = with_policies(SHOP, every.enforced(), keep_existing=False)
    for src in ("shop/frontend", "shop/orders", "batch/export"):
        assert not allowed(ps, src, "batch/report", "GET", "/r")
        assert not allowed(ps, src, "shop/payments", "GET", "/")
    assert allowed(ps, "shop/payments", "shop/frontend", "GET", "/x")  # not closed: no policy
    closing = would_deny(SHOP, every, now=NOW)
    assert {"shop/payments", "batch/report"} <= {c.destination for c in closing.changes}
    # incomplete evidence (the control plane truncated the flows): nothing closed, said so
    partial = suggest(SHOP, flows, now=NOW, since=since, namespace="shop", close_uncalled=False)
    assert partial.closed == () and partial.workloads == ("shop/orders",)
    [left] = [n for n in partial.skipped if n.kind == "uncalled-left-open"]
    assert left.flow == "shop/payments" and "incomplete" in left.message
    # a workload whose labels also select another cannot be closed alone: said, not done
    twins = _set(_workload("shop", "a", labels="{app: twin}"),
                 _workload("shop", "b", labels="{app: twin, v: b}"))  # fmt: skip
    result = suggest(twins, [], now=NOW)
    assert result.closed == ("shop/b",)
    [left] = [n for n in result.skipped if n.kind == "uncalled-left-open"]
    assert left.flow == "shop/a" and "also select shop/b" in left.message
