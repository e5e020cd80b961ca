"""requestPrincipals follow current Istio (1.21+): the pattern splits at its last '/', the
issuer must equal (or prefix/suffix-match) the part before it, the subject the part after."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from meshward.policy import Request, evaluate, parse
from meshward.policy.request_principal import (
    RequestPrincipal,
    pattern_parts,
    request_principals_predicate,
)

ACME = "https://login.acme.test"

CASES = [
    # (pattern, iss, sub, matches)
    (f"{ACME}/*", ACME, "alice", True),
    (f"{ACME}/*", f"{ACME}/tenant1", "alice", False),  # the review's finding
    (f"{ACME}/*", ACME, "", False),  # '*' is any non-empty subject
    (f"{ACME}/alice", ACME, "alice", True),
    (f"{ACME}/alice", f"{ACME}/alice", "", False),
    (f"{ACME}/al*", ACME, "alice", True),
    (f"{ACME}/al*", ACME, "bob", False),
    ("*/alice", "https://any.test", "alice", True),
    ("*/alice", "https://any.test", "bob", False),
    ("*.acme.test/alice", "https://login.acme.test", "alice", True),
    ("*.acme.test/alice", "https://login.acme.test/x", "alice", False),
    ("*alice", "https://any.test", "malice", True),  # no '/': a subject suffix
    ("acme*", "acme-corp", "anyone", True),  # no '/': an issuer prefix
    # 'https://' has slashes: the split gives iss 'https:/' and a subject prefix 'login'.
    ("https://login*", ACME, "anyone", False),
    ("https://login*", "https:/", "login-bot", True),
    ("*", "i", "s", True),
    ("*", "", "s", False),
    ("plain", "plain", "", True),
    ("plain", "plain", "x", False),
    (f"{ACME}/tenant1/alice", f"{ACME}/tenant1", "alice", True),
    (f"{ACME}/tenant1/alice", ACME, "tenant1/alice", False),  # same text, other claims
]


@pytest.mark.parametrize(("pattern", "iss", "sub", "matches"), CASES)
def test_split_at_the_last_slash(pattern: str, iss: str, sub: str, matches: bool) -> None:
    assert request_principals_predicate([pattern])(RequestPrincipal(iss, sub)) is matches


def test_no_token_never_matches() -> None:
    assert not request_principals_predicate(["*"])(None)


def _policy_set(key: str) -> Any:
    source = (
        f'from: [{{source: {{requestPrincipals: ["{ACME}/*"]}}}}]'
        if key == "requestPrincipals"
        else f'when: [{{key: request.auth.principal, values: ["{ACME}/*"]}}]'
    )
    return parse(
        {
            "p.yaml": f"""
apiVersion: meshward.dev/v1
kind: Workload
metadata: {{name: api, namespace: shop, labels: {{app: api}}}}
spec: {{ports: [{{port: 8080}}]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: acme, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  rules: [{{{source}}}]
"""
        }
    )


@pytest.mark.parametrize("key", ["requestPrincipals", "request.auth.principal"])
def test_evaluator_uses_the_split(key: str) -> None:
    ps = _policy_set(key)
    api = ps.workload("shop/api")
    assert api is not None

    def decide(iss: str) -> bool:
        request = Request(destination_port=8080, claims={"iss": iss, "sub": "alice"})
        return evaluate(ps, api, request, now=datetime.now(UTC)).allowed

    assert decide(ACME)
    assert not decide(f"{ACME}/tenant1")


@pytest.mark.parametrize(
    ("pattern", "iss", "sub"),
    [
        ("*", ("any", ""), ("any", "")),
        ("https://idp/alice", ("exact", "https://idp"), ("exact", "alice")),
        ("https://idp/*", ("exact", "https://idp"), ("any", "")),
        ("https://idp/al*", ("exact", "https://idp"), ("prefix", "al")),
        ("*/alice", ("any", ""), ("exact", "alice")),
        ("*idp/alice", ("suffix", "idp"), ("exact", "alice")),
        ("*ice", ("any", ""), ("suffix", "ice")),
        ("https:*", ("prefix", "https:"), ("any", "")),
        ("alice", ("exact", "alice"), ("exact", "")),
    ],
)
def test_one_reading_of_a_pattern_for_evaluator_and_compiler(
    pattern: str, iss: tuple[str, str], sub: tuple[str, str]
) -> None:
    """The module docstring's table, as the parts both the evaluator and the RBAC compiler
    (meshward.compile.authz.jwt_authn) are built from."""
    assert pattern_parts(pattern) == (iss, sub)
