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
from typing import Any

Match = Callable[[str], bool]


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


def _any(value: str) -> bool:
    return bool(value)


def _exact(want: str) -> Match:
    return lambda v: v == want


def _prefix(want: str) -> Match:
    return lambda v: v.startswith(want)


def _suffix(want: str) -> Match:
    return lambda v: v.endswith(want)


def split_pattern(pattern: str) -> tuple[Match, Match]:
    """(issuer matcher, subject matcher) for one pattern, exactly as Istio generates them."""
    idx = pattern.rfind("/")
    found = idx >= 0
    iss, sub = (pattern[:idx], pattern[idx + 1 :]) if found else (pattern, "")
    if pattern == "*":
        return _any, _any
    if pattern.startswith("*"):
        if found:
            return (_any if iss == "*" else _suffix(iss[1:])), _exact(sub)
        return _any, _suffix(pattern[1:])
    if pattern.endswith("*"):
        if found:
            return _exact(iss), (_any if sub == "*" else _prefix(sub[:-1]))
        return _prefix(pattern[:-1]), _any
    return _exact(iss), _exact(sub)


def request_principals_predicate(patterns: Iterable[str]) -> Callable[[Any], bool]:
    """True when the request principal matches any pattern (never without a token)."""
    pairs = tuple(split_pattern(p) for p in patterns)

    def matches(value: Any) -> bool:
        if not isinstance(value, RequestPrincipal):
            return False
        return any(mi(value.iss) and ms(value.sub) for mi, ms in pairs)

    return matches
