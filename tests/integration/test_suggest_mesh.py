"""The least-privilege loop against real Envoy sidecars (mTLS, flows over gRPC ALS):

1. no authorization policy: traffic flows and is recorded;
2. `meshward policy suggest --mode enforce`: the files validate (with the Envoy limits), cover
   100 % of the observed flows, and once in the policy directory every sidecar enforces them:
   observed flows (and an unseen id under a folded path) pass, never-observed ones are denied,
   and the frontend, which nobody called, gets allow-nothing: closed to every caller;
3. audit mode (MeshConfig `enforcement: {namespaces: {shop: audit}}`): the same policies only
   report: the never-observed call passes and its flow carries the dry-run would-deny; back to
   enforce, it is denied again.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshward.cli import main
from meshward.policy import load
from meshward.testing.mesh import Mesh
from meshward.testing.topology import workloads_yaml
from meshward.testing.waiting import wait_until

FRONTEND, ORDERS, PAYMENTS = "shop/frontend", "shop/orders", "shop/payments"
MESH = """
apiVersion: meshward.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: cluster.local, rootNamespace: meshward-system%s}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: meshward-system}
spec: {mtls: {mode: STRICT}}
"""
AUDIT = ", enforcement: {namespaces: {shop: audit}}"
WORKLOADS = workloads_yaml(["frontend", "orders", "payments"])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    base = tmp_path_factory.mktemp("suggest")
    policies = base / "policies"
    policies.mkdir()
    (policies / "mesh.yaml").write_text(MESH % "" + WORKLOADS)
    with Mesh(
        policies, base / "run", [FRONTEND, ORDERS, PAYMENTS], flows_db=base / "flows.db"
    ) as m:
        yield m


def observed(mesh: Mesh) -> list[dict[str, Any]]:
    url = f"{mesh.xds.admin_url}/flows/observed"
    with urllib.request.urlopen(url, timeout=5) as response:
        rows: list[dict[str, Any]] = json.loads(response.read())["rows"]
        return rows


def flows(mesh: Mesh, source: str) -> list[dict[str, Any]]:
    url = f"{mesh.xds.admin_url}/flows?from={source}"
    with urllib.request.urlopen(url, timeout=5) as response:
        rows: list[dict[str, Any]] = json.loads(response.read())["rows"]
        return rows


def converge(mesh: Mesh) -> None:
    wanted = load([mesh.policy_dir]).version
    wait_until(lambda: mesh.status()["policy"]["version"] == wanted, 30, "the edit to be applied")
    mesh.wait_converged(wanted)


def test_suggest_enforce_then_audit(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = [
        (FRONTEND, ORDERS, "GET", "/orders/41"),
        (FRONTEND, ORDERS, "GET", "/orders/42"),
        (FRONTEND, ORDERS, "POST", "/orders"),
        (ORDERS, PAYMENTS, "POST", "/charge"),
    ]
    for source, target, method, path in calls:
        assert mesh.request(source, target, path, method=method)[0] == 200
    wanted = {(s, t, m, "/orders/{*}" if p.startswith("/orders/") else p)
              for s, t, m, p in calls}  # fmt: skip
    wait_until(
        lambda: wanted <= {(r["source"], r["destination"], r["method"], r["path"])
                           for r in observed(mesh)},
        30, "the flows to reach the store",
    )  # fmt: skip

    out = tmp_path / "suggested"
    admin = mesh.xds.admin_url or ""
    capsys.readouterr()
    code = main(["policy", "suggest", "--xds", admin, "--out", str(out), "--mode", "enforce",
                 "--json"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["valid"] is True
    assert (
        report["coverage"]["percent"] == 100.0 and report["coverage"]["flows"] == 3
    )  # /orders/41 and /42: one flow
    assert sorted(f["workload"] for f in report["files"]) == [FRONTEND, ORDERS, PAYMENTS]
    assert report["closed"] == [FRONTEND]  # nobody called it: allow-nothing
    assert [f["allow_nothing"] for f in report["files"] if f["workload"] == FRONTEND] == [True]
    assert any(w["kind"] == "no-callers" and w["flow"] == FRONTEND for w in report["warnings"])
    closing = {(c["source"], c["destination"]) for c in report["would_deny"]["changes"]}
    assert (PAYMENTS, ORDERS) in closing and (FRONTEND, PAYMENTS) in closing
    assert (ORDERS, FRONTEND) in closing and (PAYMENTS, FRONTEND) in closing
    assert main(["policy", "validate", "--envoy", str(mesh.policy_dir), str(out)]) == 0
    # the text report; a rerun replaces its own files, never someone else's
    capsys.readouterr()
    assert main(["policy", "suggest", "--xds", admin, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 AuthorizationPolicy file(s) (dry-run)" in text
    assert "(shop/frontend, allow nothing: no caller observed)" in text
    assert "no callers observed for shop/frontend in the window: suggested allow-nothing" in text
    assert "coverage: 3/3 observed allowed flows allowed by the suggestion (100.0%)" in text
    assert "  shop/payments -> shop/orders: " in text
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "suggested-shop.orders.yaml").write_text("# my own file\n")
    assert main(["policy", "suggest", "--xds", admin, "--out", str(tmp_path / "mine")]) == 1
    assert "was not written by `policy suggest`" in capsys.readouterr().err
    assert main(["policy", "suggest", "--xds", admin, "--out", str(out), "--namespace", "x"]) == 1
    assert "no workload of the policy set is in it" in capsys.readouterr().err
    main(["policy", "suggest", "--xds", admin, "--out", str(out), "--mode", "enforce"])

    # enforce: copy the files into the policy directory, as an operator would
    for file in out.glob("*.yaml"):
        shutil.copy(file, mesh.policy_dir / file.name)
    converge(mesh)
    assert mesh.request(FRONTEND, ORDERS, "/orders/41")[0] == 200
    assert mesh.request(FRONTEND, ORDERS, "/orders/99999")[0] == 200  # an id never seen
    assert mesh.request(FRONTEND, ORDERS, "/orders", method="POST")[0] == 200
    assert mesh.request(ORDERS, PAYMENTS, "/charge", method="POST")[0] == 200
    # a caller never observed: its sidecar no longer even has a route to orders (the compiler
    # gives a workload outbound paths only to peers whose policies may admit it: status 0)
    assert mesh.request(PAYMENTS, ORDERS, "/orders/41")[0] == 0
    assert mesh.request(FRONTEND, ORDERS, "/orders/41", method="DELETE")[0] == 403
    assert mesh.request(FRONTEND, PAYMENTS, "/charge", method="POST")[0] == 0
    assert mesh.request(FRONTEND, ORDERS, "/admin")[0] == 403
    # allow-nothing: the frontend, never called, admits nobody (no route to it either)
    assert mesh.request(ORDERS, FRONTEND, "/")[0] == 0
    assert mesh.request(PAYMENTS, FRONTEND, "/")[0] == 0

    # audit mode for the namespace: the same policies only report
    (mesh.policy_dir / "mesh.yaml").write_text(MESH % AUDIT + WORKLOADS)
    converge(mesh)
    assert mesh.request(PAYMENTS, ORDERS, "/orders/7")[0] == 200
    assert mesh.request(FRONTEND, ORDERS, "/orders/7")[0] == 200
    would = wait_until(
        lambda: [r for r in flows(mesh, PAYMENTS)
                 if r["destination"] == ORDERS and r["path"] == "/orders/{*}"
                 and r["decision"] == "allow" and r["dry_run"]],
        30, "the audited flow with its dry-run verdict",
    )  # fmt: skip
    # no dry-run ALLOW rule matched: the shadow engine's default deny (names no policy)
    assert would[0]["dry_run"] == ["(dry-run ALLOW)"]
    frontend = [r for r in flows(mesh, FRONTEND) if r["path"] == "/orders/{*}"]
    assert frontend and all(r["dry_run"] == [] for r in frontend)

    # back to enforce: denied again
    (mesh.policy_dir / "mesh.yaml").write_text(MESH % "" + WORKLOADS)
    converge(mesh)
    assert mesh.request(PAYMENTS, ORDERS, "/orders/7")[0] == 0
