"""The types that pass between the steps: what the builder hands a generator
(:class:`RbacEngine`), and what the HTTP builder hands the listener (:class:`HttpAuthz`, a
chain of :class:`Stage`).

Istio's builder has the same seam: ``build()`` gathers each action's rules into enforced and
shadow ``RBAC`` sets, and ``buildHTTP``/``buildTCP`` turn those into filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshward.compile.authz.placement import PlacedRule

Json = dict[str, Any]


@dataclass(frozen=True)
class RbacEngine:
    """What one HTTP RBAC filter of a workload's chain evaluates: the builder decides which
    rules, which action and whether the verdict is enforced; the generator
    (meshward.compile.authz.http_rbac) only renders it."""

    filter: str  # names.RBAC_*: the filter of the chain whose route config this is
    action: str  # Envoy's RBAC action: "ALLOW", "DENY" or "LOG"
    rules: tuple[PlacedRule, ...]
    enforced: bool  # ``rules``/``matcher``; else ``shadow_rules``/``shadow_matcher``
    indexed: bool = False  # the principal index's matcher tree instead of a rules engine
    # ALLOW rules engine after an indexed shadow filter: one more policy, which matches when
    # the indexed rules allowed, keeps "any ALLOW rule matches" one decision.
    indexed_verdict: bool = False


@dataclass(frozen=True)
class Stage:
    """One HTTP filter of the authorization chain.

    ``filter`` goes in the listener and is the same for every policy; ``per_route`` is its
    ``typed_per_filter_config`` on the inbound virtual host (the rules), None when this
    workload's policy gives it nothing to do (it then passes every request). ``off``: the
    per-route config that switches the filter off on a route. ``needs_peer``:
    principal-indexed, left out of plaintext chains.
    """

    name: str
    filter: Json
    per_route: Json | None
    off: Json
    needs_peer: bool = False


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
        return {s.name: s.off for s in self.stages}
