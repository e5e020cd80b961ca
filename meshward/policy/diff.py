"""Which workload-to-workload flows a policy change opens or closes (`meshward policy diff`).

Flows are probed, not proven: for every (caller, destination) pair the probe requests cover the
destination's ports and the methods, paths and end-user identities its policies mention in
either version (plus GET / and a plaintext caller). A changed decision on any probe is reported
with the probe that shows it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from meshward.policy.evaluator import Check, RequestContext, WorkloadPolicies, evaluate, plan_for
from meshward.policy.model import AuthorizationPolicy, Decision, Request, Rule, Workload
from meshward.policy.policyset import PolicySet

PLAINTEXT = "(plaintext)"
MAX_PROBES_PER_DESTINATION = 400


@dataclass(frozen=True)
class Probe:
    port: int
    method: str
    path: str
    claims: tuple[tuple[str, Any], ...] | None  # sorted items; None: no token

    def describe(self) -> str:
        token = ""
        if self.claims is not None:
            token = " with token " + ", ".join(f"{k}={v}" for k, v in self.claims)
        return f"{self.method} {self.path}{token}"


@dataclass(frozen=True)
class FlowChange:
    source: str  # workload ref, or PLAINTEXT
    destination: str
    probe: Probe
    before: Decision
    after: Decision

    @property
    def direction(self) -> str:
        return "allow -> deny" if self.before.allowed else "deny -> allow"

    def render(self) -> str:
        why = self.after.reason
        return (
            f"{self.source} -> {self.destination}:{self.probe.port} {self.probe.describe()}: "
            f"{self.direction} ({why})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "port": self.probe.port,
            "method": self.probe.method,
            "path": self.probe.path,
            "claims": dict(self.probe.claims) if self.probe.claims is not None else None,
            "before": self.before.verdict,
            "after": self.after.verdict,
            "before_reason": self.before.reason,
            "after_reason": self.after.reason,
        }


@dataclass(frozen=True)
class PolicyDiff:
    changes: tuple[FlowChange, ...]
    added_workloads: tuple[str, ...]
    removed_workloads: tuple[str, ...]
    version_before: str
    version_after: str
    truncated: bool = False  # stopped at max_changes

    @property
    def changed(self) -> bool:
        return bool(self.changes or self.added_workloads or self.removed_workloads)


def diff(
    old: PolicySet,
    new: PolicySet,
    *,
    now: datetime,
    destinations: Iterable[str] | None = None,
    max_changes: int | None = None,
    max_evaluations: int | None = None,
    group_callers: bool = True,
) -> PolicyDiff:
    """``destinations``: probe only flows to these workloads (callers who know which workloads'
    policies changed, like the control plane's history, skip the rest); ``max_changes``: stop
    after that many changes; ``max_evaluations``: stop after that many probe pairs evaluated (a
    budget for callers that diff on every change). ``truncated`` says when either stopped it.
    ``group_callers``: probe one caller per class of callers that no rule of the destination's
    policies (either version) tells apart (:func:`caller_classes`), then only the probes that
    changed for it with the other members; the result is the same as probing every caller
    (False: probe every caller, as a test oracle)."""
    when = now  # required: the caller (the CLI) reads the clock
    old_refs = {w.ref for w in old.workloads}
    new_refs = {w.ref for w in new.workloads}
    common = sorted(old_refs & new_refs)
    targets = common if destinations is None else sorted(set(destinations) & set(common))
    changes: list[FlowChange] = []
    truncated = False
    budget = [max_evaluations]
    contexts: dict[tuple[int, str], RequestContext] = {}  # per caller and version, reused
    sources = [*common, PLAINTEXT]
    for dst_ref in targets:
        if truncated:
            break
        old_dst, new_dst = old.workload(dst_ref), new.workload(dst_ref)
        assert old_dst is not None and new_dst is not None
        probes = _probes(old, old_dst, new, new_dst)
        callers = [s for s in sources if s != dst_ref]
        # Per caller, the probes whose decision may have changed: all of them without classes;
        # with them, those that changed for the caller's class representative.
        suspects: dict[str, list[Probe]] = {ref: probes for ref in callers}
        if group_callers:
            suspects = {}
            # Telling callers apart costs a check per caller: charged like an evaluation each,
            # so a mesh-wide change under a budget stops after a few destinations, not after
            # classing every caller of every workload.
            if budget[0] is not None:
                budget[0] -= len(callers)
                if budget[0] < 0:
                    truncated = True
                    break
            for members in caller_classes(old, old_dst, new, new_dst, callers, contexts):
                found = []
                for probe in probes:
                    if not _spend(budget):
                        truncated = True
                        break
                    before = _decide(old, old_dst, members[0], probe, when)
                    if before.allowed != _decide(new, new_dst, members[0], probe, when).allowed:
                        found.append(probe)
                suspects.update((ref, found) for ref in members)
                if truncated:
                    break
        for src_ref in callers:
            if truncated:
                break
            for probe in suspects.get(src_ref, ()):
                if not _spend(budget):
                    truncated = True
                    break
                before = _decide(old, old_dst, src_ref, probe, when)
                after = _decide(new, new_dst, src_ref, probe, when)
                if before.allowed != after.allowed:
                    if max_changes is not None and len(changes) >= max_changes:
                        truncated = True
                        break
                    changes.append(FlowChange(src_ref, dst_ref, probe, before, after))
    return PolicyDiff(
        changes=tuple(changes),
        added_workloads=tuple(sorted(new_refs - old_refs)),
        removed_workloads=tuple(sorted(old_refs - new_refs)),
        version_before=old.version,
        version_after=new.version,
        truncated=truncated,
    )


def _spend(budget: list[int | None]) -> bool:
    if budget[0] is None:
        return True
    budget[0] -= 1
    return budget[0] >= 0


#: what the evaluator's checks call the caller's attributes (rule sources and `when` keys)
CALLER_LABELS = frozenset(
    {
        "peer principal", "peer namespace", "source ip", "remote ip",
        "source.principal", "source.namespace", "source.ip", "remote.ip",
    }
)  # fmt: skip


def _caller_checks(plan: WorkloadPolicies) -> list[Check]:
    checks: list[Check] = []
    for entries in plan.entries.values():
        for _, rule in entries:
            for alternative in rule.sources:
                checks.extend(c for c in alternative if c.label in CALLER_LABELS)
            checks.extend(c for c in rule.conditions if c.label in CALLER_LABELS)
    return checks


def caller_classes(
    old: PolicySet,
    old_dst: Workload,
    new: PolicySet,
    new_dst: Workload,
    callers: list[str],
    contexts: dict[tuple[int, str], RequestContext] | None = None,
) -> list[list[str]]:
    """``callers`` (workload refs, PLAINTEXT) grouped so that two callers of a group get the same
    decision to every request the destination can receive, in either version.

    Why this is sound: a decision depends on the caller only through the request's peer
    principal, its namespace and the source (and remote) IP, read by rule checks whose value
    depends on nothing else (one attribute per check), and through the peer's presence
    (plaintext, its own group). Callers for which every such check of the destination's rules
    (both versions, each caller as that version declares it) comes out the same are therefore
    decided the same whatever the method, path, port or token. In a fleet where each service
    names ~10 callers, ~1,000 callers fall into a dozen groups. ``contexts``: each caller's
    request context per version, kept across destinations (the checks read only the caller's
    attributes, the same for every destination)."""
    contexts = {} if contexts is None else contexts
    checks = [
        (policy_set, dst, _caller_checks(plan_for(policy_set, dst)))
        for policy_set, dst in ((old, old_dst), (new, new_dst))
    ]
    groups: dict[tuple[Any, ...], list[str]] = {}
    for ref in callers:
        key: list[Any] = [ref == PLAINTEXT]
        for policy_set, dst, found in checks:
            ctx = contexts.get((id(policy_set), ref))
            if ctx is None:
                ctx = RequestContext(_request(policy_set, dst, ref, Probe(0, "GET", "/", None)))
                contexts[(id(policy_set), ref)] = ctx
            key.extend(check.test(ctx) for check in found)
        groups.setdefault(tuple(key), []).append(ref)
    return list(groups.values())


def _request(policy_set: PolicySet, dst: Workload, src_ref: str, probe: Probe) -> Request:
    principal = source_ip = None
    if src_ref != PLAINTEXT:
        src = policy_set.workload(src_ref)
        assert src is not None
        principal = src.spiffe_id(policy_set.mesh.trust_domain)
        source_ip = src.address
    return Request(
        method=probe.method,
        path=probe.path,
        host=dst.name,
        destination_port=probe.port,
        source_principal=principal,
        source_ip=source_ip,
        destination_ip=dst.address,
        claims=dict(probe.claims) if probe.claims is not None else None,
    )


def _decide(
    policy_set: PolicySet, dst: Workload, src_ref: str, probe: Probe, now: datetime
) -> Decision:
    return evaluate(policy_set, dst, _request(policy_set, dst, src_ref, probe), now=now)


def _probes(old: PolicySet, old_dst: Workload, new: PolicySet, new_dst: Workload) -> list[Probe]:
    policies = [*old.policies_for(old_dst), *new.policies_for(new_dst)]
    ports = sorted({p.port for p in (*old_dst.ports, *new_dst.ports)}) or [0]
    methods = {"GET"}
    paths = {"/"}
    claims: set[tuple[tuple[str, Any], ...] | None] = {None}
    for rule in _rules(policies):
        for op in rule.operations:
            methods.update(_samples(op.methods, "GET"))
            methods.update(_samples(op.not_methods, "GET"))
            paths.update(_path_samples(op.paths))
            paths.update(_path_samples(op.not_paths))
            ports.extend(p for p in op.ports if p not in ports)
        token = _token(rule)
        if token is not None:
            claims.add(token)
    probes = [
        Probe(port, method, path, token)
        for port in ports
        for method in sorted(methods)
        for path in sorted(paths)
        for token in sorted(claims, key=lambda c: () if c is None else c)
    ]
    return probes[:MAX_PROBES_PER_DESTINATION]


def _rules(policies: Iterable[AuthorizationPolicy]) -> Iterator[Rule]:
    for policy in policies:
        yield from policy.rules


def _samples(patterns: Iterable[str], fallback: str) -> set[str]:
    out: set[str] = set()
    for p in patterns:
        if p == "*":
            out.add(fallback)
        elif p.endswith("*"):
            out.add(p[:-1] + "probe")
        elif p.startswith("*"):
            out.add("probe" + p[1:])
        else:
            out.add(p)
    return out


def _path_samples(patterns: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for p in patterns:
        sample = p.replace("{**}", "x").replace("{*}", "x")
        if sample == "*":
            continue
        if sample.endswith("*"):
            stem = sample[:-1]
            out.add(stem + "probe" if stem.endswith("/") else stem)
        elif sample.startswith("*"):
            out.add("/x" + sample[1:] if not sample[1:].startswith("/") else sample[1:])
        else:
            out.add(sample if sample.startswith("/") else "/" + sample)
    return out


def _token(rule: Rule) -> tuple[tuple[str, Any], ...] | None:
    """Claims satisfying the rule's exact JWT requirements, if it has any."""
    claims: dict[str, Any] = {}
    for source in rule.sources:
        if source.request_principals:
            sample = next(iter(sorted(_samples(source.request_principals, ""))))
            if "/" not in sample.strip("/"):
                sample = "https://issuer.example/" + (sample or "probe")
            iss, _, sub = sample.rpartition("/")
            claims.update(iss=iss, sub=sub or "probe")
    for cond in rule.conditions:
        exact = [v for v in cond.values if "*" not in v]
        if not exact:
            continue
        if cond.key.startswith("request.auth.claims[") and cond.key.count("[") == 1:
            claims[cond.key[len("request.auth.claims[") : -1]] = exact[0]
        elif cond.key == "request.auth.principal" and "/" in exact[0]:
            iss, _, sub = exact[0].rpartition("/")
            claims.update(iss=iss, sub=sub)
        elif cond.key == "request.auth.audiences":
            claims["aud"] = exact[0]
    if not claims:
        return None
    claims.setdefault("iss", "https://issuer.example")
    claims.setdefault("sub", "probe")
    return tuple(sorted(claims.items()))
