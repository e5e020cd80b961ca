"""Step 2 alone: plain request values -> the facts the policy reads, or a refusal made before
any rule. Real parsed policies, real tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import struct_pb2

from meshward.extauthz import inputs, request
from meshward.extauthz.client import build_check_request
from meshward.extauthz.inputs import CheckInput
from meshward.extauthz.request import HttpCheck
from meshward.extauthz.result import Rejection
from meshward.extauthz.snapshot import Snapshot
from meshward.extauthz.tokens import JWT_AUTHN_NAMESPACE, JWT_PAYLOAD_KEY, JwtVerifier
from meshward.testing.jwt_issuer import LocalIssuer

PolicyFactory = Callable[..., Any]
PEER = "spiffe://cluster.local/ns/web/sa/frontend"
HEADER_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: teams, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - when: [{key: "request.headers[x-team]", values: ["blue"]}]
"""
STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: foo}
spec: {mtls: {mode: STRICT}}
"""


def _http(**kw: Any) -> HttpCheck:
    kw.setdefault("source_principal", PEER)
    read = request.read(build_check_request(**kw))
    assert isinstance(read, HttpCheck)
    return read


def _build(policy_set: Any, **kw: Any) -> CheckInput | Rejection:
    verifier = JwtVerifier()
    snapshot = Snapshot(policy_set, rules_id=verifier.rules_id)
    return inputs.build(_http(**kw), snapshot, verifier)


def test_facts_carry_the_normalized_path_and_the_verified_user(
    policy_set_for: PolicyFactory, issuer: LocalIssuer
) -> None:
    token = issuer.token("alice", groups=["admin"])
    built = _build(
        policy_set_for(HEADER_POLICY),
        path="/a/./b/../c",
        headers={"authorization": f"Bearer {token}", "x-team": "blue"},
        workload="foo/httpbin",
    )
    assert isinstance(built, CheckInput)
    assert (built.ref, built.facts.path, built.raw_path) == ("foo/httpbin", "/a/c", "/a/./b/../c")
    assert built.user == f"{issuer.issuer}/alice"
    assert built.facts.claims is not None and built.facts.claims["groups"] == ["admin"]
    assert built.expires_at is not None and built.token is not None


def test_the_workload_comes_from_the_server_identity_without_an_extension(
    policy_set_for: PolicyFactory,
) -> None:
    policy_set = policy_set_for()
    spiffe = policy_set.workload("foo/httpbin").spiffe_id(policy_set.mesh.trust_domain)
    built = _build(policy_set, path="/", destination_principal=spiffe)
    assert isinstance(built, CheckInput) and built.ref == "foo/httpbin"
    unknown = _build(policy_set, path="/", destination_principal="spiffe://x/ns/a/sa/b")
    assert isinstance(unknown, Rejection) and unknown.code == "unknown_workload"
    assert "no workload has identity spiffe://x/ns/a/sa/b" in unknown.reason
    nothing = _build(policy_set, path="/")
    assert isinstance(nothing, Rejection) and "no destination principal" in nothing.reason


def test_an_unknown_workload_names_the_policy_version(policy_set_for: PolicyFactory) -> None:
    policy_set = policy_set_for()
    built = _build(policy_set, path="/", workload="foo/nope")
    assert isinstance(built, Rejection) and built.workload == "foo/nope"
    assert policy_set.version[:12] in built.reason


def test_a_path_envoy_would_reject_is_refused(policy_set_for: PolicyFactory) -> None:
    built = _build(policy_set_for(), path="/a%2Fb", workload="foo/httpbin")
    assert isinstance(built, Rejection)
    assert (built.status, built.code) == (403, "request_rejected")


def test_a_token_that_does_not_verify_is_a_401_naming_the_request_authentication(
    policy_set_for: PolicyFactory, other_issuer: LocalIssuer
) -> None:
    forged = other_issuer.token("mallory")
    built = _build(
        policy_set_for(),
        path="/x/../y",
        headers={"authorization": f"Bearer {forged}"},
        workload="foo/httpbin",
    )
    assert isinstance(built, Rejection)
    assert (built.status, built.code, built.policy, built.rule) == (
        401,
        "invalid_token",
        "foo/jwt",
        0,
    )
    assert built.path == "/y"  # the normalized path, as the decision log reports it


def test_native_mode_reads_jwt_authns_payload_and_never_the_token(
    policy_set_for: PolicyFactory, other_issuer: LocalIssuer
) -> None:
    check_request = build_check_request(
        path="/",
        workload="foo/httpbin",
        source_principal=PEER,
        # a token jwt_authn would have rejected: in native mode it is not ours to verify
        headers={"authorization": f"Bearer {other_issuer.token('mallory')}"},
    )
    payload = struct_pb2.Struct()
    payload.update({"iss": "https://issuer.example", "sub": "bob", "exp": 2e9})
    check_request.attributes.metadata_context.filter_metadata[JWT_AUTHN_NAMESPACE].fields[
        JWT_PAYLOAD_KEY
    ].struct_value.CopyFrom(payload)
    read = request.read(check_request)
    assert isinstance(read, HttpCheck)
    verifier = JwtVerifier()
    built = inputs.build(read, Snapshot(policy_set_for(jwt="native")), verifier)
    assert isinstance(built, CheckInput) and built.token is None
    assert (built.user, built.expires_at) == ("https://issuer.example/bob", 2e9)
    assert verifier.verifications == 0


def test_header_names_are_lowercased_when_rules_read_headers(
    policy_set_for: PolicyFactory,
) -> None:
    http = _http(path="/", workload="foo/httpbin")
    mixed = HttpCheck(**{**http.__dict__, "headers": {"X-Team": "blue"}})
    built = inputs.build(mixed, Snapshot(policy_set_for(HEADER_POLICY)), JwtVerifier())
    assert isinstance(built, CheckInput) and built.facts.headers == {"x-team": "blue"}


def test_plaintext_under_strict_mtls_is_refused_before_any_rule(
    policy_set_for: PolicyFactory,
) -> None:
    policy_set = policy_set_for(STRICT)
    built = _build(policy_set, path="/", workload="foo/httpbin", source_principal="")
    assert isinstance(built, Rejection) and built.code == "mtls_required"
    with_peer = _build(policy_set, path="/", workload="foo/httpbin")
    assert isinstance(with_peer, CheckInput)
    bad_host = _build(policy_set, path="/", host="a b", workload="foo/httpbin")
    assert isinstance(bad_host, Rejection) and bad_host.code == "request_rejected"
