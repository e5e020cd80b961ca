"""ext_authz only for the requests a CUSTOM rule matches, as Istio does it.

Istio puts a shadow RBAC filter holding the CUSTOM rules in front of ext_authz and enables
ext_authz (``filter_enabled_metadata``) only when that shadow engine matched
(istio/istio pilot/pkg/security/authz/builder/builder.go). Meshward's chain is the same for
every policy apart from ext_authz's presence, and its late ext_authz filter is already gated
(inverted) on the ALLOW filter's shadow verdict ``NATIVE_ALLOW_RESULT_KEY == allowed``, which
only the ALLOW union's route config writes. So the CUSTOM rules become that ALLOW filter's
shadow rules with action DENY, on the route only: a CUSTOM match writes ``denied`` (ext_authz
runs), no match ``allowed`` (ext_authz is skipped), and an absent verdict still runs it (fail
closed). No listener changes, and the enforced ALLOW rules of the same filter are untouched.

It applies when CUSTOM rules are the only ones ext_authz is needed for: the ALLOW union needs
that shadow engine itself, and ext_authz ALLOW or DENY rules (JWT rules under
``jwtEnforcement: extauthz``) need the service on every request anyway. Under that mode a
CUSTOM rule reading the token has no RBAC form (tokens reach the service through the token
filter, which evaluates the whole policy, CUSTOM included), so then too nothing changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshward.compile.classify import rule_extauthz_reason
from meshward.compile.rbac import RuleContext, rule_policy
from meshward.policy.model import Action

if TYPE_CHECKING:
    from meshward.compile.authz import AuthzPlan

SUMMARY = (
    "ext_authz only for requests a CUSTOM rule matches (a shadow copy of the CUSTOM rules "
    "gates it); RBAC DENY and ALLOW enforced natively"
)


def applies(plan: AuthzPlan) -> bool:
    """ext_authz is needed for CUSTOM rules only, and each of them has an RBAC form."""
    custom = plan.extauthz(Action.CUSTOM)
    if not custom or plan.extauthz(Action.ALLOW, Action.DENY):
        return False
    return plan.jwt_native or all(rule_extauthz_reason(r.rule) is None for r in custom)


def shadow_rules(plan: AuthzPlan, ctx: RuleContext) -> dict[str, Any]:
    """The ALLOW filter's route-level shadow engine: the CUSTOM rules, action DENY."""
    policies = {r.rbac_name: rule_policy(r.rule, ctx) for r in plan.extauthz(Action.CUSTOM)}
    return {"shadow_rules": {"action": "DENY", "policies": policies}}
