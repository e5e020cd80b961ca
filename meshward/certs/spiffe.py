"""SPIFFE IDs as Meshward uses them: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``.

The rules follow the SPIFFE ID specification (and go-spiffe's parser, which Envoy-side tooling
agrees with): lowercase scheme and trust domain, no port/userinfo/query/fragment, no percent
encoding, path segments of ``[A-Za-z0-9._-]`` that are neither empty nor ``.``/``..``. On top of
that Meshward requires the Istio path shape, because policies name principals as
``td/ns/<ns>/sa/<sa>`` and Envoy RBAC parses the namespace out of it. Every rejection says which
rule was broken, since a typo here means a policy silently never matches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshward.errors import UserError

SCHEME = "spiffe://"
MAX_LENGTH = 2048  # SPIFFE: URI SANs longer than this are not interoperable
_WHITESPACE = re.compile(r"\s")

_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")


class InvalidSpiffeId(UserError):
    """A string that is not a SPIFFE ID Meshward can issue or trust."""


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.principal}"

    @property
    def uri(self) -> str:
        return str(self)

    @property
    def principal(self) -> str:
        """Istio's spelling in policies (no scheme): ``td/ns/<ns>/sa/<sa>``."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def validate_trust_domain(value: str) -> str:
    """Return ``value`` if it is a valid trust domain name, else raise InvalidSpiffeId."""
    if not value:
        raise InvalidSpiffeId("trust domain is empty: use a name such as 'cluster.local'")
    if value != value.strip():
        raise InvalidSpiffeId(f"trust domain {value!r} has surrounding whitespace")
    if value.lower() != value and _TRUST_DOMAIN_RE.match(value.lower()):
        raise InvalidSpiffeId(
            f"trust domain {value!r} must be lowercase (SPIFFE compares trust domains "
            f"byte for byte): use {value.lower()!r}"
        )
    if ":" in value:
        raise InvalidSpiffeId(f"trust domain {value!r} must not carry a port")
    if not _TRUST_DOMAIN_RE.match(value):
        raise InvalidSpiffeId(
            f"trust domain {value!r} may contain only lowercase letters, digits, '.', '-' and '_'"
        )
    return value


def _validate_segment(what: str, value: str, original: str) -> None:
    if not value:
        raise InvalidSpiffeId(f"{original!r}: {what} is empty")
    if value in (".", ".."):
        raise InvalidSpiffeId(f"{original!r}: {what} must not be '.' or '..'")
    if not _SEGMENT_RE.match(value):
        raise InvalidSpiffeId(
            f"{original!r}: {what} {value!r} may contain only letters, digits, '.', '-' and '_'"
        )


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    """Build (and validate) the SPIFFE ID of a workload's service account."""
    validate_trust_domain(trust_domain)
    original = f"{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
    _validate_segment("namespace", namespace, original)
    _validate_segment("service account", service_account, original)
    return SpiffeId(trust_domain, namespace, service_account)


def parse_spiffe_id(value: str, trust_domain: str | None = None) -> SpiffeId:
    """Parse ``spiffe://td/ns/<ns>/sa/<sa>``; with ``trust_domain``, require that trust domain.

    Raises InvalidSpiffeId (a UserError) naming the rule that failed.
    """
    if not isinstance(value, str) or not value:
        raise InvalidSpiffeId(
            "SPIFFE ID is empty: expected spiffe://<trust-domain>/ns/<ns>/sa/<sa>"
        )
    if len(value) > MAX_LENGTH:
        raise InvalidSpiffeId(
            f"SPIFFE ID is {len(value)} characters long; the limit is {MAX_LENGTH}"
        )
    if _WHITESPACE.search(value):  # the same characters as str.isspace(), without a loop
        raise InvalidSpiffeId(f"{value!r} contains whitespace")
    scheme, sep, rest = value.partition("://")
    if not sep:
        raise InvalidSpiffeId(
            f"{value!r} is not a SPIFFE ID: expected spiffe://<trust-domain>/ns/<ns>/sa/<sa>"
        )
    if scheme != "spiffe":
        hint = " (the scheme must be lowercase)" if scheme.lower() == "spiffe" else ""
        raise InvalidSpiffeId(
            f"{value!r} has scheme {scheme!r}; a SPIFFE ID starts with spiffe://{hint}"
        )
    if "?" in rest or "#" in rest:
        raise InvalidSpiffeId(f"{value!r} must not contain a query ('?') or fragment ('#')")
    if "%" in rest:
        raise InvalidSpiffeId(f"{value!r} must not contain percent-encoded characters")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise InvalidSpiffeId(f"{value!r} must not contain user info ('@')")
    try:
        validate_trust_domain(authority)
    except InvalidSpiffeId as exc:
        raise InvalidSpiffeId(f"{value!r}: {exc}") from None
    if trust_domain is not None and authority != trust_domain:
        raise InvalidSpiffeId(
            f"{value!r} belongs to trust domain {authority!r}, but this mesh's trust domain is "
            f"{trust_domain!r}"
        )
    segments = path.split("/") if slash else []
    if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
        raise InvalidSpiffeId(
            f"{value!r}: the path must be /ns/<namespace>/sa/<service-account> "
            f"(got {'/' + path if slash else 'no path'!r})"
        )
    _validate_segment("namespace", segments[1], value)
    _validate_segment("service account", segments[3], value)
    return SpiffeId(authority, segments[1], segments[3])
