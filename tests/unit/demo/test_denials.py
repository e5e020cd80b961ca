from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest

from meshward.cli import main
from meshward.demo.state import DemoState, WorkloadState, save
from meshward.flows import denials, evidence


def collect(S: ModuleType, **kwargs: object) -> list[denials.Denial]:
    return denials.collect(
        {"shop/orders": S.ORDERS_LOG, "shop/payments": S.PAYMENTS_LOG}, S.DECISION_LOG, **kwargs
    )  # type: ignore[arg-type]


def test_every_enforced_denial_once_oldest_first(S: ModuleType) -> None:
    found = collect(S)
    assert [(d.workload, d.decider, d.trace_id) for d in found] == [
        ("shop/orders", evidence.RBAC, S.T_RBAC_NONE),
        ("shop/payments", evidence.EXTAUTHZ, S.T_EXT_DENY),  # in both logs: listed once
        ("shop/payments", evidence.RBAC, S.T_RBAC_DENY),
        (
            "shop/payments",
            evidence.EXTAUTHZ,
            "ffff0000ffff0000ffff0000ffff0000",
        ),  # decision log only
    ]
    ext = found[1]
    # the decision log's words win over the access log's metadata
    assert ext.reason == "no ALLOW policy matched (ALLOW policies selecting shop/payments: a, b)"
    assert ext.source == "spiffe://cluster.local/ns/shop/sa/orders"
    assert found[2].rule_ref == "shop/payments-deny-admin#0"
    assert found[0].rule_ref == "(no rule matched)"
    assert found[3].status == 401 and found[3].reason == "token expired"


def test_dry_run_only_when_asked(S: ModuleType) -> None:
    assert not any(d.dry_run for d in collect(S))
    dry = [d for d in collect(S, include_dry_run=True) if d.dry_run]
    assert sorted((d.policy, d.trace_id) for d in dry) == sorted(
        [
            ("shop/payments-deny-scraper", S.T_RBAC_DENY),
            ("shop/payments-deny-scraper", S.T_SHADOW_ALLOW),
            ("shop/payments-jwt-tightening", S.T_EXT_ALLOW),
        ]
    )
    assert all("dry-run" in d.decider for d in dry)


def test_spans_are_attached_by_trace(S: ModuleType) -> None:
    spans = [
        {"trace_id": S.T_RBAC_DENY, "service": "payments.shop", "name": "ingress", "start_unix_nano": 2},
        {"trace_id": S.T_RBAC_DENY, "service": "meshward-demo-tour", "name": "call", "start_unix_nano": 1},
        {"trace_id": "other", "service": "x", "name": "y"},
    ]  # fmt: skip
    found = {d.trace_id: d for d in collect(S, spans=spans)}
    assert found[S.T_RBAC_DENY].spans == ("meshward-demo-tour: call", "payments.shop: ingress")
    assert found[S.T_RBAC_NONE].spans == ()


def test_select(S: ModuleType) -> None:
    found = collect(S)
    now = datetime(2026, 11, 21, 3, 9, 5, tzinfo=UTC)
    recent = denials.select(found, since=timedelta(seconds=10), now=now)
    assert [d.trace_id for d in recent] == ["ffff0000ffff0000ffff0000ffff0000"]
    assert len(denials.select(found, since=timedelta(minutes=1), now=now)) == 4
    assert [d.workload for d in denials.select(found, workload="shop/orders")] == ["shop/orders"]
    scraper = denials.select(found, source="shop/metrics-scraper")
    assert [d.trace_id for d in scraper] == [S.T_RBAC_DENY]
    assert denials.select(found, source="shop/nobody") == []


def test_render_and_json(S: ModuleType) -> None:
    found = collect(S)
    text = denials.render(found, jaeger="http://localhost:16686/")
    assert f"http://localhost:16686/trace/{S.T_RBAC_DENY}" in text
    assert "shop/sa/metrics-scraper" in text and "why: DENY rule shop/payments-deny-admin#0" in text
    data = found[2].to_json("http://jaeger:16686")
    assert data["jaeger"] == f"http://jaeger:16686/trace/{S.T_RBAC_DENY}"
    assert data["decided_by"] == evidence.RBAC and data["policy"] == "shop/payments-deny-admin"


@pytest.mark.parametrize(
    ("spiffe", "short"),
    [
        ("spiffe://cluster.local/ns/shop/sa/frontend", "shop/sa/frontend"),
        ("", "-"),
        ("spiffe://odd", "spiffe://odd"),
    ],
)
def test_short_identity(spiffe: str, short: str) -> None:
    assert denials.short_identity(spiffe) == short


def test_cli_reads_a_state_dir(
    S: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "orders.log").write_text(S.ORDERS_LOG)
    (tmp_path / "payments.log").write_text(S.PAYMENTS_LOG)
    (tmp_path / "decisions.jsonl").write_text(S.DECISION_LOG)
    state = DemoState(
        kind="local",
        policy_dir="policies",
        xds_admin=None,
        extauthz=None,
        decision_log="decisions.jsonl",  # relative: to the state file's directory
        workloads={
            "shop/orders": WorkloadState("shop/orders", "spiffe://x", "h:1", "h:2", access_log="orders.log"),
            "shop/payments": WorkloadState("shop/payments", "spiffe://y", "h:3", "h:4", access_log="payments.log"),
        },
    )  # fmt: skip
    save(state, tmp_path / "state.json")
    assert main(["denials", "--state", str(tmp_path), "--since", "3650d", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["trace_id"] for d in data["denials"]][:3] == [
        S.T_RBAC_NONE,
        S.T_EXT_DENY,
        S.T_RBAC_DENY,
    ]
    assert data["running"] is False
    assert main(["denials", "--state", str(tmp_path), "--workload", "shop/orders",
                 "--since", "3650d", "--jaeger", "http://j:16686"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("1 denial in the last 3650d (stopped local demo")
    assert f"http://j:16686/trace/{S.T_RBAC_NONE}" in out
    # these lines are older than the window: say so, and how to widen it
    assert main(["denials", "--state", str(tmp_path), "--since", "1s"]) == 0
    assert "older; widen with --since" in capsys.readouterr().out


def test_cli_without_a_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESHWARD_DEMO_LAST", str(tmp_path / "nothing"))
    assert main(["denials"]) == 1
    assert "no running demo found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["denials", "--since", "soon"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--limit", "-1"], "argument --limit: must be 0 or more, got -1"),
        (["--limit", "ten"], "argument --limit: expected a whole number"),
        (["--since", "-5m"], "a duration cannot be negative"),
        (["--jaeger", "localhost:16686"], "expected an http(s) URL"),
    ],
)
def test_cli_refuses_bad_flags(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["denials", "--state", str(tmp_path), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


GOOD_STATE = {"kind": "local", "policy_dir": "p", "xds_admin": None, "extauthz": None,
              "decision_log": None, "workloads": {}}  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({**GOOD_STATE, "decision_log": 5}, "decision_log: expected a string or null, got a number"),
        ({**GOOD_STATE, "pid": "x", "running": True}, "pid: expected a number or null"),
        ({**GOOD_STATE, "workloads": [1]}, "workloads: expected an object, got a list"),
        ({**GOOD_STATE, "workloads": {"a/b": 1}}, "workloads['a/b']: expected an object"),
        (
            {**GOOD_STATE, "workloads": {"a/b": {"ref": "a/b", "spiffe_id": "s", "inbound": "h:1",
                                                 "app": "h:2", "access_log": 7}}},
            "workloads['a/b'].access_log: expected a string or null, got a number",
        ),
        ({**GOOD_STATE, "colour": "red"}, "colour: unknown field"),
        ({**GOOD_STATE, "kind": "cloud"}, "kind: expected 'local' or 'compose'"),
        ({"workloads": {}}, "kind: missing"),
        ([], "is not a Meshward demo state file"),
    ],
)  # fmt: skip
def test_cli_names_what_is_wrong_in_a_bad_state_file(
    content: object, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hand-edited state file used to end in a Python TypeError/AttributeError traceback."""
    (tmp_path / "state.json").write_text(json.dumps(content))
    assert main(["denials", "--state", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_refuses_a_workload_the_demo_does_not_have(capsys: pytest.CaptureFixture[str]) -> None:
    """It used to print "0 denials" for a typo."""
    tour = str(Path(__file__).resolve().parents[3] / "sidecar-config" / "tour.json")
    for flag in ("--workload", "--from"):
        assert main(["denials", "--state", tour, flag, "shop/order"]) == 1
        err = capsys.readouterr().err
        assert f"{flag} shop/order: no such workload in this demo" in err
        assert "did you mean 'shop/orders'?" in err
