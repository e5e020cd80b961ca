"""Request principals (``requestPrincipals``, ``request.auth.principal``) matched as current Istio
does (1.21+, ``requestPrincipalGenerator``).

A request principal is the verified token's ``iss`` and ``sub``. A pattern is split at its LAST
``/`` (an issuer is often a URL with slashes of its own) into an issuer part and a subject
part, each matched on its own claim:

===========================  ============================  ==========================
pattern                      iss                           sub
===========================  ============================  ==========================
``*``                        any non-empty                 any non-empty
``ISS/SUB``                  equals ISS                    equals SUB
``ISS/*``                    equals ISS                    any non-empty
``ISS/PRE*``                 equals ISS                    starts with PRE
``*/SUB``                    any non-empty                 equals SUB
``*SUFFIX/SUB``              ends with SUFFIX              equals SUB
``*SUFFIX`` (no ``/``)       any non-empty                 ends with SUFFIX
``PREFIX*`` (no ``/``)       starts with PREFIX            any non-empty
``VALUE`` (no ``/``)         equals VALUE                  equals ""
===========================  ============================  ==========================

So ``https://login.acme.test/*`` matches only tokens whose ``iss`` is exactly
``https://login.acme.test`` - not ``https://login.acme.test/tenant1``, which a plain prefix
match on ``iss/sub`` would accept (the behaviour before Istio 1.21, and Meshward's before).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

Match = Callable[[str], bool]


class ClaimMatch(NamedTuple):
    """How one claim (``iss`` or ``sub``) is matched: ``any`` (any non-empty value), ``exact``,
    ``prefix`` or ``suffix`` of ``value``. The evaluator turns it into a predicate
    (:func:`split_pattern`), the compiler into an Envoy StringMatcher
    (meshward.compile.authz.jwt_authn): one reading of the pattern for both."""

    kind: Literal["any", "exact", "prefix", "suffix"]
    value: str = ""


ANY_VALUE = ClaimMatch("any")


class RequestPrincipal(str):
    """``iss/sub`` as text (what explain shows), with the two claims kept apart for matching:
    the joined text is ambiguous when either claim contains ``/``."""

    __slots__ = ("iss", "sub")
    iss: str
    sub: str

    def __new__(cls, iss: str, sub: str) -> RequestPrincipal:
        self = super().__new__(cls, f"{iss}/{sub}")
        self.iss = iss
        self.sub = sub
        return self


def pattern_parts(pattern: str) -> tuple[ClaimMatch, ClaimMatch]:
    """(issuer match, subject match) for one pattern, exactly as Istio generates them (the
    table above)."""
    idx = pattern.rfind("/")
    found = idx >= 0
    iss, sub = (pattern[:idx], pattern[idx + 1 :]) if found else (pattern, "")
    if pattern == "*":
        return ANY_VALUE, ANY_VALUE
    if pattern.startswith("*"):
        if found:
            issuer = ANY_VALUE if iss == "*" else ClaimMatch("suffix", iss[1:])
            return issuer, ClaimMatch("exact", sub)
        return ANY_VALUE, ClaimMatch("suffix", pattern[1:])
    if pattern.endswith("*"):
        if found:
            subject = ANY_VALUE if sub == "*" else ClaimMatch("prefix", sub[:-1])
            return ClaimMatch("exact", iss), subject
        return ClaimMatch("prefix", pattern[:-1]), ANY_VALUE
    return ClaimMatch("exact", iss), ClaimMatch("exact", sub)


def _predicate(match: ClaimMatch) -> Match:
    want = match.value
    if match.kind == "any":
        return bool
    if match.kind == "exact":
        return lambda v: v == want
    if match.kind == "prefix":
        return lambda v: v.startswith(want)
    return lambda v: v.endswith(want)


def split_pattern(pattern: str) -> tuple[Match, Match]:
    """(issuer predicate, subject predicate) for one pattern."""
    iss, sub = pattern_parts(pattern)
    return _predicate(iss), _predicate(sub)


def request_principals_predicate(patterns: Iterable[str]) -> Callable[[Any], bool]:
    """True when the request principal matches any pattern (never without a token)."""
    pairs = tuple(split_pattern(p) for p in patterns)

    def matches(value: Any) -> bool:
        if not isinstance(value, RequestPrincipal):
            return False
        return any(mi(value.iss) and ms(value.sub) for mi, ms in pairs)

    return matches
