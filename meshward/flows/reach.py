"""Reachability and blast radius under a policy set (pure: policy set and ``now`` in, facts out).

Which workload may call which, with which methods and paths, is decided by the policy
evaluator itself — the same function behind ``meshward policy explain`` — never by a second
reading of the rules: for every ordered pair of the mesh's workloads and every port of the
callee, a small set of *probe* requests is evaluated. The probes come from the rules that select
the callee: every method, path and Host pattern a rule names (``/orders/*`` is probed as
``/orders/meshward-probe``), each prefix or template path combined with each suffix path
(``/api/*`` with ``*.json``), plus one method, path and Host no rule names (standing for "any
other"). A callee no rule constrains costs one probe per caller. A property test checks that
no request of a wider grid is allowed between workloads reported as unable to connect; overlaps
of patterns rarer than prefix-with-suffix (two templates of one shape, say) are not probed.

Probes carry the caller's mesh identity (its SPIFFE ID and address), the callee's name as Host
(unless a rule names Hosts), no end-user token and no extra headers: rules that need a token, a
header or another ``when`` condition do not open a path here; they are listed per callee as
``conditional_rules``. A CUSTOM policy is decided without its provider, as ``explain`` does:
fail closed.

Blast radius: the workloads a compromised workload could call directly (its edges in the
reachability graph) and transitively (by moving through each workload it reaches in turn).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from meshward.policy.evaluator import Check, CompiledRule, RequestContext, evaluate, plan_for
from meshward.policy.model import Action, AuthorizationPolicy, Protocol, Request, Workload
from meshward.policy.paths import PathRejected
from meshward.policy.policyset import PolicySet

OTHER = "*"  # in methods/paths lists: "any method (path) no rule names"
PROBE_SEGMENT = "meshward-probe"
OTHER_PATH = f"/{PROBE_SEGMENT}-other"
OTHER_HOST = f"{PROBE_SEGMENT}-other.invalid"
STANDARD_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
MAX_WORKLOADS = 1000  # reachability is N^2 pairs: past this, the report says it stopped
MAX_PROBES = 4096  # per callee port (methods x paths); more patterns are cut and counted
MAX_REQUESTS_LISTED = 200  # allowed probe requests listed per edge


@dataclass(frozen=True)
class Probe:
    """One request tried against a callee port: ``method`` and ``path`` are "" on TCP."""

    port: int
    method: str
    path: str
    method_label: str  # the pattern it stands for: a method, or OTHER
    path_label: str  # the rule's path pattern it stands for, or OTHER
    host: str = ""  # "" = the callee's name, as explain defaults it
    host_label: str = OTHER  # the rule's host pattern it stands for, or OTHER

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "method": self.method, "path": self.path, "host": self.host}


@dataclass(frozen=True)
class Edge:
    """What ``source`` may call on ``destination`` (only pairs with at least one allowed probe)."""

    source: str
    destination: str
    allowed: tuple[Probe, ...]
    probes: int  # tried on this pair
    rules: tuple[str, ...]  # the policy#rule refs that allowed them; "" = no ALLOW policy

    @property
    def everything(self) -> bool:
        return len(self.allowed) == self.probes

    def access(self) -> list[dict[str, Any]]:
        """Allowed (methods, paths) groups, per port: paths with the same allowed methods
        together. OTHER stands for methods or paths no rule names."""
        by_path: dict[tuple[int, str, str], list[str]] = {}
        for p in self.allowed:
            by_path.setdefault((p.port, p.host_label, p.path_label), []).append(p.method_label)
        groups: dict[tuple[int, str, tuple[str, ...]], list[str]] = {}
        for (port, host, path), named in by_path.items():
            groups.setdefault((port, host, tuple(sorted(set(named)))), []).append(path)
        out = []
        for (port, host, methods), paths in sorted(groups.items()):
            # "A & B" (a request matching both) says nothing more beside A or B themselves
            shown = [p for p in paths if not (" & " in p and set(p.split(" & ")) & set(paths))]
            group: dict[str, Any] = {"port": port, "methods": list(methods), "paths": sorted(shown)}
            if host != OTHER:  # only where a rule names hosts
                group["host"] = host
            out.append(group)
        return out

    def summary(self) -> str:
        if self.everything:
            return "anything"
        parts = []
        for group in self.access():
            methods = "any method" if group["methods"] == [OTHER] else ", ".join(group["methods"])
            paths = ", ".join("any other path" if p == OTHER else p for p in group["paths"])
            text = f"{methods} {paths}".strip() if paths else f"{methods} (connection)"
            parts.append(f"{text} (Host {group['host']})" if "host" in group else text)
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        listed = self.allowed[:MAX_REQUESTS_LISTED]
        return {
            "source": self.source,
            "destination": self.destination,
            "anything": self.everything,
            "access": self.access(),
            "summary": self.summary(),
            "allowed_probes": len(self.allowed),
            "probes": self.probes,
            "requests": [p.to_json() for p in listed],
            "requests_truncated": len(self.allowed) - len(listed),
            "rules": list(self.rules),
        }


@dataclass
class Reachability:
    workloads: tuple[str, ...]
    edges: dict[tuple[str, str], Edge]
    probes: dict[str, tuple[Probe, ...]]  # per callee
    conditional_rules: dict[str, tuple[str, ...]]  # per callee: rules probes cannot satisfy
    skipped: str = ""  # why reachability was not computed ("" when it was)
    cut_probes: int = 0  # probes not tried because a callee named too many patterns
    evaluations: int = 0
    graph: dict[str, frozenset[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        out: dict[str, set[str]] = {w: set() for w in self.workloads}
        for src, dst in self.edges:
            out.setdefault(src, set()).add(dst)
        self.graph = {k: frozenset(v) for k, v in out.items()}


# --------------------------------------------------------------------------- probes


def _path_example(pattern: str) -> str:
    """A concrete path the pattern matches (templates and wildcards filled in)."""
    if pattern == "*":
        return "/" + PROBE_SEGMENT
    if pattern.startswith("*"):
        return "/" + PROBE_SEGMENT + pattern[1:]
    if pattern.endswith("*"):
        base = pattern[:-1]
        return base + PROBE_SEGMENT if base.endswith("/") else base + "-" + PROBE_SEGMENT
    return pattern.replace("{**}", PROBE_SEGMENT).replace("{*}", PROBE_SEGMENT)


def _named(policies: Iterable[AuthorizationPolicy]) -> tuple[set[str], set[str], set[str]]:
    methods: set[str] = set()
    paths: set[str] = set()
    hosts: set[str] = set()
    for policy in policies:
        for rule in policy.rules:
            for op in rule.operations:
                methods.update(op.methods, op.not_methods)
                paths.update(op.paths, op.not_paths)
                hosts.update(op.hosts, op.not_hosts)
    return methods, paths, hosts


def _host_example(pattern: str) -> str:
    if pattern == "*":
        return PROBE_SEGMENT
    if pattern.startswith("*"):
        return PROBE_SEGMENT + pattern[1:]
    if pattern.endswith("*"):
        return pattern[:-1] + PROBE_SEGMENT
    return pattern


def _path_probes(named: set[str]) -> list[tuple[str, str]]:
    """(path, label) per named pattern, then each prefix or template pattern combined with
    each suffix pattern (``/api/*`` with ``*.json``: ``/api/meshward-probe.json``, which only
    a request matching both reaches), then one path no rule names."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(path: str, label: str) -> None:
        if path not in seen:
            seen.add(path)
            out.append((path, label))

    patterns = sorted(p for p in named if p != "*")
    for pattern in patterns:
        add(_path_example(pattern), pattern)
    suffixes = [p for p in patterns if p.startswith("*")]
    stems = [p for p in patterns if p.endswith("*") or "{*}" in p or "{**}" in p]
    for stem in stems:
        for suffix in suffixes:
            add(_path_example(stem) + suffix[1:], f"{stem} & {suffix}")
    add(OTHER_PATH, OTHER)
    return out


def _conditional(policies: Iterable[AuthorizationPolicy]) -> tuple[str, ...]:
    """ALLOW rules a probe cannot satisfy: they need an end-user token, a header or a
    ``when`` condition."""
    out = []
    for policy in policies:
        if policy.action is not Action.ALLOW or policy.dry_run:
            continue
        for i, rule in enumerate(policy.rules):
            if rule.conditions or any(
                s.request_principals or s.not_request_principals for s in rule.sources
            ):
                out.append(f"{policy.ref}#{i}")
    return tuple(out)


def probes_for(policy_set: PolicySet, workload: Workload) -> tuple[tuple[Probe, ...], int]:
    """The probes for a callee (every port), and how many were cut by MAX_PROBES."""
    policies = policy_set.policies_for(workload)
    named_methods, named_paths, named_hosts = _named(policies)
    methods = sorted(m for m in named_methods if m != "*")
    other_method = next((m for m in STANDARD_METHODS if m not in named_methods), "GET")
    if not methods:
        other_method = "GET"
    method_probes = [(m, m) for m in methods] + [(other_method, OTHER)]
    path_probes = _path_probes(named_paths)
    # Hosts only where a rule names them (else the callee's name, what explain sends, stands
    # for every Host): then the callee's name, each named pattern and one Host none names.
    host_probes: list[tuple[str, str]] = [("", OTHER)]
    if named_hosts:
        named = {(_host_example(h), h) for h in named_hosts if _host_example(h) != workload.name}
        host_probes = [("", workload.name), *sorted(named), (OTHER_HOST, OTHER)]
    ports = workload.ports or ()
    out: list[Probe] = []
    cut = 0
    for wp in ports:
        if wp.protocol is Protocol.TCP:
            out.append(Probe(wp.port, "", "", OTHER, ""))
            continue
        budget = MAX_PROBES
        for host, hlabel in host_probes:
            for method, mlabel in method_probes:
                for path, plabel in path_probes:
                    if budget == 0:
                        cut += 1
                        continue
                    budget -= 1
                    out.append(Probe(wp.port, method, path, mlabel, plabel, host, hlabel))
    if not ports:  # a workload without declared ports: port 0, as explain defaults it
        out.append(Probe(0, "GET", OTHER_PATH, OTHER, OTHER))
    return tuple(out), cut


def request_for(policy_set: PolicySet, caller: Workload, callee: Workload, probe: Probe) -> Request:
    """The request `explain --source-workload CALLER --workload CALLEE` builds for a probe."""
    return Request(
        method=probe.method or "GET",
        path=probe.path or "/",
        host=probe.host or callee.name,
        destination_port=probe.port,
        source_principal=caller.spiffe_id(policy_set.mesh.trust_domain),
        source_ip=caller.address,
        destination_ip=callee.address,
    )


# --------------------------------------------------------------------------- caller classes


def _rule_checks(rule: CompiledRule) -> tuple[Check, ...]:
    return (*(c for alt in rule.sources for c in alt), *(c for alt in rule.operations for c in alt),
            *rule.conditions)  # fmt: skip


CallerView = tuple[Any, Any, Any]  # what a RequestContext holds of the caller
# Check labels (meshward.policy.evaluator) that read only the request, never the caller: they
# answer alike for every caller of one probe, so they are left out of the grouping key. Any
# other label — one added later included — is kept: it can only split groups, never merge.
REQUEST_ONLY = frozenset(
    {"host", "destination port", "method", "path", "destination.ip", "destination.port",
     "connection.sni", "request.auth.principal", "request.auth.audiences",
     "request.auth.presenter", "request principal"}
)  # fmt: skip


def caller_view(policy_set: PolicySet, caller: Workload) -> CallerView:
    """The request attributes that come from the caller, derived by the evaluator's own
    RequestContext: peer principal, peer namespace, source address (= remote address here)."""
    ctx = RequestContext(
        Request(source_principal=caller.spiffe_id(policy_set.mesh.trust_domain),
                source_ip=caller.address),
        tcp=True,
    )  # fmt: skip
    return ctx.principal, ctx.namespace, ctx.source_ip


def caller_classes(
    policy_set: PolicySet,
    callee: Workload,
    callers: Sequence[Workload],
    probe: Probe,
    views: Mapping[str, CallerView] | None = None,
) -> list[list[Workload]]:
    """Callers the callee's rules cannot tell apart, grouped: one evaluation per group stands
    for all of its members. A caller reaches a decision only through the rules' checks (its
    principal, namespace and address are read nowhere else), so callers for which every check
    of every rule selecting the callee gives the same answer get the same decision for every
    request. Checks that read the request, not the caller, answer alike for all callers of
    one probe and split nothing. This makes a mesh of N workloads cost N x (distinct kinds of
    caller) evaluations per probe instead of N x N.

    One context is built per callee and only its caller attributes (those
    :func:`caller_view` reads) are swapped per caller: building a context per pair was most
    of the cost at a thousand workloads."""
    plan = plan_for(policy_set, callee)
    unique = {
        id(check): check
        for cp in plan.policies
        for rule in (*cp.rules, *cp.tcp_rules)
        for check in _rule_checks(rule)
        if check.label not in REQUEST_ONLY
    }
    checks = tuple(unique.values())
    groups: dict[tuple[Any, ...], list[Workload]] = {}
    if not callers:
        return []
    if not checks:  # no rule looks at anything: every caller alike
        return [list(callers)]
    try:
        ctx = RequestContext(request_for(policy_set, callers[0], callee, probe))
    except PathRejected:  # cannot happen for a probe path; never merge callers on a guess
        return [[c] for c in callers]
    for caller in callers:
        view = views[caller.ref] if views is not None else caller_view(policy_set, caller)
        ctx.principal, ctx.namespace, ctx.source_ip = view
        ctx.remote_ip = view[2]
        key = tuple(check.test(ctx) for check in checks)
        groups.setdefault(key, []).append(caller)
    return list(groups.values())


# --------------------------------------------------------------------------- reachability


def reachability(
    policy_set: PolicySet,
    *,
    now: datetime,
    workloads: Sequence[Workload] | None = None,
    max_workloads: int = MAX_WORKLOADS,
) -> Reachability:
    """Every ordered pair of distinct workloads (``workloads``: default all of the set's)."""
    chosen = tuple(sorted(workloads or policy_set.workloads, key=lambda w: w.ref))
    refs = tuple(w.ref for w in chosen)
    if len(chosen) > max_workloads:
        return Reachability(
            refs,
            {},
            {},
            {},
            skipped=f"{len(chosen)} workloads: reachability is computed for at most "
            f"{max_workloads} (N^2 pairs)",
        )
    edges: dict[tuple[str, str], Edge] = {}
    probes: dict[str, tuple[Probe, ...]] = {}
    conditional: dict[str, tuple[str, ...]] = {}
    cut_total = evaluations = 0
    views = {w.ref: caller_view(policy_set, w) for w in chosen}
    for callee in chosen:
        tried, cut = probes_for(policy_set, callee)
        probes[callee.ref] = tried
        cut_total += cut
        rules = _conditional(policy_set.policies_for(callee))
        if rules:
            conditional[callee.ref] = rules
        callers = [c for c in chosen if c.ref != callee.ref]
        for group in caller_classes(policy_set, callee, callers, tried[0], views):
            allowed: list[Probe] = []
            deciding: set[str] = set()
            for probe in tried:
                decision = evaluate(
                    policy_set, callee, request_for(policy_set, group[0], callee, probe), now=now
                )
                evaluations += 1
                if decision.allowed:
                    allowed.append(probe)
                    deciding.add(
                        f"{decision.policy}#{decision.rule}" if decision.policy is not None else ""
                    )
            if allowed:
                for caller in group:
                    edges[(caller.ref, callee.ref)] = Edge(
                        caller.ref, callee.ref, tuple(allowed), len(tried), tuple(sorted(deciding))
                    )
    return Reachability(refs, edges, probes, conditional, "", cut_total, evaluations)


# --------------------------------------------------------------------------- blast radius


def blast_radius(graph: Mapping[str, Iterable[str]]) -> dict[str, dict[str, Any]]:
    """Per node: ``direct`` (its out-neighbours) and ``transitive`` (every node reachable by
    one or more edges, itself left out: a compromised workload already holds itself).

    Strongly connected components first (every member of one reaches the same nodes), then
    one pass over them callees-first, each component's reach an integer bit set: a dense mesh
    of a thousand workloads costs a million bit operations, not a billion edge visits."""
    nodes = sorted(set(graph) | {t for targets in graph.values() for t in targets})
    index = {n: i for i, n in enumerate(nodes)}
    succ = [sorted({index[t] for t in graph.get(n, ())}) for n in nodes]
    components = _components(succ)  # callees before callers (Tarjan's order)
    component_of = [0] * len(nodes)
    for c, members in enumerate(components):
        for m in members:
            component_of[m] = c
    reach = [0] * len(components)
    for c, members in enumerate(components):
        bits = 0
        for m in members:
            for t in succ[m]:
                tc = component_of[t]
                bits |= 1 << t
                if tc != c:
                    bits |= reach[tc]
        if len(members) > 1:  # a cycle: every member reaches every member
            for m in members:
                bits |= 1 << m
        reach[c] = bits
    out: dict[str, dict[str, Any]] = {}
    for node in graph:
        i = index[node]
        bits = reach[component_of[i]] & ~(1 << i)
        transitive = [nodes[j] for j in range(len(nodes)) if bits >> j & 1]
        direct = [nodes[j] for j in succ[i] if j != i]
        out[node] = {
            "direct": direct,
            "direct_count": len(direct),
            "transitive": transitive,
            "transitive_count": len(transitive),
        }
    return dict(sorted(out.items()))


def _components(succ: Sequence[Sequence[int]]) -> list[list[int]]:
    """Tarjan's strongly connected components, iterative (no recursion limit at scale); each
    component is emitted after every component it reaches."""
    counter = 0
    number: list[int | None] = [None] * len(succ)
    low = [0] * len(succ)
    on_stack = [False] * len(succ)
    stack: list[int] = []
    out: list[list[int]] = []
    for root in range(len(succ)):
        if number[root] is not None:
            continue
        work: list[tuple[int, int]] = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                number[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack[v] = True
            recurse = False
            for j in range(i, len(succ[v])):
                w = succ[v][j]
                nw = number[w]
                if nw is None:
                    work.append((v, j + 1))
                    work.append((w, 0))
                    recurse = True
                    break
                if on_stack[w]:
                    low[v] = min(low[v], nw)
            if recurse:
                continue
            if low[v] == number[v]:
                members = []
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    members.append(w)
                    if w == v:
                        break
                out.append(members)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return out
