"""Which request attributes a workload's policies read: the decision cache key is made of exactly
these (plus the policy version and the workload), so two requests that differ only in something
no rule reads share one cache entry, and two that differ in anything a rule reads never do.

Pure functions: computed once per policy version per workload and unit-tested on their own.
The evaluator (meshward.policy.evaluate) is the only judge of a decision; this module must only
ever over-approximate what it reads. A rule key it does not recognise makes the workload
uncacheable rather than guessing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from meshward.policy.model import Action, AuthorizationPolicy, Condition, Operation, Source
from meshward.policy.vocabulary import OPERATION_FORMS, SOURCE_FORMS, header_name
from meshward.policy.vocabulary import claim_path as loader_claim_path

# Attribute names. Headers and claims are parameterised: "request.headers[x-team]",
# "request.auth.claims[groups]" (nested: "request.auth.claims[a][b]").
SOURCE_PRINCIPAL = "source.principal"
SOURCE_IP = "source.ip"
REMOTE_IP = "remote.ip"
DESTINATION_IP = "destination.ip"
DESTINATION_PORT = "destination.port"
SNI = "connection.sni"
METHOD = "request.method"
PATH = "request.path"
HOST = "request.host"
AUTH_PRINCIPAL = "request.auth.principal"
AUTH_AUDIENCES = "request.auth.audiences"
AUTH_PRESENTER = "request.auth.presenter"
HEADER_PREFIX = "request.headers["
CLAIM_PREFIX = "request.auth.claims["


# `when` keys that read one fixed attribute.
_CONDITION_ATTRIBUTES: Mapping[str, tuple[str, ...]] = {
    "source.ip": (SOURCE_IP,),
    # Istio's remote.ip falls back to the peer address when no X-Forwarded-For was trusted.
    "remote.ip": (REMOTE_IP, SOURCE_IP),
    "source.namespace": (SOURCE_PRINCIPAL,),
    "source.principal": (SOURCE_PRINCIPAL,),
    "request.auth.principal": (AUTH_PRINCIPAL,),
    "request.auth.audiences": (AUTH_AUDIENCES,),
    "request.auth.presenter": (AUTH_PRESENTER,),
    "destination.ip": (DESTINATION_IP,),
    "destination.port": (DESTINATION_PORT,),
    "connection.sni": (SNI,),
}


class Uncacheable(Exception):
    """The policies read something the plan cannot name; decisions for this workload are
    evaluated on every request (correct, only slower)."""


@dataclass(frozen=True)
class AttributesRead:
    """What a workload's decision depends on. ``attributes`` is None when uncacheable."""

    attributes: tuple[str, ...] | None
    reason: str = ""  # why uncacheable
    # Emergency-policy expiries (sorted): the decision changes at each, so no entry may outlive
    # the next one.
    expiries: tuple[datetime, ...] = ()

    @property
    def cacheable(self) -> bool:
        return self.attributes is not None

    @property
    def reads_token(self) -> bool:
        return self.attributes is not None and any(
            a.startswith("request.auth.") for a in self.attributes
        )


# The request attributes each Source/Operation field pair of the vocabulary reads. Built per
# vocabulary pair at import: a field added to the vocabulary without an entry here fails with a
# KeyError before anything is served, never with a key that leaves out what a rule reads.
_FIELD_ATTRIBUTES: Mapping[str, tuple[str, ...]] = {
    "principals": (SOURCE_PRINCIPAL,),
    "namespaces": (SOURCE_PRINCIPAL,),  # the namespace is read from the peer principal
    "request_principals": (AUTH_PRINCIPAL,),
    "ip_blocks": (SOURCE_IP,),
    "remote_ip_blocks": (REMOTE_IP, SOURCE_IP),  # remote ip falls back to the source ip
    "hosts": (HOST,),
    "ports": (DESTINATION_PORT,),
    "methods": (METHOD,),
    "paths": (PATH,),
}
FieldReads = tuple[tuple[str, tuple[str, ...]], ...]  # (model attribute, attributes read)
_SOURCE_READS: FieldReads = tuple((f.attr, _FIELD_ATTRIBUTES[f.pair.name]) for f in SOURCE_FORMS)
_OPERATION_READS: FieldReads = tuple(
    (f.attr, _FIELD_ATTRIBUTES[f.pair.name]) for f in OPERATION_FORMS
)


def _field_attributes(item: Source | Operation, reads: FieldReads) -> set[str]:
    return {a for attr, attributes in reads if getattr(item, attr) for a in attributes}


def condition_attributes(condition: Condition) -> tuple[str, ...]:
    """The attributes one `when` entry reads; raises Uncacheable for keys it cannot name."""
    key = condition.key
    fixed = _CONDITION_ATTRIBUTES.get(key)
    if fixed is not None:
        return fixed
    header = header_name(key)
    if header is not None:
        return (f"{HEADER_PREFIX}{header.lower()}]",)
    path = loader_claim_path(key)
    if path is not None:
        return (CLAIM_PREFIX + "][".join(path) + "]",)
    raise Uncacheable(f"condition key {key!r} is not a known attribute")


def attributes_read(
    policies: Iterable[AuthorizationPolicy], *, custom_hook: bool = False, tcp_ports: bool = False
) -> AttributesRead:
    """The attribute set the evaluator may read for a workload selected by ``policies``.

    Pass every policy that selects the workload, expired ones included (an over-approximation
    is still a correct key). ``custom_hook``: a CUSTOM policy is decided by a Python callable
    that may read anything, so such a workload is uncacheable. ``tcp_ports``: the workload
    declares TCP ports, where rules apply differently, so the destination port matters.
    """
    attributes: set[str] = {DESTINATION_PORT} if tcp_ports else set()
    expiries: list[datetime] = []
    try:
        for policy in policies:
            if policy.expires_at is not None:
                expiries.append(policy.expires_at)
            if policy.action is Action.CUSTOM and custom_hook:
                raise Uncacheable(f"CUSTOM policy {policy.ref} is decided by a custom hook")
            for rule in policy.rules:
                for source in rule.sources:
                    attributes |= _field_attributes(source, _SOURCE_READS)
                for operation in rule.operations:
                    attributes |= _field_attributes(operation, _OPERATION_READS)
                for condition in rule.conditions:
                    attributes.update(condition_attributes(condition))
    except Uncacheable as exc:
        return AttributesRead(None, reason=str(exc), expiries=tuple(sorted(expiries)))
    return AttributesRead(tuple(sorted(attributes)), expiries=tuple(sorted(expiries)))


# ---- key extraction ---------------------------------------------------------------------------

# Sentinels no header or claim value can equal (values are str, or tagged tuples from _freeze).
NO_TOKEN = ("\x00", "no-token")
MISSING = ("\x00", "missing")


@dataclass(slots=True)
class RequestFacts:
    """The raw attributes of one Check, as the key extractor and the evaluator see them.
    ``path`` is already normalized; ``claims`` is None for an anonymous request."""

    method: str
    path: str
    host: str
    destination_port: int
    source_principal: str | None
    source_ip: str | None
    destination_ip: str | None
    sni: str | None
    headers: Mapping[str, str]
    claims: Mapping[str, Any] | None


Getter = Callable[[RequestFacts], object]


def claim_path(attribute: str) -> tuple[str, ...]:
    """``request.auth.claims[a][b]`` -> ("a", "b")."""
    path = loader_claim_path(attribute)
    if path is None:
        raise ValueError(f"not a claim attribute: {attribute!r}")
    return path


def _freeze(value: Any) -> object:
    """A hashable, exact stand-in for a claim value (lists and objects included). Types are
    kept apart (``1``, ``1.0``, ``True`` and ``"1"`` are different claims)."""
    kind = type(value)
    if kind is str:
        return value
    if kind is list:
        return ("list", *(_freeze(v) for v in value))
    if value is None or kind in (int, float, bool):
        return (kind.__name__, value)
    return ("json", json.dumps(value, sort_keys=True, separators=(",", ":")))


def _claim_getter(path: tuple[str, ...]) -> Getter:
    def get(facts: RequestFacts) -> object:
        if facts.claims is None:
            return NO_TOKEN
        value: Any = facts.claims
        for part in path:
            if not isinstance(value, Mapping) or part not in value:
                return MISSING
            value = value[part]
        return _freeze(value)

    return get


def _auth_getter(claim: str) -> Getter:
    def get(facts: RequestFacts) -> object:
        if facts.claims is None:
            return NO_TOKEN
        if claim == "principal":  # iss/sub, kept apart so a missing claim never equals ""
            return (
                _freeze(facts.claims.get("iss", MISSING)),
                _freeze(facts.claims.get("sub", MISSING)),
            )
        return _freeze(facts.claims.get(claim, MISSING))

    return get


def _header_getter(name: str) -> Getter:
    def get(facts: RequestFacts) -> object:
        return facts.headers.get(name, MISSING)

    return get


_FIXED_GETTERS: Mapping[str, Getter] = {
    SOURCE_PRINCIPAL: lambda f: f.source_principal,
    SOURCE_IP: lambda f: f.source_ip,
    REMOTE_IP: lambda f: f.source_ip,  # ext_authz sees one client address; see RequestFacts
    DESTINATION_IP: lambda f: f.destination_ip,
    DESTINATION_PORT: lambda f: f.destination_port,
    SNI: lambda f: f.sni,
    METHOD: lambda f: f.method,
    PATH: lambda f: f.path,
    HOST: lambda f: f.host,
    AUTH_PRINCIPAL: _auth_getter("principal"),
    AUTH_AUDIENCES: _auth_getter("aud"),
    AUTH_PRESENTER: _auth_getter("azp"),
}


def getter(attribute: str) -> Getter:
    fixed = _FIXED_GETTERS.get(attribute)
    if fixed is not None:
        return fixed
    if attribute.startswith(HEADER_PREFIX):
        return _header_getter(attribute[len(HEADER_PREFIX) : -1])
    if attribute.startswith(CLAIM_PREFIX):
        return _claim_getter(claim_path(attribute))
    raise ValueError(f"unknown attribute {attribute!r}")


def key_function(attributes: tuple[str, ...]) -> Callable[[RequestFacts], tuple[object, ...]]:
    """A function from facts to the key part for these attributes (compiled once per plan)."""
    getters = tuple(getter(a) for a in attributes)
    if not getters:
        return lambda facts: ()
    if len(getters) == 1:
        only = getters[0]
        return lambda facts: (only(facts),)
    return lambda facts: tuple(g(facts) for g in getters)
