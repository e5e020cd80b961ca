"""The plan step: where each rule of a workload runs, and why (Istio's builder splits policies
by action before generating anything; this also decides the filter each rule needs).

Envoy decides everything it can read from the connection and the request headers (the hot path,
no Python), and, with ``jwt_native`` (MeshConfig ``jwtEnforcement: native``, the default),
rules that read the verified end-user JWT (``requestPrincipals``, ``request.auth.*``: RBAC
metadata matchers on jwt_authn's payload). CUSTOM policies, and JWT rules under
``jwtEnforcement: extauthz``, need the ext_authz service. ``meshward policy compile
--explain`` prints this placement rule by rule, with the reason.

:func:`place` gives an :class:`AuthzPlacement` (every :class:`PlacedRule` of a workload, HTTP
and TCP, plus what the chain needs: ext_authz, token routes, jwt_authn); the builders
(meshward.compile.authz.builder) read nothing else about the policies' actions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from meshward.compile import names
from meshward.compile.names import rbac_policy_name
from meshward.policy.model import Action, AuthorizationPolicy, RequestAuthentication, Rule
from meshward.policy.ordering import rule_order_key
from meshward.policy.vocabulary import OPERATION_FORMS, SOURCE_FIELDS, SOURCE_FORMS

JWT_KEY_PREFIX = "request.auth."
HEADER_KEY_PREFIX = "request.headers["
# `when` keys only an HTTP request has (a TCP connection cannot satisfy them).
_HTTP_ONLY_KEYS = (JWT_KEY_PREFIX, HEADER_KEY_PREFIX)
# Source/Operation fields only an HTTP request has, and the one that reads the verified JWT.
_HTTP_OPERATION = tuple(f for f in OPERATION_FORMS if f.pair.http_only)
_HTTP_SOURCE = tuple(f for f in SOURCE_FORMS if f.pair.http_only)
_JWT_FORMS = tuple(f for f in SOURCE_FORMS if f.pair is SOURCE_FIELDS["request_principals"])


class Placement(StrEnum):
    NATIVE = "native"  # Envoy RBAC decides, no Python on the request path
    EXTAUTHZ = "ext_authz"  # the ext_authz service decides
    INERT = "inert"  # compiled to nothing (e.g. an ALLOW rule with HTTP fields on a TCP port)


def rule_extauthz_reason(rule: Rule) -> str | None:
    """Why ``rule`` needs the ext_authz service, or None when Envoy can decide it alone."""
    for i, source in enumerate(rule.sources):
        for f in _JWT_FORMS:
            if getattr(source, f.attr):
                return f"from[{i}].source.{f.key} reads the verified end-user JWT"
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
        found += (f"to[{i}].operation.{f.key}" for f in _HTTP_OPERATION if getattr(op, f.attr))
    for i, source in enumerate(rule.sources):
        found += (f"from[{i}].source.{f.key}" for f in _HTTP_SOURCE if getattr(source, f.attr))
    for i, condition in enumerate(rule.conditions):
        if condition.key.startswith(_HTTP_ONLY_KEYS):
            found.append(f"when[{i}] {condition.key}")
    return tuple(found)


@dataclass(frozen=True)
class PlacedRule:
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


def envoy_policy_order(rules: Iterable[PlacedRule]) -> list[PlacedRule]:
    """``rules`` in the order Envoy's RBAC rules engine tries them: by name, as strings (its
    ``policies`` map is a ``std::map``). When several match, the first of these is the
    ``rbac_access_denied_matched_policy[...]`` / ``enforced_effective_policy_id``."""
    return sorted(rules, key=lambda r: rule_order_key(r.policy.namespace, r.policy.name, r.index))


def place_rules(
    policies: Iterable[AuthorizationPolicy], *, tcp: bool = False, jwt_native: bool = False
) -> list[PlacedRule]:
    """Every rule of ``policies`` (in order) with where it runs and why. ``jwt_native``: rules
    reading the end-user JWT are RBAC metadata matchers on jwt_authn's payload (the mesh's
    default, MeshConfig ``jwtEnforcement: native``), not ext_authz."""
    out: list[PlacedRule] = []
    for policy in policies:
        for index, rule in enumerate(policy.rules):
            out.append(_place(policy, index, rule, tcp=tcp, jwt_native=jwt_native))
    return out


def _place(
    policy: AuthorizationPolicy, index: int, rule: Rule, *, tcp: bool, jwt_native: bool
) -> PlacedRule:
    if tcp:
        return _place_tcp(policy, index, rule)
    if policy.action is Action.CUSTOM:
        return PlacedRule(
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
            return PlacedRule(policy, index, Placement.INERT, f"AUDIT rule not compiled: {reason}")
        if policy.dry_run:
            reason += (
                " (dry-run: ext_authz evaluates it only on requests it sees for other rules; "
                "it never enables ext_authz by itself)"
            )
        return PlacedRule(policy, index, Placement.EXTAUTHZ, reason)
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
    return PlacedRule(policy, index, Placement.NATIVE, f"{what}: {readable}")


def _place_tcp(policy: AuthorizationPolicy, index: int, rule: Rule) -> PlacedRule:
    http = http_only_fields(rule)
    if policy.action is Action.ALLOW or policy.action is Action.AUDIT:
        if http:
            return PlacedRule(
                policy,
                index,
                Placement.INERT,
                f"{policy.action.value} rule matches no TCP connection: {', '.join(http)} "
                "need HTTP",
                tcp=True,
            )
        return PlacedRule(policy, index, Placement.NATIVE, "network RBAC", tcp=True)
    if policy.action is Action.CUSTOM:
        if http:
            return PlacedRule(
                policy,
                index,
                Placement.INERT,
                f"CUSTOM rule matches no TCP connection: {', '.join(http)} need HTTP",
                tcp=True,
            )
        return PlacedRule(
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
    return PlacedRule(policy, index, Placement.NATIVE, note, tcp=True)


@dataclass(frozen=True, order=True)
class TokenSource:
    """Where a RequestAuthentication looks for an end-user token (as meshward.extauthz does):
    a request header, or a query parameter."""

    header: str = ""  # lowercase header name
    param: str = ""  # query parameter name

    def __str__(self) -> str:
        return f"header {self.header}" if self.header else f"query parameter {self.param}"


def token_sources(
    request_authentications: Iterable[RequestAuthentication],
) -> tuple[TokenSource, ...]:
    """Every place a token may be for a workload: each JWT rule's ``fromHeaders`` and
    ``fromParams``, or Istio's defaults (``Authorization``, ``?access_token=``) when it names
    neither. A RequestAuthentication without JWT rules verifies nothing."""
    found: set[TokenSource] = set()
    for ra in request_authentications:
        for rule in ra.jwt_rules:
            if not rule.from_headers and not rule.from_params:
                found.add(TokenSource(header="authorization"))
                found.add(TokenSource(param="access_token"))
            found.update(TokenSource(header=h.name.lower()) for h in rule.from_headers)
            found.update(TokenSource(param=p) for p in rule.from_params)
    return tuple(sorted(found))


@dataclass(frozen=True)
class AuthzPlacement:
    """The plan for one workload: where each of its rules runs on its HTTP ports (``rules``) and
    its TCP ports (``tcp_rules``), and which filters its HTTP chains need (ext_authz, jwt_authn,
    token routes). The builders read the policies only through this."""

    rules: tuple[PlacedRule, ...]
    tcp_rules: tuple[PlacedRule, ...]
    has_allow: bool  # an enforced ALLOW policy selects the workload (default deny applies)
    # A dry-run ALLOW policy selects the workload: its shadow engine must exist even when no
    # rule of it compiles (no rules, or none a TCP connection can match), as in Istio, where
    # shadow ALLOW rules with no policies mean "shadow deny everything".
    has_dry_run_allow: bool = False
    extauthz_reasons: tuple[str, ...] = field(default=())
    # Where end-user tokens may be (a RequestAuthentication selects the workload): requests
    # that may carry one go to ext_authz, which rejects an invalid token with 401.
    token_sources: tuple[TokenSource, ...] = field(default=())
    # jwtEnforcement native (the default): RequestAuthentications compile to a jwt_authn filter
    # (meshward.compile.authz.jwt_authn) and JWT rules to RBAC metadata matchers.
    jwt_native: bool = False
    request_authentications: tuple[RequestAuthentication, ...] = field(default=())

    @property
    def verifies_jwt_natively(self) -> bool:
        """The chain starts with Envoy's jwt_authn filter (some JWT rule selects the workload)."""
        return self.jwt_native and any(ra.jwt_rules for ra in self.request_authentications)

    def native(self, action: Action, *, dry_run: bool = False) -> list[PlacedRule]:
        return [
            r
            for r in self.rules
            if r.placement is Placement.NATIVE
            and r.policy.action is action
            and r.policy.dry_run == dry_run
        ]

    def extauthz(self, *actions: Action) -> list[PlacedRule]:
        return [
            r
            for r in self.rules
            if r.placement is Placement.EXTAUTHZ
            and r.policy.action in actions
            and not r.policy.dry_run
        ]

    @property
    def needs_extauthz(self) -> bool:
        """Some rule needs the ext_authz service to be decided (the filter after RBAC)."""
        return bool(self.extauthz(Action.ALLOW, Action.DENY, Action.CUSTOM))

    @property
    def verifies_tokens(self) -> bool:
        """Requests carrying an end-user token go to ext_authz first (the token filter)."""
        return bool(self.token_sources)

    @property
    def uses_extauthz(self) -> bool:
        """The workload's HTTP chains have an ext_authz filter (and the cluster)."""
        return self.needs_extauthz or self.verifies_tokens

    @property
    def custom_gated(self) -> bool:
        """ext_authz is needed for CUSTOM rules only, each with an RBAC form: it then sees just
        the requests they match, as in Istio, whose builder puts the CUSTOM rules in a shadow
        RBAC filter in front of ext_authz and enables ext_authz on that filter's verdict
        (istio/istio pilot/pkg/security/authz/builder/builder.go). Here the CUSTOM rules are the
        ALLOW filter's shadow engine, action DENY (meshward.compile.authz.builder): a match
        writes ``denied`` under NATIVE_ALLOW_RESULT_KEY, which the late ext_authz's existing
        (inverted) gate reads as "run"; no match writes ``allowed``, "skip"; no verdict runs it
        (fail closed). Route-only: no listener change. Not with ext_authz ALLOW or DENY rules
        (the ALLOW union owns that engine, and those need every request anyway), nor, under
        ``jwtEnforcement: extauthz``, with a CUSTOM rule reading the token (no RBAC form)."""
        custom = self.extauthz(Action.CUSTOM)
        if not custom or self.extauthz(Action.ALLOW, Action.DENY):
            return False
        return self.jwt_native or all(rule_extauthz_reason(r.rule) is None for r in custom)

    @property
    def extauthz_always(self) -> bool:
        """ext_authz must see every request (CUSTOM or JWT DENY rules), or only the requests no
        native ALLOW rule allowed (or, custom_gated, that a CUSTOM rule matched)."""
        if self.custom_gated:
            return False
        if self.extauthz(Action.DENY, Action.CUSTOM):
            return True
        return not self.native(Action.ALLOW)

    @property
    def union_shadow(self) -> bool:
        """Native ALLOW rules run as shadow rules whose verdict gates ext_authz."""
        return bool(self.extauthz(Action.ALLOW)) and bool(self.native(Action.ALLOW))

    def summary(self) -> str:
        return self._rules_summary() + self._token_summary()

    def _token_summary(self) -> str:
        if self.verifies_jwt_natively:
            return (
                "; end-user tokens are verified by Envoy's jwt_authn (401 when invalid; no "
                "token: no request principal) and JWT rules are RBAC metadata matchers"
            )
        if not self.token_sources:
            return ""
        where = ", ".join(str(s) for s in self.token_sources)
        return (
            f"; requests that may carry an end-user token ({where}) go to ext_authz first, "
            "which rejects an invalid token with 401 (token-less requests never do)"
        )

    def _rules_summary(self) -> str:
        if not self.needs_extauthz:
            tail = "; no ext_authz filter" if not self.verifies_tokens else ""
            if self.has_allow:
                return "native only: RBAC DENY, then RBAC ALLOW enforced" + tail
            return "native only: RBAC DENY; no ALLOW policy (allowed unless denied)" + tail
        if self.custom_gated:
            return (
                "ext_authz only for requests a CUSTOM rule matches (a shadow copy of the CUSTOM "
                "rules gates it); RBAC DENY and ALLOW enforced natively"
            )
        if self.extauthz_always:
            why = (
                "CUSTOM or JWT DENY rules must see every request"
                if self.extauthz(Action.DENY, Action.CUSTOM)
                else "no native ALLOW rule can allow first"
            )
            return f"ext_authz on every request ({why}); it evaluates the whole policy"
        return (
            "ALLOW union: native ALLOW rules run as RBAC shadow rules; ext_authz is consulted "
            "only when none of them allowed (filter_enabled_metadata: "
            f"{names.NATIVE_ALLOW_RESULT_KEY} != allowed)"
        )


def place(
    policies: Sequence[AuthorizationPolicy],
    request_authentications: Iterable[RequestAuthentication] = (),
    *,
    jwt_native: bool = False,
) -> AuthzPlacement:
    """Where each rule runs. ``jwt_native`` (MeshConfig ``jwtEnforcement: native``, the
    default): tokens are verified by jwt_authn and JWT rules are native RBAC; otherwise both
    go to ext_authz (kept for comparison)."""
    request_authentications = tuple(request_authentications)
    rules = tuple(place_rules(policies, jwt_native=jwt_native))
    tcp_rules = tuple(place_rules(policies, tcp=True))
    has_allow = any(p.action is Action.ALLOW and not p.dry_run for p in policies)
    has_dry_run_allow = any(p.action is Action.ALLOW and p.dry_run for p in policies)
    reasons = tuple(
        f"{r.policy.ref} rule[{r.index}]: {r.reason}"
        for r in rules
        if r.placement is Placement.EXTAUTHZ and not r.policy.dry_run
    )
    sources = () if jwt_native else token_sources(request_authentications)
    if sources:
        reasons += (
            "a RequestAuthentication selects the workload: requests carrying a token are "
            "verified by ext_authz (401 when invalid)",
        )
    return AuthzPlacement(
        rules=rules,
        tcp_rules=tcp_rules,
        has_allow=has_allow,
        has_dry_run_allow=has_dry_run_allow,
        extauthz_reasons=reasons,
        token_sources=sources,
        jwt_native=jwt_native,
        request_authentications=request_authentications if jwt_native else (),
    )
