"""Where each rule runs, and the reason given for it."""

from __future__ import annotations

from meshward.compile import Placement, needs_extauthz, place_rules
from meshward.policy.model import Action, AuthorizationPolicy, Condition, Operation, Rule, Source

NATIVE = Rule(
    sources=(Source(principals=("td/ns/a/sa/b",), namespaces=("a",), ip_blocks=("10.0.0.0/8",)),),
    operations=(Operation(hosts=("x",), methods=("GET",), paths=("/p",), ports=(80,)),),
    conditions=(
        Condition(key="request.headers[x-team]", values=("blue",)),
        Condition(key="source.ip", values=("10.0.0.1",)),
        Condition(key="connection.sni", values=("x",)),
        Condition(key="destination.port", values=("80",)),
    ),
)


def policy(action: Action, *rules: Rule, dry_run: bool = False) -> AuthorizationPolicy:
    provider = "opa" if action is Action.CUSTOM else None
    return AuthorizationPolicy(
        namespace="ns", name="p", action=action, rules=rules, provider=provider, dry_run=dry_run
    )


def test_everything_envoy_can_read_is_native() -> None:
    assert needs_extauthz(NATIVE) is None
    assert needs_extauthz(policy(Action.ALLOW, NATIVE, Rule())) is None


def test_jwt_rules_need_extauthz_and_say_which_field() -> None:
    rp = Rule(sources=(Source(request_principals=("iss/*",)),))
    nrp = Rule(sources=(Source(), Source(not_request_principals=("iss/x",))))
    claim = Rule(conditions=(Condition(key="request.auth.claims[groups]", values=("a",)),))
    assert needs_extauthz(rp) == "from[0].source.requestPrincipals reads the verified end-user JWT"
    assert (
        needs_extauthz(nrp) == "from[1].source.notRequestPrincipals reads the verified end-user JWT"
    )
    assert needs_extauthz(claim) == (
        "when[0] key request.auth.claims[groups] reads the verified end-user JWT"
    )
    reason = needs_extauthz(policy(Action.DENY, NATIVE, claim))
    assert reason is not None and reason.startswith("rules[1]: when[0]")


def test_custom_needs_extauthz_unless_it_has_no_rules() -> None:
    reason = needs_extauthz(policy(Action.CUSTOM, NATIVE))
    assert reason is not None and "CUSTOM" in reason and "'opa'" in reason
    assert needs_extauthz(policy(Action.CUSTOM)) is None  # no rules: never matches


def test_classification_per_rule() -> None:
    jwt = Rule(sources=(Source(request_principals=("*",)),))
    classes = place_rules(
        [
            policy(Action.ALLOW, NATIVE, jwt),
            policy(Action.DENY, NATIVE, dry_run=True),
            policy(Action.AUDIT, jwt),
        ]
    )
    assert [(c.placement, c.index) for c in classes] == [
        (Placement.NATIVE, 0),
        (Placement.EXTAUTHZ, 1),
        (Placement.NATIVE, 0),
        (Placement.INERT, 0),
    ]
    assert classes[0].rbac_name == "ns[ns]-policy[p]-rule[0]"
    assert "dry-run" in classes[2].reason
    assert classes[1].to_json()["placement"] == "ext_authz"


def test_tcp_classification_follows_istio() -> None:
    http = Rule(operations=(Operation(methods=("GET",)),))
    tcp = place_rules(
        [
            policy(Action.ALLOW, http, NATIVE),
            policy(Action.DENY, http),
            policy(Action.CUSTOM, http),
        ],
        tcp=True,
    )
    assert [c.placement for c in tcp] == [
        Placement.INERT,  # ALLOW with an HTTP field: no TCP connection matches
        Placement.INERT,
        Placement.NATIVE,  # DENY: HTTP fields dropped, denies more
        Placement.INERT,  # CUSTOM with an HTTP field: never matches on TCP
    ]
    assert "to[0].operation.methods" in tcp[0].reason
    assert "fail closed" in tcp[2].reason
