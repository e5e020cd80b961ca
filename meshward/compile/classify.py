"""Where each rule is decided: natively by Envoy's RBAC filter, or by the ext_authz service.

Envoy decides everything it can read from the connection and the request headers (the hot path,
no Python), and, with ``jwt_native`` (MeshConfig ``jwtEnforcement: native``, the default),
rules that read the verified end-user JWT (``requestPrincipals``, ``request.auth.*``: RBAC
metadata matchers on jwt_authn's payload). CUSTOM policies, and JWT rules under
``jwtEnforcement: extauthz``, need the ext_authz service. ``meshward policy compile
--explain`` prints this classification rule by rule, with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from meshward.compile.names import rbac_policy_name
from meshward.policy.model import Action, AuthorizationPolicy, Rule
from meshward.policy.ordering import rule_order_key

JWT_KEY_PREFIX = "request.auth."
HEADER_KEY_PREFIX = "request.headers["
# `when` keys only an HTTP request has (a TCP connection cannot satisfy them).
_HTTP_ONLY_KEYS = (JWT_KEY_PREFIX, HEADER_KEY_PREFIX)


class Placement(StrEnum):
    NATIVE = "native"  # Envoy RBAC decides, no Python on the request path
    EXTAUTHZ = "ext_authz"  # the ext_authz service decides
    INERT = "inert"  # compiled to nothing (e.g. an ALLOW rule with HTTP fields on a TCP port)


def rule_extauthz_reason(rule: Rule) -> str | None:
    """Why ``rule`` needs the ext_authz service, or None when Envoy can decide it alone."""
    for i, source in enumerate(rule.sources):
        if source.request_principals:
            return f"from[{i}].source.requestPrincipals reads the verified end-user JWT"
        if source.not_request_principals:
            return f"from[{i}].source.notRequestPrincipals reads the verified end-user JWT"
    for i, condition in enumerate(rule.conditions):
        if condition.key.startswith(JWT_KEY_PREFIX):
            return f"when[{i}] key {condition.key} reads the verified end-user JWT"
    return None


def needs_extauthz(item: Rule | AuthorizationPolicy) -> str | None:
    """Why a rule or a policy needs the ext_authz service; None when Envoy decides it natively.

    A CUSTOM policy always does (its provider is the ext_authz service), unless it has no rules
    (Istio: no rules never match, so the provider is never asked). A policy otherwise needs it
    when any of its rules does.
    """
    if isinstance(item, Rule):
        return rule_extauthz_reason(item)
    if item.action is Action.CUSTOM:
        if not item.rules:
            return None
        return (
            f"CUSTOM action: requests matching its rules are decided by provider {item.provider!r}"
        )
    for index, rule in enumerate(item.rules):
        reason = rule_extauthz_reason(rule)
        if reason is not None:
            return f"rules[{index}]: {reason}"
    return None


def http_only_fields(rule: Rule) -> tuple[str, ...]:
    """The fields of ``rule`` a TCP connection cannot have (hosts, methods, paths, headers, JWT)."""
    found: list[str] = []
    for i, op in enumerate(rule.operations):
        for name in ("hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths"):
            if getattr(op, name):
                found.append(f"to[{i}].operation.{_camel(name)}")
    for i, source in enumerate(rule.sources):
        for name in ("request_principals", "not_request_principals"):
            if getattr(source, name):
                found.append(f"from[{i}].source.{_camel(name)}")
    for i, condition in enumerate(rule.conditions):
        if condition.key.startswith(_HTTP_ONLY_KEYS):
            found.append(f"when[{i}] {condition.key}")
    return tuple(found)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


@dataclass(frozen=True)
class RuleClass:
    """One rule of one policy as compiled for one workload (HTTP ports unless ``tcp``)."""

    policy: AuthorizationPolicy
    index: int
    placement: Placement
    reason: str
    tcp: bool = False

    @property
    def rbac_name(self) -> str:
        return rbac_policy_name(self.policy.namespace, self.policy.name, self.index)

    @property
    def rule(self) -> Rule:
        return self.policy.rules[self.index]

    def to_json(self) -> dict[str, object]:
        return {
            "policy": self.policy.ref,
            "rule": self.index,
            "rbac_policy": self.rbac_name,
            "action": self.policy.action.value,
            "dry_run": self.policy.dry_run,
            "placement": self.placement.value,
            "reason": self.reason,
            "protocol": "TCP" if self.tcp else "HTTP",
        }


def envoy_policy_order(rules: Iterable[RuleClass]) -> list[RuleClass]:
    """``rules`` in the order Envoy's RBAC rules engine tries them: by name, as strings (its
    ``policies`` map is a ``std::map``). When several match, the first of these is the
    ``rbac_access_denied_matched_policy[...]`` / ``enforced_effective_policy_id``."""
    return sorted(rules, key=lambda r: rule_order_key(r.policy.namespace, r.policy.name, r.index))


def classify_rules(
    policies: Iterable[AuthorizationPolicy], *, tcp: bool = False, jwt_native: bool = False
) -> list[RuleClass]:
    """Every rule of ``policies`` (in order) with where it runs and why. ``jwt_native``: rules
    reading the end-user JWT are RBAC metadata matchers on jwt_authn's payload (the mesh's
    default, MeshConfig ``jwtEnforcement: native``), not ext_authz."""
    out: list[RuleClass] = []
    for policy in policies:
        for index, rule in enumerate(policy.rules):
            out.append(_classify(policy, index, rule, tcp=tcp, jwt_native=jwt_native))
    return out


def _classify(
    policy: AuthorizationPolicy, index: int, rule: Rule, *, tcp: bool, jwt_native: bool
) -> RuleClass:
    if tcp:
        return _classify_tcp(policy, index, rule)
    if policy.action is Action.CUSTOM:
        return RuleClass(
            policy, index, Placement.EXTAUTHZ, f"CUSTOM action (provider {policy.provider!r})"
        )
    reason = rule_extauthz_reason(rule)
    if reason is not None and jwt_native:
        jwt_note = reason.replace("reads the verified end-user JWT", "reads jwt_authn's payload")
        reason = None
    else:
        jwt_note = ""
    if reason is not None:
        if policy.action is Action.AUDIT:
            return RuleClass(policy, index, Placement.INERT, f"AUDIT rule not compiled: {reason}")
        if policy.dry_run:
            reason += (
                " (dry-run: ext_authz evaluates it only on requests it sees for other rules; "
                "it never enables ext_authz by itself)"
            )
        return RuleClass(policy, index, Placement.EXTAUTHZ, reason)
    what = {
        Action.ALLOW: "RBAC ALLOW",
        Action.DENY: "RBAC DENY",
        Action.AUDIT: "RBAC LOG",
        Action.CUSTOM: "",
    }[policy.action]
    if policy.dry_run:
        what += " shadow rule (dry-run: evaluated and logged, never enforced)"
    readable = "every field is readable by Envoy"
    if jwt_note:
        readable += f" ({jwt_note}: RBAC metadata matchers)"
    return RuleClass(policy, index, Placement.NATIVE, f"{what}: {readable}")


def _classify_tcp(policy: AuthorizationPolicy, index: int, rule: Rule) -> RuleClass:
    http = http_only_fields(rule)
    if policy.action is Action.ALLOW or policy.action is Action.AUDIT:
        if http:
            return RuleClass(
                policy,
                index,
                Placement.INERT,
                f"{policy.action.value} rule matches no TCP connection: {', '.join(http)} "
                "need HTTP",
                tcp=True,
            )
        return RuleClass(policy, index, Placement.NATIVE, "network RBAC", tcp=True)
    if policy.action is Action.CUSTOM:
        if http:
            return RuleClass(
                policy,
                index,
                Placement.INERT,
                f"CUSTOM rule matches no TCP connection: {', '.join(http)} need HTTP",
                tcp=True,
            )
        return RuleClass(
            policy,
            index,
            Placement.NATIVE,
            "network RBAC DENY (CUSTOM on a TCP port: no provider is consulted for TCP, so a "
            "matching connection is denied, fail closed)",
            tcp=True,
        )
    # DENY: keep the TCP fields and ignore the rest, so the rule denies more (fail closed).
    note = "network RBAC DENY"
    if http:
        note += f"; ignoring HTTP-only {', '.join(http)} (fail closed: denies more)"
    return RuleClass(policy, index, Placement.NATIVE, note, tcp=True)
