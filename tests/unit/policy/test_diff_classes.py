"""`policy diff` probing one caller per class gives exactly what probing every caller gives."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from meshward.policy.diff import PLAINTEXT, caller_classes, diff
from meshward.testing.policy_edits import addressed_fleet, edits

NOW = datetime(2026, 12, 3, tzinfo=UTC)
# the edited policies' callee, a neighbour in its namespace, one in the other namespace
DESTINATIONS = ("team000/svc0000", "team000/svc0005", "team001/svc0031")


@pytest.mark.parametrize("edit", sorted(edits(addressed_fleet())))
def test_grouped_diff_equals_probing_every_caller(edit: str) -> None:
    old = addressed_fleet()
    new = edits(old)[edit]
    for a, b in ((old, new), (new, old)):
        grouped = diff(a, b, now=NOW, destinations=DESTINATIONS)
        every = diff(a, b, now=NOW, destinations=DESTINATIONS, group_callers=False)
        assert grouped == every
        assert grouped.changes, f"{edit}: the edit should open or close some flow"


def test_classes_are_few_and_split_by_what_rules_read() -> None:
    old = addressed_fleet()
    new = edits(old)["prefix-and-ip-condition"]
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
    old = addressed_fleet()
    new = edits(old)["methods"]
    one = DESTINATIONS[:1]
    budget = 400  # probing every caller of the callee needs more than this, its classes less
    assert diff(
        old, new, now=NOW, destinations=one, group_callers=False, max_evaluations=budget
    ).truncated
    grouped = diff(old, new, now=NOW, destinations=one, max_evaluations=budget)
    assert not grouped.truncated and grouped.changes
    assert grouped == diff(old, new, now=NOW, destinations=one, group_callers=False)


def test_a_mesh_wide_change_under_a_budget_classes_few_destinations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Classing callers is charged to the budget: a change touching every workload stops after
    a few destinations instead of classing every caller of each (the history diffs every
    applied change under a budget)."""
    import meshward.policy.diff as module
    from meshward.policy.model import Action, AuthorizationPolicy, Operation, Rule
    from meshward.policy.policyset import PolicySet

    old = addressed_fleet(120)
    deny = AuthorizationPolicy(
        namespace=old.mesh.root_namespace, name="deny-debug", action=Action.DENY,
        rules=(Rule(operations=(Operation(paths=("/debug",)),)),),
    )  # fmt: skip
    new = PolicySet.create(mesh=old.mesh, workloads=old.workloads,
                           authorization_policies=[*old.authorization_policies, deny])  # fmt: skip
    classed: list[str] = []
    real = module.caller_classes

    def counting(*args: object, **kw: object) -> list[list[str]]:
        classed.append(args[1].ref)  # type: ignore[attr-defined]
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "caller_classes", counting)
    budget = 1_000
    result = diff(old, new, now=NOW, max_evaluations=budget)
    assert result.truncated and result.changes
    assert 1 <= len(classed) <= budget // 120 + 1  # each destination charges its ~120 callers
