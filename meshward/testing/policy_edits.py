"""Policy edits of every kind a rule can tell callers apart by (principals, namespaces, prefixes,
IP blocks, `when` conditions, DENY and ALLOW, a removal), on a fleet whose workloads sit in two
subnets: for tests that compare a fast path (grouped diff, changed-document scan) with the
definition."""

from __future__ import annotations

import dataclasses

from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    Condition,
    Operation,
    Rule,
    Source,
)
from meshward.policy.policyset import PolicySet
from meshward.testing.topology import fleet


def addressed_fleet(services: int = 40) -> PolicySet:
    """A fleet of ``services`` services in namespaces of 30, workloads spread over two subnets."""
    ps = fleet(services)
    workloads = [
        dataclasses.replace(w, address=f"10.{i % 2}.0.{i + 1}") for i, w in enumerate(ps.workloads)
    ]
    return PolicySet.create(
        mesh=ps.mesh, workloads=workloads, authorization_policies=ps.authorization_policies
    )


def _with(ps: PolicySet, *policies: AuthorizationPolicy, drop: str | None = None) -> PolicySet:
    kept = [p for p in ps.authorization_policies if p.name != drop]
    return PolicySet.create(
        mesh=ps.mesh,
        workloads=ps.workloads,
        authorization_policies=[*kept, *policies],
    )


def edits(ps: PolicySet) -> dict[str, PolicySet]:
    target = next(p for p in ps.authorization_policies if p.selector is not None)
    app = target.selector
    methods = dataclasses.replace(
        target,
        rules=(dataclasses.replace(target.rules[0], operations=(Operation(methods=("PUT",)),)),),
    )
    deny_ns = AuthorizationPolicy(
        namespace="team000", name="deny-others", action=Action.DENY, selector=app,
        rules=(Rule(sources=(Source(not_namespaces=("team000",),
                                    not_principals=("cluster.local/ns/team001/sa/svc0031",)),)),),
    )  # fmt: skip
    prefix = AuthorizationPolicy(
        namespace="team000", name="allow-prefix", action=Action.ALLOW, selector=app,
        rules=(Rule(sources=(Source(principals=("cluster.local/ns/team001/*",)),),
                    conditions=(Condition("source.ip", values=("10.1.0.0/16",)),)),),
    )  # fmt: skip
    ip_deny = AuthorizationPolicy(
        namespace="meshward-system", name="deny-subnet", action=Action.DENY,
        rules=(Rule(sources=(Source(ip_blocks=("10.0.0.0/16",), not_ip_blocks=("10.0.0.5/32",)),),
                    operations=(Operation(paths=("/api/*",)),)),),
    )  # fmt: skip
    return {
        "methods": _with(ps, methods, drop=target.name),
        "deny-namespace": _with(ps, deny_ns),
        "prefix-and-ip-condition": _with(ps, prefix),
        "mesh-wide-ip-deny": _with(ps, ip_deny),
        "removed": _with(ps, drop=target.name),
    }
