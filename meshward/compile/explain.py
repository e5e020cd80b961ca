"""Rule-by-rule: where each rule applying to a workload runs, and why (``--explain``)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from meshward.compile import authz
from meshward.compile.authz import PlacedRule
from meshward.compile.options import CompileOptions
from meshward.compile.workload import authz_placement
from meshward.policy.model import Action, Protocol, Workload

DEFAULT_INDEX_MIN_RULES = CompileOptions.rbac_index_min_rules
TCP_ONLY_MECHANISM = (
    "TCP ports only: network RBAC (dry-run shadow rules, DENY incl. CUSTOM, then ALLOW); no "
    "ext_authz filter (no provider is consulted for TCP: a matching CUSTOM rule denies)"
)

if TYPE_CHECKING:
    from meshward.policy.policyset import PolicySet


def _ports(policy_set: PolicySet, workload: Workload) -> list[dict[str, Any]]:
    return [
        {
            "port": p.port,
            "protocol": p.protocol.value,
            "mtls": policy_set.mtls_mode(workload, p.port).value,
        }
        for p in sorted(workload.ports, key=lambda p: p.port)
    ]


def indexed_names(
    placement: authz.AuthzPlacement, index_min_rules: int | None, trust_domain: str = ""
) -> set[str]:
    """RBAC names of the rules that go to the principal-indexed matcher (mTLS chains)."""
    out: set[str] = set()
    for action in (Action.ALLOW, Action.DENY):
        indexed, _ = authz.split_indexed(placement.native(action), index_min_rules, trust_domain)
        out.update(r.rbac_name for r in indexed)
    return out


def explain_json(
    policy_set: PolicySet,
    workload: Workload,
    *,
    now: datetime | None = None,
    index_min_rules: int | None = DEFAULT_INDEX_MIN_RULES,
) -> dict[str, Any]:
    policies = policy_set.policies_for(workload, now)
    placement = authz_placement(policy_set, workload, now=now)
    indexed = indexed_names(placement, index_min_rules, policy_set.mesh.trust_domain)
    rules = []
    for r in placement.rules:
        entry = r.to_json()
        entry["principal_index"] = r.rbac_name in indexed
        rules.append(entry)
    has_tcp = any(p.protocol is Protocol.TCP for p in workload.ports)
    has_http = any(p.protocol is not Protocol.TCP for p in workload.ports) or not workload.ports
    # A TCP-only workload has no HTTP chain: no ext_authz or jwt_authn filter, whatever the
    # HTTP placement of its rules would be (CUSTOM on TCP is a network RBAC DENY).
    tcp_only = has_tcp and not has_http
    return {
        "workload": workload.ref,
        "spiffe_id": workload.spiffe_id(policy_set.mesh.trust_domain),
        "policy_version": policy_set.version,
        "ports": _ports(policy_set, workload),
        "policies": [p.ref for p in policies],
        "extauthz_filter": placement.uses_extauthz and not tcp_only,
        "jwt_authn_filter": placement.verifies_jwt_natively and not tcp_only,
        "extauthz_reasons": [] if tcp_only else list(placement.extauthz_reasons),
        "mechanism": TCP_ONLY_MECHANISM if tcp_only else placement.summary(),
        "rules": rules if has_http else [],
        "tcp_rules": [r.to_json() for r in placement.tcp_rules] if has_tcp else [],
    }


def _rows(rules: tuple[PlacedRule, ...], indexed: set[str] | None = None) -> list[str]:
    indexed = indexed or set()
    table = [
        (
            r.policy.action.value + (" (dry-run)" if r.policy.dry_run else ""),
            f"{r.policy.ref} rule[{r.index}]",
            r.placement.value,
            r.reason
            + (
                " (principal index: looked up by the caller's identity)"
                if r.rbac_name in indexed
                else ""
            ),
        )
        for r in rules
    ]
    if not table:
        return []
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    return [
        "  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3]
        for row in table
    ]


def explain_text(policy_set: PolicySet, workload: Workload, *, now: datetime | None = None) -> str:
    data = explain_json(policy_set, workload, now=now)
    placement = authz_placement(policy_set, workload, now=now)
    ports = ", ".join(f"{p['port']}/{p['protocol']} (mTLS {p['mtls']})" for p in data["ports"])
    lines = [
        f"{data['workload']}  {data['spiffe_id']}",
        f"ports: {ports or 'none declared'}",
        f"policies: {', '.join(data['policies']) or 'none (every request is allowed)'}",
        f"authorization: {data['mechanism']}",
        f"ext_authz filter: {'yes' if data['extauthz_filter'] else 'no'}",
        f"jwt_authn filter: {'yes' if data['jwt_authn_filter'] else 'no'}",
    ]
    indexed = {r["rbac_policy"] for r in data["rules"] if r["principal_index"]}
    if data["rules"]:
        lines += ["", "HTTP ports, rule by rule:", *_rows(placement.rules, indexed)]
    if data["tcp_rules"]:
        lines += [
            "",
            "TCP ports, rule by rule (network RBAC, no ext_authz):",
            *_rows(placement.tcp_rules),
        ]
    return "\n".join(lines) + "\n"
