"""The attribute keys a policy's `when` conditions may name (`request.headers[...]`,
`request.auth.claims[...]`, ip and port keys): one vocabulary for the loader, the evaluator, the
RBAC compiler and ext_authz's cache key, so they never disagree on what a key means."""

from __future__ import annotations

import re

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
