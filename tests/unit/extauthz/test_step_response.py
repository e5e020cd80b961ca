"""Step 4 alone: a decision or a rejection turned into the result and the CheckResponse."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from meshward.extauthz import decision, inputs, request, response
from meshward.extauthz.client import build_check_request, describe_response
from meshward.extauthz.decision import CachedDecision, Outcome
from meshward.extauthz.inputs import CheckInput
from meshward.extauthz.result import Rejection
from meshward.extauthz.snapshot import Snapshot
from meshward.extauthz.tokens import JwtVerifier
from meshward.policy import evaluate
from meshward.policy.model import Action, Decision
from meshward.testing.jwt_issuer import LocalIssuer

PolicyFactory = Callable[..., Any]
PEER = "spiffe://cluster.local/ns/web/sa/frontend"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CUSTOM_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: CUSTOM
  provider: {name: meshward-extauthz}
  rules:
  - to: [{operation: {paths: ["/ext*"]}}]
"""


def _input(policy_set: Any, **kw: Any) -> CheckInput:
    read = request.read(build_check_request(workload="foo/httpbin", source_principal=PEER, **kw))
    assert isinstance(read, request.HttpCheck)
    built = inputs.build(read, Snapshot(policy_set), JwtVerifier())
    assert isinstance(built, CheckInput)
    return built


def _respond(inp: CheckInput, cached: CachedDecision, recharged: list[Any]) -> Any:
    return response.respond(
        inp,
        Outcome(cached, True, ("v", "k")),
        version="abcdef0123456789",
        verbose=False,
        trace_id=TRACE,
        recharge=recharged.append,
    )


def test_an_allow_sets_identity_headers_strips_the_token_and_is_memoized(
    policy_set_for: PolicyFactory, issuer: LocalIssuer
) -> None:
    token = issuer.token("alice")
    inp = _input(policy_set_for(), path="/", headers={"authorization": f"Bearer {token}"})
    cached = CachedDecision(Decision(allowed=True, reason="ok", policy="foo/a", rule=0))
    recharged: list[Any] = []
    first = _respond(inp, cached, recharged)
    again = _respond(inp, cached, recharged)
    assert first.allowed and first.cache_hit is True and first.policy_version == "abcdef0123456789"
    out = describe_response(first.response)
    assert out["headers"] == {
        "x-meshward-principal": PEER,
        "x-meshward-user": f"{issuer.issuer}/alice",
    }
    assert "authorization" in out["headers_to_remove"]
    assert out["dynamic_metadata"]["cache"] == "hit"
    assert again.response is first.response  # a hit builds no protobuf
    assert recharged == [("v", "k")]  # charged once, when the memo grew
    assert cached.memo_bytes > response.RESPONSE_OVERHEAD


def test_the_memo_is_bounded(policy_set_for: PolicyFactory) -> None:
    cached = CachedDecision(Decision(allowed=True, reason="ok", policy="foo/a", rule=0))
    policy_set = policy_set_for()
    for i in range(response.MEMO_LIMIT * 3):
        read = request.read(
            build_check_request(path="/", workload="foo/httpbin", source_principal=f"{PEER}{i}")
        )
        assert isinstance(read, request.HttpCheck)
        inp = inputs.build(read, Snapshot(policy_set), JwtVerifier())
        assert isinstance(inp, CheckInput)
        _respond(inp, cached, [])
    assert 0 < len(cached.responses) <= response.MEMO_LIMIT


def test_denials_carry_a_stable_code_and_a_quiet_body(policy_set_for: PolicyFactory) -> None:
    inp = _input(policy_set_for(), path="/admin")
    for action, code in (
        (Action.DENY, "denied_by_policy"),
        (Action.CUSTOM, "denied_by_policy"),
        (Action.ALLOW, "no_matching_allow"),
    ):
        cached = CachedDecision(
            Decision(allowed=False, reason="why", policy="foo/p", rule=1, action=action)
        )
        result = _respond(inp, cached, [])
        assert (result.http_status, result.code) == (403, code)
        body = json.loads(result.response.denied_response.body)
        assert body == {"error": "access denied", "code": code, "trace_id": TRACE}


def test_a_rejection_becomes_a_denial_and_a_401_asks_for_a_bearer_token() -> None:
    result = response.rejected(
        Rejection(
            401, "bad signature", "invalid_token", method="GET", path="/x", policy="foo/jwt", rule=0
        ),
        version="v1",
        verbose=True,
        trace_id=TRACE,
    )
    assert not result.allowed and result.http_status == 401 and result.policy_version == "v1"
    denied = result.response.denied_response
    assert denied.status.code == 401
    headers = {h.header.key: h.header.value for h in denied.headers}
    assert headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert "bad signature" in headers["www-authenticate"]  # verbose: the reason is told
    assert json.loads(denied.body)["policy"] == "foo/jwt"


def test_decide_then_respond_round_trip(policy_set_for: PolicyFactory) -> None:
    """The two steps compose: an uncacheable decision reports no cache state."""
    policy_set = policy_set_for(CUSTOM_POLICY)
    snapshot = Snapshot(policy_set, custom_hook=True)
    read = request.read(
        build_check_request(path="/", workload="foo/httpbin", source_principal=PEER)
    )
    assert isinstance(read, request.HttpCheck)
    inp = inputs.build(read, snapshot, JwtVerifier())
    assert isinstance(inp, CheckInput)
    how = decision.Decider(
        cache=decision.decision_cache(1 << 20, 60),
        evaluate=evaluate,
    )
    out = decision.decide(inp, snapshot, how)
    result = response.respond(inp, out, version="v", verbose=False, trace_id=TRACE)
    assert result.allowed and result.cache_hit is None
    assert describe_response(result.response)["dynamic_metadata"].get("cache") is None
