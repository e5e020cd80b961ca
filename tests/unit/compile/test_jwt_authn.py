"""RequestAuthentication -> jwt_authn, and JWT rules -> RBAC metadata matchers (issue 16).

The matchers are checked against the evaluator's own predicates through the Envoy model
(meshward.testing.simulate); tests/integration/test_compile_equivalence.py drives real Envoy.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from meshward.compile import CompileOptions, Endpoint, compile_workload
from meshward.compile.authz import jwt_authn
from meshward.compile.workload import to_dict
from meshward.policy import PolicySet
from meshward.policy.matching import claim_values, strings_predicate
from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    JwtEnforcement,
    JwtHeader,
    JwtRule,
    MeshConfig,
    RequestAuthentication,
    Rule,
    Source,
    Workload,
    WorkloadPort,
)
from meshward.policy.request_principal import split_pattern
from meshward.testing import simulate

JWKS = '{"keys":[{"kty":"oct","k":"c2VjcmV0","alg":"HS256"}]}'


def _ra(name: str, *rules: JwtRule) -> RequestAuthentication:
    return RequestAuthentication(
        namespace="shop", name=name, selector={"app": "api"}, jwt_rules=rules
    )


def _set(
    *policies: AuthorizationPolicy,
    ras: tuple[RequestAuthentication, ...] = (),
    jwt: JwtEnforcement = JwtEnforcement.NATIVE,
) -> PolicySet:
    return PolicySet.create(
        mesh=MeshConfig(jwt_enforcement=jwt),
        workloads=[
            Workload(
                namespace="shop",
                name="api",
                labels={"app": "api"},
                ports=(WorkloadPort("http", 8080),),
            )
        ],
        authorization_policies=policies,
        request_authentications=ras,
    )


def _filters(policy_set: PolicySet) -> list[dict[str, Any]]:
    resources = compile_workload(
        policy_set,
        "shop/api",
        CompileOptions(extauthz=Endpoint("127.0.0.1", 9191), jwks={"https://idp/jwks": JWKS}),
    )
    (listener,) = [to_dict(x) for x in resources.listeners if "inbound" in x.name]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    filters: list[dict[str, Any]] = hcm["http_filters"]
    return filters


def test_one_provider_per_issuer_with_istio_semantics() -> None:
    ras = (
        _ra(
            "a",
            JwtRule(
                issuer="https://idp",
                jwks_uri="https://idp/jwks",
                audiences=("x",),
                from_headers=(JwtHeader("X-Token", "Tok "),),
                forward_original_token=True,
                output_payload_to_header="x-payload",
            ),
        ),
        _ra(
            "b",
            JwtRule(
                issuer="https://idp",
                jwks_uri="https://idp/jwks",
                audiences=("y",),
                from_params=("t",),
            ),
        ),
        _ra("c", JwtRule(issuer="https://other", jwks_uri="https://other/unfetched")),
    )
    filters = _filters(_set(ras=ras))
    names = [f["name"] for f in filters]
    assert names[1] == jwt_authn.FILTER_JWT_AUTHN  # first after the header mutation
    assert not any("ext_authz" in n for n in names)  # no Python on the request path
    config = filters[1]["typed_config"]
    providers = config["providers"]
    assert sorted(p["issuer"] for p in providers.values()) == ["https://idp", "https://other"]
    idp = providers["origins-0"]
    assert idp["audiences"] == ["x", "y"]
    assert idp["from_headers"] == [{"name": "x-token", "value_prefix": "Tok "}]
    assert idp["from_params"] == ["t"]
    assert idp["forward"] is True and idp["forward_payload_header"] == "x-payload"
    assert idp["local_jwks"] == {"inline_string": JWKS}  # fetched by the control plane
    assert idp["payload_in_metadata"] == jwt_authn.PAYLOAD_KEY
    assert idp["jwt_cache_config"]["jwt_cache_size"] > 0
    other = providers["origins-1"]
    # never fetched: a key nobody holds, so every token from it fails (401), fail closed
    assert other["local_jwks"] == {"inline_string": jwt_authn.NO_KEYS_JWKS}
    assert "from_headers" not in other and "audiences" not in other  # Envoy's defaults
    requirements = config["rules"][0]["requires"]["requires_any"]["requirements"]
    # any provider, or no token at all (no request principal); a bad token is a 401
    assert requirements[-1] == {"allow_missing": {}}
    assert [r["provider_name"] for r in requirements[:-1]] == ["origins-0", "origins-1"]


def test_default_locations_are_named_when_merged_with_explicit_ones() -> None:
    ras = (
        _ra("a", JwtRule(issuer="https://idp", jwks=JWKS)),
        _ra("b", JwtRule(issuer="https://idp", jwks=JWKS, from_params=("t",))),
    )
    idp = _filters(_set(ras=ras))[1]["typed_config"]["providers"]["origins-0"]
    assert idp["from_headers"] == [{"name": "authorization", "value_prefix": "Bearer "}]
    assert idp["from_params"] == ["access_token", "t"]


def test_no_request_authentication_no_filter_and_extauthz_mode_keeps_the_token_filter() -> None:
    assert jwt_authn.FILTER_JWT_AUTHN not in [f["name"] for f in _filters(_set())]
    ras = (_ra("a", JwtRule(issuer="https://idp", jwks=JWKS)),)
    names = [f["name"] for f in _filters(_set(ras=ras, jwt=JwtEnforcement.EXTAUTHZ))]
    assert jwt_authn.FILTER_JWT_AUTHN not in names and "meshward.ext_authz.token" in names


def test_jwt_rules_are_native_rbac_and_the_invalid_host_route_disables_jwt_authn() -> None:
    policy = AuthorizationPolicy(
        namespace="shop",
        name="users",
        action=Action.ALLOW,
        rules=(Rule(sources=(Source(request_principals=("https://idp/*",)),)),),
    )
    ps = _set(policy, ras=(_ra("a", JwtRule(issuer="https://idp", jwks=JWKS)),))
    resources = compile_workload(ps, "shop/api", CompileOptions())
    assert not resources.extauthz
    (route,) = [to_dict(r) for r in resources.routes if r.name.startswith("inbound")]
    vhost = route["virtual_hosts"][0]
    assert vhost["routes"][0]["typed_per_filter_config"][jwt_authn.FILTER_JWT_AUTHN] == (
        jwt_authn.JWT_ROUTE_DISABLED
    )
    rbac = vhost["typed_per_filter_config"]["meshward.rbac.allow"]["rbac"]["rules"]
    principal = rbac["policies"]["ns[shop]-policy[users]-rule[0]"]["principals"][0]
    assert principal["and_ids"]["ids"][0]["sourced_metadata"]["metadata_matcher"] == {
        "filter": "envoy.filters.http.jwt_authn",
        "path": [{"key": "payload"}, {"key": "iss"}],
        "value": {"string_match": {"exact": "https://idp"}},
    }


def _request(payload: dict[str, Any] | None) -> Any:
    conn = simulate.Connection("GET", "/", "h", {}, 1, None)
    req = simulate._Request(conn, "/")
    req.payload = payload
    return req


PATTERNS = [
    "*",
    "https://idp/*",
    "https://idp/alice",
    "*/alice",
    "*idp/alice",
    "*ice",
    "https://idp/al*",
    "https:*",
    "https://idp",
    "alice",
    "",
    "https://a/b/c",
]
VALUES = ["https://idp", "https://idp/tenant", "https://a/b", "", "alice", "c", "https:"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_request_principal_splits_at_the_last_slash_like_the_evaluator(pattern: str) -> None:
    match_iss, match_sub = split_pattern(pattern)
    matcher = jwt_authn.request_principal(pattern)
    for iss, sub in itertools.product(VALUES, ["alice", "bob", "", "x/alice"]):
        want = match_iss(iss) and match_sub(sub)
        got = simulate.principal(matcher, _request({"iss": iss, "sub": sub}))
        assert got == want, (pattern, iss, sub)
    assert not simulate.principal(matcher, _request(None))  # no token: no request principal


CLAIMS: list[dict[str, Any]] = [
    {
        "groups": ["admins", "dev"],
        "scope": "read write:all",
        "aud": "shop",
        "azp": "web",
        "org": {"team": ["blue"], "unit": "east"},
    },
    {"groups": "admins", "scope": ["read write:all"], "aud": ["x", "shop"], "org": "flat"},
    {"groups": [1, True], "scope": "  read  ", "permission": "a b", "org": {"team": "red"}},
    {},
]


@pytest.mark.parametrize(
    "key,path",
    [
        ("request.auth.claims[groups]", ("groups",)),
        ("request.auth.claims[scope]", ("scope",)),
        ("request.auth.claims[permission]", ("permission",)),
        ("request.auth.claims[org][team]", ("org", "team")),
        ("request.auth.claims[org][unit]", ("org", "unit")),
        ("request.auth.audiences", ("aud",)),
        ("request.auth.presenter", ("azp",)),
    ],
)
def test_claim_matchers_agree_with_the_evaluator(key: str, path: tuple[str, ...]) -> None:
    patterns = [
        "admins",
        "adm*",
        "*ns",
        "*",
        "read",
        "write:*",
        "*:all",
        "read write:all",
        "shop",
        "blue",
        "east",
        "web",
        "a",
        "b",
        "1",
        "",
    ]
    for pattern, claims in itertools.product(patterns, CLAIMS):
        pred = strings_predicate([pattern])
        want = any(pred(v) for v in claim_values(claims, path))
        got = simulate.principal(jwt_authn.condition_value(key, pattern), _request(claims))
        assert got == want, (key, pattern, claims)


def test_an_inline_jwks_without_keys_gets_a_key_nobody_holds() -> None:
    """Envoy refuses a provider with no valid key (the listener would be NACKed)."""
    ras = (_ra("a", JwtRule(issuer="https://idp", jwks='{"keys": []}')),)
    idp = _filters(_set(ras=ras))[1]["typed_config"]["providers"]["origins-0"]
    assert idp["local_jwks"] == {"inline_string": jwt_authn.NO_KEYS_JWKS}
