"""The attribute keys a policy's `when` conditions may name (`request.headers[...]`,
`request.auth.claims[...]`, ip and port keys) and the field pairs of a rule's `from.source` and
`to.operation` (`principals` / `notPrincipals`, ...): one vocabulary for the loader, the
evaluator, the canonical form, the RBAC compiler, placement, the Envoy limits check and
ext_authz's cache key, so they never disagree on what a key means or how it is spelled."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z:]+$")
_CLAIM_KEY = re.compile(r"^request\.auth\.claims((?:\[[^\[\]]+\])+)$")
_HEADER_KEY = re.compile(r"^request\.headers\[([^\[\]]*)\]$")
IP_KEYS = frozenset({"source.ip", "remote.ip", "destination.ip"})
PORT_KEYS = frozenset({"destination.port"})
PLAIN_KEYS = frozenset(
    {
        "source.namespace",
        "source.principal",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "connection.sni",
    }
)


def claim_path(key: str) -> tuple[str, ...] | None:
    """``request.auth.claims[a][b]`` -> ("a", "b")."""
    match = _CLAIM_KEY.match(key)
    if not match:
        return None
    return tuple(re.findall(r"\[([^\[\]]+)\]", match.group(1)))


def header_name(key: str) -> str | None:
    match = _HEADER_KEY.match(key)
    return match.group(1) if match else None


@dataclass(frozen=True)
class FieldPair:
    """A Source or Operation field and its negation, by their names in meshward.policy.model
    (``principals`` / ``not_principals``). ``http_only``: only an HTTP request has it, a TCP
    connection never does (Envoy's network RBAC cannot match it)."""

    name: str
    http_only: bool = False

    @property
    def negated(self) -> str:
        return f"not_{self.name}"


def _istio_key(name: str) -> str:
    """``not_ip_blocks`` -> ``notIpBlocks``: the model's name as an AuthorizationPolicy spells it."""
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


@dataclass(frozen=True)
class FieldForm:
    """One side of a :class:`FieldPair` as a consumer walks it: the model attribute
    (``not_principals``), the key as written in YAML (``notPrincipals``), and whether it
    negates. Precomputed once per pair so hot compile paths do no string work."""

    pair: FieldPair
    attr: str
    key: str
    negate: bool


def _by_name(*pairs: FieldPair) -> Mapping[str, FieldPair]:
    return {pair.name: pair for pair in pairs}


def _forms(pairs: Mapping[str, FieldPair]) -> tuple[FieldForm, ...]:
    """Each pair's field then its negation, in the vocabulary's order (which the canonical form
    and the evaluator's explanations list them in)."""
    return tuple(
        FieldForm(pair, attr, _istio_key(attr), negate)
        for pair in pairs.values()
        for attr, negate in ((pair.name, False), (pair.negated, True))
    )


SOURCE_FIELDS = _by_name(
    FieldPair("principals"),
    FieldPair("request_principals", http_only=True),  # the verified end-user JWT
    FieldPair("namespaces"),
    FieldPair("ip_blocks"),
    FieldPair("remote_ip_blocks"),
)
OPERATION_FIELDS = _by_name(
    FieldPair("hosts", http_only=True),
    FieldPair("ports"),
    FieldPair("methods", http_only=True),
    FieldPair("paths", http_only=True),
)
SOURCE_FORMS = _forms(SOURCE_FIELDS)
OPERATION_FORMS = _forms(OPERATION_FIELDS)
