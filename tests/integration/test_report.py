"""`meshward report` against a running control plane (the shipped examples/ policy, real mTLS
flow reports from SVIDs its CA issued): the JSON's reachability agrees with `policy explain` on
every workload pair and probe, the flow-based numbers are the flows sent, and the HTML report
renders in a real headless Chromium with its service graph drawn and its script run."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2

from meshward.certs import CertificateAuthority
from meshward.certs.client_tls import client_ssl_context
from meshward.cli import main
from meshward.compile import CompileOptions
from meshward.compile.names import DRY_RUN_DENY_PREFIX, RBAC_METADATA_NAMESPACE
from meshward.flows.service import flows_for
from meshward.policy import load
from meshward.policy.cases import build_request
from meshward.policy.explain import explain
from meshward.testing import als
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.service import XdsServiceThread

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TD = "spiffe://cluster.local/ns/shop/sa/"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI", "").lower() in ("true", "1"):  # a gate must not pass by skipping
            raise RuntimeError("chromium is not installed (Debian package `chromium`)")
        pytest.skip("chromium unavailable: run `make tools` (Debian package chromium)")
    return found


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XdsServiceThread]:
    base = tmp_path_factory.mktemp("report")
    policy = load([EXAMPLES])
    ca = CertificateAuthority.ephemeral(policy.mesh.trust_domain)
    with XdsServiceThread(
        None, ca, compiler_for(CompileOptions()), policy_paths=[EXAMPLES],
        flows=flows_for(str(base / "flows.db")),
    ) as xds:  # fmt: skip
        xds.ca = ca  # type: ignore[attr-defined]
        yield xds


def entry(workload: str, caller: str, path: str, *, method: int = 1, status: int = 200,
          rbac: dict[str, str] | None = None) -> Any:  # fmt: skip
    details = "via_upstream" if status < 400 else "rbac_access_denied_matched_policy[none]"
    e = als.http_entry(workload, path=path, method=method, status=status, details=details,
                       principal=TD + caller if caller else "")  # fmt: skip
    if rbac:
        meta = struct_pb2.Struct()
        meta.update(rbac)
        e.common_properties.metadata.filter_metadata[RBAC_METADATA_NAMESPACE].CopyFrom(meta)
    return e


def allowed_by(policy: str, rule: int = 0) -> dict[str, str]:
    return {
        "enforced_effective_policy_id": f"ns[shop]-policy[{policy}]-rule[{rule}]",
        "enforced_engine_result": "allowed",
    }


def report_flows(plane: XdsServiceThread) -> None:
    """What sidecars would report: frontend -> orders (allowed x5, a DELETE denied x2),
    scraper -> payments /metrics (allowed, but the dry-run payments-deny-scraper would deny
    it x3), orders -> inventory (allowed x4)."""
    ca = plane.ca  # type: ignore[attr-defined]
    dry = {
        DRY_RUN_DENY_PREFIX + "shadow_engine_result": "denied",
        DRY_RUN_DENY_PREFIX + "shadow_effective_policy_id":
            "ns[shop]-policy[payments-deny-scraper]-rule[0]",
    }  # fmt: skip
    batches = {
        "orders": [entry("shop/orders", "frontend", f"/orders/{i}",
                         rbac=allowed_by("orders-allow-frontend")) for i in range(5)]
        + [entry("shop/orders", "frontend", "/orders/7", method=5, status=403)] * 2,
        "payments": [entry("shop/payments", "metrics-scraper", "/metrics",
                           rbac={**allowed_by("shop-allow-scraper-metrics"), **dry})] * 3,
        "inventory": [entry("shop/inventory", "orders", "/inventory/sku-1",
                            rbac=allowed_by("inventory-allow-orders-read"))] * 4,
    }  # fmt: skip
    for name, entries in batches.items():
        svid = ca.issue(TD + name)
        context = client_ssl_context(
            svid.cert_chain_pem, svid.private_key_pem, ca.trust_bundle().roots_pem
        )
        message = als.message(f"shop/{name}", entries)
        status, _ = asyncio.run(als.send("127.0.0.1", plane.port, context, [message]))
        assert status == "OK"
    assert plane.service is not None and plane.service.flows is not None
    plane.service.flows.store.flush()


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_report_against_a_running_control_plane(
    plane: XdsServiceThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_flows(plane)
    admin = plane.admin_url
    assert admin is not None
    page = tmp_path / "report.html"
    code, out, err = run_cli(
        ["report", "--xds", admin, "--since", "1h", "--json", "--html", str(page)], capsys
    )
    assert code == 0, err
    doc = json.loads(out)
    now = datetime.now(UTC)

    # Reachability equals `policy explain` over every workload pair and every probe.
    policy = load([EXAMPLES])
    allowed = {
        (e["source"], e["destination"]): {
            (r["port"], r["method"], r["path"], r["host"]) for r in e["requests"]
        }
        for e in doc["reachability"]
    }
    workloads = [w.ref for w in policy.workloads]
    assert sorted(doc["workloads"]) == sorted(workloads)
    reachable_pairs = 0
    for dst in workloads:
        for src in workloads:
            if src == dst:
                continue
            explained_allowed = set()
            for probe in doc["probes"][dst]:
                callee, request = build_request(
                    policy, destination=dst, source=src, method=probe["method"] or "GET",
                    path=probe["path"] or "/", port=probe["port"],
                    host=probe["host"] or None,
                )  # fmt: skip
                if explain(policy, callee, request, now=now).decision.allowed:
                    explained_allowed.add(
                        (probe["port"], probe["method"], probe["path"], probe["host"])
                    )
            assert explained_allowed == allowed.get((src, dst), set()), (src, dst)
            reachable_pairs += bool(explained_allowed)
    assert doc["reachability_summary"]["reachable_pairs"] == reachable_pairs == 7
    assert doc["reachability_summary"]["pairs"] == len(workloads) * (len(workloads) - 1)

    # Blast radius: scraper reaches every other workload; inventory none.
    radius = doc["blast_radius"]
    assert radius["shop/scraper"]["transitive_count"] == 4
    assert radius["shop/frontend"]["direct"] == ["shop/inventory", "shop/orders"]
    assert radius["shop/inventory"]["transitive"] == []

    # Flow-based numbers are the flows reported above.
    assert doc["compliance"]["allowed"] == 12 and doc["compliance"]["rate"] == 1.0
    dry = {d["policy"]: d for d in doc["dry_run"]}
    assert dry["shop/payments-deny-scraper"]["would_deny"] == 3
    assert not dry["shop/payments-deny-scraper"]["ready"]
    unused = {u["rule"] for u in doc["unused_rules"]}
    assert "shop/orders-allow-frontend#0" not in unused
    assert "shop/payments-deny-admin#0" in unused
    assert doc["emergency"][0]["policy"] == "shop/inventory-emergency-allow-frontend"
    assert doc["emergency"][0]["state"] == "in force"
    assert doc["mtls"]["coverage"] == 1.0 and doc["mtls"]["requests"] == 14
    edges = {(e["source"], e["destination"]): e for e in doc["edges"]}
    assert edges[("shop/frontend", "shop/orders")]["denied"] == 2

    # The text view prints the same numbers.
    code, text, _ = run_cli(["report", "--xds", admin], capsys)
    assert code == 0
    assert "REACHABILITY: 7 of 20 workload pairs" in text
    assert "shop/payments-deny-scraper [DENY]: would deny 3 requests" in text

    # The HTML report, rendered by a real headless Chromium.
    dom = render_in_chromium(page, tmp_path)
    svg = re.search(r"<svg[^>]*id=\"graph\"[^>]*>", dom)
    assert svg is not None
    assert 'data-interactive="ready"' in svg.group(0)  # the inline script ran
    drawn_nodes = int(re.search(r'data-drawn-nodes="(\d+)"', svg.group(0)).group(1))  # type: ignore[union-attr]
    assert drawn_nodes == len(doc["nodes"]) == 5
    for node in workloads:
        assert f'data-id="{node}"' in dom
    assert len(re.findall(r'class="edge edge-allowed"', dom)) == 3
    assert len(re.findall(r'class="edge edge-denied"', dom)) == 1
    assert re.search(r'class="edge edge-dryrun" data-source="shop/scraper" '
                     r'data-target="shop/payments"', dom)  # fmt: skip
    # reachable by policy but never used: the 7 reachable pairs minus the 3 used
    assert len(re.findall(r'class="edge edge-unused"', dom)) == 4
    assert "http://" not in page.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")
    shot = tmp_path / "report.png"
    run_chromium([f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()], tmp_path)
    assert shot.stat().st_size > 10_000  # a picture, not a blank page


def run_chromium(args: list[str], tmp_path: Path) -> str:
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def render_in_chromium(page: Path, tmp_path: Path) -> str:
    return run_chromium(["--dump-dom", page.as_uri()], tmp_path)


def test_report_errors_are_clear(
    plane: XdsServiceThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = plane.admin_url
    assert admin is not None
    code, _, err = run_cli(
        ["report", "--xds", admin, "--html", str(tmp_path / "no-such-dir" / "r.html")], capsys
    )
    assert code == 1 and "cannot write" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--since", "soon"])
    assert exit_info.value.code == 2
