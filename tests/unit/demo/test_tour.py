from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshward.demo import report, status_poll, tour
from meshward.demo.state import DemoState, WorkloadState, load, save
from meshward.demo.tokens import AUDIENCE, ISSUER, mint
from meshward.flows import evidence
from meshward.policy import Request, evaluate, parse

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"


# -- the tour's expectations are the policy's ---------------------------------------------------
def _steps_with_policy() -> Iterator[tuple[tour.Call, object]]:
    """Each call of the tour with the policy set in force when it is made (edits applied)."""
    texts = {p.name: p.read_text() for p in sorted(EXAMPLES.glob("*.yaml"))}
    for step in tour.TOUR:
        if isinstance(step, tour.PolicyEdit):
            if step.content is None:
                texts.pop(step.file, None)
            else:
                texts[step.file] = step.content
            continue
        yield step, parse(texts)


CALLS = [
    (c, p) for c, p in _steps_with_policy() if c.decider not in (evidence.MTLS, evidence.NO_ROUTE)
]


@pytest.mark.parametrize(
    ("call", "policy"), CALLS, ids=[f"{c.who}:{c.method}:{c.path}" for c, _ in CALLS]
)
def test_each_expectation_is_what_the_evaluator_decides(call: tour.Call, policy: object) -> None:
    """The tour asserts against real Envoys; here the same expectations against the reference
    evaluator, so a tour expectation can never disagree with the policy files."""
    workload = policy.workload(call.target)  # type: ignore[attr-defined]
    source = policy.workload(call.source)  # type: ignore[attr-defined]
    trust_domain = policy.mesh.trust_domain  # type: ignore[attr-defined]
    claims = (
        {"iss": ISSUER, "sub": "alice", "aud": AUDIENCE, "scope": call.scope}
        if call.scope
        else None
    )
    decision = evaluate(
        policy,  # type: ignore[arg-type]
        workload,
        Request(method=call.method, path=call.path, destination_port=8080,
                source_principal=source.spiffe_id(trust_domain), claims=claims),
        now=datetime.now(UTC),
    )  # fmt: skip
    assert decision.verdict == call.expect, decision.reason
    if call.policy is not None:
        expected = None if call.policy == tour.NONE else call.policy
        if expected is not None:
            assert (decision.policy, decision.rule) == (expected, call.rule)
        else:
            assert decision.rule is None
    if call.would_deny is not None:
        assert sorted(d.policy for d in decision.dry_run if d.would_deny) == sorted(call.would_deny)


def test_tour_covers_the_issue() -> None:
    calls = [s for s in tour.TOUR if isinstance(s, tour.Call)]
    edits = [s for s in tour.TOUR if isinstance(s, tour.PolicyEdit)]
    deciders = {c.decider for c in calls}
    assert {evidence.RBAC, evidence.MTLS} <= deciders
    # issue 16: end-user JWT rules are Envoy's (jwt_authn + RBAC), never ext_authz's
    assert all(c.decider == evidence.RBAC for c in calls if c.scope is not None)
    assert [e.content is None for e in edits] == [False, True, False, True]  # add, revert, x2
    # issue 16: ext_authz decides only CUSTOM policies, and the repeat is a cache hit
    extauthz = [c for c in calls if c.decider == evidence.EXTAUTHZ]
    assert extauthz and all(c.policy == tour.COSTS_POLICY for c in extauthz)
    assert [c.extauthz for c in extauthz] == [tour.CACHE_MISS, tour.CACHE_HIT]
    assert len({(c.source, c.target, c.method, c.path) for c in extauthz}) == 1
    assert any(
        c.extauthz == tour.NOT_ASKED
        and c.target == extauthz[0].target
        and c.section == extauthz[0].section
        for c in calls
    )
    assert any(c.would_deny for c in calls) and any(".." in c.path for c in calls)
    scopes = {c.scope for c in calls if c.target == "shop/payments"}
    assert {"payments:write", "payments:read", None} <= scopes
    # the very next step after each edit is a call whose outcome the edit changed (it is made
    # once: an edit is a route update that reaches open connections at their next request)
    for edit in edits:
        at = tour.TOUR.index(edit)
        after = tour.TOUR[at + 1]
        assert isinstance(after, tour.Call)
        same = [
            s
            for s in tour.TOUR[:at]
            if isinstance(s, tour.Call)
            and (s.source, s.target, s.method, s.path)
            == (after.source, after.target, after.method, after.path)
        ]
        assert same and same[-1].expect != after.expect


# -- judging -------------------------------------------------------------------------------------
def _verdict(**kw: object) -> evidence.Verdict:
    base: dict[str, object] = dict(
        workload="shop/orders", direction="inbound", allowed=False, status=403,
        decider=evidence.RBAC, policy=None, rule=None, reason="no ALLOW rule matched",
        trace_id="t" * 32,
    )  # fmt: skip
    base.update(kw)
    return evidence.Verdict(**base)  # type: ignore[arg-type]


CALL = tour.Call("s", "shop/frontend", "shop/orders", "DELETE", "/orders/42", tour.DENY,
                 evidence.RBAC, tour.NONE)  # fmt: skip


def test_judge_as_expected() -> None:
    r = tour.judge(1, CALL, tour.Response(403, "RBAC: access denied"), _verdict(),
                   request_id="r", trace_id="x")  # fmt: skip
    assert r.ok and r.actual == "deny" and r.trace_id == "t" * 32 and r.rule_ref == "-"


@pytest.mark.parametrize(
    ("response", "verdict", "problem"),
    [
        (tour.Response(200, "{}"), _verdict(allowed=True, status=200), "expected deny, got allow"),
        (tour.Response(403, ""), _verdict(decider=evidence.EXTAUTHZ), "expected Envoy RBAC to decide"),
        (tour.Response(403, ""), _verdict(policy="shop/x", rule=0), "expected no rule to decide, not shop/x#0"),
        (tour.Response(403, ""), None, "no access-log line"),
    ],
)  # fmt: skip
def test_judge_names_each_broken_expectation(
    response: tour.Response, verdict: evidence.Verdict | None, problem: str
) -> None:
    r = tour.judge(1, CALL, response, verdict, request_id="r", trace_id="x")
    assert not r.ok and any(problem in p for p in r.problems), r.problems


def test_judge_dry_run_and_rule_index() -> None:
    call = tour.Call("s", "shop/scraper", "shop/payments", "GET", "/metrics", tour.ALLOW,
                     evidence.RBAC, "shop/allow", 0, would_deny=("shop/dry",))  # fmt: skip
    ok = _verdict(allowed=True, status=200, policy="shop/allow", rule=0, would_deny=("shop/dry",))
    assert tour.judge(1, call, tour.Response(200, ""), ok, request_id="r", trace_id="x").ok
    for bad in (
        _verdict(allowed=True, status=200, policy="shop/allow", rule=1, would_deny=("shop/dry",)),
        _verdict(allowed=True, status=200, policy="shop/allow", rule=0),
    ):
        assert not tour.judge(1, call, tour.Response(200, ""), bad, request_id="r", trace_id="x").ok


def test_judge_ext_authz_involvement() -> None:
    call = tour.Call("s", "shop/orders", "shop/inventory", "GET", "/costs/1", tour.DENY,
                     evidence.EXTAUTHZ, "shop/c", 0, extauthz=tour.CACHE_HIT)  # fmt: skip

    def verdict(meta: object) -> evidence.Verdict:
        return _verdict(decider=evidence.EXTAUTHZ, policy="shop/c", rule=0, raw={"ext_authz": meta})

    hit = tour.judge(
        1, call, tour.Response(403, ""), verdict({"cache": "hit"}), request_id="r", trace_id="x"
    )
    assert hit.ok and hit.extauthz == tour.CACHE_HIT and hit.to_json()["extauthz"] == "hit"
    for meta, got in (
        ({"cache": "miss"}, "miss"),
        (None, "not asked"),
        ("-", "not asked"),
        ({"decision": "deny"}, "uncached"),
    ):
        r = tour.judge(1, call, tour.Response(403, ""), verdict(meta), request_id="r", trace_id="x")
        assert not r.ok and f"expected ext_authz hit, got {got}" in r.problems


def test_judge_without_http() -> None:
    plaintext = tour.Call("s", None, "shop/orders", "GET", "/", tour.DENY, evidence.MTLS)
    reset = tour.Response(0, "closed", "RemoteDisconnected")
    r = tour.judge(1, plaintext, reset, None, request_id="r", trace_id="x")
    assert r.ok and r.decider == evidence.MTLS
    refused = tour.Response(0, "refused", "ConnectionRefusedError")
    r = tour.judge(1, plaintext, refused, None, request_id="r", trace_id="x")
    assert not r.ok and "nothing listens" in r.problems[0]
    no_route = tour.Call(
        "s", "shop/frontend", "shop/payments", "GET", "/", tour.DENY, evidence.NO_ROUTE
    )
    assert tour.judge(1, no_route, refused, None, request_id="r", trace_id="x").ok


def test_request_key_ignores_the_trace_decision_digit() -> None:
    sent = "0f4e3c1a-1b2c-4d5e-8f90-123456789abc"
    logged = "0f4e3c1a-1b2c-9d5e-8f90-123456789abc"  # Envoy packed "forced trace" into it
    assert tour.request_key(sent) == tour.request_key(logged)
    assert tour.request_key("short") == "short"


# -- report --------------------------------------------------------------------------------------
def test_report_table() -> None:
    good = tour.judge(1, CALL, tour.Response(403, ""), _verdict(), request_id="r", trace_id="x")
    bad = tour.judge(3, CALL, tour.Response(200, ""), _verdict(allowed=True, status=200),
                     request_id="r", trace_id="x")  # fmt: skip
    edit = tour.EditResult(2, tour.PolicyEdit("s", "add DENY", "f.yaml", "x"), "ab" * 32, 0.4)
    text = report.render(tour.TourResult([good, edit, bad], seconds=1.5))
    assert text.startswith("== s\n#")
    assert "~ edit: add DENY (policy abababababab, every sidecar ACKed in 0.4s)" in text
    assert "allow !!" in text and "EXPECTATION FAILED: expected deny, got allow" in text
    assert text.endswith("2/3 steps as expected in 1.5s: 1 FAILED")
    data = tour.TourResult([good, edit], seconds=1).to_json()
    assert data["ok"] and data["calls"] == 1 and data["steps"][1]["kind"] == "policy-edit"
    json.dumps(data)


# -- state file ----------------------------------------------------------------------------------
def test_state_round_trip_and_relative_paths(tmp_path: Path) -> None:
    state = DemoState(
        kind="compose", policy_dir="policies", xds_admin="http://xds:15011", extauthz="e:1",
        decision_log="/abs/decisions.jsonl",
        workloads={"shop/a": WorkloadState("shop/a", "spiffe://td/ns/shop/sa/a", "h:1", "h:2",
                                           {"shop/b:8080": "a:15102"}, access_log="logs/a.log")},
    )  # fmt: skip
    save(state, tmp_path / "state.json")
    loaded = load(tmp_path)
    assert loaded.policy_dir == str(tmp_path / "policies")
    assert loaded.decision_log == "/abs/decisions.jsonl"
    assert loaded.workloads["shop/a"].access_log == str(tmp_path / "logs/a.log")
    assert loaded.outbound("shop/a", "shop/b") == "a:15102"
    assert loaded.workload("shop/a").name == "a"
    with pytest.raises(Exception, match="no workload shop/zz"):
        loaded.workload("shop/zz")
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(Exception, match="not a Meshward demo state"):
        load(tmp_path / "bad.json")


def test_committed_compose_tour_state_loads() -> None:
    state = load(ROOT / "sidecar-config" / "tour.json")
    assert state.kind == "compose" and len(state.workloads) == 5


# -- convergence ---------------------------------------------------------------------------------
def test_lagging() -> None:
    node = {"node": "shop/a", "connected": True, "streams": [{"types": [
        {"type": "CDS", "in_sync": True}, {"type": "LDS", "in_sync": False}]}]}  # fmt: skip
    status = {"policy": {"version": "v2"}, "nodes": [node]}
    assert status_poll.lagging(status, ["shop/a"], "v2") == ["shop/a: LDS not ACKed yet"]
    assert "want v1" in status_poll.lagging(status, ["shop/a"], "v1")[0]
    assert status_poll.lagging(status, ["shop/b"]) == ["shop/b: not connected"]
    node["streams"][0]["types"][1]["in_sync"] = True  # type: ignore[index]
    assert status_poll.converged(status, ["shop/a"], "v2")
    rejected = {"policy": {"version": "v2", "error": "bad yaml"}, "nodes": [node]}
    assert "rejected" in status_poll.lagging(rejected, ["shop/a"])[0]


# -- tokens ----------------------------------------------------------------------------------------
def test_minted_token_verifies_against_the_payments_jwks() -> None:
    import jwt

    token = mint(EXAMPLES / "demo-keys" / "jwt-signing-key.pem", scope="payments:write")
    jwks = json.loads((EXAMPLES / "demo-keys" / "jwks.json").read_text())
    key = jwt.PyJWK(jwks["keys"][0])
    claims = jwt.decode(token, key.key, algorithms=["ES256"], audience=AUDIENCE, issuer=ISSUER)
    assert (
        claims["scope"] == "payments:write"
        and jwt.get_unverified_header(token)["kid"] == "shop-demo-1"
    )
