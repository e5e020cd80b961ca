"""One Check end to end without gRPC: identity, decision, cache behaviour and the response Envoy
acts on. Real policies (parsed YAML), real tokens, the real evaluator."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from meshward.extauthz.authorizer import Authorizer
from meshward.extauthz.cache import DecisionCache
from meshward.extauthz.client import build_check_request, describe_response
from meshward.extauthz.tokens import JwtVerifier
from meshward.testing.extauthz import ADMINS_YAML, HTTPBIN_YAML
from meshward.testing.jwt_issuer import LocalIssuer

PEER = "spiffe://cluster.local/ns/web/sa/frontend"
WORKLOAD = "foo/httpbin"  # declared by the policy_set_for fixture (conftest.py)
PolicyFactory = Callable[..., Any]

ADMIN_POLICY = ADMINS_YAML


class Clocks:
    """Wall and monotonic clocks the test moves by hand (pyjwt keeps real time)."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.mono_base = 1000.0

    def wall(self) -> float:
        return time.time() + self.offset

    def mono(self) -> float:
        return self.mono_base + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def _authorizer(policy_set: Any, clocks: Clocks | None = None, **kw: Any) -> Authorizer:
    clocks = clocks or Clocks()
    verifier = JwtVerifier(clock=clocks.mono, wall_clock=clocks.wall)
    cache: DecisionCache[Any] = DecisionCache(1 << 24, ttl=kw.pop("ttl", 60.0), timer=clocks.mono)
    return Authorizer(
        policy_set, verifier=verifier, cache=cache, wall_clock=clocks.wall, clock=clocks.mono, **kw
    )


def _check(
    authorizer: Authorizer, path: str = "/admin", token: str | None = None, **kw: Any
) -> Any:
    headers = dict(kw.pop("headers", {}))
    if token:
        headers["authorization"] = f"Bearer {token}"
    kw.setdefault("workload", WORKLOAD)
    return authorizer.check(
        build_check_request(path=path, headers=headers, **kw), "4bf92f3577b34da6a3ce929d0e0e4736"
    )


# ---- decisions and responses -------------------------------------------------------------------


def test_right_claim_allows_with_identity_headers(
    policy_set_for: PolicyFactory, issuer: LocalIssuer
) -> None:
    authorizer = _authorizer(policy_set_for(ADMIN_POLICY))
    result = _check(
        authorizer,
        token=issuer.token("alice", groups=["admin"]),
        source_principal=PEER,
        headers={"x-meshward-user": "forged", "x-meshward-principal": "forged"},
    )
    assert result.allowed and result.http_status == 200
    assert (result.policy, result.rule) == ("foo/admins", 0)
    out = describe_response(result.response)
    assert out["headers"] == {
        "x-meshward-principal": PEER,
        "x-meshward-user": f"{issuer.issuer}/alice",
    }
    assert (
        "authorization" in out["headers_to_remove"]
    )  # forwardOriginalToken: false (Istio default)
    assert out["dynamic_metadata"]["policy"] == "foo/admins"


def test_anonymous_allow_removes_forged_identity_headers(policy_set_for: PolicyFactory) -> None:
    result = _check(_authorizer(policy_set_for(ADMIN_POLICY)), path="/public/x")
    assert result.allowed and result.user is None
    out = describe_response(result.response)
    assert out["headers"] == {}
    assert set(out["headers_to_remove"]) == {"x-meshward-principal", "x-meshward-user"}


def test_denials_are_quiet_by_default(policy_set_for: PolicyFactory, issuer: LocalIssuer) -> None:
    """A caller learns a stable code and the trace id, never policy names, rules or reasons
    (issue 13); the decision log / CheckResult keep the full story for operators."""
    authorizer = _authorizer(policy_set_for(ADMIN_POLICY))
    result = _check(authorizer, token=issuer.token(groups=["dev"]))
    out = describe_response(result.response)
    assert out["http_status"] == 403 and out["grpc_code"] == 7
    assert out["body"] == {
        "error": "access denied",
        "code": "no_matching_allow",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    }
    assert "x-meshward-denied-by" not in out["headers"]
    assert result.policy == "foo/admins" and "no ALLOW policy matched" in result.reason
    expired = _check(authorizer, path="/public", token=issuer.token(exp=int(time.time()) - 3600))
    out = describe_response(expired.response)
    assert out["http_status"] == 401 and out["body"]["code"] == "invalid_token"
    assert set(out["body"]) == {"error", "code", "trace_id"}
    assert out["headers"]["www-authenticate"] == 'Bearer error="invalid_token"'
    assert "expired" not in str((out["body"], out["headers"])) and expired.reason == "token expired"
    deny = _check(authorizer, path="/x/../../etc")
    assert describe_response(deny.response)["body"]["code"] in (
        "request_rejected",
        "no_matching_allow",
    )


def test_wrong_claim_is_403_naming_the_policy(
    policy_set_for: PolicyFactory, issuer: LocalIssuer
) -> None:
    result = _check(
        _authorizer(policy_set_for(ADMIN_POLICY, verbose=True)), token=issuer.token(groups=["dev"])
    )
    assert not result.allowed and result.http_status == 403
    out = describe_response(result.response)
    assert out["http_status"] == 403 and out["grpc_code"] == 7
    assert out["body"]["error"] == "access denied"
    assert out["body"]["policy"] == "foo/admins"
    assert out["body"]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert "no ALLOW policy matched" in out["body"]["reason"]
    assert out["headers"]["x-meshward-denied-by"] == "foo/admins"
    assert out["dynamic_metadata"]["decision"] == "deny"


def test_deny_policy_names_policy_and_rule(
    policy_set_for: PolicyFactory, issuer: LocalIssuer
) -> None:
    deny = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-interns, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - when: [{key: "request.auth.claims[role]", values: ["intern"]}]
"""
    result = _check(
        _authorizer(policy_set_for(deny, verbose=True)), token=issuer.token(role="intern")
    )
    body = describe_response(result.response)["body"]
    assert (body["policy"], body["rule"]) == ("foo/no-interns", 0)


def test_bad_token_is_401_naming_the_request_authentication(
    policy_set_for: PolicyFactory, issuer: LocalIssuer
) -> None:
    result = _check(
        _authorizer(policy_set_for(ADMIN_POLICY, verbose=True)),
        path="/public",
        token=issuer.token(exp=int(time.time()) - 3600),
    )
    assert result.http_status == 401
    out = describe_response(result.response)
    assert out["grpc_code"] == 16
    assert out["body"] == {
        "error": "unauthenticated",
        "code": "invalid_token",
        "policy": "foo/jwt",
        "rule": 0,
        "reason": "token expired",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    }
    assert out["headers"]["www-authenticate"].startswith('Bearer error="invalid_token"')


def test_output_payload_to_header_and_forward_original_token(
    policy_set_for: PolicyFactory, issuer: LocalIssuer
) -> None:
    extra = "    outputPayloadToHeader: x-jwt-payload\n    forwardOriginalToken: true\n"
    token = issuer.token(groups=["admin"])
    result = _check(_authorizer(policy_set_for(ADMIN_POLICY, ra_extra=extra)), token=token)
    out = describe_response(result.response)
    assert out["headers"]["x-jwt-payload"] == token.split(".")[1]
    assert "authorization" not in out["headers_to_remove"]
    anonymous = describe_response(
        _check(_authorizer(policy_set_for(ADMIN_POLICY, ra_extra=extra)), path="/public").response
    )
    assert "x-jwt-payload" in anonymous["headers_to_remove"]  # a client cannot forge it


# ---- which workload ----------------------------------------------------------------------------


def test_workload_from_destination_principal_when_no_context_extension(
    policy_set_for: PolicyFactory,
) -> None:
    authorizer = _authorizer(policy_set_for(ADMIN_POLICY))
    result = _check(
        authorizer,
        path="/public",
        workload=None,
        destination_principal="spiffe://cluster.local/ns/foo/sa/httpbin",
    )
    assert result.allowed and result.workload == WORKLOAD
    nobody = _check(authorizer, path="/public", workload=None)
    assert not nobody.allowed and "cannot identify the workload" in nobody.reason
    stranger = _check(
        authorizer, path="/public", workload=None, destination_principal="spiffe://x/ns/a/sa/b"
    )
    assert not stranger.allowed and "no workload has identity" in stranger.reason
    unknown = _check(authorizer, path="/public", workload="foo/nope")
    assert not unknown.allowed and "unknown workload foo/nope" in unknown.reason


def test_malformed_and_oversized_requests_are_denied(policy_set_for: PolicyFactory) -> None:
    from envoy.service.auth.v3 import external_auth_pb2

    authorizer = _authorizer(policy_set_for(ADMIN_POLICY))
    empty = authorizer.check(external_auth_pb2.CheckRequest())
    assert not empty.allowed and "malformed CheckRequest" in empty.reason
    huge = _check(authorizer, path="/public/" + "a" * 20_000)
    assert not huge.allowed and "too large" in huge.reason
    many = _check(authorizer, path="/public", headers={f"h{i}": "v" for i in range(600)})
    assert not many.allowed and "too large" in many.reason
    escaped = _check(authorizer, path="/public/..%2Fadmin")
    assert not escaped.allowed and "path rejected" in escaped.reason


# ---- the decision cache ------------------------------------------------------------------------


def test_second_identical_request_does_not_evaluate(
    policy_set_for: PolicyFactory, issuer: LocalIssuer
) -> None:
    authorizer = _authorizer(policy_set_for(ADMIN_POLICY))
    token = issuer.token(groups=["admin"])
    first = _check(
        authorizer, token=token, headers={"x-request-id": "1", "traceparent": "00-aa-bb-01"}
    )
    second = _check(
        authorizer, token=token, headers={"x-request-id": "2", "traceparent": "00-cc-dd-01"}
    )
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert authorizer.evaluations == 1
    # Another token with the same claims the rules read shares the entry; another path does not.
    _check(authorizer, token=issuer.token("bob", groups=["admin"]))
    assert authorizer.evaluations == 1
    _check(authorizer, path="/admin/x", token=token)
    assert authorizer.evaluations == 2


def test_negative_decisions_are_cached(policy_set_for: PolicyFactory, issuer: LocalIssuer) -> None:
    authorizer = _authorizer(policy_set_for(ADMIN_POLICY))
    token = issuer.token(groups=["dev"])
    results = [_check(authorizer, token=token) for _ in range(3)]
    assert [r.allowed for r in results] == [False] * 3
    assert [r.cache_hit for r in results] == [False, True, True]
    assert authorizer.evaluations == 1
    assert results[2].policy == "foo/admins"
    assert describe_response(results[2].response)["body"]["code"] == "no_matching_allow"


def test_entry_never_outlives_the_token(policy_set_for: PolicyFactory, issuer: LocalIssuer) -> None:
    clocks = Clocks()
    authorizer = _authorizer(policy_set_for(ADMIN_POLICY), clocks, ttl=600)
    token = issuer.token(groups=["admin"], ttl=20)
    assert _check(authorizer, token=token).cache_hit is False
    clocks.advance(19)
    assert _check(authorizer, token=token).cache_hit is True
    clocks.advance(2)  # past exp on our clock (pyjwt's real clock and leeway still accept it)
    assert _check(authorizer, token=token).cache_hit is False
    assert authorizer.evaluations == 2


def test_ttl_bounds_entries(policy_set_for: PolicyFactory) -> None:
    clocks = Clocks()
    authorizer = _authorizer(policy_set_for(ADMIN_POLICY), clocks, ttl=5)
    assert _check(authorizer, path="/public").cache_hit is False
    clocks.advance(4)
    assert _check(authorizer, path="/public").cache_hit is True
    clocks.advance(2)
    assert _check(authorizer, path="/public").cache_hit is False


def test_new_policy_version_applies_on_the_next_request(
    policy_set_for: PolicyFactory, issuer: LocalIssuer
) -> None:
    authorizer = _authorizer(policy_set_for(ADMIN_POLICY))
    token = issuer.token(groups=["dev"])
    assert not _check(authorizer, token=token).allowed
    assert _check(authorizer, token=token).cache_hit
    widened = ADMIN_POLICY.replace('values: ["admin"]', 'values: ["admin", "dev"]')
    authorizer.update(policy_set_for(widened))
    after = _check(authorizer, token=token)
    assert after.allowed and after.cache_hit is False


def test_emergency_policy_expiry_ends_cached_entries(policy_set_for: PolicyFactory) -> None:
    clocks = Clocks()
    expires = datetime.fromtimestamp(clocks.wall(), UTC) + timedelta(seconds=30)
    lockdown = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: lockdown
  namespace: foo
  annotations: {{meshward.dev/expires-at: "{expires.isoformat().replace("+00:00", "Z")}"}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/public*"]}}}}]}}]
"""
    authorizer = _authorizer(policy_set_for(ADMIN_POLICY, lockdown), clocks, ttl=600)
    assert not _check(authorizer, path="/public").allowed
    clocks.advance(29)
    assert _check(authorizer, path="/public").cache_hit is True
    clocks.advance(2)
    after = _check(authorizer, path="/public")
    assert after.allowed and after.cache_hit is False


def test_a_sole_emergency_allow_expiring_keeps_the_default_deny(
    policy_set_for: PolicyFactory,
) -> None:
    """ext_authz agrees with the evaluator: once the workload's only ALLOW expires, nothing is
    allowed (it used to count as "no ALLOW policy", which allowed everyone)."""
    clocks = Clocks()
    expires = datetime.fromtimestamp(clocks.wall(), UTC) + timedelta(seconds=30)
    emergency = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: break-glass
  namespace: foo
  annotations: {{meshward.dev/expires-at: "{expires.isoformat().replace("+00:00", "Z")}"}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  action: ALLOW
  rules: [{{to: [{{operation: {{paths: ["/public*"]}}}}]}}]
"""
    authorizer = _authorizer(policy_set_for(emergency), clocks, ttl=600)
    assert _check(authorizer, path="/public").allowed
    assert not _check(authorizer, path="/other").allowed
    clocks.advance(31)
    for path in ("/public", "/other"):
        after = _check(authorizer, path=path)
        assert not after.allowed and after.cache_hit is False, path


def test_dry_run_and_audit_are_reported_not_enforced(policy_set_for: PolicyFactory) -> None:
    dry = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: would-deny
  namespace: foo
  annotations: {istio.io/dry-run: "true"}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/public*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: watch, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: AUDIT
  rules: [{to: [{operation: {paths: ["/public*"]}}]}]
"""
    result = _check(_authorizer(policy_set_for(ADMIN_POLICY, dry)), path="/public")
    assert result.allowed
    assert [(d.policy, d.would_deny) for d in result.dry_run] == [("foo/would-deny", True)]
    assert result.audit_policies == ("foo/watch",)


def test_uppercase_header_names_are_keyed_as_the_evaluator_reads_them(
    policy_set_for: PolicyFactory,
) -> None:
    team = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: team, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules: [{when: [{key: "request.headers[x-team]", values: ["red"]}]}]
"""
    authorizer = _authorizer(policy_set_for(team, with_ra=False))

    def check(value: str) -> Any:
        request = build_check_request(path="/", workload=WORKLOAD)
        request.attributes.request.http.headers["X-Team"] = value  # Envoy never sends this
        return authorizer.check(request)

    assert check("red").allowed
    assert not check("blue").allowed


POISON_POLICY = (
    HTTPBIN_YAML
    + """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: foo}
spec:
  rules:
  - to: [{operation: {methods: ["GET"]}}]
"""
)


def test_a_request_refused_before_authorization_never_poisons_the_cache() -> None:
    """The key holds only what rules read (here: the method). A bad Host, a ';' on a dot
    segment or a plaintext peer under STRICT are refused before any rule: such a denial must
    not be served, from the cache, to a good request with the same key."""
    from meshward.extauthz.client import build_check_request
    from meshward.policy import parse

    strict = (
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: strict, namespace: foo}\nspec: {mtls: {mode: STRICT}}\n"
    )
    authorizer = Authorizer(parse({"p.yaml": POISON_POLICY + strict}))

    def check(host: str = "httpbin.foo", path: str = "/x", peer: str = PEER) -> Any:
        return authorizer.check(
            build_check_request(
                method="GET", path=path, host=host, source_principal=peer, workload=WORKLOAD
            )
        )

    for bad in (
        check(host="bad host"),
        check(host="a.example,admin.internal"),
        check(path="/x/%2e%2e;y/admin"),
        check(peer=""),
    ):
        assert not bad.allowed and bad.cache_hit is None
        good = check()
        assert good.allowed, good.reason
    assert check().cache_hit is True  # good requests still share their entry


# ---- jwtEnforcement native: claims from jwt_authn's payload ------------------------------------


def _with_payload(request: Any, payload: dict[str, Any]) -> Any:
    """What Envoy's ext_authz filter sends with metadata_context_namespaces: jwt_authn's
    verified payload under envoy.filters.http.jwt_authn / payload."""
    namespace = request.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"]
    namespace.update({"payload": payload})
    return request


def test_native_mode_reads_the_verified_payload_and_never_a_raw_token(
    policy_set_for: PolicyFactory, issuer: LocalIssuer
) -> None:
    """Under jwtEnforcement native, Envoy verified the token (and may have removed it): the
    service takes the claims from the metadata context; a token in the headers that jwt_authn
    did not vouch for counts for nothing (it is never verified a second time)."""
    clocks = Clocks()
    authorizer = _authorizer(policy_set_for(ADMIN_POLICY, jwt="native"), clocks)
    exp = clocks.wall() + 300
    payload = {"iss": issuer.issuer, "sub": "alice", "groups": ["admin"], "exp": exp}
    allowed = authorizer.check(
        _with_payload(build_check_request(path="/admin", workload=WORKLOAD), payload), ""
    )
    assert allowed.allowed and allowed.user == f"{issuer.issuer}/alice"
    assert (allowed.policy, allowed.rule) == ("foo/admins", 0)
    other = {**payload, "groups": ["users"]}
    denied = authorizer.check(
        _with_payload(build_check_request(path="/admin", workload=WORKLOAD), other), ""
    )
    assert not denied.allowed and denied.http_status == 403
    # a valid token in the header, but no payload from jwt_authn: no claims, denied (not 401)
    raw = _check(authorizer, token=issuer.token("alice", groups=["admin"]))
    assert not raw.allowed and raw.http_status == 403 and raw.user is None


def test_native_cache_entries_never_outlive_the_payload_exp(
    policy_set_for: PolicyFactory, issuer: LocalIssuer
) -> None:
    clocks = Clocks()
    authorizer = _authorizer(policy_set_for(ADMIN_POLICY, jwt="native"), clocks, ttl=3600.0)
    payload = {"iss": issuer.issuer, "sub": "alice", "groups": ["admin"], "exp": clocks.wall() + 30}

    def check() -> Any:
        request = build_check_request(path="/admin", workload=WORKLOAD)
        return authorizer.check(_with_payload(request, payload), "")

    assert check().cache_hit is False and check().cache_hit is True
    clocks.offset += 31  # past exp: the entry is gone although the cache TTL is an hour
    assert check().cache_hit is False
