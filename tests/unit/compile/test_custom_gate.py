"""ext_authz sees only the requests a CUSTOM rule matches (AuthzPlacement.custom_gated), and
the compiled chain still decides like the evaluator: compiled config through the model of
Envoy's filters (meshward.testing.simulate), which the real-Envoy equivalence test keeps
faithful."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from meshward.compile import (
    CompileOptions,
    Endpoint,
    Mode,
    PortBinding,
    WorkloadBinding,
    compile_workload,
)
from meshward.compile.authz import place
from meshward.compile.workload import to_dict
from meshward.policy import Request, evaluate
from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    Condition,
    JwtEnforcement,
    Operation,
    Rule,
    Source,
)
from meshward.policy.policyset import PolicySet
from meshward.testing import simulate, synth

NOW = datetime(2030, 1, 1, tzinfo=UTC)
WEB = "spiffe://cluster.local/ns/shop/sa/web"
OTHER = "spiffe://cluster.local/ns/shop/sa/batch"
SELECT = {"app": synth.TARGET_NAME}
CUSTOM = AuthorizationPolicy(
    "shop",
    "ext-review",
    Action.CUSTOM,
    SELECT,
    (Rule(operations=(Operation(paths=("/ext*",)),)),),
    provider="test-authz",
)
ALLOW_WEB = AuthorizationPolicy(
    "shop",
    "allow-web",
    Action.ALLOW,
    SELECT,
    (Rule(sources=(Source(principals=("cluster.local/ns/shop/sa/web",)),)),),
)
DENY_ADMIN = AuthorizationPolicy(
    "shop", "deny-admin", Action.DENY, SELECT, (Rule(operations=(Operation(paths=("/admin*",)),)),)
)
JWT_ALLOW = AuthorizationPolicy(
    "shop",
    "allow-admins",
    Action.ALLOW,
    SELECT,
    (Rule(conditions=(Condition(key="request.auth.claims[groups]", values=("admin",)),)),),
)


def _policy_set(
    *policies: AuthorizationPolicy, jwt: JwtEnforcement = JwtEnforcement.NATIVE
) -> PolicySet:
    base = synth.random_policy_set(0, synth.Profile())
    return PolicySet.create(
        mesh=replace(base.mesh, jwt_enforcement=jwt),
        workloads=base.workloads,
        authorization_policies=policies,
    )


def _run(
    policy_set: PolicySet, method: str, path: str, peer: str | None, headers: Mapping[str, str] = {}
) -> tuple[int, bool]:
    options = CompileOptions(
        mode=Mode.STATIC,
        bindings={
            synth.TARGET_REF: WorkloadBinding(
                ports={
                    p: PortBinding(
                        listen=Endpoint("127.0.0.1", 10000 + p), app=Endpoint("127.0.0.1", 1)
                    )
                    for p in synth.HTTP_PORTS
                }
            )
        },
        extauthz=Endpoint("127.0.0.1", 9191),
        outbound=False,
    )
    resources = compile_workload(policy_set, synth.TARGET_REF, options, now=NOW)
    listener = next(
        to_dict(item)
        for item in resources.listeners
        if to_dict(item)["address"]["socket_address"]["port_value"] == 18080
    )
    workload = policy_set.workload(synth.TARGET_REF)

    def request(path_seen: str) -> Request:
        return Request(
            method=method,
            path=path_seen,
            destination_port=8080,
            source_principal=peer,
            headers=dict(headers),
        )

    def check(conn: simulate.Connection, path_seen: str, context: Mapping[str, str]) -> bool:
        return evaluate(
            policy_set, workload, request(path_seen), now=NOW, custom=synth.custom_provider
        ).allowed

    conn = simulate.Connection(
        method=method, path=path, host="api.shop", headers=dict(headers), port=18080, peer_uri=peer
    )
    outcome = simulate.run(listener, conn, check, lambda c, cfg: None)
    want = evaluate(policy_set, workload, request(path), now=NOW, custom=synth.custom_provider)
    assert (outcome.status == 200) == want.allowed, (path, outcome, want.reason)
    return outcome.status, outcome.extauthz_called


@pytest.mark.parametrize(
    ("method", "path", "peer", "headers", "status", "called"),
    [
        ("GET", "/ext/a", WEB, {}, 200, True),  # the CUSTOM rule matches: the provider decides
        ("GET", "/ext/a", WEB, {"x-custom": "deny"}, 403, True),
        ("GET", "/other", WEB, {}, 200, False),  # no CUSTOM match: ext_authz is not asked
        ("POST", "/other/x", WEB, {}, 200, False),
        ("GET", "/ext/a", OTHER, {}, 403, False),  # RBAC ALLOW denies first (same verdict)
        ("GET", "/admin", WEB, {}, 403, False),  # RBAC DENY
        ("GET", "/ext/a", None, {}, 403, False),  # plaintext: no ALLOW principal matches
    ],
)
def test_only_requests_a_custom_rule_matches_reach_ext_authz(
    method: str, path: str, peer: str | None, headers: dict[str, str], status: int, called: bool
) -> None:
    policy_set = _policy_set(CUSTOM, ALLOW_WEB, DENY_ADMIN)
    assert _run(policy_set, method, path, peer, headers) == (status, called)


def test_without_allow_policies_the_gate_alone_decides_who_is_asked() -> None:
    policy_set = _policy_set(CUSTOM)
    assert _run(policy_set, "GET", "/ext/1", OTHER) == (200, True)
    assert _run(policy_set, "GET", "/ext/1", OTHER, {"x-custom": "deny"}) == (403, True)
    assert _run(policy_set, "GET", "/else", OTHER, {"x-custom": "deny"}) == (200, False)


def test_ext_authz_rules_besides_custom_keep_ext_authz_on_every_request() -> None:
    """Under jwtEnforcement: extauthz a JWT rule is ext_authz's: no gate (the ALLOW union
    owns the shadow engine), and ext_authz sees every request it saw before."""
    policy_set = _policy_set(CUSTOM, JWT_ALLOW, jwt=JwtEnforcement.EXTAUTHZ)
    workload = policy_set.workload(synth.TARGET_REF)
    authz = place(policy_set.policies_for(workload, NOW), jwt_native=False)
    assert not authz.custom_gated and authz.extauthz_always
    assert _run(policy_set, "GET", "/else", WEB) == (403, True)
    native = _policy_set(CUSTOM, JWT_ALLOW)
    native_plan = place(
        native.policies_for(native.workload(synth.TARGET_REF), NOW), jwt_native=True
    )
    assert native_plan.custom_gated and "CUSTOM rule matches" in native_plan.summary()


def test_a_custom_rule_reading_the_token_under_extauthz_mode_is_not_gated() -> None:
    reads_token = replace(
        CUSTOM,
        rules=(Rule(sources=(Source(not_request_principals=("*",)),)),),
    )
    policy_set = _policy_set(reads_token, ALLOW_WEB, jwt=JwtEnforcement.EXTAUTHZ)
    authz = place(
        policy_set.policies_for(policy_set.workload(synth.TARGET_REF), NOW), jwt_native=False
    )
    assert not authz.custom_gated
    # token-less: the CUSTOM rule matches, the provider is asked (and allows, its default)
    assert _run(policy_set, "GET", "/anything", WEB) == (200, True)
    assert _run(policy_set, "GET", "/anything", WEB, {"x-custom": "deny"}) == (403, True)
