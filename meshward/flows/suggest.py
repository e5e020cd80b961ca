"""Least-privilege AuthorizationPolicies from observed allowed flows (pure: flows in, policies
out, ``now`` passed in).

Why it is shaped like this: a suggestion is only safe to enforce if it is *never wider than what
was seen* and *allows everything that was seen*. So per destination workload:

- each caller gets exactly its own (port, method, path) combinations: paths that share the same
  method set become one operation, so no rule is a cross product that was never observed;
- callers with identical operations share one rule; they become ``namespaces: [NS]`` only when
  every workload of NS (at least two) is among them with those same operations;
- paths are the flow store's templates (``/orders/{*}``, meshward.flows.paths): ids fold there,
  nowhere else, so a suggestion never generalizes a segment that did not vary like an id;
- what cannot be expressed without widening is skipped and reported, never approximated: an
  unknown or plaintext caller, a path the store folded into ``{other}``, a path with ``*`` (Istio
  would read it as a prefix or suffix), a workload whose labels also select another workload.

Only ALLOWED flows are read (the caller filters; :func:`suggest` checks again): a denied flow is
evidence of something that must stay denied.

A workload in scope that nobody was observed calling gets Istio's allow-nothing (an ALLOW policy
selecting it, without rules), with a ``no-callers`` warning: writing nothing would leave it
selected by no policy, i.e. open to every caller, a pivot from which the rest stays reachable.
Only when no allowed flow to it was seen at all: a workload whose callers could not be expressed
(plaintext, unknown identities, folded paths) is left alone and its flows are reported skipped,
and with ``close_uncalled=False`` (the evidence is known to be incomplete) nothing is closed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from meshward.flows.paths import ID, MAX_SEGMENTS, REST
from meshward.flows.records import ALLOW, PLAINTEXT, UNKNOWN
from meshward.flows.store import OTHER_PATH
from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    Operation,
    Protocol,
    Rule,
    Source,
    Workload,
)
from meshward.policy.paths import PathRejected, check_path_template, normalize_path
from meshward.policy.policyset import PolicySet, selects

NAME_PREFIX = "suggested-"
MAX_WARNINGS = 200  # per kind; the rest are counted
MIN_WINDOW_SECONDS = 3600.0  # less than this is a short window
RECENT_FRACTION = 0.1  # a caller first seen in the last 10% of the window is "recent"
MIN_NAMESPACE_WORKLOADS = 2  # a namespace of one workload stays a principal


class Mode(StrEnum):
    DRY_RUN = "dry-run"
    ENFORCE = "enforce"


@dataclass(frozen=True)
class ObservedFlow:
    """One allowed flow summed over the window (the rows of ``/flows/observed``)."""

    source: str  # caller workload "ns/name", or UNKNOWN / PLAINTEXT
    destination: str
    port: int
    method: str  # "" for TCP
    path: str  # template; "" for TCP
    count: int
    first_seen: float  # Unix seconds
    last_seen: float
    decision: str = ALLOW

    @property
    def tcp(self) -> bool:
        return not self.method and not self.path

    def describe(self) -> str:
        what = f"{self.method} {self.path}" if not self.tcp else "(tcp)"
        return f"{self.source} -> {self.destination}:{self.port} {what}"

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> ObservedFlow:
        return cls(
            source=str(row["source"]),
            destination=str(row["destination"]),
            port=int(row["port"]),
            method=str(row.get("method") or ""),
            path=str(row.get("path") or ""),
            count=int(row["count"]),
            first_seen=float(row["first_seen"]),
            last_seen=float(row["last_seen"]),
            decision=str(row.get("decision", ALLOW)),
        )


@dataclass(frozen=True)
class Note:
    """A skipped flow or a thin-evidence warning, with the flow it is about."""

    kind: str
    message: str
    flow: str = ""

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "message": self.message, "flow": self.flow}


@dataclass(frozen=True)
class Suggestion:
    policies: tuple[AuthorizationPolicy, ...]  # one per destination workload, sorted
    workloads: tuple[str, ...]  # the workload each policy is for, in the same order
    used: tuple[ObservedFlow, ...]  # the flows the policies are made of
    skipped: tuple[Note, ...]  # flows that could not be expressed without widening
    warnings: tuple[Note, ...]  # thin evidence
    window: tuple[float, float]  # (start, now) in Unix seconds
    mode: Mode
    closed: tuple[str, ...] = ()  # workloads given allow-nothing: no caller observed

    def enforced(self) -> tuple[AuthorizationPolicy, ...]:
        """The policies as they act once enforced (what coverage and diff judge)."""
        return tuple(replace(p, dry_run=False) for p in self.policies)


@dataclass
class _Notes:
    limit: int = MAX_WARNINGS
    items: list[Note] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, message: str, flow: str = "") -> None:
        self.counts[kind] += 1
        if self.counts[kind] <= self.limit:
            self.items.append(Note(kind, message, flow))

    def done(self) -> tuple[Note, ...]:
        extra = [
            Note(kind, f"... and {n - self.limit} more {kind} notes")
            for kind, n in sorted(self.counts.items())
            if n > self.limit
        ]
        return (*self.items, *extra)


def suggest(
    policy_set: PolicySet,
    flows: Iterable[ObservedFlow],
    *,
    now: datetime,
    since: datetime | None = None,
    namespace: str | None = None,
    mode: Mode = Mode.DRY_RUN,
    close_uncalled: bool = True,
) -> Suggestion:
    """Per workload (in ``namespace`` when given), the policy allowing exactly the observed
    allowed flows to it: allow-nothing where none was observed (``close_uncalled``: pass False
    when the flows are known to be incomplete). ``since``: the start of the observation window
    (None: the oldest flow's first sighting); flows last seen before it are ignored."""
    now_ts = now.timestamp()
    start = since.timestamp() if since is not None else None
    skipped, warnings = _Notes(), _Notes()
    td = policy_set.mesh.trust_domain
    by_dst: dict[str, list[ObservedFlow]] = defaultdict(list)
    called: set[str] = set()  # every destination of an allowed flow, expressible or not
    for flow in flows:
        if flow.decision != ALLOW or flow.count <= 0:
            continue  # never suggest from denied (or empty) flows
        if start is not None and flow.last_seen < start:
            continue
        dst_ns = flow.destination.partition("/")[0]
        if namespace is not None and dst_ns != namespace:
            continue
        called.add(flow.destination)
        reason = _inexpressible(policy_set, flow)
        if reason is not None:
            skipped.add(reason[0], reason[1], flow.describe())
            continue
        if REST in flow.path:
            warnings.add(
                "deep-path",
                f"the store keeps at most {MAX_SEGMENTS} segments: {flow.path} allows any deeper "
                "path under that prefix",
                flow.describe(),
            )
        by_dst[flow.destination].append(_normalized(flow))
    window_start = start
    if window_start is None:
        firsts = [f.first_seen for fs in by_dst.values() for f in fs]
        window_start = min(firsts, default=now_ts)
    window = max(0.0, now_ts - window_start)
    if window < MIN_WINDOW_SECONDS:
        warnings.add(
            "short-window",
            f"the evidence covers {_human(window)} (less than {_human(MIN_WINDOW_SECONDS)}): "
            "rare but legitimate calls (batch jobs, daily reports, failover) may be missing",
        )
    index = _Index.of(policy_set)
    policies: list[AuthorizationPolicy] = []
    used: list[ObservedFlow] = []
    targets: list[str] = []
    for dst_ref in sorted(by_dst):
        dst = policy_set.workload(dst_ref)
        assert dst is not None  # _inexpressible checked it
        alone = _selector_problem(index, dst)
        if alone is not None:
            for flow in by_dst[dst_ref]:
                skipped.add("shared-selector", alone, flow.describe())
            continue
        dst_flows = by_dst[dst_ref]
        policies.append(_policy(policy_set, index, dst, dst_flows, mode))
        targets.append(dst_ref)
        used.extend(dst_flows)
        _thin(policy_set, index, dst_flows, now_ts, window, warnings, td)
        _unrecorded(policy_set, dst, warnings)
    closed: list[str] = []
    for dst in sorted(policy_set.workloads, key=lambda w: w.ref):
        if dst.ref in called or (namespace is not None and dst.namespace != namespace):
            continue
        alone = _selector_problem(index, dst)
        if not close_uncalled or alone is not None:
            why = alone or "the flows read are incomplete, so callers may be missing"
            skipped.add(
                "uncalled-left-open",
                f"no callers observed, but no allow-nothing suggested ({why}): no policy selects "
                "it, so it stays open to every caller",
                dst.ref,
            )
            continue
        policies.append(_allow_nothing(dst, mode))
        targets.append(dst.ref)
        closed.append(dst.ref)
        warnings.add(
            "no-callers",
            f"no callers observed for {dst.ref} in the window: suggested allow-nothing (every "
            "caller denied); if something should call it, widen --since or drive that traffic",
            dst.ref,
        )
        _unrecorded(policy_set, dst, warnings)
    order = sorted(range(len(targets)), key=targets.__getitem__)
    return Suggestion(
        policies=tuple(policies[i] for i in order),
        workloads=tuple(targets[i] for i in order),
        used=tuple(sorted(used, key=_flow_key)),
        skipped=skipped.done(),
        warnings=warnings.done(),
        window=(window_start, now_ts),
        mode=mode,
        closed=tuple(closed),
    )


def _allow_nothing(dst: Workload, mode: Mode) -> AuthorizationPolicy:
    """Istio's allow-nothing: an ALLOW policy selecting the workload, without rules, so no
    request matches an ALLOW rule and every one is denied."""
    return AuthorizationPolicy(
        namespace=dst.namespace,
        name=f"{NAME_PREFIX}{dst.name}"[:253],
        action=Action.ALLOW,
        selector=dict(sorted(dst.labels.items())),
        rules=(),
        dry_run=mode is Mode.DRY_RUN,
    )


def _flow_key(f: ObservedFlow) -> tuple[str, str, int, str, str]:
    return (f.destination, f.source, f.port, f.method, f.path)


def _inexpressible(policy_set: PolicySet, flow: ObservedFlow) -> tuple[str, str] | None:
    dst = policy_set.workload(flow.destination)
    if dst is None:
        return "unknown-destination", f"{flow.destination} is not a workload of the policy set"
    if flow.source in (UNKNOWN, PLAINTEXT) or policy_set.workload(flow.source) is None:
        what = "without mTLS" if flow.source == PLAINTEXT else "whose identity names no workload"
        return "unknown-caller", f"caller {what}: no principal to allow (left to other policy)"
    if not any(p.port == flow.port for p in dst.ports):
        return "unknown-port", f"port {flow.port} is not a declared port of {dst.ref}"
    if flow.tcp or is_tcp_port(dst, flow.port):
        if flow.tcp and is_tcp_port(dst, flow.port):
            return None
        return "incomplete", "an HTTP flow without method and path, or a request on a TCP port"
    if flow.path == OTHER_PATH:
        return (
            "folded-paths",
            "the store folded this caller's paths into {other} (over its per-pair path limit): "
            "the paths are unknown, so nothing is suggested for them",
        )
    if not flow.method or not flow.path.startswith("/"):
        return "incomplete", "the flow has no method or path"
    if "*" in flow.path.replace(ID, "").replace(REST, ""):
        return "wildcard-path", "a '*' in a path would read as a prefix/suffix pattern (wider)"
    if ID in flow.path or REST in flow.path:
        problem = check_path_template(flow.path)
        if problem is not None:
            return "bad-template", f"path template {flow.path!r}: {problem}"
    try:
        _normalize_template(flow.path)
    except PathRejected as exc:
        return "rejected-path", f"the sidecar rejects this path before authorization: {exc}"
    return None


_PLACEHOLDER = "mwtemplate{}x"


def _normalize_template(path: str) -> str:
    """The template as RBAC sees it (normalized as Envoy normalizes the request path), its
    ``{*}``/``{**}`` tokens kept."""
    tokens: list[str] = []
    out = []
    i = 0
    while i < len(path):
        for token in (REST, ID):
            if path.startswith(token, i):
                out.append(_PLACEHOLDER.format(len(tokens)))
                tokens.append(token)
                i += len(token)
                break
        else:
            out.append(path[i])
            i += 1
    normalized = normalize_path("".join(out))
    for index, token in enumerate(tokens):
        normalized = normalized.replace(_PLACEHOLDER.format(index), token, 1)
    return normalized


def _normalized(flow: ObservedFlow) -> ObservedFlow:
    return flow if flow.tcp else replace(flow, path=_normalize_template(flow.path))


@dataclass(frozen=True)
class _Index:
    """Per policy set, built once per suggestion (not per workload: a mesh of 1,000)."""

    by_namespace: Mapping[str, tuple[Workload, ...]]
    sharing: Mapping[str, tuple[str, ...]]  # principal -> workload refs

    @classmethod
    def of(cls, policy_set: PolicySet) -> _Index:
        td = policy_set.mesh.trust_domain
        by_ns: dict[str, list[Workload]] = defaultdict(list)
        sharing: dict[str, list[str]] = defaultdict(list)
        for w in policy_set.workloads:
            by_ns[w.namespace].append(w)
            sharing[w.principal(td)].append(w.ref)
        return cls(
            {ns: tuple(ws) for ns, ws in by_ns.items()},
            {p: tuple(refs) for p, refs in sharing.items()},
        )


def _selector_problem(index: _Index, dst: Workload) -> str | None:
    """A policy is selected by labels: it must select this workload and no other."""
    if not dst.labels:
        return f"{dst.ref} has no labels: a policy cannot select it alone"
    others = [
        w.ref
        for w in index.by_namespace.get(dst.namespace, ())
        if w.ref != dst.ref and selects(dst.labels, w.labels)
    ]
    if others:
        return (
            f"the labels of {dst.ref} also select {', '.join(others[:3])}: a policy for it would "
            "open those too (give it a distinguishing label)"
        )
    return None


def _policy(
    policy_set: PolicySet,
    index: _Index,
    dst: Workload,
    flows: Sequence[ObservedFlow],
    mode: Mode,
) -> AuthorizationPolicy:
    td = policy_set.mesh.trust_domain
    per_caller: dict[str, tuple[Operation, ...]] = {}
    by_caller: dict[str, list[ObservedFlow]] = defaultdict(list)
    for flow in flows:
        by_caller[flow.source].append(flow)
    for caller, caller_flows in by_caller.items():
        per_caller[caller] = _operations(caller_flows)
    groups: dict[tuple[Operation, ...], list[str]] = defaultdict(list)
    for caller, ops in per_caller.items():
        groups[ops].append(caller)
    rules = [
        Rule(sources=_sources(policy_set, index, set(callers), td), operations=ops)
        for ops, callers in groups.items()
    ]
    rules.sort(key=lambda r: (repr(r.sources), repr(r.operations)))
    return AuthorizationPolicy(
        namespace=dst.namespace,
        name=f"{NAME_PREFIX}{dst.name}"[:253],
        action=Action.ALLOW,
        selector=dict(sorted(dst.labels.items())),
        rules=tuple(rules),
        dry_run=mode is Mode.DRY_RUN,
    )


def _operations(flows: Sequence[ObservedFlow]) -> tuple[Operation, ...]:
    """One caller's flows to one workload as operations that allow exactly those flows."""
    tcp_ports: set[int] = set()
    methods_of: dict[tuple[int, str], set[str]] = defaultdict(set)
    for flow in flows:
        if flow.tcp:
            tcp_ports.add(flow.port)
        else:
            methods_of[(flow.port, flow.path)].add(flow.method.upper())
    paths_of: dict[tuple[int, tuple[str, ...]], list[str]] = defaultdict(list)
    for (port, path), methods in methods_of.items():
        paths_of[(port, tuple(sorted(methods)))].append(path)
    ops = [Operation(ports=(port,)) for port in sorted(tcp_ports)]
    ops += [
        Operation(ports=(port,), methods=methods, paths=tuple(sorted(paths)))
        for (port, methods), paths in sorted(paths_of.items())
    ]
    return tuple(ops)


def _sources(
    policy_set: PolicySet, index: _Index, callers: set[str], td: str
) -> tuple[Source, ...]:
    namespaces: list[str] = []
    caller_ns = {ref.partition("/")[0] for ref in callers}
    for ns in sorted(caller_ns):
        members = index.by_namespace.get(ns, ())
        if len(members) >= MIN_NAMESPACE_WORKLOADS and all(w.ref in callers for w in members):
            namespaces.append(ns)
    principals = sorted(
        {
            caller.principal(td)
            for ref in callers
            if (caller := policy_set.workload(ref)) is not None
            and caller.namespace not in namespaces
        }
    )
    sources: list[Source] = []
    if principals:
        sources.append(Source(principals=tuple(principals)))
    if namespaces:
        sources.append(Source(namespaces=tuple(namespaces)))
    return tuple(sources)


def _thin(
    policy_set: PolicySet,
    index: _Index,
    flows: Sequence[ObservedFlow],
    now: float,
    window: float,
    warnings: _Notes,
    td: str,
) -> None:
    for flow in flows:
        if flow.count == 1:
            warnings.add("seen-once", "seen once: may be a one-off", flow.describe())
    first_by_caller: dict[str, float] = {}
    for flow in flows:
        first_by_caller[flow.source] = min(
            first_by_caller.get(flow.source, flow.first_seen), flow.first_seen
        )
    recent = now - max(window * RECENT_FRACTION, 1.0)
    dst = flows[0].destination
    for caller, first in sorted(first_by_caller.items()):
        if window > 0 and first >= recent:
            warnings.add(
                "recent-caller",
                f"{caller} first called {dst} {_human(now - first)} ago (window {_human(window)}):"
                " little evidence of what it normally does",
                f"{caller} -> {dst}",
            )
    for caller in sorted(first_by_caller):
        caller_w = policy_set.workload(caller)
        assert caller_w is not None
        others = [r for r in index.sharing.get(caller_w.principal(td), ()) if r != caller]
        if others:
            warnings.add(
                "shared-identity",
                f"{caller} shares its identity with {', '.join(others[:3])}: those get the "
                "same access",
                f"{caller} -> {dst}",
            )


def _unrecorded(policy_set: PolicySet, dst: Workload, warnings: _Notes) -> None:
    """What the current ALLOW policies require that flows do not record (end-user tokens,
    conditions, hosts, addresses): the suggestion cannot carry it over, so replacing them with
    the suggestion would drop it. Said per policy, so the operator keeps those rules."""
    for policy in policy_set.policies_for(dst):
        if policy.action is not Action.ALLOW or policy.dry_run:
            continue
        needs = sorted(
            {
                what
                for rule in policy.rules
                for what, present in (
                    ("end-user tokens (requestPrincipals)",
                     any(s.request_principals or s.not_request_principals for s in rule.sources)),
                    ("conditions (when)", bool(rule.conditions)),
                    ("hosts", any(o.hosts or o.not_hosts for o in rule.operations)),
                    ("ip blocks", any(s.ip_blocks or s.remote_ip_blocks for s in rule.sources)),
                )
                if present
            }
        )  # fmt: skip
        if needs:
            warnings.add(
                "unrecorded-requirements",
                f"{policy.ref} also requires {', '.join(needs)}, which flows do not record: the "
                "suggestion does not carry it over; keep that policy (or its rule)",
                dst.ref,
            )


def _human(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{(seconds % 86400) // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60}s"
    return f"{seconds}s"


def sample_path(template: str, ident: str = "1") -> str:
    """A concrete path the template stands for (replaying a flow needs a request)."""
    return template.replace(REST, ident).replace(ID, ident)


def is_tcp_port(workload: Workload, port: int) -> bool:
    return any(p.port == port and p.protocol is Protocol.TCP for p in workload.ports)
