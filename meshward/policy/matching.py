"""Istio's value patterns (exact, ``prefix*``, ``*suffix``, ``*``) and the other small matchers
rules are built from. Each returns a predicate compiled once per policy set, so per-request work
is a few string comparisons."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from meshward.policy.paths import compiled_path_template, is_path_template

StrPredicate = Callable[[str | None], bool]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SPIFFE_PREFIX = "spiffe://"


def wildcard_problem(value: str) -> str | None:
    """Istio supports a single ``*`` at the start or the end (or ``*`` alone)."""
    if value == "*" or "*" not in value:
        return None
    inner = value[1:] if value.startswith("*") else value[:-1] if value.endswith("*") else value
    if "*" in inner:
        return f"{value!r}: '*' is allowed only once, at the start or the end of a value"
    return None


def string_predicate(pattern: str, *, ignore_case: bool = False) -> StrPredicate:
    """``*`` matches any non-empty value (Istio compiles it to ``.+``)."""
    if pattern == "*":
        return _present
    if ignore_case:
        pattern = pattern.lower()
    if pattern.startswith("*"):
        suffix = pattern[1:]
        if ignore_case:
            return lambda v: v is not None and v.lower().endswith(suffix)
        return lambda v: v is not None and v.endswith(suffix)
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        if ignore_case:
            return lambda v: v is not None and v.lower().startswith(prefix)
        return lambda v: v is not None and v.startswith(prefix)
    if ignore_case:
        return lambda v: v is not None and v.lower() == pattern
    return lambda v: v == pattern


def _present(value: str | None) -> bool:
    return bool(value)


def any_of(predicates: Iterable[StrPredicate]) -> StrPredicate:
    preds = tuple(predicates)
    if len(preds) == 1:
        return preds[0]
    return lambda v: any(p(v) for p in preds)


def strings_predicate(patterns: Iterable[str], *, ignore_case: bool = False) -> StrPredicate:
    """True when the value matches any pattern. Exact patterns become one set lookup."""
    exact: set[str] = set()
    others: list[StrPredicate] = []
    for pattern in patterns:
        if "*" in pattern:
            others.append(string_predicate(pattern, ignore_case=ignore_case))
        else:
            exact.add(pattern.lower() if ignore_case else pattern)
    if exact and not others:
        frozen = frozenset(exact)
        if ignore_case:
            return lambda v: v is not None and v.lower() in frozen
        return lambda v: v in frozen
    if exact:
        others.append(strings_predicate(exact, ignore_case=ignore_case))
    return any_of(others)


def path_predicate(pattern: str) -> StrPredicate:
    if is_path_template(pattern):
        regex = compiled_path_template(pattern)
        return lambda v: v is not None and regex.fullmatch(v) is not None
    return string_predicate(pattern)


def paths_predicate(patterns: Iterable[str]) -> StrPredicate:
    return any_of(path_predicate(p) for p in patterns)


def parse_network(value: str) -> IpNetwork:
    """``1.2.3.4`` or ``10.0.0.0/8``; host bits are allowed (Envoy masks them, as Istio does)."""
    return ipaddress.ip_network(value, strict=False)


def networks_predicate(values: Iterable[str]) -> Callable[[IpAddress | None], bool]:
    networks = tuple(parse_network(v) for v in values)
    return lambda ip: ip is not None and any(ip in net for net in networks)


def parse_ip(value: str | None) -> IpAddress | None:
    if not value:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def strip_spiffe(principal: str) -> str:
    return principal[len(SPIFFE_PREFIX) :] if principal.startswith(SPIFFE_PREFIX) else principal


def namespace_of(principal: str | None) -> str | None:
    """The namespace in ``td/ns/<ns>/sa/<sa>`` (Istio matches ``.*/ns/<ns>/.*``)."""
    if not principal:
        return None
    _, sep, rest = principal.partition("/ns/")
    if not sep:
        return None
    namespace, slash, _ = rest.partition("/")
    return namespace if slash and namespace else None


# Istio (1.21+) treats these top-level claims as space-delimited lists: `scope: "a b"` matches
# a policy value "a" or "b" (and no longer the whole string).
SPACE_DELIMITED_CLAIMS = frozenset({"scope", "permission"})


def claim_values(claims: Any, path: tuple[str, ...]) -> tuple[str, ...]:
    """String values at a nested claim path (a string claim, or the strings of a list claim)."""
    node = claims
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return ()
        node = node[key]
    if isinstance(node, str):
        if len(path) == 1 and path[0] in SPACE_DELIMITED_CLAIMS:
            return tuple(node.split())
        return (node,)
    if isinstance(node, list):
        return tuple(v for v in node if isinstance(v, str))
    return ()


def header_elements(value: str | None) -> tuple[str, ...]:
    """Istio matches each comma-separated element of a header (Envoy joins repeated headers
    with ',') as well as the whole value."""
    if value is None:
        return ()
    if "," not in value:
        return (value,)
    return (value, *value.split(","))
