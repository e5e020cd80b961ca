"""A workload's authorization as Envoy filters: the RBAC filters and, only where needed, ext_authz.

Istio's order is CUSTOM -> DENY -> ALLOW, and a request is allowed by ALLOW policies if it
matches ANY ALLOW rule of the workload. Some rules are decided natively (RBAC), some by the
ext_authz service (CUSTOM). End-user JWTs (MeshConfig ``jwtEnforcement: native``, the default)
are Envoy's too: a RequestAuthentication puts the jwt_authn filter first in the chain and JWT
rules are RBAC metadata matchers on its payload (meshward.compile.jwt_authn); the ext_authz
parts below that mention tokens and JWT rules apply only under ``jwtEnforcement: extauthz``,
kept for comparison. The HTTP chain is:

0. ext_authz for requests that may carry an end-user token (``meshward.ext_authz.token``),
   enabled only on workloads with a RequestAuthentication: a token that does not verify is
   rejected with 401 before any authorization, as Istio's jwt_authn filter does, even when no
   rule reads the JWT. It is enabled only on the routes that match the token locations (a
   header that is present, a query parameter in ``:path``); token-less requests never reach
   Python for it;
1. dry-run DENY / dry-run ALLOW / AUDIT: shadow-only RBAC filters (observe, never enforce);
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
   no verdict is ever written, and ext_authz runs on every request. On token routes it is
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
principal-indexed ``matcher`` (meshward.compile.index): a prefix map on the peer's URI SAN, so
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
(meshward.policy.ordering, :func:`envoy_policy_order`), so both name the same rule, and a
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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshward.compile import custom_gate, index, jwt_authn, names
from meshward.compile.classify import Placement, RuleClass, classify_rules, envoy_policy_order
from meshward.compile.rbac import RuleContext, rule_policy
from meshward.policy.model import Action, AuthorizationPolicy, RequestAuthentication
from meshward.policy.paths import re2_escape

Json = dict[str, Any]

T_HTTP_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
T_HTTP_RBAC_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
T_NET_RBAC = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
T_EXTAUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
T_EXTAUTHZ_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"


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
class AuthzPlan:
    """Where every rule of a workload runs (HTTP ports)."""

    rules: tuple[RuleClass, ...]
    tcp_rules: tuple[RuleClass, ...]
    has_allow: bool  # an enforced ALLOW policy selects the workload (default deny applies)
    extauthz_reasons: tuple[str, ...] = field(default=())
    # Where end-user tokens may be (a RequestAuthentication selects the workload): requests
    # that may carry one go to ext_authz, which rejects an invalid token with 401.
    token_sources: tuple[TokenSource, ...] = field(default=())
    # jwtEnforcement native (the default): RequestAuthentications compile to a jwt_authn filter
    # (meshward.compile.jwt_authn) and JWT rules to RBAC metadata matchers.
    jwt_native: bool = False
    request_authentications: tuple[RequestAuthentication, ...] = field(default=())

    @property
    def verifies_jwt_natively(self) -> bool:
        """The chain starts with Envoy's jwt_authn filter (some JWT rule selects the workload)."""
        return self.jwt_native and any(ra.jwt_rules for ra in self.request_authentications)

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
    def extauthz_always(self) -> bool:
        """ext_authz must see every request (CUSTOM or JWT DENY rules), or only the requests no
        native ALLOW rule allowed (or a CUSTOM rule matched: meshward.compile.custom_gate)."""
        if custom_gate.applies(self):
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
        if custom_gate.applies(self):
            return custom_gate.SUMMARY
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


def plan(
    policies: Sequence[AuthorizationPolicy],
    request_authentications: Iterable[RequestAuthentication] = (),
    *,
    jwt_native: bool = False,
) -> AuthzPlan:
    """Where each rule runs. ``jwt_native`` (MeshConfig ``jwtEnforcement: native``, the
    default): tokens are verified by jwt_authn and JWT rules are native RBAC; otherwise both
    go to ext_authz (kept for comparison)."""
    request_authentications = tuple(request_authentications)
    rules = tuple(classify_rules(policies, jwt_native=jwt_native))
    tcp_rules = tuple(classify_rules(policies, tcp=True))
    has_allow = any(p.action is Action.ALLOW and not p.dry_run for p in policies)
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
    return AuthzPlan(
        rules=rules,
        tcp_rules=tcp_rules,
        has_allow=has_allow,
        extauthz_reasons=reasons,
        token_sources=sources,
        jwt_native=jwt_native,
        request_authentications=request_authentications if jwt_native else (),
    )


def _policies(rules: Sequence[RuleClass], ctx: RuleContext) -> dict[str, Json]:
    return {r.rbac_name: rule_policy(r.rule, ctx) for r in rules}


def split_indexed(
    rules: list[RuleClass], min_rules: int | None, trust_domain: str = ""
) -> tuple[list[RuleClass], list[RuleClass]]:
    """(indexed, plain): rules that name their callers (exact identities, principal prefixes,
    namespaces) go to the principal index when there are at least ``min_rules`` of them (None:
    never); meshward.compile.index.split decides."""
    return index.split(rules, min_rules, trust_domain)


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


# ---- the chain: stages with a listener half and a route half --------------------------------


@dataclass(frozen=True)
class Stage:
    """One HTTP filter of the authorization chain.

    ``filter`` goes in the listener and is the same for every policy; ``per_route`` is its
    ``typed_per_filter_config`` on the inbound virtual host (the rules), None when this
    workload's policy gives it nothing to do (it then passes every request). ``needs_peer``:
    principal-indexed, left out of plaintext chains.
    """

    name: str
    filter: Json
    per_route: Json | None
    needs_peer: bool = False


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


def rbac_route_configs(
    plan_: AuthzPlan,
    port_map: Mapping[int, int],
    *,
    index_min_rules: int | None = None,
    trust_domain: str = "",
) -> dict[str, Json]:
    """Filter name -> RBACPerRoute, for the RBAC filters this workload's policy uses (the
    others get nothing and pass every request)."""
    ctx = RuleContext(port_map=port_map)
    rbac: dict[str, Json] = {}
    dry_deny = plan_.native(Action.DENY, dry_run=True)
    if dry_deny:
        rbac[names.RBAC_DRY_RUN_DENY] = _shadow("DENY", _policies(dry_deny, ctx))
    dry_allow = plan_.native(Action.ALLOW, dry_run=True)
    if dry_allow:
        rbac[names.RBAC_DRY_RUN_ALLOW] = _shadow("ALLOW", _policies(dry_allow, ctx))
    audit = plan_.native(Action.AUDIT) + plan_.native(Action.AUDIT, dry_run=True)
    if audit:
        rbac[names.RBAC_AUDIT] = _shadow("LOG", _policies(audit, ctx))
    deny_indexed, deny = split_indexed(plan_.native(Action.DENY), index_min_rules, trust_domain)
    if deny:
        rbac[names.RBAC_DENY] = _enforced("DENY", _policies(deny, ctx))
    if deny_indexed:
        rbac[names.RBAC_DENY_INDEXED] = {
            "matcher": index.matcher(deny_indexed, ctx, "DENY", trust_domain)
        }
    enforce = plan_.has_allow and not plan_.extauthz(Action.ALLOW)
    # Without ext_authz ALLOW rules the native ALLOW rules are enforced; with them they only
    # say (in metadata) whether they allowed, and ext_authz runs when they did not. When
    # ext_authz must see every request anyway (CUSTOM, JWT DENY rules) it decides the whole
    # policy: no shadow verdict, so the gate never skips it.
    gate = plan_.union_shadow and not plan_.extauthz_always
    if enforce or gate:
        indexed, allow = split_indexed(plan_.native(Action.ALLOW), index_min_rules, trust_domain)
        engine: Json
        if indexed and not allow:
            # Only indexed rules: the tree alone decides. On a plaintext chain it has no peer
            # identity to look up and matches nothing, which is right: every rule names callers.
            tree = index.matcher(indexed, ctx, "ALLOW", trust_domain)
            engine = {"matcher": tree} if enforce else {"shadow_matcher": tree}
        else:
            policies = _policies(allow, ctx)
            if indexed:
                # Indexed rules first, as shadow; one synthetic policy carries their verdict
                # into the rules engine, so the ALLOW union holds across both engines (and a
                # plaintext chain, which has no indexed filter, never sees that verdict).
                rbac[names.RBAC_ALLOW_INDEXED] = {
                    "shadow_matcher": index.matcher(indexed, ctx, "ALLOW", trust_domain)
                }
                policies[names.INDEXED_ALLOW_POLICY] = _indexed_allowed()
            engine = _enforced("ALLOW", policies) if enforce else _shadow("ALLOW", policies)
        rbac[names.RBAC_ALLOW] = engine
    if custom_gate.applies(plan_):  # ext_authz only where a CUSTOM rule matches
        rbac[names.RBAC_ALLOW] = {
            **rbac.get(names.RBAC_ALLOW, {}),
            **custom_gate.shadow_rules(plan_, ctx),
        }
    return {name: _per_route(name, config) for name, config in rbac.items()}


def rbac_stages(
    plan_: AuthzPlan,
    port_map: Mapping[int, int],
    *,
    index_min_rules: int | None = None,
    trust_domain: str = "",
) -> list[Stage]:
    """Every RBAC filter of an inbound HTTP chain, in chain order, with this workload's rules."""
    configs = rbac_route_configs(
        plan_, port_map, index_min_rules=index_min_rules, trust_domain=trust_domain
    )
    return [
        Stage(
            name=name,
            filter=rbac_filter(name, prefix),
            per_route=configs.get(name),
            needs_peer=needs_peer,
        )
        for name, prefix, needs_peer in RBAC_CHAIN
    ]


def _extauthz_config(timeout_ms: int, *, gated: bool, stat_prefix: str = "") -> Json:
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
        # The payload jwt_authn verified (jwtEnforcement: native): CUSTOM providers and the
        # evaluator read the end-user claims from it, the token itself may be gone.
        "metadata_context_namespaces": [jwt_authn.FILTER_JWT_AUTHN],
    }
    if stat_prefix:
        config["stat_prefix"] = stat_prefix
    if gated:
        # Enabled unless the native ALLOW rules allowed: a missing verdict also calls ext_authz
        # (fail closed), never skips it.
        config["filter_enabled_metadata"] = {
            "filter": names.RBAC_METADATA_NAMESPACE,
            "path": [{"key": names.NATIVE_ALLOW_RESULT_KEY}],
            "value": {"string_match": {"exact": "allowed"}},
            "invert": True,
        }
    return config


def extauthz_filter(*, timeout_ms: int) -> Json:
    """The ext_authz filter after the RBAC filters, the same for every policy: always gated on
    the native ALLOW shadow verdict, which only the ALLOW union's route config produces."""
    config = _extauthz_config(timeout_ms, gated=True)
    return {"name": names.FILTER_EXTAUTHZ, "typed_config": config}


def token_filter(*, timeout_ms: int) -> Json:
    """The ext_authz filter before the RBAC filters, for requests that may carry a token."""
    config = _extauthz_config(timeout_ms, gated=False, stat_prefix="token")
    return {"name": names.FILTER_EXTAUTHZ_TOKEN, "typed_config": config}


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


EXTAUTHZ_DISABLED: Json = {"@type": T_EXTAUTHZ_ROUTE, "disabled": True}


@dataclass(frozen=True)
class HttpAuthz:
    """The authorization of one inbound HTTP port: listener filters and route-level configs."""

    stages: tuple[Stage, ...]  # chain order, between the header mutation and the router
    token_routes: tuple[Json, ...]  # routes (without action) that send requests to the token filter
    extauthz: bool  # the chain has the ext_authz filters (the only policy-dependent part)

    def filters(self, *, peer: bool = True) -> list[Json]:
        """The chain's authorization filters; ``peer=False``: a plaintext chain (no index)."""
        return [s.filter for s in self.stages if peer or not s.needs_peer]

    def vhost_config(self) -> dict[str, Json]:
        return {s.name: s.per_route for s in self.stages if s.per_route is not None}

    def off_config(self) -> dict[str, Json]:
        """Per-filter configs that switch every authorization filter off, for a route that
        answers before authorization (meshward.compile.listeners: an invalid Host): an
        RBACPerRoute without ``rbac`` ("the global RBAC policy will be disabled for this
        route"), ext_authz ``disabled``."""
        off = {
            T_EXTAUTHZ: EXTAUTHZ_DISABLED,
            jwt_authn.T_JWT_AUTHN: jwt_authn.JWT_ROUTE_DISABLED,
        }
        return {
            s.name: off.get(s.filter["typed_config"]["@type"], {"@type": T_HTTP_RBAC_ROUTE})
            for s in self.stages
        }


def http_authz(
    plan_: AuthzPlan,
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
    context = extauthz_per_route(workload_ref, declared_port)
    stages: list[Stage] = []
    if plan_.verifies_jwt_natively:
        verify = jwt_authn.jwt_authn_filter(plan_.request_authentications, jwks or {})
        if verify is not None:
            stages.append(Stage(name=jwt_authn.FILTER_JWT_AUTHN, filter=verify, per_route=None))
    token_routes: list[Json] = []
    rbac = rbac_stages(plan_, port_map, index_min_rules=index_min_rules, trust_domain=trust_domain)
    if not plan_.uses_extauthz:
        return HttpAuthz(stages=tuple(stages + rbac), token_routes=(), extauthz=False)
    stages.append(
        Stage(
            name=names.FILTER_EXTAUTHZ_TOKEN,
            filter=token_filter(timeout_ms=extauthz_timeout_ms),
            per_route=EXTAUTHZ_DISABLED,  # token-less requests: off
        )
    )
    # Requests that may carry a token: the token filter has the service decide, the late
    # filter is off (decided already).
    on_token_route = {
        names.FILTER_EXTAUTHZ_TOKEN: context,
        names.FILTER_EXTAUTHZ: EXTAUTHZ_DISABLED,
    }
    for match in token_matches(plan_.token_sources):
        token_routes.append({**match, "typed_per_filter_config": on_token_route})
    stages += rbac
    stages.append(
        Stage(
            name=names.FILTER_EXTAUTHZ,
            filter=extauthz_filter(timeout_ms=extauthz_timeout_ms),
            per_route=context if plan_.needs_extauthz else EXTAUTHZ_DISABLED,
        )
    )
    return HttpAuthz(stages=tuple(stages), token_routes=tuple(token_routes), extauthz=True)


def token_matches(sources: Sequence[TokenSource]) -> list[Json]:
    """Route ``name`` + ``match`` for requests that may carry a token: one route per header
    (present, whatever its value) and one for all query parameters (a regex on ``:path``).

    A superset of what the ext_authz service calls a token (it also wants the header's prefix,
    a non-empty value): sending a token-less request to it costs a Check, never a decision,
    since the service evaluates the whole policy.
    """
    out: list[Json] = []
    for source in sources:
        if source.header:
            out.append(
                {
                    "name": f"token-header-{source.header}",
                    "match": {
                        "prefix": "/",
                        "headers": [{"name": source.header, "present_match": True}],
                    },
                }
            )
    params = [s.param for s in sources if s.param]
    if params:
        alternatives = "|".join(_encoded_name(p) for p in params)
        # The query (before any '#') has a field `<name>=<non-empty value>`; the name may be
        # percent-encoded in part or in full, as the service decodes it.
        regex = rf"[^?]*\?(?:[^#]*&)?(?:{alternatives})=[^&#].*"
        out.append(
            {
                "name": "token-param",
                "match": {
                    "prefix": "/",
                    "headers": [
                        {"name": ":path", "string_match": {"safe_regex": {"regex": regex}}}
                    ],
                },
            }
        )
    return out


def _encoded_name(name: str) -> str:
    """A regex for ``name`` as it may appear in a query: each character literal or
    percent-encoded (either hex case); a space also as '+'."""
    parts = []
    for ch in name:
        encoded = "".join(
            "%" + "".join(f"[{h}{h.lower()}]" if h.isalpha() else h for h in f"{b:02X}")
            for b in ch.encode()
        )
        alts = [re2_escape(ch), encoded]
        if ch == " ":
            alts.append(r"\+")
        parts.append("(?:" + "|".join(alts) + ")")
    return "".join(parts)


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
    "HttpAuthz",
    "Stage",
    "TokenSource",
    "envoy_policy_order",
    "extauthz_filter",
    "extauthz_per_route",
    "http_authz",
    "network_rbac_filters",
    "plan",
    "rbac_route_configs",
    "rbac_stages",
    "token_filter",
    "token_sources",
]
