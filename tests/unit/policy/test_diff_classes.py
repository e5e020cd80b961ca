"""`policy diff` probing one caller per class gives exactly what probing every caller gives."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from meshward.policy.diff import PLAINTEXT, caller_classes, diff
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

NOW = datetime(2026, 12, 3, tzinfo=UTC)
# the edited policies' callee, a neighbour in its namespace, one in the other namespace
DESTINATIONS = ("team000/svc0000", "team000/svc0005", "team001/svc0031")


def _base() -> PolicySet:
    """A fleet of 40 services in namespaces of 30, workloads spread over two subnets."""
    ps = fleet(40)
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


def _edits(ps: PolicySet) -> dict[str, PolicySet]:
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


@pytest.mark.parametrize("edit", sorted(_edits(_base())))
def test_grouped_diff_equals_probing_every_caller(edit: str) -> None:
    old = _base()
    new = _edits(old)[edit]
    for a, b in ((old, new), (new, old)):
        grouped = diff(a, b, now=NOW, destinations=DESTINATIONS)
        every = diff(a, b, now=NOW, destinations=DESTINATIONS, group_callers=False)
        assert grouped == every
        assert grouped.changes, f"{edit}: the edit should open or close some flow"


def test_classes_are_few_and_split_by_what_rules_read() -> None:
    old = _base()
    new = _edits(old)["prefix-and-ip-condition"]
    dst = next(w for w in old.workloads if w.ref == "team000/svc0000")
    callers = [w.ref for w in old.workloads if w.ref != dst.ref] + [PLAINTEXT]
    classes = caller_classes(old, dst, new, dst, callers)
    assert sorted(r for c in classes for r in c) == sorted(callers)
    assert len(classes) < len(callers) // 2
    assert [PLAINTEXT] in classes
    # the prefix rule and the ip condition tell team001 callers apart by subnet
    team001 = [c for c in classes if any(r.startswith("team001/") for r in c)]
    assert len(team001) >= 2


def test_a_budget_is_spent_per_class_not_per_caller() -> None:
    old = _base()
    new = _edits(old)["methods"]
    one = DESTINATIONS[:1]
    budget = 400  # probing every caller of the callee needs more than this, its classes less
    assert diff(
        old, new, now=NOW, destinations=one, group_callers=False, max_evaluations=budget
    ).truncated
    grouped = diff(old, new, now=NOW, destinations=one, max_evaluations=budget)
    assert not grouped.truncated and grouped.changes
    assert grouped == diff(old, new, now=NOW, destinations=one, group_callers=False)
