"""The principal index takes rules that name callers by prefix or namespace, not only by exact
identity: a prefix map on the peer's URI SAN (meshward.compile.authz.principal_index). Decisions are checked
against meshward.policy.evaluate through the Envoy model (meshward.testing.simulate), including
peers of other trust domains, which Istio's namespace matching admits; the real-Envoy check is
tests/integration/test_compile_equivalence.py ("keyed+indexed")."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from meshward.compile import (
    CompileOptions,
    Endpoint,
    Mode,
    PortBinding,
    WorkloadBinding,
    compile_workload,
)
from meshward.compile.authz import place_rules
from meshward.compile.authz import principal_index as index
from meshward.compile.workload import to_dict
from meshward.policy import PolicySet, Request, evaluate
from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    MeshConfig,
    MtlsMode,
    Operation,
    PeerAuthentication,
    Rule,
    Source,
    Workload,
    WorkloadPort,
)
from meshward.testing import simulate

NOW = datetime(2030, 1, 1, tzinfo=UTC)
TD = "cluster.local"
API = Workload("shop", "api", {"app": "api"}, "api", ports=(WorkloadPort("http", 8080),))
RUNTIME = 18080


def _policy(name: str, *rules: Rule, action: Action = Action.ALLOW) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        namespace="shop", name=name, action=action, selector={"app": "api"}, rules=rules
    )


def _keyed_rules(count: int) -> list[Rule]:
    """Rules the exact-identity index could not take: namespaces, namespace prefixes, principal
    prefixes, principals with notPrincipals."""
    out: list[Rule] = []
    for i in range(count):
        source = [
            Source(namespaces=(f"team-{i}",)),
            Source(namespaces=(f"grp-{i}*",)),
            Source(principals=(f"{TD}/ns/team-{i}/sa/svc-*",)),
            Source(
                principals=(f"{TD}/ns/team-{i}/*",),
                not_principals=(f"{TD}/ns/team-{i}/sa/banned",),
            ),
        ][i % 4]
        out.append(Rule(sources=(source,), operations=(Operation(paths=(f"/{i}/*",)),)))
    return out


def _policy_set(*policies: AuthorizationPolicy) -> PolicySet:
    return PolicySet.create(
        mesh=MeshConfig(trust_domain=TD),
        workloads=[API],
        authorization_policies=list(policies),
        peer_authentications=[PeerAuthentication("shop", "default", mode=MtlsMode.STRICT)],
    )


def _compile(ps: PolicySet, index_min_rules: int | None = 16) -> dict[str, Any]:
    options = CompileOptions(
        mode=Mode.STATIC,
        bindings={
            API.ref: WorkloadBinding(
                ports={
                    8080: PortBinding(
                        listen=Endpoint("127.0.0.1", RUNTIME), app=Endpoint("127.0.0.1", 1)
                    )
                }
            )
        },
        outbound=False,
        rbac_index_min_rules=index_min_rules,
    )
    resources = compile_workload(ps, API.ref, options, now=NOW)
    (listener,) = [to_dict(x) for x in resources.listeners]
    return listener


def _decide(listener: dict[str, Any], ps: PolicySet, peer: str, path: str) -> tuple[int, bool]:
    conn = simulate.Connection(
        method="GET", path=path, host="api.shop", headers={}, port=RUNTIME, peer_uri=peer
    )
    got = simulate.run(listener, conn).status
    request = Request(
        method="GET",
        path=path,
        host="api.shop",
        destination_port=8080,
        source_principal=peer,
        source_ip="127.0.0.1",
        destination_ip="127.0.0.1",
    )
    return got, evaluate(ps, API, request, now=NOW).allowed


PEERS = [
    f"spiffe://{TD}/ns/team-1/sa/svc-a",
    f"spiffe://{TD}/ns/team-2/sa/svc-x",
    f"spiffe://{TD}/ns/team-3/sa/banned",
    f"spiffe://{TD}/ns/team-3/sa/other",
    f"spiffe://{TD}/ns/team-0/sa/anyone",
    f"spiffe://{TD}/ns/team-12/sa/svc-a",
    f"spiffe://{TD}/ns/grp-5x/sa/a",
    f"spiffe://{TD}/ns/grp-5/sa/a",
    f"spiffe://{TD}/ns/shop/sa/web",
    f"spiffe://{TD}/ns/zz/sa/web",
    # Other trust domains: Istio's namespace ignores the trust domain, principals do not.
    "spiffe://other.td/ns/team-0/sa/x",
    "spiffe://other.td/ns/team-4/sa/svc-a",
    "spiffe://other.td/ns/grp-1y/sa/x",
    "spiffe://cluster.local.evil/ns/team-4/sa/x",
    "spiffe://cluster/ns/team-0/sa/x",
]
PATHS = ["/99/a", "/0/a", "/1/a", "/2/a", "/3/a", "/4/a", "/5/a", "/12/a", "/13/a", "/x"]


@pytest.mark.parametrize("with_exact", [False, True], ids=["keyed", "keyed+exact"])
@pytest.mark.parametrize("deny", [False, True], ids=["allow", "deny"])
def test_keyed_rules_are_indexed_and_decide_like_the_evaluator(
    with_exact: bool, deny: bool
) -> None:
    rules = _keyed_rules(40)
    if with_exact:  # exact identities whose keys are prefixes of each other (svc-1, svc-12)
        rules += [
            Rule(
                sources=(Source(principals=(f"{TD}/ns/team-1/sa/svc-{i}",)),),
                operations=(Operation(paths=(f"/{i}/*",)),),
            )
            for i in (1, 12, 13)
        ]
        # A key in another trust domain: its peers can still match the namespace rules.
        rules.append(
            Rule(
                sources=(Source(principals=("other.td/ns/team-4/sa/svc-a",)),),
                operations=(Operation(paths=("/99/*",)),),
            )
        )
    action = Action.DENY if deny else Action.ALLOW
    policies = [_policy("keyed", *rules, action=action)]
    if deny:  # something to deny from: everything else allowed
        policies.append(_policy("all", Rule()))
    ps = _policy_set(*policies)
    listener = _compile(ps)
    text = json.dumps(listener)
    assert "prefix_match_map" in text
    filter_name = "meshward.rbac.deny_indexed" if deny else "meshward.rbac.allow"
    assert filter_name in text
    vhost = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    rbac = vhost["virtual_hosts"][0]["typed_per_filter_config"][filter_name]["rbac"]
    tree = rbac["matcher"]["matcher_tree"]["prefix_match_map"]["map"]
    assert f"spiffe://{TD}/ns/team-0/" in tree  # a namespace
    assert f"spiffe://{TD}/ns/grp-1" in tree  # a namespace prefix
    assert f"spiffe://{TD}/ns/team-2/sa/svc-" in tree  # a principal prefix
    assert f"spiffe://{TD}/" in tree  # own peers never walk the other-domain branch
    mismatches = []
    outcomes = set()
    for peer in PEERS:
        for path in PATHS:
            got, allowed = _decide(listener, ps, peer, path)
            outcomes.add(got)
            if got != (200 if allowed else 403):
                mismatches.append(f"{peer} {path}: model {got}, evaluator {allowed}")
    assert not mismatches, "\n".join(mismatches[:10])
    assert outcomes == {200, 403}


def test_an_own_domain_peer_in_an_unnamed_namespace_walks_no_rule() -> None:
    """The entry for ``spiffe://<td>/`` is empty: a local peer the rules do not name is
    answered by one lookup, not a walk over the namespace rules kept for foreign peers."""
    ps = _policy_set(_policy("keyed", *_keyed_rules(40)))
    rules = place_rules(ps.policies_for(API, NOW))
    layout = index._layout(rules, TD)
    assert layout.entries[f"spiffe://{TD}/"] == ()
    assert layout.entries[f"spiffe://{TD}/ns/team-0/"]  # the namespace rule
    assert len(layout.any_td) == 20  # the namespace rules: what a foreign peer can match


def test_unkeyable_rules_stay_in_the_rules_engine() -> None:
    unkeyable = [
        Rule(sources=(Source(principals=("*/sa/web",)),)),  # suffix
        Rule(sources=(Source(namespaces=("*ps",)),)),  # namespace suffix
        Rule(sources=(Source(not_principals=(f"{TD}/ns/a/sa/b",)),)),  # only a negation
        Rule(sources=(Source(ip_blocks=("10.0.0.0/8",)),)),
        Rule(operations=(Operation(methods=("GET",)),)),  # no from
        Rule(sources=(Source(principals=("*",)),)),
    ]
    ps = _policy_set(_policy("keyed", *_keyed_rules(20)), _policy("plain", *unkeyable))
    rules = place_rules(ps.policies_for(API, NOW))
    indexed, plain = index.split(rules, 16, TD)
    assert len(indexed) == 20
    assert sorted(r.rbac_name for r in plain) == sorted(
        f"ns[shop]-policy[plain]-rule[{i}]" for i in range(6)
    )
    # Without the trust domain namespaces cannot be keyed.
    indexed, _ = index.split(rules, 1, "")
    assert len(indexed) == 10


def test_the_entry_budget_falls_back_to_exact_identities(monkeypatch: pytest.MonkeyPatch) -> None:
    """A namespace rule is filed under every exact caller of that namespace: past the budget,
    only rules naming exact identities are indexed (the route stays small)."""
    exact = [Rule(sources=(Source(principals=(f"{TD}/ns/team-0/sa/svc-{i}",)),)) for i in range(20)]
    ps = _policy_set(_policy("mixed", *exact, *_keyed_rules(20)))
    rules = place_rules(ps.policies_for(API, NOW))
    assert len(index.split(rules, 16, TD)[0]) == 40
    monkeypatch.setattr(index, "MAX_ENTRY_RULES", 30)
    indexed, plain = index.split(rules, 16, TD)
    assert len(indexed) == 20 and all(index.exact_principals(r) for r in indexed)
    assert len(plain) == 20


def test_layout_entries_hold_every_rule_filed_under_a_prefix_of_their_key() -> None:
    """Both ways _layout finds a key's rules (its prefixes tried, or the filed keys tried:
    whichever is fewer) give what the definition says, on a fleet (few keys a workload) and
    a workload called by 80 named callers (more keys than a SAN has characters)."""
    from meshward.compile import authz
    from meshward.compile.authz import principal_index
    from meshward.policy import parse
    from meshward.testing import topology

    principals = ", ".join(f'"cluster.local/ns/n{i % 7}/sa/caller{i}"' for i in range(80))
    many = parse(
        {
            "m.yaml": f"""---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {{name: orders, namespace: shop, labels: {{app: orders}}}}
spec:
  ports: [{{name: http, port: 8080, protocol: HTTP}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: callers, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  rules:
  - from: [{{source: {{principals: [{principals}]}}}}]
  - from: [{{source: {{namespaces: [n1, n2]}}}}]
"""
        }
    )
    checked = {"few": 0, "many": 0}
    for ps in (topology.fleet(30), many):
        domain = ps.mesh.trust_domain
        for workload in ps.workloads:
            placed = authz.place(
                ps.policies_for(workload, None), ps.request_authentications_for(workload)
            )
            keyed = [r for r in placed.rules if principal_index.rule_keys(r, domain) is not None]
            if not keyed:
                continue
            layout = principal_index._layout(keyed, domain)
            filed: dict[str, set[int]] = {}
            for pos, rule in enumerate(layout.rules):
                for key, _ in principal_index.rule_keys(rule, domain) or ():
                    filed.setdefault(key, set()).add(pos)
            for key, members in layout.entries.items():
                expected = {p for f, ps_ in filed.items() if f and key.startswith(f) for p in ps_}
                if layout.any_td and not key.startswith(layout.own):
                    expected |= set(layout.any_td)
                assert members == tuple(sorted(expected)), key
                checked["many" if len(filed) >= len(key) else "few"] += 1
    assert checked["few"] > 0 and checked["many"] > 0
