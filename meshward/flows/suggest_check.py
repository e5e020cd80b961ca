"""Judging a suggestion before anyone enforces it (pure, ``now`` passed in).

- coverage: every flow the suggestion was made of is replayed through the policy evaluator
  against the suggested policies *as enforced*: anything short of 100 % allowed is a bug, and is
  reported flow by flow rather than hidden;
- would deny: what the suggestion, added to the current policy set and enforced, denies that
  the current set allows (``meshward policy diff``'s machinery, probing only the workloads the
  suggestion selects);
- files: one YAML file per workload, with a header saying where the evidence came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from meshward.flows.suggest import ObservedFlow, Suggestion, sample_path
from meshward.policy import canonical
from meshward.policy.diff import PolicyDiff, diff
from meshward.policy.evaluator import evaluate
from meshward.policy.model import Action, AuthorizationPolicy, Request
from meshward.policy.policyset import PolicySet

MAX_DIFF_CHANGES = 500
UNSEEN_ID = "0b7c2f4e-9d1a-4c3b-8e5f-6a7d8c9e0f12"
MAX_DIFF_EVALUATIONS = 200_000  # probe pairs: a big mesh answers in seconds, marked truncated


@dataclass(frozen=True)
class Coverage:
    total: int
    allowed: int
    denied: tuple[tuple[ObservedFlow, str], ...]  # (flow, the evaluator's reason)

    @property
    def percent(self) -> float:
        return 100.0 if self.total == 0 else round(100.0 * self.allowed / self.total, 2)

    def to_json(self) -> dict[str, Any]:
        return {
            "flows": self.total,
            "allowed": self.allowed,
            "percent": self.percent,
            "denied": [{"flow": f.describe(), "reason": why} for f, why in self.denied],
        }


def with_policies(
    policy_set: PolicySet, policies: tuple[AuthorizationPolicy, ...], *, keep_existing: bool
) -> PolicySet:
    """The current set plus ``policies`` (``keep_existing``), or its workloads, mesh and
    authentication with only ``policies`` for authorization."""
    new = {p.ref for p in policies}  # a rerun's files replace the earlier suggestion's
    existing = [p for p in policy_set.authorization_policies if keep_existing and p.ref not in new]
    return PolicySet.create(
        mesh=policy_set.mesh,
        workloads=policy_set.workloads,
        authorization_policies=(*existing, *policies),
        peer_authentications=policy_set.peer_authentications,
        request_authentications=policy_set.request_authentications,
    )


def replay(policy_set: PolicySet, flow: ObservedFlow, *, now: datetime, ident: str = "1") -> Any:
    """The evaluator's decision for ``flow`` (its path template instantiated with ``ident``)."""
    dst = policy_set.workload(flow.destination)
    src = policy_set.workload(flow.source)
    assert dst is not None and src is not None
    request = Request(
        method=flow.method or "GET",
        path=sample_path(flow.path, ident) if flow.path else "/",
        host=dst.name,
        destination_port=flow.port,
        source_principal=src.spiffe_id(policy_set.mesh.trust_domain),
        source_ip=src.address,
        destination_ip=dst.address,
    )
    return evaluate(policy_set, dst, request, now=now)


def coverage(policy_set: PolicySet, suggestion: Suggestion, *, now: datetime) -> Coverage:
    """Replay every flow the suggestion used through the suggested policies alone, enforced."""
    judged = with_policies(policy_set, suggestion.enforced(), keep_existing=False)
    denied: list[tuple[ObservedFlow, str]] = []
    for flow in suggestion.used:
        # a folded path is replayed with a short id and with a UUID: the template must admit
        # ids it never saw, not just one
        idents = ("1", UNSEEN_ID) if "{*" in flow.path else ("1",)
        for ident in idents:
            decision = replay(judged, flow, now=now, ident=ident)
            if not decision.allowed:
                denied.append((flow, f"{decision.reason} (id {ident})"))
                break
    return Coverage(len(suggestion.used), len(suggestion.used) - len(denied), tuple(denied))


def existing_allows(policy_set: PolicySet, suggestion: Suggestion) -> tuple[str, ...]:
    """Enforced ALLOW policies already selecting a suggested workload (other than an earlier
    suggestion): next to them the suggestion narrows nothing, as ALLOW policies add up."""
    refs: set[str] = set()
    mine = {p.ref for p in suggestion.policies}
    for ref in suggestion.workloads:
        workload = policy_set.workload(ref)
        assert workload is not None
        for p in policy_set.policies_for(workload):
            if p.action is Action.ALLOW and not p.dry_run and p.ref not in mine:
                refs.add(p.ref)
    return tuple(sorted(refs))


def would_deny(
    policy_set: PolicySet, suggestion: Suggestion, *, now: datetime, replacing: bool = False
) -> PolicyDiff:
    """Flows the current set allows and the current set plus the enforced suggestion denies;
    ``replacing``: with the ALLOW policies of :func:`existing_allows` removed (the suggestion
    taking their place; only the suggested workloads are probed)."""
    base = policy_set
    if replacing:
        gone = set(existing_allows(policy_set, suggestion))
        base = PolicySet.create(
            mesh=policy_set.mesh,
            workloads=policy_set.workloads,
            authorization_policies=[
                p for p in policy_set.authorization_policies if p.ref not in gone
            ],
            peer_authentications=policy_set.peer_authentications,
            request_authentications=policy_set.request_authentications,
        )
    after = with_policies(base, suggestion.enforced(), keep_existing=True)
    destinations = set(suggestion.workloads)
    result = diff(
        policy_set,
        after,
        now=now,
        destinations=destinations,
        max_changes=MAX_DIFF_CHANGES,
        max_evaluations=MAX_DIFF_EVALUATIONS,
    )
    closing = tuple(c for c in result.changes if c.before.allowed and not c.after.allowed)
    return PolicyDiff(
        changes=closing,
        added_workloads=(),
        removed_workloads=(),
        version_before=result.version_before,
        version_after=result.version_after,
        truncated=result.truncated,
    )


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def files(suggestion: Suggestion) -> dict[str, str]:
    """File name -> YAML, one file per workload: ``<namespace>.<workload>.yaml``."""
    by_policy: dict[str, list[ObservedFlow]] = {}
    for flow in suggestion.used:
        by_policy.setdefault(flow.destination, []).append(flow)
    out: dict[str, str] = {}
    start, end = suggestion.window
    closed = set(suggestion.closed)
    for policy, workload in zip(suggestion.policies, suggestion.workloads, strict=True):
        flows = by_policy.get(workload, [])
        callers = sorted({f.source for f in flows})
        evidence = (
            f"# Suggested by `meshward policy suggest`: allow nothing (an ALLOW without rules):\n"
            f"# no caller of {workload} was observed {_stamp(start)} .. {_stamp(end)}.\n"
            if workload in closed
            else f"# Suggested by `meshward policy suggest` from {len(flows)} allowed flow(s) "
            f"({sum(f.count for f in flows)} requests)\n"
            f"# to {workload} observed {_stamp(start)} .. {_stamp(end)};\n"
            f"# callers: {', '.join(callers)}.\n"
        )
        header = (
            evidence
            + f"# Mode: {suggestion.mode.value}"
            + (
                ' (istio.io/dry-run: "true": evaluated and logged, never enforced; remove the '
                "annotation to enforce).\n"
                if policy.dry_run
                else " (enforced).\n"
            )
        )
        body = canonical.dump_documents([canonical.authorization_policy_document(policy)])
        out[f"{workload.replace('/', '.')}.yaml"] = header + body
    return out
