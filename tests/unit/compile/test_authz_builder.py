"""The seam between the plan and the generators (meshward.compile.authz.builder): which rules
each RBAC filter of a chain gets, with which action, enforced or shadow, indexed or not. The
rendered Envoy config of the same cases is pinned by the feature pairs (test_features.py)."""

from __future__ import annotations

from meshward.compile import names
from meshward.compile.authz import RbacEngine, build_tcp, http_rbac_engines, place
from meshward.policy.model import Action, AuthorizationPolicy, Operation, Rule, Source

BAR = Rule(sources=(Source(principals=("cluster.local/ns/bar/sa/client",)),))
GET = Rule(operations=(Operation(methods=("GET",)),))
JWT = Rule(sources=(Source(request_principals=("https://issuer.example/*",)),))


def _policy(name: str, action: Action, *rules: Rule, dry_run: bool = False) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        namespace="foo",
        name=name,
        action=action,
        rules=rules,
        dry_run=dry_run,
        provider="authz" if action is Action.CUSTOM else None,
    )


def _shape(engines: list[RbacEngine]) -> list[tuple[str, str, bool, bool, bool, list[str]]]:
    return [
        (
            e.filter,
            e.action,
            e.enforced,
            e.indexed,
            e.indexed_verdict,
            [r.rbac_name for r in e.rules],
        )
        for e in engines
    ]


def test_deny_then_allow_both_enforced() -> None:
    placement = place([_policy("allow", Action.ALLOW, BAR), _policy("deny", Action.DENY, GET)])
    assert _shape(http_rbac_engines(placement)) == [
        (names.RBAC_DENY, "DENY", True, False, False, ["ns[foo]-policy[deny]-rule[0]"]),
        (names.RBAC_ALLOW, "ALLOW", True, False, False, ["ns[foo]-policy[allow]-rule[0]"]),
    ]


def test_dry_run_and_audit_are_shadow_engines_only() -> None:
    placement = place(
        [
            _policy("dry-deny", Action.DENY, GET, dry_run=True),
            _policy("dry-allow", Action.ALLOW, BAR, dry_run=True),
            _policy("audit", Action.AUDIT, GET),
        ]
    )
    assert _shape(http_rbac_engines(placement)) == [
        (
            names.RBAC_DRY_RUN_DENY,
            "DENY",
            False,
            False,
            False,
            ["ns[foo]-policy[dry-deny]-rule[0]"],
        ),
        (
            names.RBAC_DRY_RUN_ALLOW,
            "ALLOW",
            False,
            False,
            False,
            ["ns[foo]-policy[dry-allow]-rule[0]"],
        ),
        (names.RBAC_AUDIT, "LOG", False, False, False, ["ns[foo]-policy[audit]-rule[0]"]),
    ]
    # No enforced ALLOW policy: no ALLOW engine, nothing is denied by default.
    assert not placement.has_allow


def test_allow_union_runs_native_allow_rules_as_shadow() -> None:
    """A JWT ALLOW rule decided by ext_authz: the native ALLOW rules only say whether they
    allowed (shadow), so ext_authz can be skipped when they did."""
    placement = place([_policy("native", Action.ALLOW, BAR), _policy("jwt", Action.ALLOW, JWT)])
    assert placement.union_shadow and not placement.extauthz_always
    assert _shape(http_rbac_engines(placement)) == [
        (names.RBAC_ALLOW, "ALLOW", False, False, False, ["ns[foo]-policy[native]-rule[0]"]),
    ]
    # With jwt_authn (native JWT) the same rules are all enforced RBAC.
    native = place(
        [_policy("native", Action.ALLOW, BAR), _policy("jwt", Action.ALLOW, JWT)], jwt_native=True
    )
    assert [e.enforced for e in http_rbac_engines(native)] == [True]


def test_custom_gates_ext_authz_with_a_shadow_engine_in_the_allow_filter() -> None:
    """CUSTOM rules are all ext_authz is for: native ALLOW rules stay enforced and the CUSTOM
    rules become the ALLOW filter's shadow DENY engine, whose verdict gates ext_authz (only
    requests a CUSTOM rule matches reach it, as in Istio). With an ext_authz ALLOW rule too,
    ext_authz must see every request: the ALLOW filter gets no rules at all and ext_authz
    decides the whole policy."""
    placement = place([_policy("native", Action.ALLOW, BAR), _policy("ext", Action.CUSTOM, GET)])
    assert placement.custom_gated and not placement.extauthz_always and placement.uses_extauthz
    assert _shape(http_rbac_engines(placement)) == [
        (names.RBAC_ALLOW, "ALLOW", True, False, False, ["ns[foo]-policy[native]-rule[0]"]),
        (names.RBAC_ALLOW, "DENY", False, False, False, ["ns[foo]-policy[ext]-rule[0]"]),
    ]
    with_jwt = place(
        [
            _policy("native", Action.ALLOW, BAR),
            _policy("jwt", Action.ALLOW, JWT),
            _policy("ext", Action.CUSTOM, GET),
        ]
    )
    assert with_jwt.extauthz_always and not with_jwt.custom_gated
    assert http_rbac_engines(with_jwt) == []


def test_principal_index_gets_its_own_filters_and_the_allow_union_holds() -> None:
    callers = [
        Rule(sources=(Source(principals=(f"cluster.local/ns/bar/sa/c{i}",)),)) for i in range(3)
    ]
    placement = place(
        [
            _policy("allow", Action.ALLOW, *callers, GET),
            _policy("deny", Action.DENY, BAR),
        ]
    )
    shape = _shape(http_rbac_engines(placement, index_min_rules=1, trust_domain="cluster.local"))
    indexed_allow = [f"ns[foo]-policy[allow]-rule[{i}]" for i in range(3)]
    assert shape == [
        (names.RBAC_DENY_INDEXED, "DENY", True, True, False, ["ns[foo]-policy[deny]-rule[0]"]),
        (names.RBAC_ALLOW_INDEXED, "ALLOW", False, True, False, indexed_allow),
        (names.RBAC_ALLOW, "ALLOW", True, False, True, ["ns[foo]-policy[allow]-rule[3]"]),
    ]
    # Below the threshold nothing is indexed.
    assert [e.indexed for e in http_rbac_engines(placement, index_min_rules=None)] == [False, False]


def test_tcp_builder_denies_custom_and_keeps_default_deny() -> None:
    """On a TCP port CUSTOM is a DENY (no provider for TCP: fail closed), DENY rules lose
    their HTTP fields, and an ALLOW policy whose rules all need HTTP still denies by default."""
    placement = place(
        [
            _policy("allow-get", Action.ALLOW, GET),
            _policy("deny", Action.DENY, Rule(sources=BAR.sources, operations=GET.operations)),
            _policy("ext", Action.CUSTOM, BAR),
        ]
    )
    filters = build_tcp(placement, {9000: 9000}, "inbound_9000")
    configs = [f["typed_config"] for f in filters]
    assert [
        (c["rules"].get("action", "ALLOW"), sorted(c["rules"]["policies"])) for c in configs
    ] == [
        ("DENY", ["ns[foo]-policy[deny]-rule[0]", "ns[foo]-policy[ext]-rule[0]"]),
        ("ALLOW", []),
    ]
    deny = configs[0]["rules"]["policies"]["ns[foo]-policy[deny]-rule[0]"]
    assert deny["permissions"] == [{"any": True}]  # methods dropped: denies more, never less


def test_dry_run_allow_nothing_is_an_empty_shadow_allow_engine() -> None:
    """A dry-run ALLOW without rules (or, on TCP, with only rules a connection cannot match)
    still gets its shadow engine, with no policies: Envoy then reports every request "shadow
    denied", the evaluator's would_deny (as in Istio). Without a dry-run ALLOW, no engine."""
    nothing = place([_policy("allow-nothing", Action.ALLOW, dry_run=True)])
    assert _shape(http_rbac_engines(nothing)) == [
        (names.RBAC_DRY_RUN_ALLOW, "ALLOW", False, False, False, [])
    ]
    http_only = place([_policy("dry-get", Action.ALLOW, GET, dry_run=True)])
    for placement in (nothing, http_only):
        [tcp] = [f["typed_config"] for f in build_tcp(placement, {9000: 9000}, "inbound_9000")]
        assert "rules" not in tcp and tcp["shadow_rules"] == {"action": "ALLOW", "policies": {}}
        assert tcp["shadow_rules_stat_prefix"] == names.DRY_RUN_ALLOW_PREFIX
    assert http_rbac_engines(place([_policy("deny", Action.DENY, GET, dry_run=True)]))[
        0
    ].filter == (names.RBAC_DRY_RUN_DENY)
    assert all(
        e.filter != names.RBAC_DRY_RUN_ALLOW
        for e in http_rbac_engines(place([_policy("allow", Action.ALLOW, BAR)]))
    )
    assert (
        build_tcp(place([_policy("deny", Action.DENY, GET, dry_run=True)]), {}, "s")[0][
            "typed_config"
        ]["shadow_rules"]["action"]
        == "DENY"
    )


def test_dry_run_allow_engine_holds_the_enforced_allow_rules() -> None:
    """A request an enforced ALLOW rule allows is not one the dry-run ALLOW would deny (the
    evaluator's would_deny), so the shadow engine holds those rules too, HTTP and TCP."""
    placement = place(
        [
            _policy("allow-nothing", Action.ALLOW, dry_run=True),
            _policy("allow-bar", Action.ALLOW, BAR),
        ]
    )
    assert _shape(http_rbac_engines(placement))[0] == (
        names.RBAC_DRY_RUN_ALLOW,
        "ALLOW",
        False,
        False,
        False,
        ["ns[foo]-policy[allow-bar]-rule[0]"],
    )
    dry, enforced = [f["typed_config"] for f in build_tcp(placement, {9000: 9000}, "s")]
    assert sorted(dry["shadow_rules"]["policies"]) == ["ns[foo]-policy[allow-bar]-rule[0]"]
    assert sorted(enforced["rules"]["policies"]) == ["ns[foo]-policy[allow-bar]-rule[0]"]
