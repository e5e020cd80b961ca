"""Istio's authorization semantics as a pure function: CUSTOM -> DENY -> ALLOW per workload.

Rules are compiled once per (policy set, workload) into predicate tuples, so a request costs a
handful of comparisons. The same compiled checks carry field paths and patterns, which is what
`explain` uses to say *why* a rule did not match.

When several rules of one action match, the one reported as deciding is the first in Envoy's
order (meshward.policy.ordering: string order of the RBAC names), so ``meshward policy explain``,
the ext_authz service and Envoy's ``rbac_access_denied_matched_policy[...]`` name the same rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from meshward.policy.matching import (
    SPIFFE_PREFIX,
    IpAddress,
    StrPredicate,
    claim_values,
    header_elements,
    namespace_of,
    networks_predicate,
    parse_ip,
    paths_predicate,
    strings_predicate,
)
from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    Condition,
    Decision,
    DryRunResult,
    MtlsMode,
    Operation,
    Protocol,
    Request,
    Rule,
    Source,
    Workload,
)
from meshward.policy.ordering import rule_order_key
from meshward.policy.paths import (
    PathRejected,
    check_request_target,
    normalize_path,
)
from meshward.policy.policyset import PolicySet
from meshward.policy.request_principal import RequestPrincipal, request_principals_predicate
from meshward.policy.vocabulary import (
    IP_KEYS,
    OPERATION_FORMS,
    SOURCE_FORMS,
    FieldForm,
    claim_path,
    header_name,
)

# How a Decision for a request the sidecar answers with 400 (bad path or Host) starts.
REJECTED_BEFORE_AUTHORIZATION = "rejected before authorization (HTTP 400)"

CustomProvider = Callable[[AuthorizationPolicy, Request], tuple[bool, str]]


class RequestContext:
    """The request attributes rules read, derived once per request."""

    __slots__ = (
        "claims",
        "destination_ip",
        "headers",
        "host",
        "method",
        "namespace",
        "path",
        "port",
        "principal",
        "remote_ip",
        "request",
        "request_principal",
        "sni",
        "source_ip",
        "tcp",
    )

    def __init__(self, request: Request, *, tcp: bool = False) -> None:
        self.request = request
        self.tcp = tcp
        self.path: str | None = None if tcp else normalize_path(request.path)
        host = request.host
        if not tcp:
            host = check_request_target(host, self.path or "")  # raises PathRejected
        self.method = request.method
        self.host = host
        self.port = request.destination_port
        peer = request.source_principal
        if not peer:
            self.principal: str | None = None
        elif peer.startswith(SPIFFE_PREFIX):
            self.principal = peer[len(SPIFFE_PREFIX) :]
        else:
            # Istio matches "spiffe://" + pattern, so a non-SPIFFE peer matches only "*".
            self.principal = "\0" + peer
        self.namespace = namespace_of(self.principal)
        claims = request.claims
        self.claims = claims
        self.request_principal: RequestPrincipal | None = None
        if claims is not None:
            iss, sub = claims.get("iss"), claims.get("sub")
            if isinstance(iss, str) and isinstance(sub, str):
                self.request_principal = RequestPrincipal(iss, sub)
        self.source_ip: IpAddress | None = parse_ip(request.source_ip)
        self.remote_ip: IpAddress | None = parse_ip(request.remote_ip) or self.source_ip
        self.destination_ip: IpAddress | None = parse_ip(request.destination_ip)
        headers = request.headers
        if any(k != k.lower() for k in headers):
            headers = {k.lower(): v for k, v in headers.items()}
        self.headers = headers
        self.sni = request.sni


@dataclass(frozen=True)
class Check:
    """One field of a rule: ``path`` names it as written (``from[0].source.notPrincipals``)."""

    path: str
    label: str  # the request attribute, for explanations ("peer principal")
    patterns: tuple[str, ...]
    negate: bool
    http_only: bool
    extract: Callable[[RequestContext], Any]
    predicate: Callable[[Any], bool]

    def test(self, ctx: RequestContext) -> bool:
        return self.predicate(self.extract(ctx)) != self.negate

    def describe(self, ctx: RequestContext) -> str:
        actual = self.extract(ctx)
        if isinstance(actual, str) and actual.startswith("\0"):
            actual = actual[1:]
        if isinstance(actual, tuple):
            actual = actual[0] if len(actual) == 1 else list(actual) or None
        elif actual is not None and not isinstance(actual, str | int):
            actual = str(actual)  # IP addresses
        shown = "none" if actual is None else repr(actual)
        verb = "matches" if self.negate else "does not match"
        return f"{self.path}: {self.label} {shown} {verb} {list(self.patterns)}"


@dataclass(frozen=True)
class CompiledRule:
    index: int
    sources: tuple[tuple[Check, ...], ...]  # OR of ANDs; () = any source
    operations: tuple[tuple[Check, ...], ...]
    conditions: tuple[Check, ...]
    http_only: bool

    def matches(self, ctx: RequestContext) -> bool:
        if self.sources and not any(all(c.test(ctx) for c in alt) for alt in self.sources):
            return False
        if self.operations and not any(all(c.test(ctx) for c in alt) for alt in self.operations):
            return False
        return all(c.test(ctx) for c in self.conditions)

    def without_http(self) -> CompiledRule:
        """Istio on a TCP port: a DENY rule's HTTP-only fields are ignored (it denies more)."""

        def strip(alts: tuple[tuple[Check, ...], ...]) -> tuple[tuple[Check, ...], ...]:
            return tuple(tuple(c for c in alt if not c.http_only) for alt in alts)

        return replace(
            self,
            sources=strip(self.sources),
            operations=strip(self.operations),
            conditions=tuple(c for c in self.conditions if not c.http_only),
            http_only=False,
        )

    def mismatch(self, ctx: RequestContext) -> str | None:
        """Why the rule does not match, or None when it does."""
        for name, alts in (("from", self.sources), ("to", self.operations)):
            if not alts:
                continue
            failures = [next((c for c in alt if not c.test(ctx)), None) for alt in alts]
            if all(f is not None for f in failures):
                reasons = [f.describe(ctx) for f in failures if f is not None]
                if len(reasons) == 1:
                    return reasons[0]
                return f"no `{name}` entry matched: " + "; ".join(reasons)
        for check in self.conditions:
            if not check.test(ctx):
                return check.describe(ctx)
        return None


@dataclass(frozen=True)
class CompiledPolicy:
    policy: AuthorizationPolicy
    rules: tuple[CompiledRule, ...]  # by rule index (what explain lists)
    tcp_rules: tuple[CompiledRule, ...]  # the rules as they apply on a TCP port
    # The same rules in Envoy's order (meshward.policy.ordering): ``rule[10]`` before ``rule[2]``.
    ordered: tuple[CompiledRule, ...]
    tcp_ordered: tuple[CompiledRule, ...]

    def rules_for(self, ctx: RequestContext) -> tuple[CompiledRule, ...]:
        return self.tcp_rules if ctx.tcp else self.rules

    def first_match(self, ctx: RequestContext) -> int | None:
        """The matching rule Envoy would name (the first in its order), or None."""
        for rule in self.tcp_ordered if ctx.tcp else self.ordered:
            if rule.matches(ctx):
                return rule.index
        return None

    def key(self, rule: CompiledRule) -> bytes:
        return rule_order_key(self.policy.namespace, self.policy.name, rule.index)


# --------------------------------------------------------------------------- compiling


def _pred(patterns: Sequence[str], *, ignore_case: bool = False) -> StrPredicate:
    return strings_predicate(patterns, ignore_case=ignore_case)


# The request attribute each field pair reads: (label, extractor, predicate factory). Which
# pairs exist, their YAML spelling and which only HTTP has: the vocabulary's.
FieldSpec = tuple[str, Callable[[RequestContext], Any], Callable[[Any], Callable[[Any], bool]]]


def _checks(
    prefix: str, item: Source | Operation, forms: Sequence[FieldForm], spec: Mapping[str, FieldSpec]
) -> tuple[Check, ...]:
    out: list[Check] = []
    for form in forms:
        values = getattr(item, form.attr)
        if not values:
            continue
        label, extract, make = spec[form.pair.name]
        out.append(
            Check(
                path=prefix + form.key,
                label=label,
                patterns=tuple(str(v) for v in values),
                negate=form.negate,
                http_only=form.pair.http_only,
                extract=extract,
                predicate=make(values),
            )
        )
    return tuple(out)


def _strs(ignore_case: bool = False) -> Callable[[Any], Callable[[Any], bool]]:
    return lambda values: _pred(values, ignore_case=ignore_case)


def _nets(values: Any) -> Callable[[Any], bool]:
    return networks_predicate(values)


def _ints(values: Any) -> Callable[[Any], bool]:
    allowed = frozenset(int(v) for v in values)
    return lambda v: v in allowed


def _paths(values: Any) -> Callable[[Any], bool]:
    return paths_predicate(values)


_SOURCE_SPEC: Mapping[str, FieldSpec] = {
    "principals": ("peer principal", lambda c: c.principal, _strs()),
    "request_principals": (
        "request principal",
        lambda c: c.request_principal,
        request_principals_predicate,
    ),
    "namespaces": ("peer namespace", lambda c: c.namespace, _strs()),
    "ip_blocks": ("source ip", lambda c: c.source_ip, _nets),
    "remote_ip_blocks": ("remote ip", lambda c: c.remote_ip, _nets),
}
_OPERATION_SPEC: Mapping[str, FieldSpec] = {
    "hosts": ("host", lambda c: c.host or None, _strs(ignore_case=True)),
    "ports": ("destination port", lambda c: c.port, _ints),
    "methods": ("method", lambda c: c.method or None, _strs()),
    "paths": ("path", lambda c: c.path, _paths),
}


def compile_source(source: Source, prefix: str) -> tuple[Check, ...]:
    return _checks(prefix, source, SOURCE_FORMS, _SOURCE_SPEC)


def compile_operation(operation: Operation, prefix: str) -> tuple[Check, ...]:
    return _checks(prefix, operation, OPERATION_FORMS, _OPERATION_SPEC)


def _condition_target(
    key: str,
) -> tuple[str, Callable[[RequestContext], Any], Callable[[Any], Callable[[Any], bool]], bool]:
    """(label, extractor, predicate factory, http_only) for a `when` key."""
    if key in IP_KEYS:
        attr = {
            "source.ip": "source_ip",
            "remote.ip": "remote_ip",
            "destination.ip": "destination_ip",
        }[key]
        return (key, lambda c: getattr(c, attr), _nets, False)
    if key == "destination.port":
        return (key, lambda c: c.port, _ints, False)
    if key == "source.namespace":
        return (key, lambda c: c.namespace, _strs(), False)
    if key == "source.principal":
        return (key, lambda c: c.principal, _strs(), False)
    if key == "connection.sni":
        return (key, lambda c: c.sni, _strs(), False)
    if key == "request.auth.principal":
        return (key, lambda c: c.request_principal, request_principals_predicate, True)
    if key == "request.auth.audiences":
        return (key, lambda c: claim_values(c.claims, ("aud",)), _any_of_strs, True)
    if key == "request.auth.presenter":
        return (key, lambda c: claim_values(c.claims, ("azp",)), _any_of_strs, True)
    header = header_name(key)
    if header is not None:
        lower = header.lower()
        return (key, lambda c: c.headers.get(lower), _header_values, True)
    path = claim_path(key)
    if path is not None:
        return (key, lambda c: claim_values(c.claims, path), _any_of_strs, True)
    raise ValueError(f"unknown condition key {key!r}")  # the loader rejects these


def _any_of_strs(values: Any) -> Callable[[Any], bool]:
    pred = _pred(values)
    return lambda items: any(pred(v) for v in items)


def _header_values(values: Any) -> Callable[[Any], bool]:
    present = "*" in values  # Istio: presence match, even for an empty value
    pred = _pred([v for v in values if v != "*"]) if len(values) > int(present) else None

    def test(value: str | None) -> bool:
        if value is None:
            return False
        if present:
            return True
        return pred is not None and any(pred(e) for e in header_elements(value))

    return test


def compile_conditions(conditions: Sequence[Condition]) -> tuple[Check, ...]:
    out: list[Check] = []
    for k, cond in enumerate(conditions):
        label, extract, make, http_only = _condition_target(cond.key)
        for name, values, negate in (
            ("values", cond.values, False),
            ("notValues", cond.not_values, True),
        ):
            if values:
                out.append(
                    Check(
                        path=f"when[{k}].{name}",
                        label=label,
                        patterns=values,
                        negate=negate,
                        http_only=http_only,
                        extract=extract,
                        predicate=make(values),
                    )
                )
    return tuple(out)


def compile_rule(rule: Rule, index: int) -> CompiledRule:
    sources = tuple(compile_source(s, f"from[{j}].source.") for j, s in enumerate(rule.sources))
    operations = tuple(
        compile_operation(o, f"to[{j}].operation.") for j, o in enumerate(rule.operations)
    )
    conditions = compile_conditions(rule.conditions)
    http_only = any(c.http_only for alt in (*sources, *operations) for c in alt) or any(
        c.http_only for c in conditions
    )
    return CompiledRule(index, sources, operations, conditions, http_only)


def compile_policy(policy: AuthorizationPolicy) -> CompiledPolicy:
    rules = tuple(compile_rule(r, i) for i, r in enumerate(policy.rules))
    if policy.action is Action.DENY:
        tcp_rules = tuple(r.without_http() for r in rules)
    else:
        # ALLOW / AUDIT / CUSTOM on TCP: a rule needing HTTP attributes never matches.
        tcp_rules = tuple(r for r in rules if not r.http_only)

    def envoy_order(items: tuple[CompiledRule, ...]) -> tuple[CompiledRule, ...]:
        return tuple(sorted(items, key=lambda r: rule_order_key(ns, name, r.index)))

    ns, name = policy.namespace, policy.name
    return CompiledPolicy(policy, rules, tcp_rules, envoy_order(rules), envoy_order(tcp_rules))


# One rule of an enforced policy, for trying every rule of an action in Envoy's order.
Entry = tuple[CompiledPolicy, CompiledRule]


@dataclass(frozen=True)
class WorkloadPolicies:
    """A workload's compiled policies, split by how they take part in a decision."""

    workload: Workload
    policies: tuple[CompiledPolicy, ...]  # every selecting policy, in policies_for order
    tcp_ports: frozenset[int]
    expiring: bool
    # Every rule of the enforced (not dry-run) policies of an action, across policies, in
    # Envoy's order: the first match is the deciding rule. HTTP and TCP variants.
    entries: dict[tuple[Action, bool], tuple[Entry, ...]]

    def active(self, now: datetime) -> tuple[CompiledPolicy, ...]:
        if not self.expiring:
            return self.policies
        return tuple(
            p for p in self.policies if p.policy.expires_at is None or p.policy.expires_at > now
        )

    def first_match(
        self, action: Action, ctx: RequestContext, now: datetime
    ) -> tuple[CompiledPolicy, int] | None:
        """The enforced rule of ``action`` Envoy would name for ``ctx``, or None."""
        entries = self.entries.get((action, ctx.tcp), ())
        if not self.expiring:
            for cp, rule in entries:
                if rule.matches(ctx):
                    return cp, rule.index
            return None
        for cp, rule in entries:
            expires = cp.policy.expires_at
            if expires is not None and expires <= now:
                continue
            if rule.matches(ctx):
                return cp, rule.index
        return None


def _entries(policies: Sequence[CompiledPolicy]) -> dict[tuple[Action, bool], tuple[Entry, ...]]:
    out: dict[tuple[Action, bool], list[tuple[bytes, Entry]]] = {}
    for cp in policies:
        if cp.policy.dry_run:
            continue
        for tcp, rules in ((False, cp.rules), (True, cp.tcp_rules)):
            bucket = out.setdefault((cp.policy.action, tcp), [])
            bucket.extend((cp.key(rule), (cp, rule)) for rule in rules)
    return {
        k: tuple(entry for _, entry in sorted(v, key=lambda item: item[0])) for k, v in out.items()
    }


def plan_for(policy_set: PolicySet, workload: Workload) -> WorkloadPolicies:
    plans = policy_set.plans
    cached = plans.get(("plan", workload))
    if cached is not None:
        plan: WorkloadPolicies = cached
        return plan
    compiled: list[CompiledPolicy] = []
    for policy in policy_set.policies_for(workload):
        key = ("policy", policy.namespace, policy.name, policy.dry_run)  # audit mode: both forms
        cp = plans.get(key)
        if cp is None:
            cp = compile_policy(policy)
            plans[key] = cp
        compiled.append(cp)
    plan = WorkloadPolicies(
        workload=workload,
        policies=tuple(compiled),
        tcp_ports=frozenset(p.port for p in workload.ports if p.protocol is Protocol.TCP),
        expiring=any(p.policy.expires_at is not None for p in compiled),
        entries=_entries(compiled),
    )
    plans[("plan", workload)] = plan
    return plan


def context_for(plan: WorkloadPolicies, request: Request) -> RequestContext:
    """Raises PathRejected (HostRejected for the Host) when Envoy would answer 400 before
    authorization."""
    return RequestContext(request, tcp=request.destination_port in plan.tcp_ports)


# --------------------------------------------------------------------------- evaluating


def plaintext_refusal(policy_set: PolicySet, workload: Workload, request: Request) -> str | None:
    """Why a plaintext request never reaches authorization (STRICT mTLS on its port), or None.
    Depends only on the peer's presence and the port, not on any rule: ext_authz checks it
    before its decision cache, whose keys hold only what rules read."""
    if request.source_principal:
        return None
    port = request.destination_port
    if policy_set.mtls_mode(workload, port) is not MtlsMode.STRICT:
        return None
    return f"plaintext connection refused: PeerAuthentication makes mTLS STRICT on {workload.ref} port {port}"


def evaluate(
    policy_set: PolicySet,
    workload: Workload,
    request: Request,
    *,
    now: datetime,
    custom: CustomProvider | None = None,
) -> Decision:
    """Decide one request to `workload` at `now` (required: the caller reads the clock, so an
    expired emergency rule never applies by accident and evaluation stays pure). `custom`
    answers CUSTOM (ext_authz provider) policies; without it a matching CUSTOM policy denies
    (fail closed)."""
    when = now
    plan = plan_for(policy_set, workload)
    refusal = plaintext_refusal(policy_set, workload, request)
    if refusal is not None:
        return Decision(allowed=False, reason=refusal)
    try:
        ctx = context_for(plan, request)
    except PathRejected as exc:
        return Decision(allowed=False, reason=f"{REJECTED_BEFORE_AUTHORIZATION}: {exc}")
    active = plan.active(when)
    enforced = [p for p in active if not p.policy.dry_run]
    decision = _enforce(plan, enforced, ctx, when, workload, request, custom)
    audits = tuple(
        p.policy.ref
        for p in enforced
        if p.policy.action is Action.AUDIT and p.first_match(ctx) is not None
    )
    dry = tuple(_dry_run(p, enforced, ctx) for p in active if p.policy.dry_run)
    if audits or dry:
        decision = replace(decision, audit=bool(audits), audit_policies=audits, dry_run=dry)
    return decision


def _custom_matches(
    plan: WorkloadPolicies, ctx: RequestContext, now: datetime
) -> list[tuple[CompiledPolicy, int]]:
    """Each matching CUSTOM policy once, with its first matching rule, in Envoy's order."""
    seen: set[int] = set()
    out: list[tuple[CompiledPolicy, int]] = []
    for cp, rule in plan.entries.get((Action.CUSTOM, ctx.tcp), ()):
        if id(cp) in seen:
            continue
        expires = cp.policy.expires_at
        if expires is not None and expires <= now:
            continue
        if rule.matches(ctx):
            seen.add(id(cp))
            out.append((cp, rule.index))
    return out


def _enforce(
    plan: WorkloadPolicies,
    enforced: Sequence[CompiledPolicy],
    ctx: RequestContext,
    now: datetime,
    workload: Workload,
    request: Request,
    custom: CustomProvider | None,
) -> Decision:
    """CUSTOM -> DENY -> ALLOW; within an action the first matching rule in Envoy's order."""
    custom_note = ""
    for cp, index in _custom_matches(plan, ctx, now):
        ref = cp.policy.ref
        if custom is None:
            return Decision(
                allowed=False,
                reason=f"CUSTOM policy {ref} rule {index} matched and no provider "
                f"{cp.policy.provider!r} answered (fail closed)",
                policy=ref,
                rule=index,
                action=Action.CUSTOM,
            )
        ok, why = custom(cp.policy, request)
        if not ok:
            return Decision(
                allowed=False,
                reason=f"denied by CUSTOM policy {ref} rule {index} (provider "
                f"{cp.policy.provider!r}: {why})",
                policy=ref,
                rule=index,
                action=Action.CUSTOM,
            )
        custom_note = f"; CUSTOM policy {ref} allowed it ({why})"
    denied = plan.first_match(Action.DENY, ctx, now)
    if denied is not None:
        cp, index = denied
        return Decision(
            allowed=False,
            reason=f"denied by DENY policy {cp.policy.ref} rule {index}",
            policy=cp.policy.ref,
            rule=index,
            action=Action.DENY,
        )
    allowed = plan.first_match(Action.ALLOW, ctx, now)
    if allowed is not None:
        cp, index = allowed
        return Decision(
            allowed=True,
            reason=f"allowed by ALLOW policy {cp.policy.ref} rule {index}{custom_note}",
            policy=cp.policy.ref,
            rule=index,
            action=Action.ALLOW,
        )
    # Every enforced ALLOW selecting the workload counts, expired ones too: an expired
    # emergency ALLOW matches nothing but keeps the default deny (expiry never widens).
    allows = [
        cp for cp in plan.policies if cp.policy.action is Action.ALLOW and not cp.policy.dry_run
    ]
    if allows:
        names = ", ".join(
            cp.policy.ref + (" (expired)" if _expired(cp, now) else "") for cp in allows
        )
        return Decision(
            allowed=False,
            reason=f"no ALLOW policy matched (ALLOW policies selecting {workload.ref}: {names})",
        )
    return Decision(
        allowed=True,
        reason=f"no ALLOW policy selects {workload.ref}, so requests are allowed{custom_note}",
    )


def _expired(cp: CompiledPolicy, now: datetime) -> bool:
    expires = cp.policy.expires_at
    return expires is not None and expires <= now


def _dry_run(
    cp: CompiledPolicy, enforced: Sequence[CompiledPolicy], ctx: RequestContext
) -> DryRunResult:
    index = cp.first_match(ctx)
    action = cp.policy.action
    if action is Action.DENY:
        would_deny = index is not None
    elif action is Action.ALLOW:
        would_deny = index is None and not any(
            p.policy.action is Action.ALLOW and p.first_match(ctx) is not None for p in enforced
        )
    else:
        would_deny = False
    return DryRunResult(
        policy=cp.policy.ref,
        action=action,
        matched=index is not None,
        rule=index,
        would_deny=would_deny,
    )
