"""A workload's authorization as Envoy filters: the RBAC filters and, only where needed, ext_authz.

Istio's order is CUSTOM -> DENY -> ALLOW, and a request is allowed by ALLOW policies if it
matches ANY ALLOW rule of the workload. Some rules are decided natively (RBAC), some by the
ext_authz service (end-user JWT, CUSTOM). The HTTP chain is:

1. dry-run DENY / dry-run ALLOW / AUDIT: shadow-only RBAC filters (observe, never enforce);
2. RBAC DENY with the native DENY rules (enforced; a match is a 403 naming the rule);
3. RBAC ALLOW with the native ALLOW rules:
   - enforced when no ALLOW rule needs ext_authz (Python is never called for the decision);
   - otherwise evaluated as *shadow* rules, with the verdict in dynamic metadata
     ``meshward_native_allow_shadow_engine_result``;
4. ext_authz (only when some rule needs it). The service evaluates the workload's complete
   policy (meshward.policy.evaluate), so its answer is the whole decision. When the only reason
   for ext_authz is ALLOW rules, it is enabled by ``filter_enabled_metadata`` only when the
   native ALLOW rules did *not* allow: requests a native rule allows never reach Python, and the
   rest get the union of native and ext_authz ALLOW rules. CUSTOM policies and JWT DENY rules
   must be consulted on every request, so then ext_authz is always enabled.

The ext_authz service learns which workload a Check is for (and the declared port, since
runtime ports differ) from the route's ``context_extensions``.

Large workloads: when a workload has many rules that name exact callers, those rules go to
RBAC's principal-indexed ``matcher`` (meshward.compile.index) so a request costs a hash lookup
on its peer identity instead of a walk over every rule. DENY gets a second enforced filter
(either filter's match denies). For ALLOW the indexed rules run first as shadow, and one
synthetic policy (``meshward-indexed-allow``) carries their verdict into the rules engine that
holds the remaining ALLOW rules, so "any ALLOW rule matches" stays one decision; an allowed
request then reports the synthetic name as ``enforced_effective_policy_id`` and the real rule
in ``meshward_indexed_allow_shadow_effective_policy_id``. Plaintext filter chains never use the
index (it needs a peer certificate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshward.compile import index, names
from meshward.compile.classify import Placement, RuleClass, classify_rules
from meshward.compile.rbac import RuleContext, rule_policy
from meshward.policy.model import Action, AuthorizationPolicy

Json = dict[str, Any]

T_HTTP_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
T_NET_RBAC = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
T_EXTAUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
T_EXTAUTHZ_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"


@dataclass(frozen=True)
class AuthzPlan:
    """Where every rule of a workload runs (HTTP ports)."""

    rules: tuple[RuleClass, ...]
    tcp_rules: tuple[RuleClass, ...]
    has_allow: bool  # an enforced ALLOW policy selects the workload (default deny applies)
    extauthz_reasons: tuple[str, ...] = field(default=())

    def native(self, action: Action, *, dry_run: bool = False) -> list[RuleClass]:
        return [
            r
            for r in self.rules
            if r.placement is Placement.NATIVE
            and r.policy.action is action
            and r.policy.dry_run == dry_run
        ]

    def extauthz(self, *actions: Action) -> list[RuleClass]:
        return [
            r
            for r in self.rules
            if r.placement is Placement.EXTAUTHZ
            and r.policy.action in actions
            and not r.policy.dry_run
        ]

    @property
    def needs_extauthz(self) -> bool:
        return bool(self.extauthz(Action.ALLOW, Action.DENY, Action.CUSTOM))

    @property
    def extauthz_always(self) -> bool:
        """ext_authz must see every request (CUSTOM or JWT DENY rules), or only the requests no
        native ALLOW rule allowed."""
        if self.extauthz(Action.DENY, Action.CUSTOM):
            return True
        return not self.native(Action.ALLOW)

    @property
    def union_shadow(self) -> bool:
        """Native ALLOW rules run as shadow rules whose verdict gates ext_authz."""
        return bool(self.extauthz(Action.ALLOW)) and bool(self.native(Action.ALLOW))

    def summary(self) -> str:
        if not self.needs_extauthz:
            if self.has_allow:
                return "native only: RBAC DENY, then RBAC ALLOW enforced; no ext_authz filter"
            return "native only: RBAC DENY; no ALLOW policy (allowed unless denied); no ext_authz filter"
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


def plan(policies: Sequence[AuthorizationPolicy]) -> AuthzPlan:
    rules = tuple(classify_rules(policies))
    tcp_rules = tuple(classify_rules(policies, tcp=True))
    has_allow = any(p.action is Action.ALLOW and not p.dry_run for p in policies)
    reasons = tuple(
        f"{r.policy.ref} rule[{r.index}]: {r.reason}"
        for r in rules
        if r.placement is Placement.EXTAUTHZ and not r.policy.dry_run
    )
    return AuthzPlan(
        rules=rules, tcp_rules=tcp_rules, has_allow=has_allow, extauthz_reasons=reasons
    )


def _policies(rules: Sequence[RuleClass], ctx: RuleContext) -> dict[str, Json]:
    return {r.rbac_name: rule_policy(r.rule, ctx) for r in rules}


def _http_rbac(
    action: str,
    policies: dict[str, Json] | None,
    *,
    shadow: dict[str, Json] | None = None,
    shadow_prefix: str = "",
    rules_prefix: str = "",
) -> Json:
    config: Json = {"@type": T_HTTP_RBAC}
    if policies is not None:
        config["rules"] = {"action": action, "policies": policies}
        if rules_prefix:
            config["rules_stat_prefix"] = rules_prefix
        config["track_per_rule_stats"] = True
    if shadow is not None:
        config["shadow_rules"] = {"action": action, "policies": shadow}
        config["shadow_rules_stat_prefix"] = shadow_prefix
    return {"name": names.FILTER_RBAC, "typed_config": config}


def split_indexed(
    rules: list[RuleClass], min_rules: int | None
) -> tuple[list[RuleClass], list[RuleClass]]:
    """(indexed, plain): rules with exact callers go to the principal index when there are at
    least ``min_rules`` of them (None: never)."""
    if min_rules is None:
        return [], rules
    indexed = [r for r in rules if index.exact_principals(r) is not None]
    if not indexed or len(indexed) < min_rules:
        return [], rules
    return indexed, [r for r in rules if index.exact_principals(r) is None]


def _matcher_rbac(action: str, matcher: Json, *, shadow_prefix: str | None = None) -> Json:
    config: Json = {"@type": T_HTTP_RBAC}
    if shadow_prefix is None:
        config["matcher"] = matcher
    else:
        config["shadow_matcher"] = matcher
        config["shadow_rules_stat_prefix"] = shadow_prefix
    return {"name": names.FILTER_RBAC, "typed_config": config}


def _indexed_allowed() -> Json:
    """Matches when the indexed ALLOW rules (an earlier shadow filter) allowed the request."""
    return {
        "permissions": [{"any": True}],
        "principals": [
            {
                "metadata": {
                    "filter": names.RBAC_METADATA_NAMESPACE,
                    "path": [{"key": names.INDEXED_ALLOW_RESULT_KEY}],
                    "value": {"string_match": {"exact": "allowed"}},
                }
            }
        ],
    }


def http_authz_filters(
    plan_: AuthzPlan,
    port_map: Mapping[int, int],
    *,
    extauthz_timeout_ms: int,
    index_min_rules: int | None = None,
) -> list[Json]:
    """The HTTP filters from the first RBAC filter to ext_authz (the router comes after)."""
    ctx = RuleContext(port_map=port_map)
    filters: list[Json] = []
    dry_deny = plan_.native(Action.DENY, dry_run=True)
    if dry_deny:
        filters.append(
            _http_rbac(
                "DENY",
                None,
                shadow=_policies(dry_deny, ctx),
                shadow_prefix=names.DRY_RUN_DENY_PREFIX,
            )
        )
    dry_allow = plan_.native(Action.ALLOW, dry_run=True)
    if dry_allow:
        filters.append(
            _http_rbac(
                "ALLOW",
                None,
                shadow=_policies(dry_allow, ctx),
                shadow_prefix=names.DRY_RUN_ALLOW_PREFIX,
            )
        )
    audit = plan_.native(Action.AUDIT) + plan_.native(Action.AUDIT, dry_run=True)
    if audit:
        filters.append(
            _http_rbac("LOG", None, shadow=_policies(audit, ctx), shadow_prefix=names.AUDIT_PREFIX)
        )
    deny_indexed, deny = split_indexed(plan_.native(Action.DENY), index_min_rules)
    if deny:
        filters.append(_http_rbac("DENY", _policies(deny, ctx)))
    if deny_indexed:
        filters.append(_matcher_rbac("DENY", index.matcher(deny_indexed, ctx, "DENY")))
    indexed, allow = split_indexed(plan_.native(Action.ALLOW), index_min_rules)
    enforce = plan_.has_allow and not plan_.extauthz(Action.ALLOW)
    if plan_.union_shadow or enforce:
        # Without ext_authz ALLOW rules the native ALLOW rules are enforced; with them they only
        # say (in metadata) whether they allowed, and ext_authz runs when they did not.
        final_prefix = None if enforce else names.NATIVE_ALLOW_PREFIX
        if indexed and not allow:
            matcher = index.matcher(indexed, ctx, "ALLOW")
            filters.append(_matcher_rbac("ALLOW", matcher, shadow_prefix=final_prefix))
        else:
            policies = _policies(allow, ctx)
            if indexed:
                # Indexed rules first, as shadow; one synthetic policy carries their verdict
                # into the rules engine, so the ALLOW union holds across both engines.
                matcher = index.matcher(indexed, ctx, "ALLOW")
                filters.append(
                    _matcher_rbac("ALLOW", matcher, shadow_prefix=names.INDEXED_ALLOW_PREFIX)
                )
                policies[names.INDEXED_ALLOW_POLICY] = _indexed_allowed()
            if final_prefix is None:
                filters.append(_http_rbac("ALLOW", policies))
            else:
                filters.append(
                    _http_rbac("ALLOW", None, shadow=policies, shadow_prefix=final_prefix)
                )
    if plan_.needs_extauthz:
        filters.append(extauthz_filter(plan_, timeout_ms=extauthz_timeout_ms))
    return filters


def extauthz_filter(plan_: AuthzPlan, *, timeout_ms: int) -> Json:
    config: Json = {
        "@type": T_EXTAUTHZ,
        "grpc_service": {
            "envoy_grpc": {"cluster_name": names.CLUSTER_EXTAUTHZ},
            "timeout": _duration_ms(timeout_ms),
        },
        "transport_api_version": "V3",
        "failure_mode_allow": False,
        "include_peer_certificate": True,
        "include_tls_session": True,  # connection.sni for the evaluator
    }
    if not plan_.extauthz_always:
        # Enabled unless the native ALLOW rules allowed: a missing verdict also calls ext_authz
        # (fail closed), never skips it.
        config["filter_enabled_metadata"] = {
            "filter": names.RBAC_METADATA_NAMESPACE,
            "path": [{"key": names.NATIVE_ALLOW_RESULT_KEY}],
            "value": {"string_match": {"exact": "allowed"}},
            "invert": True,
        }
    return {"name": names.FILTER_EXTAUTHZ, "typed_config": config}


def extauthz_per_route(workload_ref: str, declared_port: int) -> Json:
    return {
        "@type": T_EXTAUTHZ_ROUTE,
        "check_settings": {
            "context_extensions": {
                names.CONTEXT_WORKLOAD: workload_ref,
                names.CONTEXT_PORT: str(declared_port),
            }
        },
    }


def network_rbac_filters(plan_: AuthzPlan, port_map: Mapping[int, int], stat: str) -> list[Json]:
    """Network RBAC for a TCP port: DENY (incl. CUSTOM, fail closed) then ALLOW."""
    filters: list[Json] = []
    native = [r for r in plan_.tcp_rules if r.placement is Placement.NATIVE]
    deny_ctx = RuleContext(port_map=port_map, drop_http=True)
    allow_ctx = RuleContext(port_map=port_map)

    def pick(actions: tuple[Action, ...], dry_run: bool) -> list[RuleClass]:
        return [r for r in native if r.policy.action in actions and r.policy.dry_run == dry_run]

    def net(action: str, rules: Json | None, shadow: Json | None, prefix: str) -> Json:
        config: Json = {"@type": T_NET_RBAC, "stat_prefix": f"{stat}_"}
        if rules is not None:
            config["rules"] = {"action": action, "policies": rules}
        if shadow is not None:
            config["shadow_rules"] = {"action": action, "policies": shadow}
            config["shadow_rules_stat_prefix"] = prefix
        return {"name": names.NETWORK_FILTER_RBAC, "typed_config": config}

    dry_deny = pick((Action.DENY,), True)
    if dry_deny:
        filters.append(net("DENY", None, _policies(dry_deny, deny_ctx), names.DRY_RUN_DENY_PREFIX))
    dry_allow = pick((Action.ALLOW,), True)
    if dry_allow:
        filters.append(
            net("ALLOW", None, _policies(dry_allow, allow_ctx), names.DRY_RUN_ALLOW_PREFIX)
        )
    deny = pick((Action.DENY, Action.CUSTOM), False)
    if deny:
        filters.append(net("DENY", _policies(deny, deny_ctx), None, ""))
    if plan_.has_allow:
        filters.append(net("ALLOW", _policies(pick((Action.ALLOW,), False), allow_ctx), None, ""))
    return filters


def _duration_ms(ms: int) -> str:
    return f"{ms / 1000:g}s"


__all__ = [
    "AuthzPlan",
    "extauthz_filter",
    "extauthz_per_route",
    "http_authz_filters",
    "network_rbac_filters",
    "plan",
]
