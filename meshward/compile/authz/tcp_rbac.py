"""Generator: network RBAC, the authorization of an inbound TCP port (no routes: every policy
edit replaces the listener).

A TCP connection has no HTTP fields. The plan (meshward.compile.authz.placement) leaves out
ALLOW rules that need them (they match no connection); DENY rules are rendered here with those
fields dropped, so they match more connections (fail closed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from meshward.compile import names
from meshward.compile.authz.chain import Json
from meshward.compile.authz.http_rbac import rbac_policies
from meshward.compile.authz.placement import PlacedRule
from meshward.compile.authz.rbac_policy import RuleContext

T_NET_RBAC = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"


def network_rbac(
    action: str,
    rules: Sequence[PlacedRule],
    port_map: Mapping[int, int],
    stat: str,
    *,
    shadow_prefix: str | None = None,
) -> Json:
    """One network RBAC filter: enforced ``rules``, or with ``shadow_prefix`` shadow rules
    whose stats carry that prefix (dry-run)."""
    ctx = RuleContext(port_map=port_map, drop_http=action == "DENY")
    policies = rbac_policies(rules, ctx)
    config: Json = {"@type": T_NET_RBAC, "stat_prefix": f"{stat}_"}
    if shadow_prefix is None:
        config["rules"] = {"action": action, "policies": policies}
    else:
        config["shadow_rules"] = {"action": action, "policies": policies}
        config["shadow_rules_stat_prefix"] = shadow_prefix
    return {"name": names.NETWORK_FILTER_RBAC, "typed_config": config}
