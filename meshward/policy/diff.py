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

from meshward.policy.evaluator import evaluate
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
) -> PolicyDiff:
    """``destinations``: probe only flows to these workloads (callers who know which workloads'
    policies changed, like the control plane's history, skip the rest); ``max_changes``: stop
    after that many changes; ``max_evaluations``: stop after that many probe pairs evaluated (a
    budget for callers that diff on every change). ``truncated`` says when either stopped it."""
    when = now  # required: the caller (the CLI) reads the clock
    old_refs = {w.ref for w in old.workloads}
    new_refs = {w.ref for w in new.workloads}
    common = sorted(old_refs & new_refs)
    targets = common if destinations is None else sorted(set(destinations) & set(common))
    changes: list[FlowChange] = []
    truncated = False
    for dst_ref in targets:
        if truncated:
            break
        old_dst, new_dst = old.workload(dst_ref), new.workload(dst_ref)
        assert old_dst is not None and new_dst is not None
        probes = _probes(old, old_dst, new, new_dst)
        for src_ref in [*common, PLAINTEXT]:
            if src_ref == dst_ref:
                continue
            for probe in probes:
                if max_evaluations is not None:
                    max_evaluations -= 1
                    if max_evaluations < 0:
                        truncated = True
                        break
                before = _decide(old, old_dst, src_ref, probe, when)
                after = _decide(new, new_dst, src_ref, probe, when)
                if before.allowed != after.allowed:
                    if max_changes is not None and len(changes) >= max_changes:
                        truncated = True
                        break
                    changes.append(FlowChange(src_ref, dst_ref, probe, before, after))
            if truncated:
                break
    return PolicyDiff(
        changes=tuple(changes),
        added_workloads=tuple(sorted(new_refs - old_refs)),
        removed_workloads=tuple(sorted(old_refs - new_refs)),
        version_before=old.version,
        version_after=new.version,
        truncated=truncated,
    )


def _decide(
    policy_set: PolicySet, dst: Workload, src_ref: str, probe: Probe, now: datetime
) -> Decision:
    principal = source_ip = None
    if src_ref != PLAINTEXT:
        src = policy_set.workload(src_ref)
        assert src is not None
        principal = src.spiffe_id(policy_set.mesh.trust_domain)
        source_ip = src.address
    request = Request(
        method=probe.method,
        path=probe.path,
        host=dst.name,
        destination_port=probe.port,
        source_principal=principal,
        source_ip=source_ip,
        destination_ip=dst.address,
        claims=dict(probe.claims) if probe.claims is not None else None,
    )
    return evaluate(policy_set, dst, request, now=now)


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
