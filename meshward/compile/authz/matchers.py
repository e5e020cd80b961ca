"""Istio value patterns as Envoy matchers (v3 JSON dicts), with exactly the evaluator's meaning.

meshward.policy.evaluate is the reference: every matcher here must accept the same values as the
corresponding predicate in meshward.policy.matching, and the decision-equivalence test drives
requests through a real Envoy to prove it. Patterns: ``exact``, ``prefix*``, ``*suffix`` and
``*`` (any non-empty value).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from meshward.policy.matching import SPIFFE_PREFIX
from meshward.policy.paths import is_path_template, path_template_regex, re2_escape

Json = dict[str, Any]

SPIFFE = SPIFFE_PREFIX

# Matchers that need no input: Envoy's ``any`` and its negation.
ANY_PERMISSION: Json = {"any": True}
ANY_PRINCIPAL: Json = {"any": True}
NO_PERMISSION: Json = {"not_rule": {"any": True}}
NO_PRINCIPAL: Json = {"not_id": {"any": True}}


def regex(pattern: str) -> Json:
    return {"safe_regex": {"regex": pattern}}


def string_matcher(pattern: str, *, ignore_case: bool = False) -> Json:
    """A StringMatcher for one Istio pattern; ``*`` is any non-empty value."""
    if pattern == "*":
        return regex(".+")
    extra: Json = {"ignore_case": True} if ignore_case else {}
    if pattern.startswith("*"):
        return {"suffix": pattern[1:], **extra}
    if pattern.endswith("*"):
        return {"prefix": pattern[:-1], **extra}
    return {"exact": pattern, **extra}


# ---- combinators ---------------------------------------------------------------------------


def _flatten(items: list[Json], key: str, inner: str) -> list[Json]:
    """Splice nested combinators of the same kind: fewer nodes for Envoy to walk per request."""
    out: list[Json] = []
    for item in items:
        if len(item) == 1 and key in item:
            out.extend(item[key][inner])
        else:
            out.append(item)
    return out


def or_permissions(items: list[Json]) -> Json:
    items = _flatten(items, "or_rules", "rules")
    return items[0] if len(items) == 1 else {"or_rules": {"rules": items}}


def and_permissions(items: list[Json]) -> Json:
    items = [i for i in _flatten(items, "and_rules", "rules") if i != ANY_PERMISSION]
    if not items:
        return ANY_PERMISSION
    return items[0] if len(items) == 1 else {"and_rules": {"rules": items}}


def not_permission(item: Json) -> Json:
    return {"not_rule": item}


def or_principals(items: list[Json]) -> Json:
    items = _flatten(items, "or_ids", "ids")
    return items[0] if len(items) == 1 else {"or_ids": {"ids": items}}


def and_principals(items: list[Json]) -> Json:
    items = [i for i in _flatten(items, "and_ids", "ids") if i != ANY_PRINCIPAL]
    if not items:
        return ANY_PRINCIPAL
    return items[0] if len(items) == 1 else {"and_ids": {"ids": items}}


def not_principal(item: Json) -> Json:
    return {"not_id": item}


# ---- principals (from the peer certificate) -----------------------------------------------


def principal(pattern: str) -> Json:
    """Istio principal (``td/ns/x/sa/y``, no ``spiffe://``) against the peer's URI SAN.

    ``*`` is any authenticated peer. A suffix becomes an anchored regex so it can never match the
    certificate subject, which Envoy also tries when no SAN matches.
    """
    if pattern == "*":
        return {"authenticated": {}}
    if pattern.startswith("*"):
        m = regex(re2_escape(SPIFFE) + ".*" + re2_escape(pattern[1:]))
    elif pattern.endswith("*"):
        m = {"prefix": SPIFFE + pattern[:-1]}
    else:
        m = {"exact": SPIFFE + pattern}
    return {"authenticated": {"principal_name": m}}


def namespace(pattern: str) -> Json:
    """The namespace inside the peer's SPIFFE ID (``spiffe://td/ns/<ns>/sa/<sa>``)."""
    if pattern == "*":
        ns = "[^/]+"
    elif pattern.startswith("*"):
        ns = "[^/]*" + re2_escape(pattern[1:])
    elif pattern.endswith("*"):
        ns = re2_escape(pattern[:-1]) + "[^/]*"
    else:
        ns = re2_escape(pattern)
    return {"authenticated": {"principal_name": regex(f"spiffe://[^/]+/ns/{ns}/.*")}}


def cidr(value: str) -> Json:
    network = ipaddress.ip_network(value, strict=False)
    return {"address_prefix": str(network.network_address), "prefix_len": network.prefixlen}


# ---- headers ------------------------------------------------------------------------------


def header(name: str, pattern: str) -> list[Json]:
    """A request header against one pattern, as the evaluator reads headers: the whole value or
    any comma-separated element of it matches (Envoy joins repeated headers with ',').

    Envoy has no element-wise header matcher, so each pattern becomes an OR of plain string
    matchers over the joined value (no regex on the hot path): an element equal to ``v`` sits
    at the start (``v,``), the end (``,v``), in the middle (``,v,``) or is the whole value.
    Returns the alternatives (each usable as a Permission or a Principal); any may match.
    """
    name = name.lower()
    if pattern == "*":  # presence, even with an empty value (as the evaluator reads it)
        return [{"header": {"name": name, "present_match": True}}]
    if "," in pattern:  # elements never contain ',': only the whole value can match
        return [{"header": {"name": name, "string_match": string_matcher(pattern)}}]
    if pattern.startswith("*"):
        v = pattern[1:]
        options = [{"suffix": v}, {"contains": v + ","}]
    elif pattern.endswith("*"):
        v = pattern[:-1]
        options = [{"prefix": v}, {"contains": "," + v}]
    else:
        v = pattern
        options = [{"exact": v}, {"prefix": v + ","}, {"suffix": "," + v}, {"contains": f",{v},"}]
    return [{"header": {"name": name, "string_match": m}} for m in options]


def host(pattern: str) -> Json:
    """``:authority``, case-insensitively (Istio's host matching)."""
    return {
        "header": {"name": ":authority", "string_match": string_matcher(pattern, ignore_case=True)}
    }


def method(pattern: str) -> Json:
    return {"header": {"name": ":method", "string_match": string_matcher(pattern)}}


def path(pattern: str) -> Json:
    """The normalized path without the query (Envoy's ``url_path``)."""
    if is_path_template(pattern):
        return {"url_path": {"path": regex(path_template_regex(pattern))}}
    if pattern == "*":
        return {"url_path": {"path": {"prefix": "/"}}}
    return {"url_path": {"path": string_matcher(pattern)}}


def sni(pattern: str) -> Json:
    return {"requested_server_name": string_matcher(pattern)}
