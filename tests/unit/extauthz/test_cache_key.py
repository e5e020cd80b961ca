"""The decision-cache key plan: which attributes a workload's policies read.

The property that matters: two requests that agree on every attribute in the plan get the same
decision from the real evaluator (so sharing a cache entry is safe), checked with hypothesis.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshward.extauthz import cache_key as P
from meshward.extauthz.cache_key import RequestFacts, attributes_read, key_function
from meshward.policy import (
    Action,
    AuthorizationPolicy,
    Condition,
    Operation,
    PolicySet,
    Request,
    Rule,
    Source,
    Workload,
    evaluate,
    normalize_path,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _policy(*rules: Rule, action: Action = Action.ALLOW, **kw: Any) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        namespace="foo", name=kw.pop("name", "p"), action=action, rules=rules, **kw
    )


def _facts(**kw: Any) -> RequestFacts:
    base: dict[str, Any] = {
        "method": "GET",
        "path": "/",
        "host": "h",
        "destination_port": 8000,
        "source_principal": None,
        "source_ip": "10.0.0.1",
        "destination_ip": "10.0.0.2",
        "sni": None,
        "headers": {},
        "claims": None,
    }
    base.update(kw)
    return RequestFacts(**base)


def test_each_field_maps_to_its_attribute() -> None:
    rule = Rule(
        sources=(Source(principals=("a",), request_principals=("i/s",), ip_blocks=("1.2.3.4",)),),
        operations=(Operation(hosts=("x",), ports=(80,), methods=("GET",), not_paths=("/p",)),),
        conditions=(
            Condition(key="request.headers[X-Team]", values=("a",)),
            Condition(key="request.auth.claims[groups]", values=("g",)),
            Condition(key="request.auth.claims[nested][deep]", values=("n",)),
            Condition(key="connection.sni", values=("s",)),
        ),
    )
    plan = attributes_read([_policy(rule)])
    assert plan.attributes == tuple(
        sorted(
            {
                P.SOURCE_PRINCIPAL,
                P.AUTH_PRINCIPAL,
                P.SOURCE_IP,
                P.HOST,
                P.DESTINATION_PORT,
                P.METHOD,
                P.PATH,
                "request.headers[x-team]",
                "request.auth.claims[groups]",
                "request.auth.claims[nested][deep]",
                P.SNI,
            }
        )
    )
    assert plan.reads_token


def test_every_vocabulary_field_and_its_negation_is_in_the_key() -> None:
    """The key's field table is built from policy/vocabulary.py: each Source/Operation field
    and its not* twin read the same, non-empty set of attributes (a field missing from the key
    would let a cached decision answer a request that differs in it)."""
    from meshward.policy.vocabulary import OPERATION_FORMS, SOURCE_FORMS

    sample: dict[str, Any] = {"ports": (80,)}
    seen: dict[str, tuple[str, ...]] = {}
    for forms, build in ((SOURCE_FORMS, _source_rule), (OPERATION_FORMS, _operation_rule)):
        for form in forms:
            values = sample.get(form.pair.name, ("x",))
            read = attributes_read([_policy(build(form.attr, values))]).attributes
            assert read, form.key
            assert seen.setdefault(form.pair.name, read) == read, form.key


def _source_rule(attr: str, values: tuple[Any, ...]) -> Rule:
    return Rule(sources=(Source(**{attr: values}),))


def _operation_rule(attr: str, values: tuple[Any, ...]) -> Rule:
    return Rule(operations=(Operation(**{attr: values}),))


def test_namespaces_read_the_peer_principal_and_remote_ip_its_fallback() -> None:
    plan = attributes_read(
        [_policy(Rule(sources=(Source(not_namespaces=("x",), remote_ip_blocks=("1.0.0.0/8",)),)))]
    )
    assert plan.attributes == tuple(sorted((P.REMOTE_IP, P.SOURCE_PRINCIPAL, P.SOURCE_IP)))
    assert not plan.reads_token


def test_rules_reading_nothing_give_an_empty_key() -> None:
    plan = attributes_read([_policy(Rule()), _policy(action=Action.DENY, name="q")])
    assert plan.attributes == ()
    assert key_function(())(_facts()) == ()


def test_custom_hook_or_unknown_key_makes_the_workload_uncacheable() -> None:
    custom = _policy(Rule(), action=Action.CUSTOM, provider="opa")
    assert attributes_read([custom]).cacheable  # no hook: a matching CUSTOM denies (fail closed)
    hooked = attributes_read([custom], custom_hook=True)
    assert not hooked.cacheable and "custom hook" in hooked.reason
    odd = attributes_read(
        [_policy(Rule(conditions=(Condition(key="experimental.x", values=("1",)),)))]
    )
    assert not odd.cacheable and "experimental.x" in odd.reason


def test_tcp_ports_make_the_destination_port_part_of_the_key() -> None:
    assert attributes_read([], tcp_ports=True).attributes == (P.DESTINATION_PORT,)


def test_expiries_are_collected_sorted() -> None:
    later, sooner = NOW + timedelta(hours=2), NOW + timedelta(hours=1)
    plan = attributes_read(
        [_policy(name="a", expires_at=later), _policy(name="b", expires_at=sooner)]
    )
    assert plan.expiries == (sooner, later)


def test_key_ignores_what_no_rule_reads() -> None:
    key = key_function((P.PATH, "request.headers[x-team]"))
    a = _facts(path="/a", headers={"x-team": "red", "x-request-id": "1", "traceparent": "00-aa"})
    b = _facts(
        path="/a", headers={"x-team": "red", "x-request-id": "2"}, method="POST", host="other"
    )
    assert key(a) == key(b)
    assert key(a) != key(_facts(path="/a", headers={"x-team": "blue"}))
    assert key(a) != key(_facts(path="/b", headers={"x-team": "red"}))
    assert key(_facts(path="/a")) != key(
        _facts(path="/a", headers={"x-team": ""})
    )  # absent != empty


def test_claim_keys_keep_types_absence_and_anonymity_apart() -> None:
    key = key_function(("request.auth.claims[g]",))
    values = [
        key(_facts(claims=None)),  # anonymous
        key(_facts(claims={})),  # token without the claim
        key(_facts(claims={"g": "1"})),
        key(_facts(claims={"g": 1})),
        key(_facts(claims={"g": True})),
        key(_facts(claims={"g": ["1"]})),
        key(_facts(claims={"g": {"1": 1}})),
        key(_facts(claims={"g": "\x00missing"})),
    ]
    assert len(set(values)) == len(values)
    assert key(_facts(claims={"g": ["a", "b"], "other": 1})) == key(
        _facts(claims={"g": ["a", "b"]})
    )


def test_request_principal_key_distinguishes_missing_sub() -> None:
    key = key_function((P.AUTH_PRINCIPAL,))
    assert key(_facts(claims={"iss": "i", "sub": ""})) != key(_facts(claims={"iss": "i"}))
    assert key(_facts(claims={"iss": "i", "sub": "s", "x": 1})) == key(
        _facts(claims={"iss": "i", "sub": "s"})
    )


# ---- soundness against the real evaluator -------------------------------------------------------

PRINCIPALS = ["cluster.local/ns/a/sa/x", "cluster.local/ns/b/sa/*", "*"]
PEERS = [None, "spiffe://cluster.local/ns/a/sa/x", "spiffe://cluster.local/ns/b/sa/y"]
PATHS = ["/admin", "/admin/x", "/public", "/a/../admin", "//admin", "/x?q=1"]
PATTERNS = ["/admin", "/admin/*", "/public*", "*"]
CLAIMS = [
    None,
    {},
    {"iss": "i", "sub": "s"},
    {"iss": "i", "sub": "s", "groups": ["admin"]},
    {"iss": "i", "sub": "t", "groups": "dev", "aud": ["api"]},
    {"iss": "j", "sub": "s", "groups": []},
]
HEADERS = [{}, {"x-team": "red"}, {"x-team": "red,blue"}, {"x-team": ""}, {"x-other": "1"}]

sources = st.builds(
    Source,
    principals=st.lists(st.sampled_from(PRINCIPALS), max_size=2).map(tuple),
    not_namespaces=st.lists(st.sampled_from(["a", "b"]), max_size=1).map(tuple),
    request_principals=st.lists(st.sampled_from(["i/s", "i/*", "*"]), max_size=1).map(tuple),
)
operations = st.builds(
    Operation,
    methods=st.lists(st.sampled_from(["GET", "POST"]), max_size=1).map(tuple),
    paths=st.lists(st.sampled_from(PATTERNS), max_size=2).map(tuple),
    hosts=st.lists(st.sampled_from(["h", "*.example"]), max_size=1).map(tuple),
)
conditions = st.one_of(
    st.builds(
        Condition,
        key=st.just("request.auth.claims[groups]"),
        values=st.sampled_from([("admin",), ("dev", "*")]),
    ),
    st.builds(
        Condition,
        key=st.just("request.headers[x-team]"),
        values=st.sampled_from([("red",), ("*",), ("blue",)]),
    ),
    st.builds(Condition, key=st.just("request.auth.audiences"), values=st.just(("api",))),
    st.builds(Condition, key=st.just("source.namespace"), not_values=st.just(("a",))),
)
rules = st.builds(
    Rule,
    sources=st.lists(sources, max_size=1).map(tuple),
    operations=st.lists(operations, max_size=1).map(tuple),
    conditions=st.lists(conditions, max_size=2).map(tuple),
)
policies = st.lists(
    st.tuples(
        st.sampled_from([Action.ALLOW, Action.DENY, Action.AUDIT, Action.CUSTOM]),
        st.lists(rules, max_size=2),
        st.booleans(),
    ),
    min_size=1,
    max_size=3,
)
requests = st.builds(
    Request,
    method=st.sampled_from(["GET", "POST"]),
    path=st.sampled_from(PATHS),
    host=st.sampled_from(["h", "a.example", ""]),
    destination_port=st.just(8000),
    source_principal=st.sampled_from(PEERS),
    headers=st.sampled_from(HEADERS),
    claims=st.sampled_from(CLAIMS),
)


def _facts_of(request: Request) -> RequestFacts:
    return RequestFacts(
        method=request.method,
        path=normalize_path(request.path),
        host=request.host,
        destination_port=request.destination_port,
        source_principal=request.source_principal,
        source_ip=request.source_ip,
        destination_ip=request.destination_ip,
        sni=request.sni,
        headers=request.headers,
        claims=request.claims,
    )


def _blend(plan_attributes: tuple[str, ...], first: Request, noise: Request) -> Request:
    """``first`` with every attribute the plan does NOT read taken from ``noise``."""
    read = set(plan_attributes)

    def pick(attribute: str, a: Any, b: Any) -> Any:
        return a if attribute in read else b

    header_names = {a[len(P.HEADER_PREFIX) : -1] for a in read if a.startswith(P.HEADER_PREFIX)}
    headers = {k: v for k, v in noise.headers.items() if k not in header_names}
    headers.update({k: v for k, v in first.headers.items() if k in header_names})
    reads_token = any(a.startswith("request.auth.") for a in read)
    return Request(
        method=pick(P.METHOD, first.method, noise.method),
        path=pick(P.PATH, first.path, noise.path),
        host=pick(P.HOST, first.host, noise.host),
        destination_port=first.destination_port,
        source_principal=pick(P.SOURCE_PRINCIPAL, first.source_principal, noise.source_principal),
        headers=headers,
        claims=first.claims if reads_token else noise.claims,
    )


@settings(max_examples=400, deadline=None)
@given(policies, requests, requests)
def test_requests_with_equal_keys_get_equal_decisions(
    spec: Any, first: Request, noise: Request
) -> None:
    workload = Workload(namespace="foo", name="w", labels={"app": "w"})
    docs = [
        AuthorizationPolicy(
            namespace="foo",
            name=f"p{i}",
            action=action,
            rules=tuple(rs),
            dry_run=dry,
            provider="ext" if action is Action.CUSTOM else None,
        )
        for i, (action, rs, dry) in enumerate(spec)
    ]
    policy_set = PolicySet.create(workloads=[workload], authorization_policies=docs)
    plan = attributes_read(policy_set.policies_for(workload))
    assert plan.attributes is not None
    second = _blend(plan.attributes, first, noise)
    key = key_function(plan.attributes)
    assert key(_facts_of(first)) == key(_facts_of(second))
    a = evaluate(policy_set, workload, first, now=NOW)
    b = evaluate(policy_set, workload, second, now=NOW)
    assert (a.allowed, a.policy, a.rule, a.dry_run, a.audit_policies) == (
        b.allowed,
        b.policy,
        b.rule,
        b.dry_run,
        b.audit_policies,
    )
