"""Dashboards and alert rules reference only metrics Meshward exports; the rules pass
``promtool check rules`` and their unit tests (``promtool test rules``); the committed dashboard
JSON is what the generator writes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from meshward.certs import CertificateAuthority
from meshward.extauthz.metrics import Metrics as ExtAuthzMetrics
from meshward.flows.metrics import FlowMetrics
from meshward.telemetry import dashboards
from meshward.xds.metrics import XdsMetrics

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "deploy/prometheus/alerts.yml"
RULES_TEST = ROOT / "deploy/prometheus/alerts_test.yml"
DASHBOARD_DIR = ROOT / "deploy/grafana/dashboards"
SCRAPE_METRICS = {"up"}  # written by Prometheus itself for every scrape target
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "le",
}  # fmt: skip
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: `make venv` installs Debian's prometheus package"
)


def exported_names() -> set[str]:
    """Every sample name the control plane (with flows) and ext_authz expose, from their real
    registries: counters' _total, histograms' _bucket/_sum/_count included."""
    xds = XdsMetrics()
    ca = CertificateAuthority.ephemeral("cluster.local")
    node = {"node": "a/b", "connected": True, "drift": True, "policy_enforced": True,
            "streams": [{"mode": "sotw", "types": [], "ads_credentials": {"not_after": "2030-01-01T00:00:00+00:00"}}]}  # fmt: skip
    status = {"nodes": [node], "policy": {"version": "v", "applied_at": "2026-01-01T00:00:00+00:00"},
              "server_certificate": {"not_after": "2030-01-01T00:00:00+00:00"},
              "fleet": {"connected": 1, "streams": {"sotw": 1}, "not_enforced": 0, "drifting": 1,
                        "in_sync": 1},
              "node_drift": {"a/b": True}}  # fmt: skip
    xds.add_state(lambda: status, ca=lambda: ca)
    flows = FlowMetrics(xds.registry)
    flows.add_collector(xds.registry, lambda: {"refused": {"r": 1}, "dropped": {"d": 1}})
    # Label-less counters and labelled families that have no child yet expose no sample; ask
    # every family for its sample names through a child of each.
    names: set[str] = set()
    extauthz = ExtAuthzMetrics(CollectorRegistry(auto_describe=True))
    for registry in (xds.registry, extauthz.registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(s.name for s in family.samples)
            if family.type == "counter":
                names.add(family.name + "_total")
            if family.type == "histogram":
                names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside label matchers, grouping
    clauses, durations and strings that are not function calls or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\$\w+", "5m", text)  # Grafana variables
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    found = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name = match.group(0)
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or re.match(r"(by|without)\b", rest) or name.lower() in KEYWORDS:
            continue
        if match.start() > 0 and (
            text[match.start() - 1].isdigit() or text[match.start() - 1] == "."
        ):
            continue  # a duration or number suffix (5m, 1e3)
        found.add(name)
    return found


def dashboard_exprs() -> Iterator[tuple[str, str, str]]:
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                yield path.name, panel["title"], target["expr"]


def rule_exprs() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule.get("alert") or rule["record"], rule["expr"]


def test_the_metric_name_extractor_finds_names_and_skips_the_rest() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, type) (rate(a_bucket{x="y{z}"}[5m]))) / '
            'on (node) group_left b + ignoring(c) d offset 1h > 1e3 and up{job="j"} == bool 2')  # fmt: skip
    assert metric_names(expr) == {"a_bucket", "b", "d", "up"}


def test_the_exported_names_come_from_the_real_registries() -> None:
    names = exported_names()
    assert "meshward_flows_total" in names
    assert "meshward_xds_policy_rollout_seconds_bucket" in names
    assert "meshward_extauthz_policy_info" in names
    assert "meshward_extauthz_cache_hit_ratio" not in names
    assert "meshward_extauthz_policy_version" not in names


def test_every_dashboard_expression_uses_exported_metrics_only() -> None:
    exported = exported_names() | SCRAPE_METRICS
    exprs = list(dashboard_exprs())
    assert {name for name, _, _ in exprs} == {
        "meshward-executive.json", "meshward-oncall.json", "meshward-debug.json",
    }  # fmt: skip
    unknown = [(f, t, sorted(metric_names(e) - exported)) for f, t, e in exprs
               if metric_names(e) - exported]  # fmt: skip
    assert unknown == []
    assert all(metric_names(e) for _, _, e in exprs)


def test_every_alert_uses_exported_metrics_only() -> None:
    exported = exported_names() | SCRAPE_METRICS
    rules = dict(rule_exprs())
    assert {"MeshwardDeniedFlowSpike", "MeshwardNodeDrift", "MeshwardPolicyNotEnforced",
            "MeshwardPolicyRejected", "MeshwardSvidIssuanceFailures", "MeshwardCaExpiringSoon",
            "MeshwardCredentialExpiringSoon", "MeshwardExtAuthzDown"} <= set(rules)  # fmt: skip
    assert {a: sorted(metric_names(e) - exported) for a, e in rules.items()
            if metric_names(e) - exported} == {}  # fmt: skip


def test_the_committed_dashboards_are_what_the_generator_writes() -> None:
    for name, text in dashboards.render().items():
        assert (DASHBOARD_DIR / name).read_text() == text, (
            f"{name} is stale: run `.venv/bin/python -m meshward.telemetry.dashboards`"
        )


@needs_promtool
def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """promtool parses each expression (as a recording rule): a typo fails here, not in Grafana."""
    rules: list[dict[str, Any]] = [
        {"record": f"meshward:dashboard:{i}", "expr": expr}
        for i, (_, _, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboards.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([PROMTOOL or "", "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    check = subprocess.run([PROMTOOL or "", "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout
    tested = subprocess.run([PROMTOOL or "", "test", "rules", RULES_TEST.name],
                            cwd=RULES_TEST.parent, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
