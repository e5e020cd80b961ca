"""The Grafana dashboards (executive, on-call, debug), written as provisioned JSON.

Generated rather than hand-edited so the three views share one panel vocabulary and a test can
check every PromQL expression against the metrics Meshward exports; regenerate with
``python -m meshward.telemetry.dashboards [DIR]`` (default ``deploy/grafana/dashboards``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "meshward-prometheus"}
DEFAULT_DIR = Path("deploy/grafana/dashboards")

DENIED = 'meshward_flows_total{decision="deny"}'
ALL_FLOWS = "meshward_flows_total"
LATENCY = "meshward_flow_enforcement_seconds_bucket"


def _panel(
    title: str,
    kind: str,
    targets: list[tuple[str, str]],
    *,
    w: int = 12,
    h: int = 8,
    unit: str | None = None,
    description: str = "",
    instant: bool = False,
) -> dict[str, Any]:
    panel: dict[str, Any] = {
        "title": title,
        "type": kind,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"w": w, "h": h},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": DATASOURCE,
                **({"instant": True, "format": "table"} if instant else {}),
                **({"format": "heatmap"} if kind == "heatmap" else {}),
            }
            for i, (expr, legend) in enumerate(targets)
        ],
        "fieldConfig": {"defaults": {"unit": unit} if unit else {}, "overrides": []},
        "options": {},
    }
    return panel


def _layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    x = y = row_h = 0
    for i, panel in enumerate(panels, start=1):
        pos = panel["gridPos"]
        if x + pos["w"] > 24:
            x, y, row_h = 0, y + row_h, 0
        pos["x"], pos["y"] = x, y
        x += pos["w"]
        row_h = max(row_h, pos["h"])
        panel["id"] = i
    return panels


def _dashboard(
    uid: str,
    title: str,
    description: str,
    panels: list[dict[str, Any]],
    refresh: str = "30s",
    time_from: str = "now-24h",
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["meshward"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": refresh,
        "time": {"from": time_from, "to": "now"},
        "timezone": "utc",
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": _layout(panels),
    }


# fmt: off
# One panel per entry, written as a table: the formatter would spread each over ten lines.
def executive() -> dict[str, Any]:
    return _dashboard(
        "meshward-executive",
        "Meshward / Executive",
        "Is the mesh enforcing what was decided, and how often does it say no?",
        [
            _panel("Policy compliance (nodes enforcing the policy in force)", "stat", [
                ("1 - meshward_xds_nodes_not_enforcing / clamp_min(meshward_xds_connected_nodes, 1)", "compliance"),
            ], w=6, unit="percentunit",
               description="Connected sidecars that ACKed the listeners and routes of the policy version in force"),
            _panel("Denied flows (last 7 days)", "stat", [
                (f"sum(increase({DENIED}[7d]))", "denied"),
            ], w=6, unit="short"),
            _panel("Policy change success (30 days)", "stat", [
                ('sum(increase(meshward_xds_policy_updates_total{result="applied"}[30d])) / '
                 "clamp_min(sum(increase(meshward_xds_policy_updates_total[30d])), 1)", "applied"),
            ], w=6, unit="percentunit",
               description="Policy changes applied / all changes (the rest were rejected as invalid)"),
            _panel("Enforcement latency p99", "stat", [
                (f"histogram_quantile(0.99, sum by (le) (rate({LATENCY}[1h])))", "p99"),
            ], w=6, unit="s"),
            _panel("Denied flows per week", "timeseries", [
                (f"sum(increase({DENIED}[1w]))", "denied / week"),
            ], unit="short"),
            _panel("Top denied services (7 days)", "bargauge", [
                (f"topk(10, sum by (destination) (increase({DENIED}[7d])))", "{{destination}}"),
            ], unit="short", instant=True),
            _panel("Enforcement latency", "timeseries", [
                (f"histogram_quantile(0.5, sum by (le) (rate({LATENCY}[5m])))", "p50"),
                (f"histogram_quantile(0.99, sum by (le) (rate({LATENCY}[5m])))", "p99"),
            ], unit="s"),
            _panel("Time to enforce a policy change everywhere (p90)", "timeseries", [
                ("histogram_quantile(0.9, sum by (le) (rate(meshward_xds_policy_rollout_seconds_bucket[1d])))", "p90"),
            ], unit="s"),
        ],
        time_from="now-30d",
    )


def on_call() -> dict[str, Any]:
    return _dashboard(
        "meshward-oncall",
        "Meshward / On-call",
        "What is being denied right now, what changed, and which sidecars are unhealthy",
        [
            _panel("Denied flows now (source -> destination)", "table", [
                (f"sum by (source, destination) (rate({DENIED}[5m])) > 0", ""),
            ], w=12, unit="reqps", instant=True),
            _panel("Denied flows", "timeseries", [
                (f"sum by (source, destination) (rate({DENIED}[1m]))", "{{source}} -> {{destination}}"),
            ], w=12, unit="reqps"),
            _panel("Policy pushes and rejections", "timeseries", [
                ('sum(increase(meshward_xds_policy_updates_total{result="applied"}[5m]))', "applied"),
                ('sum(increase(meshward_xds_policy_updates_total{result="rejected"}[5m]))', "rejected"),
                ("sum by (type) (increase(meshward_xds_nacks_total[5m]))", "NACK {{type}}"),
            ], w=8),
            _panel("Sidecars", "stat", [
                ("meshward_xds_connected_nodes", "connected"),
                ("meshward_xds_drifting_nodes", "drifting"),
                ("meshward_xds_nodes_not_enforcing", "not enforcing"),
                ("meshward_xds_policy_rollout_pending", "rollout pending"),
                ("meshward_xds_policy_error", "policy rejected"),
            ], w=8),
            _panel("ACKs (last 5 min)", "timeseries", [
                ("sum by (type) (increase(meshward_xds_acks_total[5m]))", "{{type}}"),
            ], w=8),
            _panel("Sidecars: seconds since last ACK, in sync, enforcing", "table", [
                ("time() - meshward_xds_node_last_ack_timestamp_seconds", "{{node}}"),
                ("meshward_xds_node_in_sync", "{{node}}"),
                ("meshward_xds_node_policy_enforced", "{{node}}"),
            ], instant=True,
               description="Per connected sidecar: when it last ACKed, and 1/0 for in sync with the desired version and enforcing the policy in force"),
            _panel("Enforcement latency heatmap", "heatmap", [
                (f"sum by (le) (rate({LATENCY}[1m]))", "{{le}}"),
            ]),
            _panel("ext_authz and collector health", "timeseries", [
                ('up{job="meshward-extauthz"}', "ext_authz up"),
                ("sum(rate(meshward_extauthz_internal_errors_total[5m]))", "ext_authz errors/s"),
                ("sum by (reason) (rate(meshward_flow_collector_refused_total[5m]))", "collector refused {{reason}}"),
            ], w=24),
        ],
        refresh="10s",
        time_from="now-1h",
    )


def debug() -> dict[str, Any]:
    return _dashboard(
        "meshward-debug",
        "Meshward / Debug",
        "Per node and per rule: versions, certificates, drift, deciding rules",
        [
            _panel("Policy version in force", "table", [
                ("meshward_xds_policy_info", "{{version}}"),
                ("meshward_xds_policy_generation", "generation"),
                ("meshward_extauthz_policy_info", "ext_authz {{version}}"),
            ], w=8, instant=True),
            _panel("Per-node policy state (1: in sync / enforcing)", "table", [
                ("meshward_xds_node_in_sync", "in sync"),
                ("meshward_xds_node_policy_enforced", "enforced"),
                ("meshward_xds_node_drift", "drift"),
            ], w=16, instant=True),
            _panel("Certificate expirations (days left)", "table", [
                ("(meshward_ca_expiry_timestamp_seconds - time()) / 86400", "CA {{certificate}}"),
                ("(meshward_xds_server_cert_expiry_timestamp_seconds - time()) / 86400", "ADS server"),
                ("(meshward_xds_node_credential_expiry_timestamp_seconds - time()) / 86400", "{{node}}"),
            ], instant=True),
            _panel("Drift events", "timeseries", [
                ("increase(meshward_xds_drift_events_total[5m])", "nodes entering drift"),
                ("meshward_xds_drifting_nodes", "drifting now"),
            ]),
            _panel("Flows with their deciding rule (last hour)", "table", [
                ("sum by (policy, rule, decision) (increase(meshward_flow_rule_decisions_total[1h])) > 0", ""),
            ], w=24, instant=True),
            _panel("SVID issuance", "timeseries", [
                ("histogram_quantile(0.99, sum by (le, method) (rate(meshward_xds_svid_issuance_seconds_bucket[5m])))", "p99 {{method}}"),
                ('sum by (method, result) (rate(meshward_xds_svid_requests_total{result!="ok"}[5m]))', "{{method}} {{result}}"),
            ], unit="s"),
            _panel("Collector drops and ADS push latency", "timeseries", [
                ("sum by (reason) (rate(meshward_flow_collector_dropped_total[5m]))", "dropped {{reason}}"),
                ("histogram_quantile(0.99, sum by (le, type) (rate(meshward_xds_push_latency_seconds_bucket[5m])))", "push p99 {{type}}"),
            ]),
        ],
        time_from="now-6h",
    )


# fmt: on


DASHBOARDS = {"executive": executive, "oncall": on_call, "debug": debug}


def render() -> dict[str, str]:
    """{file name: JSON text} for every dashboard."""
    return {
        f"meshward-{name}.json": json.dumps(build(), indent=2, sort_keys=True) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    directory = Path(args[0]) if args else DEFAULT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (directory / name).write_text(text)
        print(directory / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
