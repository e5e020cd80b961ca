"""Flows collected from real Envoy sidecars over gRPC ALS into the control plane's store.

One small mesh (frontend, orders, payments; STRICT mTLS; orders admits only frontend on
/orders*): an allowed call, an RBAC denial (POST), a plaintext (mTLS-refused) connection and a call to
a path no rule admits, then ``/flows`` and ``/denials`` on the control plane's admin address.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshward.testing.mesh import Mesh
from meshward.testing.topology import allow_doc, shop_yaml, workload_doc

FRONTEND, ORDERS, PAYMENTS, DB = "shop/frontend", "shop/orders", "shop/payments", "shop/db"
POLICY = shop_yaml(
    ["frontend", "orders", "payments", workload_doc("db", protocol="TCP")],
    allow_doc(
        "orders-allow-frontend", "orders",
        callers=["frontend"], methods=["GET"], paths=["/orders", "/orders/*"],
    ),
    allow_doc("db-allow-frontend", "db", callers=["frontend"]),
)  # fmt: skip


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    base = tmp_path_factory.mktemp("flows")
    policies = base / "policies"
    policies.mkdir()
    (policies / "mesh.yaml").write_text(POLICY)
    with Mesh(
        policies, base / "run", [FRONTEND, ORDERS, PAYMENTS, DB], flows_db=base / "flows.db"
    ) as m:
        yield m


def admin(mesh: Mesh, path: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{mesh.xds.admin_url}{path}", timeout=5) as response:
        rows: list[dict[str, Any]] = json.loads(response.read())["rows"]
    return rows


def wait_rows(mesh: Mesh, path: str, want: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = admin(mesh, path)
        if want(rows):
            return rows
        time.sleep(0.2)
    raise AssertionError(f"{path}: not seen in {timeout}s: {rows}")


def test_calls_become_flows_and_denials(mesh: Mesh) -> None:
    assert mesh.request(FRONTEND, ORDERS, "/orders/42")[0] == 200
    assert mesh.request(FRONTEND, ORDERS, "/orders/43")[0] == 200
    assert mesh.request(FRONTEND, ORDERS, "/orders/7", method="POST")[0] == 403
    assert mesh.plaintext(ORDERS, "/orders/1")[0] == 0  # STRICT: no TLS, no HTTP

    def allowed(rows: list[dict[str, Any]]) -> bool:
        return any(
            r["source"] == FRONTEND and r["destination"] == ORDERS and r["path"] == "/orders/{*}"
            and r["decision"] == "allow" and r["count"] == 2
            for r in rows
        )  # fmt: skip

    rows = wait_rows(mesh, "/flows", allowed)
    flow = next(r for r in rows if r["source"] == FRONTEND and r["decision"] == "allow")
    assert flow["method"] == "GET" and flow["port"] == 8080
    assert flow["policy"] == "shop/orders-allow-frontend#0"
    denied = wait_rows(
        mesh,
        "/denials",
        lambda rows: (
            any(r["method"] == "POST" for r in rows)
            and any(r["reason"].startswith("mTLS") for r in rows)
        ),
    )
    rbac = next(r for r in denied if r["method"] == "POST")
    assert (
        rbac["source"] == FRONTEND
        and rbac["destination"] == ORDERS
        and rbac["path"] == "/orders/{*}"
    )
    assert rbac["reason"] == "no ALLOW rule matched (default deny)"
    mtls = next(r for r in denied if r["reason"].startswith("mTLS"))
    assert mtls["destination"] == ORDERS and mtls["source"] == "plaintext"
    assert mtls["kind"] == "connection"
    # the listener log records refused connections only (its CEL filter), not every connection
    assert [r for r in denied if r["kind"] == "connection"] == [mtls]
    only = admin(mesh, "/flows?from=shop/frontend&decision=deny")
    assert only and all(r["source"] == FRONTEND and r["decision"] == "deny" for r in only)
    assert [r["method"] for r in only] == ["POST"]


def test_cli_reads_flows_and_denials_from_the_admin_address(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    from meshward.cli import main

    assert mesh.request(FRONTEND, ORDERS, "/orders/99")[0] == 200
    assert mesh.request(FRONTEND, ORDERS, "/orders/98", method="DELETE")[0] == 403
    wait_rows(mesh, "/denials", lambda rows: any(r["method"] == "DELETE" for r in rows))
    address = mesh.xds.admin_url.removeprefix("http://")
    assert main(["flows", "--xds", address, "--from", FRONTEND, "--to", ORDERS, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["flows"]
    for key in ("source", "destination", "decision", "method", "path", "policy", "count",
                "last_seen"):  # fmt: skip
        assert all(key in r for r in rows), key
    assert {(r["method"], r["decision"]) for r in rows} >= {("GET", "allow"), ("DELETE", "deny")}
    assert main(["flows", "--xds", address, "--decision", "deny", "--since", "1h"]) == 0
    text = capsys.readouterr().out
    assert "shop/frontend" in text and "DELETE /orders/{*}" in text and "GET /orders" not in text
    assert main(["denials", "--xds", address, "--json"]) == 0
    denials = json.loads(capsys.readouterr().out)["denials"]
    for key in ("source", "destination", "reason", "policy", "trace_id"):
        assert all(key in r for r in denials), key
    delete = next(r for r in denials if r["method"] == "DELETE")
    assert main(["denials", "--xds", address, "--trace", delete["trace_id"], "--json"]) == 0
    [one] = json.loads(capsys.readouterr().out)["denials"]
    assert one["method"] == "DELETE" and one["trace_id"] == delete["trace_id"]
    assert main(["flows", "--xds", "127.0.0.1:1"]) == 1  # unreachable: a clear error, exit 1
    assert "cannot read /flows" in capsys.readouterr().err


def test_metrics_count_flows_by_source_and_destination(mesh: Mesh) -> None:
    assert mesh.request(FRONTEND, ORDERS, "/orders/5")[0] == 200

    def scrape() -> str:
        with urllib.request.urlopen(f"{mesh.xds.admin_url}/metrics", timeout=5) as response:
            text: str = response.read().decode()
        return text

    want = 'meshward_flows_total{decision="allow",destination="shop/orders",source="shop/frontend"}'
    deadline = time.monotonic() + 30
    text = scrape()
    while want not in text and time.monotonic() < deadline:
        time.sleep(0.2)
        text = scrape()
    assert want in text
    assert 'meshward_flow_denials_total{policy="none"}' in text  # the POST: no ALLOW rule
    assert 'meshward_flow_enforcement_seconds_bucket{decision="allow",le="0.005"}' in text
    assert "meshward_flow_collector_refused_total" in text


def test_bad_query_parameters_are_a_400_with_a_reason(mesh: Mesh) -> None:
    import urllib.error

    for query, reason in (("decision=maybe", "decision must be"), ("limit=0", "limit must be"),
                          ("since=yesterday", "since must be")):  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as info:
            admin(mesh, f"/flows?{query}")
        assert info.value.code == 400 and reason in info.value.read().decode()


def test_tcp_connections_are_flows_too(mesh: Mesh) -> None:
    """A TCP port: the TCP proxy's gRPC log (one record per connection, no method or path)."""
    assert mesh.request(FRONTEND, DB, "/anything")[0] == 200  # HTTP through the TCP proxy

    def seen(rows: list[dict[str, Any]]) -> bool:
        return any(r["source"] == FRONTEND and r["decision"] == "allow" for r in rows)

    rows = wait_rows(mesh, "/flows?to=shop/db", seen)
    flow = next(r for r in rows if r["source"] == FRONTEND)
    assert flow["port"] == 8080 and flow["method"] == "" and flow["path"] == ""


def test_report_from_real_sidecar_flows(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`meshward report` over flows real Envoys reported: the deciding rule they named is used,
    the plaintext refusal lowers mTLS coverage, and reachability equals `policy explain`."""
    from datetime import UTC, datetime

    from meshward.cli import main
    from meshward.policy import parse
    from meshward.policy.cases import build_request
    from meshward.policy.explain import explain

    assert mesh.request(FRONTEND, ORDERS, "/orders/11")[0] == 200
    assert mesh.request(FRONTEND, ORDERS, "/orders/12", method="PUT")[0] == 403
    assert mesh.plaintext(ORDERS, "/orders/1")[0] == 0
    wait_rows(mesh, "/denials", lambda rows: any(r["method"] == "PUT" for r in rows))
    address = mesh.xds.admin_url.removeprefix("http://")
    page = tmp_path / "report.html"
    assert main(["report", "--xds", address, "--json", "--html", str(page)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "shop/orders-allow-frontend#0" not in {u["rule"] for u in doc["unused_rules"]}
    edge = next(e for e in doc["edges"] if (e["source"], e["destination"]) == (FRONTEND, ORDERS))
    assert edge["allowed"] >= 1 and edge["denied"] >= 1 and edge["policy_allows"]
    assert doc["mtls"]["plaintext"] >= 1 and doc["mtls"]["coverage"] < 1
    assert doc["compliance"]["explicit"] >= 1
    assert set(doc["blast_radius"][FRONTEND]["direct"]) == {ORDERS, PAYMENTS, DB}
    policy = parse({"mesh.yaml": POLICY})
    now = datetime.now(UTC)
    listed = {(e["source"], e["destination"]): {(r["port"], r["method"], r["path"], r["host"])
              for r in e["requests"]} for e in doc["reachability"]}  # fmt: skip
    for dst in doc["workloads"]:
        for src in doc["workloads"]:
            if src == dst:
                continue
            allowed = set()
            for p in doc["probes"][dst]:
                callee, request = build_request(policy, destination=dst, source=src,
                                                method=p["method"] or "GET", path=p["path"] or "/",
                                                port=p["port"], host=p["host"] or None)  # fmt: skip
                if explain(policy, callee, request, now=now).decision.allowed:
                    allowed.add((p["port"], p["method"], p["path"], p["host"]))
            assert allowed == listed.get((src, dst), set()), (src, dst)
    assert 'data-id="shop/db"' in page.read_text()
