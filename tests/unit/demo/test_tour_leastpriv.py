"""The least-privilege chapter's pure parts: its steps, the shop it starts from, and how it
judges `policy suggest` and `report` answers (the live run needs those commands: see
tests/integration/test_demo_leastpriv.py)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from meshward.cli import main
from meshward.demo import tour_leastpriv as lp
from meshward.demo.tour import ALLOW, DENY
from meshward.demo.tour_leastpriv_run import ChapterResult, Entry, dispatch
from meshward.errors import UserError
from meshward.flows.evidence import NO_ROUTE, RBAC
from meshward.flows.suggest import Mode, ObservedFlow, suggest
from meshward.flows.suggest_check import with_policies
from meshward.policy import Request, evaluate, load, parse

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
SHOP = [lp.FE, lp.INV, lp.ORD, lp.PAY, lp.SCR]


@pytest.fixture(scope="module")
def baseline() -> Any:
    return parse({"workloads.yaml": lp.baseline_documents(load([EXAMPLES]))})


def decide(policy_set: Any, source: str, target: str, method: str, path: str) -> Any:
    caller = policy_set.workload(source)
    return evaluate(
        policy_set,
        policy_set.workload(target),
        Request(method=method, path=path, destination_port=8080,
                source_principal=caller.spiffe_id(policy_set.mesh.trust_domain)),
        now=datetime.now(UTC),
    )  # fmt: skip


def test_the_chapter_starts_from_the_shop_with_no_authorization(baseline: Any) -> None:
    shop = load([EXAMPLES])
    assert [w.ref for w in baseline.workloads] == [w.ref for w in shop.workloads] == SHOP
    assert not baseline.authorization_policies and not baseline.request_authentications
    assert baseline.peer_authentications == shop.peer_authentications  # STRICT mTLS stays
    # so every call of the first phase is allowed, by no policy
    for call in lp.open_traffic():
        decision = decide(baseline, call.source, call.target, call.method, call.path)
        assert decision.verdict == ALLOW and decision.policy is None, call


def test_the_steps_tell_the_story_in_order() -> None:
    kinds = [type(s).__name__ for s in lp.STEPS]
    assert kinds[0] == kinds[-1] == "Report"
    assert [s.label for s in lp.STEPS if isinstance(s, lp.Report)] == ["before", "after"]
    outs = {s.out: s.mode for s in lp.STEPS if isinstance(s, lp.Suggest)}
    assert outs == {"dry-run": "dry-run", "enforce": "enforce"}
    applies = [s.source for s in lp.STEPS if isinstance(s, lp.Apply)]
    assert applies == ["dry-run", "enforce"]  # dry-run reviewed before enforcing
    for step in lp.STEPS:  # every step reads only what an earlier step wrote
        if isinstance(step, lp.Apply):
            earlier = lp.STEPS[: lp.STEPS.index(step)]
            assert step.source in {s.out for s in earlier if isinstance(s, lp.Suggest)}
    traffic = [s for s in lp.STEPS if isinstance(s, lp.Traffic)]
    assert [t.title for t in traffic] == [lp.S_OPEN, lp.S_DRY, lp.S_ENFORCED]


def test_attacks_are_never_normal_traffic_and_their_outcome_follows_from_it() -> None:
    """An attack the shop does itself would be learned by suggest; and whether it dies for
    want of a route or at RBAC depends on whether the caller calls the callee at all."""
    normal = {(s, d, m, p) for s, d, m, p in lp.NORMAL}
    pairs = {(s, d) for s, d, _, _ in lp.NORMAL}
    for src, dst, method, path, _, decider in (*lp.ATTACKS, lp.PIVOT):
        assert (src, dst, method, path) not in normal
        assert decider == (RBAC if (src, dst) in pairs else NO_ROUTE), (src, dst)
    enforced = lp.enforced_traffic()
    assert [c.expect for c in lp.attack_paths(enforced)] == [DENY] * (len(lp.ATTACKS) + 1)
    assert all(c.would_deny == (lp.DRY_RUN_ALLOW,) for c in lp.attack_paths(lp.dry_run_traffic()))
    assert all(c.would_deny == () for c in lp.dry_run_traffic() if c.note == "")
    unseen = [c for c in enforced if c.section == lp.S_NEVER_SEEN]
    assert unseen and all(c.path not in {p for *_, p in lp.NORMAL} for c in unseen)


def test_suggest_closes_exactly_the_workloads_no_normal_call_reaches(baseline: Any) -> None:
    """The chapter relies on `policy suggest` (pure part here) for the allow-nothing of the
    scraper, which nobody calls: left open, a compromised payments would pivot through it."""
    called = {dst for _, dst, _, _ in lp.NORMAL}
    assert set(lp.UNCALLED) == {w.ref for w in baseline.workloads} - called == {lp.SCR}
    now = datetime.now(UTC)
    t = now.timestamp()
    flows = [ObservedFlow(src, dst, 8080, method, path, 2, t - 7200, t - 1)
             for src, dst, method, path in lp.NORMAL]  # fmt: skip
    result = suggest(baseline, flows, now=now, namespace="shop", mode=Mode.ENFORCE)
    assert result.closed == lp.UNCALLED and set(result.workloads) == set(SHOP)
    enforced = with_policies(baseline, result.enforced(), keep_existing=False)
    src, dst, method, path, *_ = lp.PIVOT
    assert decide(baseline, src, dst, method, path).verdict == ALLOW  # open before
    assert decide(enforced, src, dst, method, path).verdict == DENY
    assert all(decide(enforced, lp.SCR, dst, "GET", "/metrics").verdict == ALLOW
               for dst in called)  # fmt: skip  # closed to callers, not as a caller


def _report(**over: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "mode": "dry-run",
        "valid": True,
        "files": [
            {"file": f"out/suggested-{w}.yaml", "workload": w, "rules": 1}
            for w in (lp.FE, lp.ORD, lp.PAY, lp.INV, lp.SCR)
        ],
        "closed": [lp.SCR],
        "coverage": {"allowed": 9, "flows": 9, "percent": 100.0, "denied": []},
        "would_deny": {"changes": [{}] * 71, "truncated": False},
        "warnings": [{"kind": "recent", "message": "shop/scraper first called 5s ago"}],
    }
    report.update(over)
    return report


def test_a_good_suggestion_passes_and_each_shortfall_is_named() -> None:
    good = lp.judge_suggest("dry-run", 0, _report())
    assert good.ok and good.would_deny == 71 and good.coverage == "9/9 (100.0%)"
    assert "coverage 9/9" in lp.render_suggest(good) and "5s ago" in lp.render_suggest(good)
    assert "allow-nothing (no caller observed): shop/scraper" in lp.render_suggest(good)
    cases = {
        "suggest exited 1": lp.judge_suggest("dry-run", 1, _report()),
        "asked for enforce": lp.judge_suggest("enforce", 0, _report()),
        "does not validate": lp.judge_suggest("dry-run", 0, _report(valid=False)),
        "coverage 8/9": lp.judge_suggest(
            "dry-run", 0, _report(coverage={"allowed": 8, "flows": 9, "percent": 88.9})
        ),
        "no suggested policy for shop/inventory, shop/orders": lp.judge_suggest(
            "dry-run", 0, _report(files=[{"file": "x", "workload": lp.FE}])
        ),
        "no such command": lp.judge_suggest("dry-run", 2, None, "error: no such command\n"),
        "allow-nothing for no workload, expected for shop/scraper": lp.judge_suggest(
            "dry-run", 0, _report(closed=[])
        ),
        "allow-nothing for shop/orders, shop/scraper": lp.judge_suggest(
            "dry-run", 0, _report(closed=[lp.ORD, lp.SCR])
        ),
    }
    for words, verdict in cases.items():
        assert not verdict.ok and any(words in p for p in verdict.problems), (words, verdict)
        assert "EXPECTATION FAILED" in lp.render_suggest(verdict)


def _blast(reach: dict[str, list[str]]) -> dict[str, Any]:
    return {w: {"direct": t, "direct_count": len(t), "transitive": t,
                "transitive_count": len(t)} for w, t in reach.items()}  # fmt: skip


OPEN = _blast({w: [o for o in SHOP if o != w] for w in SHOP})
LEAST = _blast({lp.FE: [lp.INV, lp.ORD, lp.PAY], lp.ORD: [lp.INV, lp.PAY], lp.PAY: [],
                lp.INV: [], lp.SCR: [lp.FE, lp.INV, lp.ORD, lp.PAY]})  # fmt: skip


def test_blast_radius_must_shrink_and_never_grow() -> None:
    verdict = lp.judge_radius(OPEN, LEAST)
    assert verdict.ok, verdict.problems
    table = lp.render_radius(verdict)
    assert "shop/payments   4 -> 0  4 -> 0      nothing" in table
    assert verdict.to_json()["workloads"][lp.ORD]["transitive"] == [4, 2]
    assert not lp.judge_radius(OPEN, OPEN).ok  # nothing shrank
    grew = lp.judge_radius(LEAST, OPEN)
    assert any("reaches more" in p for p in grew.problems)
    leaky = lp.judge_radius(OPEN, {**LEAST, lp.PAY: _blast({lp.PAY: [lp.SCR]})[lp.PAY]})
    assert any("shop/payments still reaches shop/scraper" in p for p in leaky.problems)
    assert not lp.judge_radius({}, {}).ok


def test_flows_missing_names_what_the_store_has_not_shown_yet() -> None:
    calls = lp.open_traffic()
    rows = [{"source": s, "destination": d, "method": m, "decision": "allow"}
            for s, d, m, _ in lp.NORMAL]  # fmt: skip
    assert lp.flows_missing(rows, calls) == []
    partial = [r for r in rows if r["destination"] != lp.PAY]
    assert lp.flows_missing(partial, calls) == [
        "shop/orders -> shop/payments POST",
        "shop/scraper -> shop/payments GET",
    ]
    denied = [{**r, "decision": "deny"} for r in rows]
    assert len(lp.flows_missing(denied, calls)) == len({(s, d, m) for s, d, m, _ in lp.NORMAL})


def test_the_result_reads_top_to_bottom_and_fails_on_any_step() -> None:
    result = ChapterResult([Entry("report", "blast radius before", True, "5 workloads")], 1.0)
    assert result.ok and "1/1 steps as expected" in result.render()
    result.entries.append(Entry("apply", "enforce", False, "FAILED: not converged"))
    assert not result.ok and "1 FAILED" in result.render()
    assert result.to_json()["steps"][1] == {"kind": "apply", "title": "enforce", "ok": False}


def test_the_cli_offers_the_chapter(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "least-privilege" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        main(["demo", "--chapter", "least-privlege"])
    assert usage.value.code == 2 and "invalid choice" in capsys.readouterr().err
    args = argparse.Namespace(chapter="all", json=True, attach=None)
    with pytest.raises(UserError, match="--json prints one chapter"):
        dispatch(args)
