"""End-user tokens: every hostile case is a 401 with a reason; no token is anonymous; keys come
from inline JWKS, file:// and http:// (real local server), refreshed on an unknown kid at most
once per interval."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from meshward.extauthz.tokens import JwtVerifier, TokenRejected, parse_jwks, rule_locations
from meshward.policy import JwtHeader, JwtRule
from meshward.testing.jwt_issuer import LocalIssuer, unsigned_token


def _rule(issuer: LocalIssuer, **kw: Any) -> JwtRule:
    kw.setdefault("jwks", issuer.jwks_json())
    return JwtRule(issuer=issuer.issuer, **kw)


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _rejected(
    verifier: JwtVerifier, rules: list[JwtRule], headers: dict[str, str], path: str = "/"
) -> str:
    with pytest.raises(TokenRejected) as info:
        verifier.authenticate(rules, headers, path)
    return info.value.reason


# ---- the happy path and anonymity --------------------------------------------------------------


def test_valid_token_yields_claims_and_request_principal(issuer: LocalIssuer) -> None:
    verified = JwtVerifier().authenticate(
        [_rule(issuer)], _bearer(issuer.token("bob", groups=["a"])), "/"
    )
    assert verified is not None
    assert verified.principal == f"{issuer.issuer}/bob"
    assert verified.claims["groups"] == ["a"]
    assert verified.location.header == "authorization"


def test_no_token_is_anonymous_and_no_rules_ignore_tokens(issuer: LocalIssuer) -> None:
    verifier = JwtVerifier()
    assert verifier.authenticate([_rule(issuer)], {"x-other": "1"}, "/") is None
    assert verifier.authenticate([], _bearer("garbage"), "/") is None  # no RequestAuthentication
    assert (
        verifier.authenticate([_rule(issuer)], {"authorization": "Basic dXNlcjpwYXNz"}, "/") is None
    )


def test_bearer_scheme_is_case_insensitive(issuer: LocalIssuer) -> None:
    token = issuer.token()
    assert (
        JwtVerifier().authenticate([_rule(issuer)], {"authorization": f"bearer {token}"}, "/")
        is not None
    )


# ---- hostile tokens ----------------------------------------------------------------------------


def test_alg_none_is_rejected(issuer: LocalIssuer) -> None:
    token = unsigned_token({"iss": issuer.issuer, "sub": "mallory", "exp": int(time.time()) + 60})
    assert "none" in _rejected(JwtVerifier(), [_rule(issuer)], _bearer(token))


def test_alg_none_with_a_signature_is_still_rejected(issuer: LocalIssuer) -> None:
    token = (
        unsigned_token({"iss": issuer.issuer, "sub": "m"}, {"alg": "None", "kid": issuer.kid})
        + "c2ln"
    )
    assert "none" in _rejected(JwtVerifier(), [_rule(issuer)], _bearer(token))


def test_hs256_signed_with_the_rsa_public_key_is_rejected(issuer: LocalIssuer) -> None:
    """Key confusion: the attacker knows the public key and signs HMAC with it."""
    payload = {"iss": issuer.issuer, "sub": "mallory", "exp": int(time.time()) + 60}
    header = {"alg": "HS256", "kid": issuer.kid, "typ": "JWT"}
    signing_input = b".".join(
        base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=")
        for part in (header, payload)
    )
    import hashlib
    import hmac

    signature = base64.urlsafe_b64encode(
        hmac.new(issuer.public_pem, signing_input, hashlib.sha256).digest()
    ).rstrip(b"=")
    token = (signing_input + b"." + signature).decode()
    reason = _rejected(JwtVerifier(), [_rule(issuer)], _bearer(token))
    assert "HS256" in reason and "not one the issuer's keys use" in reason


def test_forged_signature_same_kid_is_rejected(
    issuer: LocalIssuer, other_issuer: LocalIssuer
) -> None:
    forged = other_issuer.token("mallory")  # same iss and kid, attacker's key
    assert _rejected(JwtVerifier(), [_rule(issuer)], _bearer(forged)) == "token signature invalid"


def test_tampered_payload_is_rejected(issuer: LocalIssuer) -> None:
    header, _, signature = issuer.token("alice").split(".")
    payload = (
        base64.urlsafe_b64encode(
            json.dumps(
                {"iss": issuer.issuer, "sub": "admin", "exp": int(time.time()) + 60}
            ).encode()
        )
        .rstrip(b"=")
        .decode()
    )
    assert (
        _rejected(JwtVerifier(), [_rule(issuer)], _bearer(f"{header}.{payload}.{signature}"))
        == "token signature invalid"
    )


def test_expired_not_yet_valid_and_leeway(issuer: LocalIssuer) -> None:
    now = int(time.time())
    rules = [_rule(issuer)]
    assert (
        _rejected(JwtVerifier(leeway=0), rules, _bearer(issuer.token(exp=now - 10)))
        == "token expired"
    )
    assert (
        JwtVerifier(leeway=60).authenticate(rules, _bearer(issuer.token(exp=now - 10)), "/")
        is not None
    )
    future = issuer.token(nbf=now + 600, iat=now)
    assert "not yet valid" in _rejected(JwtVerifier(leeway=60), rules, _bearer(future))
    assert (
        JwtVerifier(leeway=60).authenticate(rules, _bearer(issuer.token(nbf=now + 30)), "/")
        is not None
    )


def test_unknown_issuer_and_wrong_issuer(issuer: LocalIssuer) -> None:
    stranger = LocalIssuer("https://evil.example")
    assert "not configured" in _rejected(JwtVerifier(), [_rule(issuer)], _bearer(stranger.token()))
    token = issuer.token(iss=None)  # no iss claim at all
    assert "no issuer" in _rejected(JwtVerifier(), [_rule(issuer)], _bearer(token))


def test_audiences(issuer: LocalIssuer) -> None:
    rules = [_rule(issuer, audiences=("api", "web"))]
    verifier = JwtVerifier()
    assert verifier.authenticate(rules, _bearer(issuer.token(aud="web")), "/") is not None
    assert verifier.authenticate(rules, _bearer(issuer.token(aud=["x", "api"])), "/") is not None
    assert (
        _rejected(verifier, rules, _bearer(issuer.token(aud="other")))
        == "token audience not allowed"
    )
    assert "required claim" in _rejected(verifier, rules, _bearer(issuer.token()))
    # No audiences configured: aud is not checked.
    assert (
        verifier.authenticate([_rule(issuer)], _bearer(issuer.token(aud="anything")), "/")
        is not None
    )


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("abc", "three dot-separated segments"),
        ("a.b", "three dot-separated segments"),
        ("a.b.c.d", "three dot-separated segments"),
        ("..sig", "three dot-separated segments"),
        ("!!!.@@@.###", "token malformed"),
        (
            base64.urlsafe_b64encode(b"[1]").decode()
            + "."
            + base64.urlsafe_b64encode(b"{}").decode()
            + ".x",
            "JSON objects",
        ),
        (
            base64.urlsafe_b64encode(b'{"alg":"RS256"}').decode() + ".bm90IGpzb24.x",
            "token malformed",
        ),
    ],
)
def test_malformed_tokens(issuer: LocalIssuer, token: str, reason: str) -> None:
    assert reason in _rejected(JwtVerifier(), [_rule(issuer)], _bearer(token))


def test_oversized_token(issuer: LocalIssuer) -> None:
    big = issuer.token(padding="x" * 10_000)
    assert "too large" in _rejected(
        JwtVerifier(max_token_bytes=8192), [_rule(issuer)], _bearer(big)
    )


def test_algorithm_outside_the_keys_own_is_rejected(issuer: LocalIssuer) -> None:
    """The JWK says RS256: a PS256 signature by the same key is still refused."""
    token = jwt.encode(
        {"iss": issuer.issuer, "sub": "a"},
        issuer.private_key,
        algorithm="PS256",
        headers={"kid": issuer.kid},
    )
    assert "PS256" in _rejected(JwtVerifier(), [_rule(issuer)], _bearer(token))


def test_ec_keys_and_keys_without_kid() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))  # no kid, no alg
    rule = JwtRule(issuer="https://ec.example", jwks=json.dumps({"keys": [jwk]}))
    token = jwt.encode({"iss": "https://ec.example", "sub": "e"}, key, algorithm="ES256")
    assert JwtVerifier().authenticate([rule], _bearer(token), "/") is not None
    rs = jwt.encode({"iss": "https://ec.example", "sub": "e"}, "s" * 32, algorithm="HS256")
    assert "HS256" in _rejected(JwtVerifier(), [rule], _bearer(rs))


def test_invalid_inline_jwks_rejects_with_a_reason(issuer: LocalIssuer) -> None:
    rule = JwtRule(issuer=issuer.issuer, jwks='{"keys": []}')
    assert "inline JWKS invalid" in _rejected(JwtVerifier(), [rule], _bearer(issuer.token()))
    with pytest.raises(ValueError):
        parse_jwks("not json")


# ---- locations ---------------------------------------------------------------------------------


def test_from_headers_with_prefix_and_from_params(issuer: LocalIssuer) -> None:
    rule = _rule(issuer, from_headers=(JwtHeader("X-Jwt", "Token "),), from_params=("tok",))
    assert [str(loc) for loc in rule_locations(rule)] == [
        "header x-jwt (prefix 'Token')",
        "query parameter tok",
    ]
    verifier = JwtVerifier()
    token = issuer.token()
    assert verifier.authenticate([rule], {"x-jwt": f"Token {token}"}, "/") is not None
    assert (
        verifier.authenticate([rule], {"x-jwt": token}, "/") is None
    )  # prefix missing: not a token there
    found = verifier.authenticate([rule], {}, f"/path?a=1&tok={token}")
    assert found is not None and found.location.param == "tok"
    # The default locations are not looked at when explicit ones are configured.
    assert verifier.authenticate([rule], _bearer(token), "/") is None


def test_default_locations_include_access_token_param(issuer: LocalIssuer) -> None:
    token = issuer.token()
    found = JwtVerifier().authenticate([_rule(issuer)], {}, f"/x?access_token={token}")
    assert found is not None and found.location.param == "access_token"


def test_token_where_its_issuers_rule_does_not_look(issuer: LocalIssuer) -> None:
    stranger = LocalIssuer("https://other.example")
    rules = [
        _rule(issuer, from_headers=(JwtHeader("x-a"),)),
        JwtRule(
            issuer=stranger.issuer, jwks=stranger.jwks_json(), from_headers=(JwtHeader("x-b"),)
        ),
    ]
    reason = _rejected(JwtVerifier(), rules, {"x-b": issuer.token()})
    assert "where its rule does not look" in reason


# ---- caching and JWKS sources ------------------------------------------------------------------


def test_verified_tokens_are_cached_until_exp(issuer: LocalIssuer) -> None:
    mono = [100.0]
    wall = [time.time()]
    verifier = JwtVerifier(clock=lambda: mono[0], wall_clock=lambda: wall[0])
    rules = [_rule(issuer)]
    token = issuer.token(ttl=30)
    rid = verifier.rules_id(rules)
    for _ in range(3):
        assert verifier.authenticate(rules, _bearer(token), "/", rules_id=rid) is not None
    assert verifier.verifications == 1
    mono[0] += 31  # past exp on our clock: verify again (pyjwt's leeway still accepts it)
    wall[0] += 31
    verifier.authenticate(rules, _bearer(token), "/", rules_id=rid)
    assert verifier.verifications == 2


def test_rejections_are_cached_briefly(issuer: LocalIssuer, other_issuer: LocalIssuer) -> None:
    verifier = JwtVerifier()
    rules = [_rule(issuer)]
    forged = other_issuer.token()
    for _ in range(3):
        _rejected(verifier, rules, _bearer(forged))
    assert verifier.verifications == 1


def test_file_jwks_refreshes_on_unknown_kid_at_most_once_per_interval(tmp_path: Path) -> None:
    first, second = LocalIssuer(kid="k1"), LocalIssuer(kid="k2")
    jwks_path = first.write_jwks(tmp_path / "jwks.json")
    mono = [0.0]
    verifier = JwtVerifier(refresh_interval=30, clock=lambda: mono[0])
    rule = JwtRule(issuer=first.issuer, jwks_uri=jwks_path.as_uri())
    assert verifier.authenticate([rule], _bearer(first.token()), "/") is not None
    source = verifier.source(rule)
    assert source.fetches == 1
    # Key rotation: k2 appears in the file, but the last fetch was just now.
    jwks_path.write_text(json.dumps({"keys": [first.jwk(), second.jwk()]}))
    mono[0] += 1
    assert "k2" in _rejected(verifier, [rule], _bearer(second.token()))
    assert "k2" in _rejected(verifier, [rule], _bearer(second.token("x")))
    assert source.fetches == 1  # no refetch inside the interval, however many unknown kids
    mono[0] += 30
    assert verifier.authenticate([rule], _bearer(second.token()), "/") is not None
    assert source.fetches == 2


class _JwksHandler(http.server.BaseHTTPRequestHandler):
    body = b""
    delay = 0.0
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        time.sleep(type(self).delay)
        # The slow and oversized cases have the client give up first; a broken pipe then is
        # expected, and socketserver would print its traceback into a later test's stderr.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, type[_JwksHandler]]]:
    handler = type("Handler", (_JwksHandler,), {"hits": 0, "delay": 0.0, "body": b""})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", handler
    server.shutdown()
    server.server_close()


def test_http_jwks_is_fetched_once_and_cached(
    issuer: LocalIssuer, jwks_server: tuple[str, Any]
) -> None:
    url, handler = jwks_server
    handler.body = issuer.jwks_json().encode()
    verifier = JwtVerifier()
    rule = JwtRule(issuer=issuer.issuer, jwks_uri=url)
    for sub in ("a", "b", "c"):
        assert verifier.authenticate([rule], _bearer(issuer.token(sub)), "/") is not None
    assert handler.hits == 1


def test_http_jwks_timeout_rejects_with_a_reason(
    issuer: LocalIssuer, jwks_server: tuple[str, Any]
) -> None:
    url, handler = jwks_server
    handler.body = issuer.jwks_json().encode()
    handler.delay = 1.0
    verifier = JwtVerifier(fetch_timeout=0.2)
    start = time.monotonic()
    reason = _rejected(
        verifier, [JwtRule(issuer=issuer.issuer, jwks_uri=url)], _bearer(issuer.token())
    )
    assert time.monotonic() - start < 0.9
    assert "JWKS fetch" in reason and "failed" in reason


def test_unsupported_jwks_scheme(issuer: LocalIssuer) -> None:
    rule = JwtRule(issuer=issuer.issuer, jwks_uri="ftp://example/jwks")
    assert "unsupported jwksUri scheme" in _rejected(JwtVerifier(), [rule], _bearer(issuer.token()))


def test_a_token_cached_for_one_rule_set_is_checked_again_for_another(issuer: LocalIssuer) -> None:
    verifier = JwtVerifier()
    token = issuer.token()
    assert verifier.authenticate([_rule(issuer)], _bearer(token), "/") is not None
    strict = [_rule(issuer, audiences=("payments",))]
    assert "required claim" in _rejected(verifier, strict, _bearer(token))
    assert verifier.rules_id([_rule(issuer)]) != verifier.rules_id(strict)
