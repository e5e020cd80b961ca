"""End-user tokens for the tour, signed with the demo-only key in ``examples/demo-keys``.

That key is public (it is in the repository) and is trusted only by ``examples/payments.yaml``;
tokens minted here prove nothing outside the demo.
"""

from __future__ import annotations

import time
from pathlib import Path

from meshward.errors import UserError

ISSUER = "https://auth.shop.example"
AUDIENCE = "payments"
KEY_ID = "shop-demo-1"


def mint(key_path: str | Path, *, scope: str, subject: str = "alice", ttl: int = 600) -> str:
    import jwt

    try:
        key = Path(key_path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the demo signing key {key_path}: {exc.strerror}") from None
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": subject,
        "aud": AUDIENCE,
        "scope": scope,
        "iat": now,
        "nbf": now - 5,
        "exp": now + ttl,
    }
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": KEY_ID})
