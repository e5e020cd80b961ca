"""A local JWT issuer (RSA key + JWKS + token minting) for the demo, tests and the benchmark.

Real signatures with real keys: the demo shows end-user rules with tokens this issuer signs, and
the tests forge hostile ones (alg none, key confusion, wrong key) from the same material.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

DEFAULT_ISSUER = "https://issuer.meshward.local"


class LocalIssuer:
    def __init__(
        self, issuer: str = DEFAULT_ISSUER, *, kid: str = "meshward-demo-1", key_size: int = 2048
    ) -> None:
        self.issuer = issuer
        self.kid = kid
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)

    @property
    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            jwt.algorithms.RSAAlgorithm.to_jwk(self.private_key.public_key())
        )
        data.update(kid=self.kid, alg="RS256", use="sig")
        return data

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk()]}

    def jwks_json(self) -> str:
        return json.dumps(self.jwks(), separators=(",", ":"))

    def write_jwks(self, path: Path) -> Path:
        path.write_text(self.jwks_json())
        return path

    def token(
        self,
        subject: str = "alice",
        *,
        ttl: float = 600.0,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """An RS256 token from this issuer; claims override the defaults (iss, sub, iat, exp)."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "iat": now,
            "exp": now + int(ttl),
        }
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(
            payload,
            self.private_key,
            algorithm="RS256",
            headers={"kid": self.kid, **(headers or {})},
        )

    def request_authentication_yaml(
        self,
        namespace: str,
        name: str,
        labels: dict[str, str],
        *,
        jwks_uri: str | None = None,
        extra: str = "",
    ) -> str:
        """A RequestAuthentication document trusting this issuer (inline JWKS unless a URI)."""
        keys = (
            f"jwksUri: {json.dumps(jwks_uri)}"
            if jwks_uri
            else f"jwks: {json.dumps(self.jwks_json())}"
        )
        selector = ", ".join(f"{k}: {json.dumps(v)}" for k, v in labels.items())
        return (
            "apiVersion: security.istio.io/v1\n"
            "kind: RequestAuthentication\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\n"
            "spec:\n"
            f"  selector: {{matchLabels: {{{selector}}}}}\n"
            "  jwtRules:\n"
            f"  - issuer: {json.dumps(self.issuer)}\n"
            f"    {keys}\n" + extra
        )


def unsigned_token(payload: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    """``alg: none`` (or any header) with an empty signature: what an attacker sends."""

    def segment(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{segment(header or {'alg': 'none', 'typ': 'JWT'})}.{segment(payload)}."
