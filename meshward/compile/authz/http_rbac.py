"""Generator: HTTP RBAC. The builder's :class:`~meshward.compile.authz.chain.RbacEngine` list
becomes the RBAC filters of an inbound HTTP chain (listener half) and their ``RBACPerRoute``
configs (route half).

Every inbound HTTP chain has the same seven RBAC filters (:data:`RBAC_CHAIN`), whatever the
policy; each has its own chain name, no engine and only a fixed shadow stat prefix in the
listener, and its rules are the virtual host's ``typed_per_filter_config`` under that name. A
filter with no engine gets no route config and passes every request ("allowed by default").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from meshward.compile import names
from meshward.compile.authz import principal_index
from meshward.compile.authz.chain import Json, RbacEngine, Stage
from meshward.compile.authz.placement import PlacedRule
from meshward.compile.authz.rbac_policy import RuleContext, rule_policy

T_HTTP_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
T_HTTP_RBAC_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"

# The RBAC filters of every inbound HTTP chain, in chain order: (name, shadow stat prefix,
# needs a peer certificate). The prefix names the filter's shadow stats and, repeated in the
# route, its shadow dynamic-metadata keys, so the filters never overwrite each other's results.
RBAC_CHAIN: tuple[tuple[str, str, bool], ...] = (
    (names.RBAC_DRY_RUN_DENY, names.DRY_RUN_DENY_PREFIX, False),
    (names.RBAC_DRY_RUN_ALLOW, names.DRY_RUN_ALLOW_PREFIX, False),
    (names.RBAC_AUDIT, names.AUDIT_PREFIX, False),
    (names.RBAC_DENY, "", False),
    (names.RBAC_DENY_INDEXED, "", True),
    (names.RBAC_ALLOW_INDEXED, names.INDEXED_ALLOW_PREFIX, True),
    (names.RBAC_ALLOW, names.NATIVE_ALLOW_PREFIX, False),
)
_PREFIX = {name: prefix for name, prefix, _ in RBAC_CHAIN}

# An RBACPerRoute without ``rbac``: "the global RBAC policy will be disabled for this route".
RBAC_ROUTE_DISABLED: Json = {"@type": T_HTTP_RBAC_ROUTE}


def rbac_policies(rules: Sequence[PlacedRule], ctx: RuleContext) -> dict[str, Json]:
    """RBAC policy name -> Policy, one per rule (meshward.compile.authz.rbac_policy)."""
    return {r.rbac_name: rule_policy(r.rule, ctx) for r in rules}


def rbac_filter(name: str, shadow_prefix: str) -> Json:
    """The listener half of an RBAC filter: no engine (a route without this filter's config
    skips it), only the shadow stat prefix, which names the filter's shadow stats."""
    listener: Json = {"@type": T_HTTP_RBAC}
    if shadow_prefix:
        listener["shadow_rules_stat_prefix"] = shadow_prefix
    return {"name": name, "typed_config": listener}


def _per_route(name: str, rbac: Json) -> Json:
    """The route half: the engines. Shadow engines repeat the filter's prefix: Envoy takes the
    metadata key prefix (``<prefix>shadow_engine_result``) from the route config when set there,
    the stat names from the listener."""
    prefix = _PREFIX[name]
    if prefix and ("shadow_rules" in rbac or "shadow_matcher" in rbac):
        rbac = {**rbac, "shadow_rules_stat_prefix": prefix}
    return {"@type": T_HTTP_RBAC_ROUTE, "rbac": rbac}


def _enforced(action: str, policies: dict[str, Json]) -> Json:
    return {"rules": {"action": action, "policies": policies}, "track_per_rule_stats": True}


def _shadow(action: str, policies: dict[str, Json]) -> Json:
    return {"shadow_rules": {"action": action, "policies": policies}}


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


def engine_config(engine: RbacEngine, ctx: RuleContext, trust_domain: str = "") -> Json:
    """One filter's ``RBAC`` message: a rules engine or, for indexed rules, a matcher tree
    (meshward.compile.authz.principal_index). On a plaintext chain an ALLOW tree has no peer
    identity to look up and matches nothing, which is right: every indexed rule names callers.
    """
    if engine.indexed:
        tree = principal_index.matcher(engine.rules, ctx, engine.action, trust_domain)
        return {"matcher": tree} if engine.enforced else {"shadow_matcher": tree}
    policies = rbac_policies(engine.rules, ctx)
    if engine.indexed_verdict:
        policies[names.INDEXED_ALLOW_POLICY] = _indexed_allowed()
    if engine.enforced:
        return _enforced(engine.action, policies)
    return _shadow(engine.action, policies)


def route_configs(
    engines: Iterable[RbacEngine], port_map: Mapping[int, int], trust_domain: str = ""
) -> dict[str, Json]:
    """Filter name -> RBACPerRoute, for the RBAC filters this workload's policy uses (the
    others get nothing and pass every request)."""
    ctx = RuleContext(port_map=port_map)
    return {e.filter: _per_route(e.filter, engine_config(e, ctx, trust_domain)) for e in engines}


def stages(
    engines: Iterable[RbacEngine], port_map: Mapping[int, int], trust_domain: str = ""
) -> list[Stage]:
    """Every RBAC filter of an inbound HTTP chain, in chain order, with this workload's rules."""
    configs = route_configs(engines, port_map, trust_domain)
    return [
        Stage(
            name=name,
            filter=rbac_filter(name, prefix),
            per_route=configs.get(name),
            off=RBAC_ROUTE_DISABLED,
            needs_peer=needs_peer,
        )
        for name, prefix, needs_peer in RBAC_CHAIN
    ]
