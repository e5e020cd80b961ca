"""Step 3 alone: an input's decision, from the cache or one evaluation, and how long it lives."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from meshward.extauthz import decision, inputs, request
from meshward.extauthz.cache import DecisionCache
from meshward.extauthz.client import build_check_request
from meshward.extauthz.decision import Decider, Outcome
from meshward.extauthz.inputs import CheckInput
from meshward.extauthz.snapshot import Snapshot
from meshward.extauthz.tokens import JwtVerifier
from meshward.policy import evaluate

PolicyFactory = Callable[..., Any]
PEER = "spiffe://cluster.local/ns/web/sa/frontend"
PATHS_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reads, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - to: [{operation: {paths: ["/public*"]}}]
"""
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


class Counted:
    def __init__(self) -> None:
        self.n = 0
        self.mono = 100.0

    def __call__(self) -> None:
        self.n += 1


def _input(snapshot: Snapshot, path: str, **kw: Any) -> CheckInput:
    read = request.read(
        build_check_request(path=path, workload="foo/httpbin", source_principal=PEER, **kw)
    )
    assert isinstance(read, request.HttpCheck)
    built = inputs.build(read, snapshot, JwtVerifier())
    assert isinstance(built, CheckInput)
    return built


def _decider(counted: Counted, ttl: float = 60.0) -> Decider:
    cache: DecisionCache[Any] = decision.decision_cache(1 << 20, ttl, timer=lambda: counted.mono)
    return Decider(
        cache=cache,
        evaluate=evaluate,
        wall=lambda: 1_700_000_000.0,
        clock=lambda: counted.mono,
        on_evaluate=counted,
    )


def test_the_repeat_is_a_hit_and_evaluates_nothing(policy_set_for: PolicyFactory) -> None:
    snapshot = Snapshot(policy_set_for(PATHS_POLICY, with_ra=False))
    counted = Counted()
    how = _decider(counted)
    first = decision.decide(_input(snapshot, "/public/a"), snapshot, how)
    again = decision.decide(_input(snapshot, "/public/a"), snapshot, how)
    other = decision.decide(_input(snapshot, "/private"), snapshot, how)
    assert (first.hit, again.hit, other.hit) == (False, True, False)
    assert again.cached is first.cached and first.cached.decision.allowed
    assert not other.cached.decision.allowed
    assert counted.n == 2
    assert first.key is not None and first.key[:2] == (snapshot.version, "foo/httpbin")


def test_a_denial_without_a_matching_allow_names_the_allows_in_force(
    policy_set_for: PolicyFactory,
) -> None:
    snapshot = Snapshot(policy_set_for(PATHS_POLICY, with_ra=False))
    out = decision.decide(_input(snapshot, "/private"), snapshot, _decider(Counted()))
    assert out.cached.decision.policy is None and out.cached.policy == "foo/reads"


def test_with_a_custom_hook_nothing_is_cached(policy_set_for: PolicyFactory) -> None:
    """A CUSTOM provider hook may read anything: its workloads' decisions are never cached."""
    policy_set = policy_set_for(PATHS_POLICY, CUSTOM_POLICY, with_ra=False)
    snapshot = Snapshot(policy_set, custom_hook=True)
    counted = Counted()
    how = _decider(counted)
    outs = [decision.decide(_input(snapshot, "/public/a"), snapshot, how) for _ in range(2)]
    assert [o.hit for o in outs] == [None, None] and counted.n == 2
    assert all(isinstance(o, Outcome) and o.key is None for o in outs)


def test_the_evaluator_gets_the_raw_path_and_its_own_copies(policy_set_for: PolicyFactory) -> None:
    snapshot = Snapshot(policy_set_for(PATHS_POLICY, with_ra=False))
    inp = _input(snapshot, "/public/./a", headers={"x-a": "1"})
    req = decision.evaluation_request(inp)
    assert req.path == "/public/./a" and inp.facts.path == "/public/a"
    assert req.headers == dict(inp.facts.headers) and req.headers is not inp.facts.headers


def test_an_entry_ends_at_the_earliest_of_ttl_token_exp_and_policy_expiry(
    policy_set_for: PolicyFactory,
) -> None:
    snapshot = Snapshot(policy_set_for(PATHS_POLICY, with_ra=False))
    plan = snapshot.plan("foo/httpbin")
    assert plan is not None
    wall, mono = 1000.0, 50.0
    assert decision.expiry(plan, None, wall, mono, ttl=60) == 110.0
    assert decision.expiry(plan, wall + 5, wall, mono, ttl=60) == 55.0
    expiring = dataclasses.replace(plan, expiries=(wall - 1, wall + 7))
    assert decision.expiry(expiring, wall + 30, wall, mono, ttl=60) == 57.0
    assert decision.expiry(expiring, None, wall + 8, mono, ttl=60) == 110.0
