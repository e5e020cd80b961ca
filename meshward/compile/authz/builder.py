"""The builders: a workload's placement (meshward.compile.authz.placement) in, the authorization
filters of its inbound chains out: the RBAC filters and, only where needed, ext_authz and
jwt_authn. As in Istio's authz builder, the builder decides which rules go to which filter
(:class:`~meshward.compile.authz.chain.RbacEngine`: action, enforced or shadow, indexed) and one
generator per target renders them (http_rbac, tcp_rbac, ext_authz, jwt_authn).


Istio's order is CUSTOM -> DENY -> ALLOW, and a request is allowed by ALLOW policies if it
matches ANY ALLOW rule of the workload. Some rules are decided natively (RBAC), some by the
ext_authz service (CUSTOM). End-user JWTs (MeshConfig ``jwtEnforcement: native``, the default)
are Envoy's too: a RequestAuthentication puts the jwt_authn filter first in the chain and JWT
rules are RBAC metadata matchers on its payload (meshward.compile.authz.jwt_authn); the ext_authz
parts below that mention tokens and JWT rules apply only under ``jwtEnforcement: extauthz``,
kept for comparison. The HTTP chain is:

0. ext_authz for requests that may carry an end-user token (``meshward.ext_authz.token``),
   enabled only on workloads with a RequestAuthentication: a token that does not verify is
   rejected with 401 before any authorization, as Istio's jwt_authn filter does, even when no
   rule reads the JWT. It is enabled only on the routes that match the token locations (a
   header that is present, a query parameter in ``:path``); token-less requests never reach
   Python for it;
1. dry-run DENY / dry-run ALLOW / AUDIT: shadow-only RBAC filters (observe, never enforce);
   the dry-run ALLOW engine also holds the enforced native ALLOW rules and exists, possibly
   empty (shadow deny all), whenever a dry-run ALLOW policy selects the workload
   (:func:`dry_run_allow_rules`);
2. RBAC DENY with the native DENY rules (enforced; a match is a 403 naming the rule);
3. RBAC ALLOW with the native ALLOW rules:
   - enforced when no ALLOW rule needs ext_authz (Python is never called for the decision);
   - otherwise (the ALLOW union) evaluated as *shadow* rules, with the verdict in dynamic
     metadata ``meshward_native_allow_shadow_engine_result``;
   - no rules at all when ext_authz must see every request anyway (below);
4. ext_authz (enabled on routes only when some rule needs it). The service evaluates the
   workload's complete policy (meshward.policy.evaluate), so its answer is the whole decision.
   The filter is gated by ``filter_enabled_metadata``: it runs unless the native ALLOW rules
   allowed, so in the ALLOW union requests a native rule allows never reach Python, and the
   rest get the union of native and ext_authz ALLOW rules. CUSTOM policies and JWT DENY rules
   must be consulted on every request: then the route gives the ALLOW filter no shadow rules,
   no verdict is ever written, and ext_authz runs on every request. Except when CUSTOM rules
   are all ext_authz is for (AuthzPlacement.custom_gated): as in Istio, ext_authz then sees
   only the requests a CUSTOM rule matches, through a shadow DENY engine of the CUSTOM rules
   in the ALLOW filter whose verdict the same gate reads. On token routes it is
   disabled: the token filter (0) already had the service decide.

Rules live in the route, not in the listener. Every inbound HTTP chain has the same seven RBAC
filters (names.RBAC_*), whatever the policy; each has its own chain name, no engine and only a
fixed shadow stat prefix in the listener, and its rules are the virtual host's
``typed_per_filter_config`` (``RBACPerRoute``) under that name. A filter the workload's policy
does not use gets no route config and passes every request (no engine: "allowed by default").
Any authorization-policy edit (a rule, the first DENY, dry-run or AUDIT policy, crossing the
index threshold) therefore changes only the RouteConfiguration, which Envoy applies to open
connections at their next request.

The one part of the chain a policy adds or removes is ext_authz: the issue demands that a
workload without rules that need the service (or tokens to verify) has no ext_authz filter at
all. A workload that needs it gets both ext_authz filters (0 and 4) whatever it needs them
for, each disabled per route where it has nothing to do, and the late one always gated on
the native ALLOW shadow verdict (when every request must reach the service, the route simply
has no ALLOW shadow rules to set that verdict). So ext_authz appearing or going is the one
policy edit that replaces the listener (and renames the route, see
meshward.compile.names.inbound_route): connections opened before keep the old chain and
rules until they drain. mTLS mode changes replace the listener too (TCP ports: network RBAC
has no per-route config, so every TCP policy edit does).

The ext_authz service learns which workload a Check is for (and the declared port, since
runtime ports differ) from the ``context_extensions`` of the route's ``ExtAuthzPerRoute``.

Large workloads: when a workload has many rules that name their callers (exact identities,
principal prefixes, namespaces; notPrincipals may narrow them), those rules go to RBAC's
principal-indexed ``matcher`` (meshward.compile.authz.principal_index): a prefix map on the peer's URI SAN, so
a request costs a lookup on its peer identity and a walk over that caller's rules only, instead
of a walk over every rule. DENY gets a second enforced filter
(either filter's match denies). For ALLOW the indexed rules run first as shadow, and one
synthetic policy (``meshward-indexed-allow``) carries their verdict into the rules engine that
holds the remaining ALLOW rules, so "any ALLOW rule matches" stays one decision; an allowed
request then reports the synthetic name as ``enforced_effective_policy_id`` and the real rule
in ``meshward_indexed_allow_shadow_effective_policy_id``; when every ALLOW rule is indexed, the
tree is simply the ALLOW filter's engine. The two extra indexed filters need a peer
certificate: plaintext filter chains leave them out (their rules name callers, so they can
never match a plaintext request) and share the route config with the mTLS chain; an ALLOW tree
on a plaintext chain has no identity to look up and matches nothing, which is also right.

Which rule a denial names: Envoy's rules engine keeps ``policies`` in a ``std::map`` and reports
the first matching policy in *string* order of the names (Istio's behaviour too), so with
several matching rules it names ``...-rule[10]`` before ``...-rule[2]``, or policy ``web-2``
before ``web`` ('-' sorts before ']'). meshward.policy.evaluate uses the same order
(meshward.policy.ordering,
:func:`~meshward.compile.authz.placement.envoy_policy_order`), so both name the same rule, and a
request ext_authz decides is named by the evaluator itself. Residual cases, where rules in
*different* filters match one request (the verdict is the same; only the name can differ):
with the principal index, a request matching both an indexed and a plain DENY rule is named
by the plain DENY filter (it runs first) even when the indexed rule sorts first; a request
without a token matching a native DENY rule and a CUSTOM or JWT DENY rule is denied by RBAC
before ext_authz sees it, where the evaluator (CUSTOM first, then every DENY rule in one
order) may name the other; in the ALLOW union, a native ALLOW match skips ext_authz even when
a JWT ALLOW rule that also matches sorts first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshward.compile import names
from meshward.compile.authz import ext_authz, http_rbac, jwt_authn, principal_index, tcp_rbac
from meshward.compile.authz.chain import HttpAuthz, RbacEngine, Stage
from meshward.compile.authz.placement import AuthzPlacement, PlacedRule, Placement
from meshward.policy.model import Action

Json = dict[str, Any]


def split_indexed(
    rules: list[PlacedRule], min_rules: int | None, trust_domain: str = ""
) -> tuple[list[PlacedRule], list[PlacedRule]]:
    """(indexed, plain): rules that name their callers (exact identities, principal prefixes,
    namespaces) go to the principal index when there are at least ``min_rules`` of them (None:
    never); meshward.compile.authz.principal_index.split decides."""
    return principal_index.split(rules, min_rules, trust_domain)


def http_rbac_engines(
    placement: AuthzPlacement, *, index_min_rules: int | None = None, trust_domain: str = ""
) -> list[RbacEngine]:
    """The RBAC engines of an inbound HTTP chain, by filter: dry-run DENY, dry-run ALLOW and
    AUDIT (shadow), DENY (enforced; the indexed part in its own filter), then ALLOW."""
    engines: list[RbacEngine] = []
    dry_deny = placement.native(Action.DENY, dry_run=True)
    if dry_deny:
        engines.append(RbacEngine(names.RBAC_DRY_RUN_DENY, "DENY", tuple(dry_deny), False))
    if placement.has_dry_run_allow:
        engines.append(
            RbacEngine(
                names.RBAC_DRY_RUN_ALLOW, "ALLOW", tuple(dry_run_allow_rules(placement)), False
            )
        )
    audit = placement.native(Action.AUDIT) + placement.native(Action.AUDIT, dry_run=True)
    if audit:
        engines.append(RbacEngine(names.RBAC_AUDIT, "LOG", tuple(audit), False))
    deny_indexed, deny = split_indexed(placement.native(Action.DENY), index_min_rules, trust_domain)
    if deny:
        engines.append(RbacEngine(names.RBAC_DENY, "DENY", tuple(deny), True))
    if deny_indexed:
        engines.append(
            RbacEngine(names.RBAC_DENY_INDEXED, "DENY", tuple(deny_indexed), True, indexed=True)
        )
    engines += _allow_engines(placement, index_min_rules, trust_domain)
    if placement.custom_gated:
        # ext_authz only where a CUSTOM rule matches: a shadow DENY engine of the CUSTOM rules
        # in the ALLOW filter (beside its enforced ALLOW rules) writes the verdict the late
        # ext_authz filter is gated on (AuthzPlacement.custom_gated).
        custom = tuple(placement.extauthz(Action.CUSTOM))
        engines.append(RbacEngine(names.RBAC_ALLOW, "DENY", custom, False))
    return engines


def dry_run_allow_rules(placement: AuthzPlacement, *, tcp: bool = False) -> list[PlacedRule]:
    """The dry-run ALLOW shadow engine's rules: the dry-run ALLOW rules and the enforced native
    ALLOW rules. Its verdict answers "would this request be denied if the dry-run ALLOW
    policies were enforced too?", as meshward.policy.evaluate's ``would_deny`` does: a request
    an enforced ALLOW rule allows stays allowed. Istio's shadow engine holds the dry-run rules
    only and reports such a request denied. The engine exists whenever a dry-run ALLOW policy
    selects the workload (AuthzPlacement.has_dry_run_allow), with no rules at all when none
    compiles (an allow-nothing policy, or a TCP port no rule can match): Envoy's ALLOW engine
    with no policies denies everything, which is the evaluator's verdict there."""
    rules = placement.tcp_rules if tcp else placement.rules
    return [r for r in rules if r.placement is Placement.NATIVE and r.policy.action is Action.ALLOW]


def _allow_engines(
    placement: AuthzPlacement, index_min_rules: int | None, trust_domain: str
) -> list[RbacEngine]:
    """The ALLOW filter's engines (and the indexed ALLOW filter's): enforced, or the ALLOW
    union's shadow verdict, or none."""
    engines: list[RbacEngine] = []
    enforce = placement.has_allow and not placement.extauthz(Action.ALLOW)
    # Without ext_authz ALLOW rules the native ALLOW rules are enforced; with them they only
    # say (in metadata) whether they allowed, and ext_authz runs when they did not. When
    # ext_authz must see every request anyway (CUSTOM, JWT DENY rules) it decides the whole
    # policy: no shadow verdict, so the gate never skips it.
    gate = placement.union_shadow and not placement.extauthz_always
    if not (enforce or gate):
        return engines
    indexed, allow = split_indexed(placement.native(Action.ALLOW), index_min_rules, trust_domain)
    if indexed and not allow:
        # Only indexed rules: the tree alone decides.
        engines.append(RbacEngine(names.RBAC_ALLOW, "ALLOW", tuple(indexed), enforce, indexed=True))
        return engines
    if indexed:
        # Indexed rules first, as shadow; one synthetic policy carries their verdict into the
        # rules engine, so the ALLOW union holds across both engines (and a plaintext chain,
        # which has no indexed filter, never sees that verdict).
        engines.append(
            RbacEngine(names.RBAC_ALLOW_INDEXED, "ALLOW", tuple(indexed), False, indexed=True)
        )
    engines.append(
        RbacEngine(names.RBAC_ALLOW, "ALLOW", tuple(allow), enforce, indexed_verdict=bool(indexed))
    )
    return engines


def build_http(
    placement: AuthzPlacement,
    port_map: Mapping[int, int],
    *,
    workload_ref: str,
    declared_port: int,
    extauthz_timeout_ms: int,
    index_min_rules: int | None = None,
    jwks: Mapping[str, str] | None = None,
    trust_domain: str = "",
) -> HttpAuthz:
    """The chain is the same for every policy except for jwt_authn (workloads a
    RequestAuthentication selects, in front) and ext_authz, which only workloads that need the
    service have (both filters, whatever for; disabled per route where idle). ``jwks``: the
    fetched JWKS documents by ``jwksUri`` (data from the control plane, inlined)."""
    stages: list[Stage] = []
    if placement.verifies_jwt_natively:
        verify = jwt_authn.jwt_authn_filter(placement.request_authentications, jwks or {})
        if verify is not None:
            stages.append(
                Stage(
                    name=jwt_authn.FILTER_JWT_AUTHN,
                    filter=verify,
                    per_route=None,
                    off=jwt_authn.JWT_ROUTE_DISABLED,
                )
            )
    engines = http_rbac_engines(
        placement, index_min_rules=index_min_rules, trust_domain=trust_domain
    )
    rbac = http_rbac.stages(engines, port_map, trust_domain)
    if not placement.uses_extauthz:
        return HttpAuthz(stages=tuple(stages + rbac), token_routes=(), extauthz=False)
    context = ext_authz.extauthz_per_route(workload_ref, declared_port)
    stages.append(ext_authz.token_stage(timeout_ms=extauthz_timeout_ms))
    stages += rbac
    stages.append(
        ext_authz.late_stage(
            timeout_ms=extauthz_timeout_ms,
            context=context if placement.needs_extauthz else None,
        )
    )
    routes = ext_authz.token_routes(placement.token_sources, context)
    return HttpAuthz(stages=tuple(stages), token_routes=tuple(routes), extauthz=True)


@dataclass(frozen=True)
class _NetworkEngine:
    action: str
    actions: tuple[Action, ...]  # the policies' actions whose rules it holds
    dry_run: bool
    shadow_prefix: str | None  # None: enforced


# Network RBAC filters in chain order: dry-run DENY, dry-run ALLOW, DENY (with CUSTOM: no
# provider is consulted for TCP, a matching connection is denied, fail closed), ALLOW.
_NETWORK_CHAIN = (
    _NetworkEngine("DENY", (Action.DENY,), True, names.DRY_RUN_DENY_PREFIX),
    _NetworkEngine("ALLOW", (Action.ALLOW,), True, names.DRY_RUN_ALLOW_PREFIX),
    _NetworkEngine("DENY", (Action.DENY, Action.CUSTOM), False, None),
    _NetworkEngine("ALLOW", (Action.ALLOW,), False, None),
)


def build_tcp(placement: AuthzPlacement, port_map: Mapping[int, int], stat: str) -> list[Json]:
    """Network RBAC for a TCP port: DENY (incl. CUSTOM, fail closed) then ALLOW. The enforced
    ALLOW filter is there whenever an enforced ALLOW policy selects the workload, even with no
    rule a TCP connection can match (default deny)."""
    native = [r for r in placement.tcp_rules if r.placement is Placement.NATIVE]
    filters: list[Json] = []
    for engine in _NETWORK_CHAIN:
        if engine.dry_run and engine.action == "ALLOW":
            always = placement.has_dry_run_allow
            rules = dry_run_allow_rules(placement, tcp=True) if always else []
        else:
            rules = [
                r
                for r in native
                if r.policy.action in engine.actions and r.policy.dry_run == engine.dry_run
            ]
            always = (
                engine.shadow_prefix is None and engine.action == "ALLOW" and placement.has_allow
            )
        if rules or always:
            filters.append(
                tcp_rbac.network_rbac(
                    engine.action, rules, port_map, stat, shadow_prefix=engine.shadow_prefix
                )
            )
    return filters
