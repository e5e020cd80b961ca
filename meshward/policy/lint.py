"""Warnings about policy that loads but probably does not do what its author meant. Nothing
here changes a decision; `meshward policy validate` prints these and `--strict` fails on them."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime

from meshward.policy.canonical import format_time
from meshward.policy.errors import Problem
from meshward.policy.lint_expiry import sole_emergency_allows
from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    Origin,
    Protocol,
    Rule,
    Workload,
)
from meshward.policy.policyset import PolicySet, selects
from meshward.policy.vocabulary import claim_path

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


def lint(policy_set: PolicySet, *, now: datetime) -> list[Problem]:
    when = now  # required: the caller (the CLI) reads the clock
    found: list[Problem] = list(policy_set.warnings)
    root = policy_set.mesh.root_namespace
    for policy in policy_set.authorization_policies:
        selected = _selected(policy_set, policy.namespace, policy.selector, root)
        found.extend(_lint_policy(policy_set, policy, selected, when))
    found.extend(sole_emergency_allows(policy_set))
    found.extend(_principals_no_workload_has(policy_set))
    found.extend(_custom_in_audit(policy_set, root))
    for kind, items in (
        ("PeerAuthentication", policy_set.peer_authentications),
        ("RequestAuthentication", policy_set.request_authentications),
    ):
        for item in items:
            if policy_set.workloads and not _selected(
                policy_set, item.namespace, item.selector, root
            ):
                found.append(
                    _at(item.origin, "spec.selector", f"{kind} selects no declared workload")
                )
    return sorted(set(found))


def _custom_in_audit(policy_set: PolicySet, root: str) -> Iterator[Problem]:
    """Audit mode makes policies dry-run, except CUSTOM (ext_authz has no dry-run): say so
    where it applies, so nobody reads "audit" as "nothing is denied here"."""
    audit = policy_set.mesh.audit_namespaces
    for policy in policy_set.authorization_policies:
        if policy.action is not Action.CUSTOM or not audit:
            continue
        hit = sorted(
            {w.namespace for w in _selected(policy_set, policy.namespace, policy.selector, root)}
            & audit
        )
        if hit:
            yield _at(
                policy.origin,
                "spec.action",
                f"CUSTOM policy stays enforced in audit namespace(s) {', '.join(hit)}: ext_authz "
                "has no dry-run",
            )


def _at(origin: Origin | None, field: str, reason: str) -> Problem:
    return Problem(origin.file if origin else "?", origin.index if origin else 0, field, reason)


def _selected(
    policy_set: PolicySet, namespace: str, selector: Mapping[str, str] | None, root: str
) -> list[Workload]:
    return [
        w
        for w in policy_set.workloads
        if (namespace in (w.namespace, root)) and selects(selector, w.labels)
    ]


def _lint_policy(
    policy_set: PolicySet, policy: AuthorizationPolicy, selected: list[Workload], now: datetime
) -> Iterator[Problem]:
    origin = policy.origin

    def warn(field: str, reason: str) -> Problem:
        return _at(origin, field, reason)

    if policy_set.workloads and not selected:
        where = f"namespace {policy.namespace}"
        if policy.selector:
            labels = ", ".join(f"{k}={v}" for k, v in sorted(policy.selector.items()))
            where += f" with labels {labels}"
        yield warn("spec.selector", f"selects no declared workload (none in {where})")
    if policy.expires_at is not None and policy.expires_at <= now:
        allow = policy.action is Action.ALLOW and not policy.dry_run
        yield warn(
            "metadata.annotations[meshward.dev/expires-at]",
            f"emergency rule expired at {format_time(policy.expires_at)} and no longer "
            + (
                "allows anything (it still keeps the default deny); delete it once a regular "
                "ALLOW covers the workload: deleting a workload's only ALLOW opens the "
                "workload to every caller"
                if allow
                else "applies; delete it"
            ),
        )
    if not policy.rules and policy.action is not Action.ALLOW:
        yield warn("spec.rules", f"a {policy.action.value} policy without rules matches nothing")
    has_jwt = any(policy_set.request_authentications_for(w) for w in selected)
    tcp_only = bool(selected) and all(
        w.ports and all(p.protocol is Protocol.TCP for p in w.ports) for w in selected
    )
    ports = {p.port for w in selected for p in w.ports}
    for i, rule in enumerate(policy.rules):
        yield from _lint_rule(
            policy_set, policy, rule, f"spec.rules[{i}]", warn, has_jwt, tcp_only, ports, selected
        )


def _not_host_advice(action: Action, host: str) -> str:
    """notHosts is an exclusion, and the caller writes the Host header: the risk is the
    opposite of a wildcard in hosts."""
    if action is Action.DENY:
        return (
            f"wildcard {host!r} exempts every Host matching it from this DENY, and callers "
            "choose the Host header: a request escapes the DENY by sending a matching Host; "
            "deny by hosts instead"
        )
    return (
        f"wildcard {host!r} excludes only the Hosts matching it; any other Host (an IP, "
        "another name) still matches: list what to match in hosts instead"
    )


def _lint_rule(
    policy_set: PolicySet,
    policy: AuthorizationPolicy,
    rule: Rule,
    path: str,
    w: Callable[[str, str], Problem],
    has_jwt: bool,
    tcp_only: bool,
    ports: set[int],
    selected: list[Workload],
) -> Iterator[Problem]:
    if policy.action is Action.ALLOW and not (rule.sources or rule.operations or rule.conditions):
        yield w(path, "allows every request from anywhere, including unauthenticated callers")
    uses_jwt = False
    uses_http = False
    trust_domain = policy_set.mesh.trust_domain
    for j, source in enumerate(rule.sources):
        sp = f"{path}.from[{j}].source"
        for field, values, twin in (
            ("principals", source.principals, source.not_principals),
            ("requestPrincipals", source.request_principals, source.not_request_principals),
            ("namespaces", source.namespaces, source.not_namespaces),
        ):
            if values and "*" in twin:
                yield w(sp, f"{field} with not{field[0].upper()}{field[1:]} '*' never matches")
            for value in set(values) & set(twin):
                yield w(sp, f"{value!r} is in both {field} and its not-twin: never matches")
        for k, principal in enumerate((*source.principals, *source.not_principals)):
            field = "principals" if k < len(source.principals) else "notPrincipals"
            if "*" in principal:
                continue
            if "/ns/" not in principal:
                yield w(
                    f"{sp}.{field}",
                    f"{principal!r} is not a SPIFFE identity (TRUST_DOMAIN/ns/NS/sa/SA) and "
                    "never matches a mesh workload",
                )
            elif not principal.startswith(trust_domain + "/"):
                yield w(
                    f"{sp}.{field}",
                    f"{principal!r} names trust domain {principal.split('/')[0]!r}, but the "
                    f"mesh's is {trust_domain!r}: it matches no mesh workload",
                )
        if source.request_principals or source.not_request_principals:
            uses_jwt = uses_http = True
    for j, op in enumerate(rule.operations):
        opath = f"{path}.to[{j}].operation"
        if op.hosts or op.not_hosts or op.methods or op.not_methods or op.paths or op.not_paths:
            uses_http = True
        for method in (*op.methods, *op.not_methods):
            if "*" in method:
                yield w(f"{opath}.methods", f"wildcard method {method!r}: list methods explicitly")
            elif method not in HTTP_METHODS:
                yield w(
                    f"{opath}.methods",
                    f"{method!r} is not a standard HTTP method (methods are case-sensitive)",
                )
        for host in op.hosts:
            if "*" in host and host != "*":
                yield w(f"{opath}.hosts", f"wildcard host {host!r} matches hosts you may not own")
        for host in op.not_hosts:
            if "*" in host and host != "*":
                yield w(f"{opath}.notHosts", _not_host_advice(policy.action, host))
        if ports and all(p not in ports for p in op.ports) and op.ports:
            yield w(
                f"{opath}.ports",
                f"none of {sorted(op.ports)} is a port of the selected workloads "
                f"({sorted(ports)}): never matches",
            )
        if policy.action is Action.DENY:
            covered = set(op.paths)
            for p in op.paths:
                if "*" in p or "{" in p or p == "/":
                    continue
                if p.rstrip("/") + "/*" not in covered and p + "*" not in covered:
                    yield w(
                        f"{opath}.paths",
                        f"DENY on exact path {p!r} misses {p.rstrip('/') + '/x'!r}; add "
                        f"{p.rstrip('/') + '/*'!r} (or {p + '*'!r}, which also covers {p + ';x'!r})",
                    )
    for k, cond in enumerate(rule.conditions):
        if cond.key.startswith("request."):
            uses_http = True
        if cond.key.startswith("request.auth.") or claim_path(cond.key) is not None:
            uses_jwt = True
        for value in set(cond.values) & set(cond.not_values):
            yield w(
                f"{path}.when[{k}]", f"{value!r} is in both values and notValues: never matches"
            )
    if uses_jwt and selected and not has_jwt:
        yield w(
            path,
            "reads end-user JWT attributes but no RequestAuthentication applies to the selected "
            "workloads, so there is never a verified token"
            + (": never matches" if policy.action is not Action.DENY else ""),
        )
    if uses_http and tcp_only:
        effect = (
            "its HTTP fields are ignored (it denies more)"
            if policy.action is Action.DENY
            else "it never matches"
        )
        yield w(path, f"uses HTTP attributes but every selected workload port is TCP: {effect}")


def _principals_no_workload_has(policy_set: PolicySet) -> Iterator[Problem]:
    """A principal ``TD/ns/NS/sa/SA`` of this mesh whose service account no declared workload
    runs as: a typo (``sa/fronted``) or a workload not declared yet. In ``principals`` it
    allows or denies nobody; in ``notPrincipals`` it excludes nobody. Only when workloads are
    declared (a policy-only directory has nothing to compare with)."""
    if not policy_set.workloads:
        return
    td = policy_set.mesh.trust_domain
    known = sorted({w.principal(td) for w in policy_set.workloads})
    # suggestions compare ns/NS/sa/SA: the shared trust domain makes any two principals alike
    tails = {p.split("/", 1)[1]: p for p in known}
    for policy in policy_set.authorization_policies:
        for i, rule in enumerate(policy.rules):
            for j, source in enumerate(rule.sources):
                for field, values, effect in (
                    ("principals", source.principals, "it matches no mesh workload"),
                    ("notPrincipals", source.not_principals, "it excludes no mesh workload"),
                ):
                    for principal in values:
                        parts = principal.split("/")
                        if (
                            "*" in principal
                            or len(parts) != 5
                            or parts[0] != td
                            or (parts[1], parts[3]) != ("ns", "sa")
                            or principal in known
                        ):
                            continue
                        close = difflib.get_close_matches(
                            principal.split("/", 1)[1], list(tails), n=1, cutoff=0.8
                        )
                        hint = f" (did you mean {tails[close[0]]!r}?)" if close else ""
                        yield _at(
                            policy.origin,
                            f"spec.rules[{i}].from[{j}].source.{field}",
                            f"{principal!r}: no declared workload runs as service account "
                            f"{parts[4]!r} in namespace {parts[2]!r}, so {effect}{hint}",
                        )
