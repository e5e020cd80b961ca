"""A workload's authorization policies as Envoy filters, in the shape of Istio's authz builder
(pilot/pkg/security/authz): plan -> builder -> one generator per target.

1. **plan** (:mod:`.placement`): where each rule runs and why: native RBAC (enforced, shadow
   for dry-run, LOG for AUDIT), the ext_authz service (CUSTOM; JWT rules under
   ``jwtEnforcement: extauthz``), or nowhere (an ALLOW rule with HTTP fields on a TCP port);
   whether the chain needs jwt_authn (RequestAuthentication) or ext_authz at all.
   :func:`place` -> :class:`AuthzPlacement` of :class:`PlacedRule`.
2. **builders** (:mod:`.builder`): which rules go to which filter of the chain, enforced or
   shadow, rules engine or principal index (:class:`~.chain.RbacEngine`), and the order of the
   filters: :func:`build_http` (-> :class:`~.chain.HttpAuthz`) and :func:`build_tcp`.
3. **generators**, one per target: :mod:`.http_rbac` (HTTP RBAC filters and their per-route
   rules), :mod:`.tcp_rbac` (network RBAC), :mod:`.ext_authz` (ext_authz filters, token
   routes), :mod:`.jwt_authn` (RequestAuthentication -> jwt_authn providers). They share the
   rule translation, Istio's ``model`` package: :mod:`.rbac_policy` (one rule -> one RBAC
   Policy), :mod:`.matchers` (value patterns -> Envoy matchers) and :mod:`.principal_index`
   (rules that name their callers -> a matcher tree keyed on the peer's URI SAN).

Everything here is pure: the same policies give the same dicts, and nothing reads a clock.
Golden input/output pairs per feature: tests/unit/compile/golden/features/.
"""

from meshward.compile.authz.builder import build_http, build_tcp, http_rbac_engines, split_indexed
from meshward.compile.authz.chain import HttpAuthz, RbacEngine, Stage
from meshward.compile.authz.ext_authz import token_matches
from meshward.compile.authz.placement import (
    AuthzPlacement,
    PlacedRule,
    Placement,
    TokenSource,
    envoy_policy_order,
    needs_extauthz,
    place,
    place_rules,
    rule_extauthz_reason,
    token_sources,
)

__all__ = [
    "AuthzPlacement",
    "HttpAuthz",
    "PlacedRule",
    "Placement",
    "RbacEngine",
    "Stage",
    "TokenSource",
    "build_http",
    "build_tcp",
    "envoy_policy_order",
    "http_rbac_engines",
    "needs_extauthz",
    "place",
    "place_rules",
    "rule_extauthz_reason",
    "split_indexed",
    "token_matches",
    "token_sources",
]
