"""`meshward demo --chapter least-privilege` end to end: the shop starts with no authorization
policy (real control plane, ext_authz, five Envoy sidecars), real traffic, `meshward policy
suggest` (dry-run, then enforcing; it closes the scraper, which nobody calls, with
allow-nothing), `meshward report` before and after. Needs both commands
(issue 18); without them the chapter fails at its first report, saying which command is missing.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from meshward.cli import main
from meshward.demo import tour_leastpriv as lp


def test_the_chapter_learns_enforces_and_shrinks_every_blast_radius(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHWARD_DEMO_LAST", str(tmp_path / "last"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["demo", "--chapter", "least-privilege", "--state", str(tmp_path / "s"),
                     "--json"])  # fmt: skip
    try:
        result = json.loads(out.getvalue())
    except ValueError:
        pytest.fail(f"no JSON (exit {code}):\n{out.getvalue()}\n{err.getvalue()[-4000:]}")
    failed = [s for s in result["steps"] if not s["ok"]]
    assert code == 0 and result["ok"] and not failed, json.dumps(failed, indent=1)[:6000]
    steps: dict[str, Any] = {s["title"]: s for s in result["steps"]}
    # suggest: both modes, every called workload, 100 % of the observed allowed flows
    suggests = [s for s in result["steps"] if s["kind"] == "suggest"]
    assert [s["mode"] for s in suggests] == ["dry-run", "enforce"]
    for s in suggests:
        assert s["coverage"].endswith("(100.0%)") and s["would_deny"] > 0
        assert set(s["workloads"]) == {lp.FE, lp.ORD, lp.PAY, lp.INV, lp.SCR}
        assert s["closed"] == [lp.SCR]  # nobody called it: suggest wrote allow-nothing
    assert not [s for s in result["steps"] if s["kind"] not in ("report", "traffic", "suggest",
                                                                "apply")]  # fmt: skip
    # dry-run: attacks allowed but reported; enforced: denied, a new id still allowed
    dry = steps[lp.S_DRY]["result"]["steps"]
    assert all(c["actual"] == "allow" for c in dry)
    # (the pivot through the scraper too: its dry-run allow-nothing reports every caller)
    assert [c["would_deny"] for c in dry if c["note"]] == [[lp.DRY_RUN_ALLOW]] * (
        len(lp.ATTACKS) + 1
    )
    enforced = steps[lp.S_ENFORCED]["result"]["steps"]
    assert [c["actual"] for c in enforced if c["note"]] == ["deny"] * (len(lp.ATTACKS) + 1)
    unseen = [c for c in enforced if c["path"] == "/orders/977"]
    assert unseen and unseen[0]["actual"] == "allow"
    # blast radius: the leaves reach nothing, the frontend no longer reaches the scraper
    [radius] = [s for s in result["steps"] if s["kind"] == "report" and "workloads" in s]
    table = radius["workloads"]
    assert table[lp.PAY]["transitive"] == [4, 0] and table[lp.INV]["transitive"] == [4, 0]
    assert lp.SCR not in table[lp.FE]["reach_after"]
