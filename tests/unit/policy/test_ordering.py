"""Which rule is reported as deciding: Envoy's order (string order of the RBAC names), shared by
the evaluator and the compiler, so explain and Envoy's access log name the same rule."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from meshward.policy import (
    Action,
    AuthorizationPolicy,
    MeshConfig,
    Operation,
    PolicySet,
    Request,
    Rule,
    Workload,
    WorkloadPort,
    evaluate,
)
from meshward.policy.ordering import rule_name, rule_order_key

NOW = datetime(2030, 1, 1, tzinfo=UTC)
API = Workload("shop", "api", {"app": "api"}, "api", ports=(WorkloadPort("http", 8080),))
GET = Rule(operations=(Operation(methods=("GET",)),))


def paths(count: int) -> tuple[Rule, ...]:
    return tuple(Rule(operations=(Operation(paths=(f"/p{i}",)),)) for i in range(count))


def policy(
    name: str, *rules: Rule, action: Action = Action.DENY, **kw: object
) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        namespace="shop",
        name=name,
        action=action,
        selector={"app": "api"},
        rules=rules,
        **kw,  # type: ignore[arg-type]
    )


def decide(
    *policies: AuthorizationPolicy, method: str = "GET", path: str = "/p2"
) -> tuple[bool, str | None, int | None]:
    ps = PolicySet.create(
        mesh=MeshConfig(trust_domain="cluster.local"),
        workloads=[API],
        authorization_policies=policies,
    )
    decision = evaluate(ps, API, Request(method=method, path=path, destination_port=8080), now=NOW)
    return decision.allowed, decision.policy, decision.rule


def test_rule_names_sort_as_envoy_std_map_does() -> None:
    assert rule_name("shop", "web", 3) == "ns[shop]-policy[web]-rule[3]"
    by_index = sorted(range(12), key=lambda i: rule_order_key("shop", "web", i))
    assert by_index == [0, 10, 11, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # '0' < ']'
    names = sorted(["web", "web-2", "web.x", "webb"], key=lambda n: rule_order_key("shop", n, 0))
    assert names == ["web-2", "web.x", "web", "webb"]  # '-' < '.' < ']' < 'b'
    assert rule_order_key("a", "z", 0) < rule_order_key("b", "a", 0)  # namespace first


def test_deny_names_the_first_match_in_envoy_order_within_a_policy() -> None:
    web = policy("web", *paths(10), GET)  # GET /p2 matches rules 2 and 10
    assert decide(web) == (False, "shop/web", 10)


def test_deny_names_the_first_match_in_envoy_order_across_policies() -> None:
    web, web2 = policy("web", *paths(10), GET), policy("web-2", GET)
    assert decide(web, web2) == (False, "shop/web-2", 0)
    assert decide(web2, web) == (False, "shop/web-2", 0)


def test_allow_and_dry_run_name_the_first_match_in_envoy_order() -> None:
    allow = policy("open", *paths(10), GET, action=Action.ALLOW)
    assert decide(allow) == (True, "shop/open", 10)
    trial = policy("trial", *paths(10), GET, dry_run=True)
    ps = PolicySet.create(
        mesh=MeshConfig(trust_domain="cluster.local"),
        workloads=[API],
        authorization_policies=[trial],
    )
    decision = evaluate(ps, API, Request(method="GET", path="/p2", destination_port=8080), now=NOW)
    assert decision.allowed
    assert [(r.policy, r.rule, r.would_deny) for r in decision.dry_run] == [
        ("shop/trial", 10, True)
    ]


def test_an_expired_policy_is_skipped_in_the_order() -> None:
    expired = policy("web-2", GET, expires_at=datetime(2029, 1, 1, tzinfo=UTC))
    assert decide(policy("web", *paths(3)), expired) == (False, "shop/web", 2)


@given(
    matches=st.lists(st.booleans(), min_size=1, max_size=14),
    allow_matches=st.lists(st.booleans(), min_size=0, max_size=14),
)
def test_the_verdict_depends_only_on_whether_any_rule_matches(
    matches: list[bool], allow_matches: list[bool]
) -> None:
    """Order changes which rule is named, never the verdict (Istio: any DENY match denies, then
    any ALLOW match allows)."""

    def rules(flags: list[bool]) -> tuple[Rule, ...]:
        return tuple(
            Rule(operations=(Operation(paths=("/p2" if hit else "/other",)),)) for hit in flags
        )

    deny = policy("deny", *rules(matches))
    allow = policy("allow", *rules(allow_matches), action=Action.ALLOW)
    allowed, named, index = decide(deny, allow)
    assert allowed is (not any(matches) and any(allow_matches))
    if any(matches):
        hits = [i for i, hit in enumerate(matches) if hit]
        assert (named, index) == (
            "shop/deny",
            min(hits, key=lambda i: rule_order_key("shop", "deny", i)),
        )
