"""`meshward demo` end to end, through the same entry point as the README's `make demo`: real
processes (control plane, ext_authz, echo apps), real Envoy sidecars, real mTLS and JWTs, and the
spans exported to a real OTLP receiver."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshward.cli import main
from meshward.flows import evidence
from meshward.telemetry.collector import OtlpReceiver


@dataclass
class Run:
    code: int
    result: dict[str, Any]
    progress: str
    state: Path
    receiver: OtlpReceiver


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def last_pointer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep the demo from recording itself as the user's "last demo"."""
    pointer = tmp_path_factory.mktemp("pointer") / "last"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESHWARD_DEMO_LAST", str(pointer))
        yield pointer


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, last_pointer: Path) -> Iterator[Run]:
    state = tmp_path_factory.mktemp("demo-state")
    with OtlpReceiver() as receiver:
        code, out, err = _run(
            ["demo", "--state", str(state), "--json", "--otlp-endpoint", receiver.endpoint]
        )
        try:
            result = json.loads(out)
        except ValueError:
            pytest.fail(f"`meshward demo --json` printed no JSON (exit {code}):\n{out}\n{err}")
        yield Run(code, result, err, state, receiver)


def _steps(run: Run, **match: Any) -> list[dict[str, Any]]:
    return [
        s
        for s in run.result["steps"]
        if s["kind"] == "call" and all(s.get(k) == v for k, v in match.items())
    ]


def test_every_expectation_held(run: Run) -> None:
    failed = [s for s in run.result["steps"] if not s["ok"]]
    assert run.code == 0 and run.result["ok"] and not failed, json.dumps(failed, indent=1)
    assert run.result["calls"] >= 20
    # progress was visible while starting, naming each component
    for name in ("xds", "extauthz", "payments", "payments-sidecar"):
        assert f"[start] {name}" in run.progress and f"[ready] {name}" in run.progress
    deciders = {s["decider"] for s in _steps(run)}
    assert {evidence.RBAC, evidence.MTLS, evidence.NO_ROUTE} <= deciders
    # payments' JWT rules are decided by Envoy (jwt_authn + RBAC), not by ext_authz
    assert all(
        s["decider"] == evidence.RBAC
        for s in _steps(run, source="shop/orders", target="shop/payments", path="/payments")
    )
    # the dry-run tightening is reported, not enforced
    [scrape] = _steps(run, source="shop/scraper", target="shop/payments", path="/metrics")
    assert scrape["actual"] == "allow" and scrape["would_deny"] == ["shop/payments-deny-scraper"]
    # the live edit: denied while it is in force, allowed again after the revert
    edits = [s for s in run.result["steps"] if s["kind"] == "policy-edit"]
    assert len(edits) == 4 and all(e["ok"] for e in edits)
    posts = [s["actual"] for s in _steps(run, section=edits[0]["section"], method="POST")]
    assert posts == ["allow", "deny", "allow"]
    # a CUSTOM policy: ext_authz decides what its rules match (a miss, then a cache hit on the
    # repeat); every other request stays Envoy's, and ext_authz decides nothing else
    custom = _steps(run, section=edits[2]["section"])
    assert [(s["decider"], s["extauthz"]) for s in custom] == [
        (evidence.RBAC, "not asked"),
        (evidence.EXTAUTHZ, "miss"),
        (evidence.EXTAUTHZ, "hit"),
        (evidence.RBAC, "not asked"),
        (evidence.RBAC, "not asked"),
    ]
    assert {s["policy"] for s in _steps(run, decider=evidence.EXTAUTHZ)} == {
        "shop/inventory-costs-need-approval"
    }
    # the edits touched the demo's copy only, and the reverts removed them again
    assert not (run.state / "policies" / "tour-live-edit.yaml").exists()
    assert not (run.state / "policies" / "tour-custom.yaml").exists()
    state = json.loads((run.state / "state.json").read_text())
    assert state["running"] is False and state["otlp"] == run.receiver.endpoint


def test_a_jwt_denial_is_decided_by_envoy_in_one_trace(run: Run) -> None:
    """No end-user token: jwt_authn lets it pass without a request principal and RBAC denies
    it; the trace runs tour -> orders -> payments with no ext_authz span in it."""
    [denied] = [
        s
        for s in _steps(run, source="shop/orders", target="shop/payments", path="/payments")
        if s["actual"] == "deny" and s["token_scope"] is None
    ]
    assert denied["decider"] == evidence.RBAC
    trace = denied["trace_id"]

    def complete(spans: list[Any]) -> bool:
        services = {s.service for s in spans if s.trace_id == trace}
        return {"payments.shop", "orders.shop"} <= services

    spans = [s for s in run.receiver.wait_for(complete, timeout=20) if s.trace_id == trace]
    assert not any(s.service == "meshward-extauthz" for s in spans)
    inbound = [s for s in spans if s.service == "payments.shop"]
    assert any(str(s.attributes.get("http.status_code")) == "403" for s in inbound)
    # and the tour's own client span (the "app") is the root of it all
    assert any(s.service == "meshward-demo-tour" and not s.parent_span_id for s in spans)


def test_an_rbac_denial_has_an_envoy_span_with_403(run: Run) -> None:
    [denied] = _steps(run, source="shop/scraper", target="shop/payments", path="/admin")
    trace = denied["trace_id"]
    spans = run.receiver.wait_for(
        lambda spans: any(s.trace_id == trace and s.service == "payments.shop" for s in spans),
        timeout=20,
    )
    [inbound] = [s for s in spans if s.trace_id == trace and s.service == "payments.shop"]
    assert str(inbound.attributes.get("http.status_code")) == "403"
    assert not any(s.trace_id == trace and s.service == "meshward-extauthz" for s in spans)


def test_denials_lists_every_denial_of_the_run(run: Run) -> None:
    code, out, _ = _run(["denials", "--state", str(run.state), "--json", "--dry-run"])
    assert code == 0
    listed = json.loads(out)["denials"]
    by_trace = {(d["trace_id"], d["dry_run"]): d for d in listed}
    for step in _steps(run, actual="deny"):
        if step["decider"] in (evidence.MTLS, evidence.NO_ROUTE):
            continue  # refused before HTTP: no access-log line, nothing to list
        d = by_trace[(step["trace_id"], False)]
        assert (d["decided_by"], d["policy"], d["rule"]) == (
            step["decider"], step["policy"], step["rule"],
        )  # fmt: skip
    assert any(d["dry_run"] and d["policy"] == "shop/payments-deny-scraper" for d in listed)


def _state_advertises_exactly_the_outbound_listeners(path: Path) -> None:
    """state.json's outbound addresses are the caller sidecars' live outbound listeners, no
    more (a pair without a listener is listed as unlistened, and nothing listens there)."""
    from meshward.envoy.admin import AdminClient  # Envoy's admin is a Unix socket (issue 13)

    state = json.loads(path.read_text())
    for ref, workload in state["workloads"].items():
        code, text = AdminClient(workload["admin"]).get("/listeners?format=json")
        assert code == 200, text
        statuses = json.loads(text)["listener_statuses"]
        bound = {
            f"{s['local_address']['socket_address']['address']}:"
            f"{s['local_address']['socket_address']['port_value']}"
            for s in statuses
            if s["name"].startswith("outbound")
        }
        assert set(workload["outbound"].values()) == bound, ref
        assert not set(workload["unlistened"].values()) & bound, ref


def _wait_rows(argv: list[str], key: str, want: Any) -> list[dict[str, Any]]:
    import time

    rows: list[dict[str, Any]] = []
    for _ in range(100):
        code, out, err = _run(argv)
        assert code == 0, err
        rows = json.loads(out)[key]
        if want(rows):
            return rows
        time.sleep(0.2)
    raise AssertionError(f"{' '.join(argv)}: not seen: {rows}")


def test_attach_runs_the_tour_against_a_running_mesh(demo_mesh: Any, last_pointer: Path) -> None:
    """What the compose `tour` service does, against a mesh started outside the tour (the
    shared demo mesh, tests/integration/conftest.py, which checks state.json says it stopped
    once it has)."""
    mesh, state_dir = demo_mesh.mesh, demo_mesh.state_dir
    code, out, err = _run(["demo", "--attach", str(state_dir), "--wait", "10", "--json"])
    assert code == 0, err
    assert json.loads(out)["ok"]
    code, out, _ = _run(["denials", "--state", str(state_dir), "--json"])
    listing = json.loads(out)
    assert listing["running"] is True and len(listing["denials"]) >= 8
    # no --otlp-endpoint: the demo's own collector kept the spans, and they are listed
    # (every denial of the tour is Envoy's now: payments' JWT rules are jwt_authn + RBAC)
    rbac = [d for d in listing["denials"] if d["decided_by"] == evidence.RBAC]
    assert rbac and any(any(s.startswith("payments.shop:") for s in d["spans"]) for d in rbac)
    assert mesh.state is not None
    _state_advertises_exactly_the_outbound_listeners(state_dir / "state.json")
    # Fleet-wide, from the control plane's flow collector (every sidecar's gRPC access log)
    admin = mesh.state.xds_admin
    flows = _wait_rows(["flows", "--xds", admin, "--json"], "flows", lambda rows: any(
        r["decision"] == "allow" and r["source"] == "shop/frontend" for r in rows))  # fmt: skip
    assert any(r["decision"] == "deny" for r in flows)
    denials = _wait_rows(["denials", "--xds", admin, "--json"], "denials", lambda rows: any(
        r["reason"].startswith("mTLS") for r in rows))  # fmt: skip
    assert {"source", "destination", "reason", "policy", "trace_id"} <= set(denials[0])


def test_a_failing_component_is_named_with_its_log(tmp_path: Path, last_pointer: Path) -> None:
    fake = tmp_path / "envoy"
    fake.write_text("#!/bin/sh\necho 'fake envoy: refusing to start' >&2\nexit 3\n")
    fake.chmod(0o755)
    state = tmp_path / "state"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESHWARD_ENVOY", str(fake))
        code, _, err = _run(["demo", "--state", str(state)])
    assert code == 1
    assert "-sidecar exited before it was ready" in err and "fake envoy: refusing to start" in err
    # every process it had started is gone
    leftovers = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if str(state).encode() in (proc / "cmdline").read_bytes():
                    leftovers.append(proc.name)
    assert not leftovers, f"processes left running: {leftovers}"
    assert os.path.isdir(state / "logs")
