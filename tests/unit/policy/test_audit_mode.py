"""Audit mode per namespace (MeshConfig ``enforcement: {namespaces: {NS: audit}}``): every
authorization policy acting on a workload of NS acts as dry-run, in the evaluator and in the
compiler alike (byte-identical to the same policies annotated dry-run); other namespaces, even
under the same mesh-wide policy, stay enforced; CUSTOM stays enforced and lint says so."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshward.compile import compile_workload
from meshward.policy import PolicyError, parse
from meshward.policy.evaluator import evaluate
from meshward.policy.lint import lint
from meshward.policy.model import Request
from meshward.policy.policyset import PolicySet

NOW = datetime(2026, 12, 3, tzinfo=UTC)


def mesh(enforcement: str = "") -> str:
    spec = f", enforcement: {enforcement}" if enforcement else ""
    return f"""
apiVersion: meshward.dev/v1
kind: MeshConfig
metadata: {{name: mesh}}
spec: {{trustDomain: cluster.local{spec}}}
"""


def workload(ns: str, name: str) -> str:
    return f"""
apiVersion: meshward.dev/v1
kind: Workload
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}
spec: {{ports: [{{name: http, port: 8080}}]}}
"""


def policies(dry_run: bool = False) -> list[str]:
    note = 'annotations: {"istio.io/dry-run": "true"}, ' if dry_run else ""
    return [
        f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: orders-allow, namespace: shop, {note}}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  rules: [{{from: [{{source: {{principals: ["cluster.local/ns/shop/sa/frontend"]}}}}]}}]
""",
        f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: meshward-system, {note}}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/admin"]}}}}]}}]
""",
    ]


WORKLOADS = [workload("shop", "frontend"), workload("shop", "orders"), workload("ops", "tool")]


def build(*docs: str) -> PolicySet:
    return parse({"set.yaml": "---".join(docs)})


def decide(ps: PolicySet, src: str, dst: str, path: str = "/") -> object:
    s, d = ps.workload(src), ps.workload(dst)
    assert s is not None and d is not None
    request = Request(path=path, host=d.name, destination_port=8080,
                      source_principal=s.spiffe_id("cluster.local"))  # fmt: skip
    return evaluate(ps, d, request, now=NOW)


ENFORCED = build(mesh(), *WORKLOADS, *policies())
AUDIT = build(mesh("{namespaces: {shop: audit, ops: enforce}}"), *WORKLOADS, *policies())
ANNOTATED = build(mesh(), *WORKLOADS, *policies(dry_run=True))


def test_the_evaluator_reports_would_deny_without_denying() -> None:
    enforced = decide(ENFORCED, "ops/tool", "shop/orders")
    audited = decide(AUDIT, "ops/tool", "shop/orders")
    assert not enforced.allowed  # type: ignore[attr-defined]
    assert audited.allowed  # type: ignore[attr-defined]
    assert [(r.policy, r.would_deny) for r in audited.dry_run] == [  # type: ignore[attr-defined]
        ("meshward-system/no-admin", False),
        ("shop/orders-allow", True),
    ]
    admin = decide(AUDIT, "shop/frontend", "shop/orders", "/admin")
    assert admin.allowed and any(r.would_deny for r in admin.dry_run)  # type: ignore[attr-defined]


def test_other_namespaces_stay_enforced_under_the_same_mesh_wide_policy() -> None:
    # the root-namespace DENY acts dry-run on shop workloads and enforced on ops workloads
    assert not decide(AUDIT, "shop/frontend", "ops/tool", "/admin").allowed  # type: ignore[attr-defined]
    assert decide(AUDIT, "shop/frontend", "shop/orders", "/admin").allowed  # type: ignore[attr-defined]
    # evaluating an audited workload first must not leak its dry-run form into the other
    fresh = build(mesh("{namespaces: {shop: audit}}"), *WORKLOADS, *policies())
    assert decide(fresh, "shop/frontend", "shop/orders", "/admin").allowed  # type: ignore[attr-defined]
    assert not decide(fresh, "shop/frontend", "ops/tool", "/admin").allowed  # type: ignore[attr-defined]


def test_the_compiler_emits_exactly_the_dry_run_form() -> None:
    for ref in ("shop/orders", "shop/frontend"):
        audited = compile_workload(AUDIT, ref, now=NOW)
        annotated = compile_workload(ANNOTATED, ref, now=NOW)
        enforced = compile_workload(ENFORCED, ref, now=NOW)
        assert audited.routes == annotated.routes and audited.listeners == annotated.listeners
        assert audited.routes != enforced.routes  # the rules moved to shadow filters
    tool_audit = compile_workload(AUDIT, "ops/tool", now=NOW)
    tool_enforced = compile_workload(ENFORCED, "ops/tool", now=NOW)
    inbound = [r for r in tool_audit.routes if r.name.startswith("inbound")]
    assert inbound and inbound == [r for r in tool_enforced.routes if r.name.startswith("inbound")]
    # and ops/tool may now call shop/orders (audited: nothing there denies it)
    names = {r.name for r in tool_audit.routes} - {r.name for r in tool_enforced.routes}
    assert names == {"outbound|8080||orders.shop"}


def test_the_setting_is_part_of_the_version_and_validated() -> None:
    assert AUDIT.version != ENFORCED.version
    assert (
        build(mesh("{namespaces: {shop: enforce}}"), *WORKLOADS).version
        == build(mesh(), *WORKLOADS).version
    )
    round_trip = parse({"dump.yaml": AUDIT.dump()})
    assert round_trip.version == AUDIT.version
    assert round_trip.mesh.audit_namespaces == frozenset({"shop"})
    with pytest.raises(PolicyError) as err:
        build(mesh("{namespaces: {shop: observe}}"))
    assert "'observe' is not one of enforce, audit" in str(err.value)
    with pytest.raises(PolicyError):
        build(mesh("{namespaces: [shop]}"))


def test_custom_stays_enforced_and_lint_says_so() -> None:
    custom = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: CUSTOM
  provider: {name: meshward-extauthz}
  rules: [{to: [{operation: {paths: ["/ext"]}}]}]
"""
    ps = build(mesh("{namespaces: {shop: audit}}"), *WORKLOADS, custom)
    orders = ps.workload("shop/orders")
    assert orders is not None
    [policy] = ps.policies_for(orders)
    assert policy.dry_run is False
    assert not decide(ps, "shop/frontend", "shop/orders", "/ext").allowed  # type: ignore[attr-defined]
    warnings = [str(p) for p in lint(ps, now=NOW)]
    assert any("CUSTOM policy stays enforced in audit namespace(s) shop" in w for w in warnings)


def test_validate_says_which_namespaces_are_in_audit_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from meshward.cli import main

    (tmp_path / "set.yaml").write_text(
        "---".join([mesh("{namespaces: {shop: audit}}"), *WORKLOADS])
    )
    assert main(["policy", "validate", str(tmp_path)]) == 0
    assert "audit mode (every policy dry-run, CUSTOM excepted): shop" in capsys.readouterr().out
    assert main(["policy", "validate", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["audit_namespaces"] == ["shop"]
