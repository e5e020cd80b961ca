"""End-user identity: find the JWT a RequestAuthentication names and verify it with pyjwt.

Istio semantics: no token -> anonymous (the request goes on without a request principal); a token
that is present but invalid for every matching rule -> rejected (401), including a token from an
issuer no rule names. Only the algorithms the issuer's own keys carry are accepted, per key, so
``alg: none`` and HS256-signed-with-the-RSA-public-key (key confusion) cannot pass.

Verified tokens are cached by their exact text until ``exp`` (and for at most ``token_ttl``):
signature checks cost tens of microseconds and the Check hot path has a budget of a few.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cachetools import LRUCache
from google.protobuf import json_format

from meshward.policy.model import JwtHeader, JwtRule

log = logging.getLogger("meshward.extauthz.tokens")

DEFAULT_LEEWAY = 60.0  # seconds of clock skew, as Envoy's jwt_authn clock_skew_seconds
DEFAULT_MAX_TOKEN_BYTES = 8192
DEFAULT_FETCH_TIMEOUT = 3.0
DEFAULT_REFRESH_INTERVAL = 30.0  # at most one refetch per issuer per interval on an unknown kid
DEFAULT_JWKS_MAX_AGE = 300.0  # a fetched JWKS is refetched after this (Envoy's default too)
DEFAULT_TOKEN_TTL = 300.0
NEGATIVE_TOKEN_TTL = 10.0

_RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGS = {"P-256": ("ES256",), "P-384": ("ES384",), "P-521": ("ES512",)}
_HMAC_ALGS = ("HS256", "HS384", "HS512")


class TokenRejected(Exception):
    """The request carried a token that must not pass; ``reason`` goes in the 401 body."""

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable  # may pass soon (keys not fetched yet): never cached


# ---- where tokens are --------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLocation:
    header: str | None = None  # lowercase header name
    prefix: str = ""
    param: str | None = None

    def __str__(self) -> str:
        if self.header is not None:
            return f"header {self.header}" + (
                f" (prefix {self.prefix.strip()!r})" if self.prefix else ""
            )
        return f"query parameter {self.param}"


AUTHORIZATION_BEARER = TokenLocation(header="authorization", prefix="Bearer ")
ACCESS_TOKEN_PARAM = TokenLocation(param="access_token")


def rule_locations(rule: JwtRule) -> tuple[TokenLocation, ...]:
    """Istio: explicit fromHeaders/fromParams, else ``Authorization: Bearer`` then
    ``?access_token=``."""
    if not rule.from_headers and not rule.from_params:
        return (AUTHORIZATION_BEARER, ACCESS_TOKEN_PARAM)
    headers = tuple(_header_location(h) for h in rule.from_headers)
    return headers + tuple(TokenLocation(param=p) for p in rule.from_params)


def _header_location(header: JwtHeader) -> TokenLocation:
    return TokenLocation(header=header.name.lower(), prefix=header.prefix)


def extract(
    location: TokenLocation, headers: Mapping[str, str], query: Mapping[str, str]
) -> str | None:
    if location.param is not None:
        return query.get(location.param) or None
    assert location.header is not None
    value = headers.get(location.header)
    if value is None:
        return None
    value = value.strip()
    prefix = location.prefix
    if prefix:
        if location.header == "authorization":  # the auth scheme is case-insensitive (RFC 7235)
            if value[: len(prefix)].lower() != prefix.lower():
                return None
        elif not value.startswith(prefix):
            return None
        value = value[len(prefix) :].strip()
    return value or None


_NO_QUERY: Mapping[str, str] = {}


def parse_query(path: str) -> dict[str, str]:
    _, sep, query = path.partition("?")
    if not sep:
        return {}
    query = query.partition("#")[0]
    out: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        out.setdefault(name, value)
    return out


# ---- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerificationKey:
    kid: str | None
    algorithms: tuple[str, ...]
    key: Any  # what pyjwt takes for these algorithms
    kty: str


def key_algorithms(jwk: Mapping[str, Any]) -> tuple[str, ...]:
    """The algorithms a JWK may verify: its own ``alg`` if set, else its family's."""
    kty = jwk.get("kty")
    family: tuple[str, ...]
    if kty == "RSA":
        family = _RSA_ALGS
    elif kty == "EC":
        family = _EC_ALGS.get(str(jwk.get("crv", "P-256")), ())
    elif kty == "OKP":
        family = ("EdDSA",) if jwk.get("crv") == "Ed25519" else ()
    elif kty == "oct":
        family = _HMAC_ALGS
    else:
        family = ()
    alg = jwk.get("alg")
    if alg is not None:
        return (alg,) if alg in family else ()
    return family


def parse_jwks(text: str | bytes) -> tuple[VerificationKey, ...]:
    """Usable verification keys from a JWKS document; unusable keys are skipped with a log line.
    Raises ValueError when the document is not a JWKS or holds no usable key."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"JWKS is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('JWKS must be an object with a "keys" list')
    keys: list[VerificationKey] = []
    for index, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        algorithms = key_algorithms(jwk)
        if not algorithms:
            log.warning("JWKS key %d skipped: unsupported kty/crv/alg", index)
            continue
        try:
            parsed = jwt.PyJWK(jwk, algorithm=algorithms[0])
        except jwt.PyJWTError as exc:
            log.warning("JWKS key %d skipped: %s", index, exc)
            continue
        kid = jwk.get("kid")
        keys.append(
            VerificationKey(
                kid if isinstance(kid, str) else None, algorithms, parsed.key, str(jwk["kty"])
            )
        )
    if not keys:
        raise ValueError("JWKS holds no usable signing key")
    return tuple(keys)


Fetcher = Callable[[str, float], bytes]


def fetch_uri(uri: str, timeout: float) -> bytes:
    """file:// reads the file; http(s):// GETs with a timeout. Anything else is refused."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path)).read_bytes()
    if parsed.scheme in ("http", "https"):
        request = urllib.request.Request(uri, headers={"accept": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data: bytes = response.read(1 << 20)
            return data
    raise ValueError(
        f"unsupported jwksUri scheme {parsed.scheme!r} (use file://, http:// or https://)"
    )


class JwksSource:
    """One issuer's key set: inline (fixed) or from ``jwksUri`` (fetched lazily with a timeout,
    kept for ``max_age``, refetched on an unknown ``kid`` at most once per ``refresh_interval``).
    A failed fetch keeps the previous keys."""

    def __init__(
        self,
        *,
        inline: str | None = None,
        uri: str | None = None,
        fetcher: Fetcher = fetch_uri,
        timeout: float = DEFAULT_FETCH_TIMEOUT,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        max_age: float = DEFAULT_JWKS_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.uri = uri
        self._fetcher = fetcher
        self._timeout = timeout
        self._refresh_interval = refresh_interval
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: tuple[VerificationKey, ...] = ()
        self._error: str | None = None
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self.fetches = 0
        if inline is not None:
            self.uri = None
            try:
                self._keys = parse_jwks(inline)
            except ValueError as exc:
                self._error = f"inline JWKS invalid: {exc}"
        elif uri is None:
            self._error = "no jwks or jwksUri configured for this issuer"

    def keys(self) -> tuple[VerificationKey, ...]:
        if self.uri is not None:
            now = self._clock()
            if self._fetched_at is None or now - self._fetched_at >= self._max_age:
                self._refresh(now)
        if not self._keys and self._error:
            raise TokenRejected(f"cannot verify token: {self._error}", retryable=True)
        return self._keys

    def refresh_for_unknown_kid(self) -> bool:
        """Refetch if allowed now; True when a fetch happened (the caller looks again)."""
        if self.uri is None:
            return False
        return self._refresh(self._clock())

    def _refresh(self, now: float) -> bool:
        """One fetch, unless one was attempted too recently: ``refresh_interval`` after a good
        fetch, at most once a second after a failed one (so a JWKS server that comes up late
        is picked up quickly, and one that is down is not hammered)."""
        with self._lock:
            if self._attempted_at is not None:
                wait = (
                    self._refresh_interval
                    if self._error is None
                    else min(1.0, self._refresh_interval)
                )
                if now - self._attempted_at < wait:
                    return False
            self._attempted_at = now
            self.fetches += 1
            assert self.uri is not None
            try:
                self._keys = parse_jwks(self._fetcher(self.uri, self._timeout))
            except Exception as exc:  # keep serving the last good keys
                self._error = f"JWKS fetch from {self.uri} failed: {exc}"
                log.warning("%s", self._error)
                return True
            self._fetched_at = now
            self._error = None
            return True


# ---- a payload Envoy's jwt_authn verified (jwtEnforcement: native) ---------------------------

JWT_AUTHN_NAMESPACE = "envoy.filters.http.jwt_authn"  # meshward.compile.authz.jwt_authn writes here
JWT_PAYLOAD_KEY = "payload"


def payload_from_metadata(metadata_context: Any) -> dict[str, Any] | None:
    """The verified JWT payload jwt_authn put in dynamic metadata, as Envoy's ext_authz sends
    it (``metadata_context_namespaces``); None when the request carried no token."""
    namespace = metadata_context.filter_metadata.get(JWT_AUTHN_NAMESPACE)
    if namespace is None or JWT_PAYLOAD_KEY not in namespace.fields:
        return None
    value = namespace.fields[JWT_PAYLOAD_KEY]
    if value.WhichOneof("kind") != "struct_value":
        return None
    payload = json_format.MessageToDict(value.struct_value)
    return payload if isinstance(payload, dict) else None


def payload_principal(claims: Mapping[str, Any] | None) -> str | None:
    """Istio's request principal ``iss/sub`` of a verified payload."""
    if claims is None:
        return None
    iss, sub = claims.get("iss"), claims.get("sub")
    return f"{iss}/{sub}" if isinstance(iss, str) and isinstance(sub, str) else None


def payload_expiry(claims: Mapping[str, Any] | None) -> float | None:
    """The payload's ``exp`` (epoch seconds), for cache entries that must not outlive it."""
    exp = claims.get("exp") if claims is not None else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


# ---- verification ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedToken:
    claims: Mapping[str, Any] = field(hash=False)
    principal: str  # iss/sub, Istio's request principal
    rule: JwtRule
    location: TokenLocation
    payload_segment: str  # base64url payload, for outputPayloadToHeader
    expires_at: float | None  # epoch seconds (the token's exp)


_EXCEPTION_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid (nbf/iat in the future)"),
    (jwt.InvalidIssuerError, "token issuer does not match"),
    (jwt.InvalidAudienceError, "token audience not allowed"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim"),
    (jwt.InvalidSignatureError, "token signature invalid"),
    (jwt.InvalidAlgorithmError, "token algorithm not allowed"),
    (jwt.InvalidIssuedAtError, "token iat invalid"),
    (jwt.InvalidKeyError, "token key unusable"),
    (jwt.DecodeError, "token malformed"),
)


def _reason(exc: Exception) -> str:
    for kind, reason in _EXCEPTION_REASONS:
        if isinstance(exc, kind):
            detail = str(exc)
            return (
                f"{reason}: {detail}"
                if detail and kind is jwt.MissingRequiredClaimError
                else reason
            )
    return f"token invalid: {type(exc).__name__}"


def _b64json(segment: str) -> Any:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise TokenRejected("token malformed") from exc


def split_token(token: str, max_bytes: int) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Header and payload of a compact JWS, unverified; rejects the shapes no issuer makes."""
    if len(token) > max_bytes:
        raise TokenRejected(f"token too large ({len(token)} bytes > {max_bytes})")
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise TokenRejected("token malformed: expected three dot-separated segments")
    header = _b64json(parts[0])
    payload = _b64json(parts[1])
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise TokenRejected("token malformed: header and payload must be JSON objects")
    return header, payload, parts[1]


class JwtVerifier:
    """Verifies tokens for a workload's JWT rules. Thread-safe; JWKS sources are shared by
    (jwks, jwksUri) so policy reloads do not refetch keys."""

    def __init__(
        self,
        *,
        leeway: float = DEFAULT_LEEWAY,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        jwks_max_age: float = DEFAULT_JWKS_MAX_AGE,
        token_ttl: float = DEFAULT_TOKEN_TTL,
        token_cache_size: int = 10_000,
        fetcher: Fetcher = fetch_uri,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.leeway = leeway
        self.max_token_bytes = max_token_bytes
        self._source_options = {
            "fetcher": fetcher,
            "timeout": fetch_timeout,
            "refresh_interval": refresh_interval,
            "max_age": jwks_max_age,
            "clock": clock,
        }
        self._sources: dict[tuple[str | None, str | None], JwksSource] = {}
        self._sources_lock = threading.Lock()
        self._token_ttl = token_ttl
        self._wall = wall_clock
        self._clock = clock
        # (token, rules id, location index) -> (monotonic expiry, verified token or rejection)
        self._cache: LRUCache[tuple[str, int, int], tuple[float, VerifiedToken | str]] = LRUCache(
            maxsize=token_cache_size
        )
        self._cache_lock = threading.Lock()
        self.verifications = 0  # signature checks actually run (cache misses)
        self._rule_ids: dict[tuple[JwtRule, ...], int] = {}
        self._locations: dict[int, tuple[TokenLocation, ...]] = {}

    def rules_id(self, rules: Sequence[JwtRule]) -> int:
        """A small exact id for a rule set (interned), for the verified-token cache key."""
        key = tuple(rules)
        with self._sources_lock:
            found = self._rule_ids.get(key)
            if found is None:
                found = self._rule_ids[key] = len(self._rule_ids) + 1
                self._locations[found] = tuple(_unique_locations(key))
            return found

    def source(self, rule: JwtRule) -> JwksSource:
        key = (rule.jwks, None if rule.jwks is not None else rule.jwks_uri)
        with self._sources_lock:
            found = self._sources.get(key)
            if found is None:
                found = JwksSource(inline=rule.jwks, uri=rule.jwks_uri, **self._source_options)  # type: ignore[arg-type]
                self._sources[key] = found
            return found

    def authenticate(
        self,
        rules: Sequence[JwtRule],
        headers: Mapping[str, str],
        path: str,
        *,
        rules_id: int = 0,
    ) -> VerifiedToken | None:
        """The verified token, or None when the request carries none (anonymous).

        Raises TokenRejected when a token is present but does not verify. ``rules_id`` (from
        ``rules_id(rules)``, computed here when 0) names the rule set in the verified-token
        cache: the same text may be valid for one workload and not for another.
        """
        if not rules:
            return None
        if not rules_id:
            rules_id = self.rules_id(rules)
        locations = self._locations[rules_id]
        found = _first_token(locations, headers, path)  # Envoy verifies the first one it finds
        if found is None:
            return None
        token, index = found
        location = locations[index]
        key = (token, rules_id, index)
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0] <= self._clock():
                del self._cache[key]
                cached = None
        if cached is not None:
            result = cached[1]
            if isinstance(result, str):
                raise TokenRejected(result)
            return result
        try:
            verified = self._verify(token, location, rules)
        except TokenRejected as rejected:
            if not rejected.retryable:
                self._remember(key, self._clock() + NEGATIVE_TOKEN_TTL, rejected.reason)
            raise
        until = self._clock() + self._token_ttl
        if verified.expires_at is not None:
            until = min(until, self._clock() + (verified.expires_at - self._wall()))
        self._remember(key, until, verified)
        return verified

    def _remember(
        self, key: tuple[str, int, int], until: float, value: VerifiedToken | str
    ) -> None:
        if until <= self._clock():
            return
        with self._cache_lock:
            self._cache[key] = (until, value)

    def _verify(
        self, token: str, location: TokenLocation, rules: Sequence[JwtRule]
    ) -> VerifiedToken:
        with self._sources_lock:
            self.verifications += 1
        header, payload, payload_segment = split_token(token, self.max_token_bytes)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none" or not alg:
            raise TokenRejected("token algorithm 'none' is not allowed")
        issuer = payload.get("iss")
        if not isinstance(issuer, str):
            raise TokenRejected("token has no issuer (iss)")
        candidates = [r for r in rules if r.issuer == issuer and location in rule_locations(r)]
        if not candidates:
            if any(r.issuer == issuer for r in rules):
                raise TokenRejected(
                    f"token from {issuer!r} found in {location}, where its rule does not look"
                )
            raise TokenRejected(f"token issuer {issuer!r} is not configured")
        first_error: TokenRejected | None = None
        for rule in candidates:
            try:
                claims = self._verify_with(rule, token, header, alg)
            except TokenRejected as exc:
                first_error = first_error or exc
                continue
            exp = claims.get("exp")
            return VerifiedToken(
                claims=claims,
                principal=f"{claims.get('iss', '')}/{claims.get('sub', '')}",
                rule=rule,
                location=location,
                payload_segment=payload_segment,
                expires_at=float(exp) if isinstance(exp, int | float) else None,
            )
        assert first_error is not None
        raise first_error

    def _verify_with(
        self, rule: JwtRule, token: str, header: Mapping[str, Any], alg: str
    ) -> dict[str, Any]:
        source = self.source(rule)
        kid = header.get("kid")
        keys = _matching(source.keys(), kid)
        if kid is not None and not keys and source.refresh_for_unknown_kid():
            keys = _matching(source.keys(), kid)
        if not keys:
            raise TokenRejected(f"token key id {kid!r} is not in the issuer's JWKS", retryable=True)
        usable = [k for k in keys if alg in k.algorithms]
        if not usable:
            raise TokenRejected(f"token algorithm {alg!r} is not one the issuer's keys use")
        options: dict[str, Any] = {"verify_aud": bool(rule.audiences)}
        last: Exception | None = None
        for key in usable:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key=key.key,
                    algorithms=[alg],
                    audience=list(rule.audiences) if rule.audiences else None,
                    issuer=rule.issuer,
                    leeway=self.leeway,
                    options=options,  # type: ignore[arg-type]
                )
                return claims
            except jwt.InvalidSignatureError as exc:
                last = exc  # another key without a kid may match
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                raise TokenRejected(_reason(exc)) from exc
        assert last is not None
        raise TokenRejected(_reason(last))


def _first_token(
    locations: Sequence[TokenLocation], headers: Mapping[str, str], path: str
) -> tuple[str, int] | None:
    """(token, index of its location) for the first location holding one."""
    query: dict[str, str] | None = None
    for index, location in enumerate(locations):
        if location.param is not None:
            if query is None:
                query = parse_query(path) if "?" in path else {}
            token = extract(location, headers, query)
        else:
            token = extract(location, headers, _NO_QUERY)
        if token is not None:
            return token, index
    return None


def _matching(keys: Sequence[VerificationKey], kid: object) -> list[VerificationKey]:
    if kid is None:
        return list(keys)
    return [k for k in keys if k.kid == kid]


def _unique_locations(rules: Sequence[JwtRule]) -> list[TokenLocation]:
    seen: list[TokenLocation] = []
    for rule in rules:
        for location in rule_locations(rule):
            if location not in seen:
                seen.append(location)
    return seen
