"""End-user JWTs decided by Envoy: RequestAuthentication -> ``jwt_authn``, and ``requestPrincipals``
/ ``request.auth.*`` -> RBAC ``metadata`` matchers on the verified payload (as Istio does).

Why natively: every request through the Python ext_authz service costs ~10x what Envoy's own
jwt_authn filter (with its token cache) + RBAC cost (issue 16). ext_authz keeps CUSTOM.

The filter (one per inbound HTTP chain of a workload a RequestAuthentication selects):

- one provider per issuer (rules naming the same issuer merge: token locations and audiences
  unite, any ``forwardOriginalToken`` forwards); keys inline (``local_jwks``): the control plane
  fetches every ``jwksUri`` (meshward.xds.jwks) and passes the documents in as data, so compile
  stays pure and sidecars need no route to the identity provider. A ``jwksUri`` whose keys were
  never fetched gets a key nobody holds (:data:`NO_KEYS_JWKS`): every token for that issuer
  fails (401), fail closed;
- requirement ``requires_any`` of every provider plus ``allow_missing``: Istio's semantics - no
  token passes without a request principal, a present token that no provider verifies is 401;
- every provider writes the verified payload to the same dynamic metadata key
  (``payload_in_metadata``: :data:`PAYLOAD_KEY`) under ``envoy.filters.http.jwt_authn``, which
  the RBAC matchers below read; ``jwt_cache_config`` caches verified tokens (bounded).

Matchers (same meaning as meshward.policy.evaluate; the equivalence test drives real Envoy):

- request principal ``ISS/SUB`` patterns are split at the LAST ``/`` exactly as
  meshward.policy.request_principal does, and match the ``iss`` and ``sub`` claims separately
  (plain jwt_authn has no combined ``iss/sub`` value; Istio's newer ``istio_authn`` filter is
  Istio-specific);
- ``request.auth.audiences`` (``aud``), ``presenter`` (``azp``), ``claims[a][b]`` match a
  string claim or any string of a list claim (``ValueMatcher`` ``string_match`` OR
  ``list_match.one_of``); ``scope`` and ``permission`` are space-delimited lists when strings
  (Istio 1.21+), matched element-wise with an anchored regex.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from meshward.compile.authz import matchers as m
from meshward.compile.authz.matchers import Json
from meshward.policy.matching import SPACE_DELIMITED_CLAIMS
from meshward.policy.model import JwtRule, RequestAuthentication
from meshward.policy.paths import re2_escape
from meshward.policy.request_principal import ClaimMatch, pattern_parts
from meshward.policy.vocabulary import claim_path

FILTER_JWT_AUTHN = "envoy.filters.http.jwt_authn"
T_JWT_AUTHN = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
T_JWT_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig"
PAYLOAD_KEY = "payload"  # dynamic metadata key of the verified payload (every provider)
JWT_CACHE_SIZE = 1000  # verified tokens cached per worker thread (Envoy's default is 100)
JWT_MAX_TOKEN_BYTES = 8192  # tokens above this are not cached (still verified)
# Envoy refuses a provider whose local JWKS has no valid public key (the whole listener would
# be NACKed), so an issuer without keys (a jwksUri never fetched, an inline JWKS with no key)
# gets this one: a P-256 public key whose private half was discarded when it was generated.
# Nothing verifies against it: every token for that issuer is a 401 (fail closed).
NO_KEYS_JWKS = (
    '{"keys":[{"kty":"EC","crv":"P-256","x":"ik0cDL6cMOpCafqlr7uIrmAkAX47_SzkhyS-VJWNP7g",'
    '"y":"E3Wwtcy-QlJxN8WNXyeJkx8s2S5rtK3dH0Gq_cuUlJ4","kid":"meshward-no-keys","alg":"ES256",'
    '"use":"sig"}]}'
)
JWT_ROUTE_DISABLED: Json = {"@type": T_JWT_ROUTE, "disabled": True}


@dataclass
class _Provider:
    """One issuer's provider, merged from every JWT rule naming it."""

    issuer: str
    jwks: str
    audiences: set[str] | None = field(default_factory=set)  # None: some rule takes any
    headers: dict[str, str] = field(default_factory=dict)  # lowercase name -> value prefix
    params: set[str] = field(default_factory=set)
    default_locations: bool = False
    forward: bool = False
    payload_header: str | None = None


def _keys(rule: JwtRule, jwks: Mapping[str, str]) -> str:
    text = rule.jwks
    if text is None and rule.jwks_uri is not None:
        text = jwks.get(rule.jwks_uri)
    return text if text is not None and _has_keys(text) else NO_KEYS_JWKS


def _has_keys(text: str) -> bool:
    """A JWKS object with at least one key (Envoy refuses an empty one)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("keys"), list) and bool(doc["keys"])


def _providers(
    request_authentications: Iterable[RequestAuthentication], jwks: Mapping[str, str]
) -> list[_Provider]:
    by_issuer: dict[str, _Provider] = {}
    for ra in request_authentications:
        for rule in ra.jwt_rules:
            provider = by_issuer.get(rule.issuer)
            if provider is None:
                provider = by_issuer[rule.issuer] = _Provider(rule.issuer, _keys(rule, jwks))
            if provider.audiences is not None:
                if rule.audiences:
                    provider.audiences.update(rule.audiences)
                else:
                    provider.audiences = None
            if not rule.from_headers and not rule.from_params:
                provider.default_locations = True
            for h in rule.from_headers:
                provider.headers.setdefault(h.name.lower(), h.prefix)
            provider.params.update(rule.from_params)
            provider.forward = provider.forward or rule.forward_original_token
            if provider.payload_header is None:
                provider.payload_header = rule.output_payload_to_header
    return [by_issuer[k] for k in sorted(by_issuer)]


def provider_name(index: int) -> str:
    return f"origins-{index}"  # Istio's provider names


def _provider_config(p: _Provider) -> Json:
    config: Json = {
        "issuer": p.issuer,
        "local_jwks": {"inline_string": p.jwks},
        "forward": p.forward,
        "payload_in_metadata": PAYLOAD_KEY,
        "jwt_cache_config": {
            "jwt_cache_size": JWT_CACHE_SIZE,
            "jwt_max_token_size": JWT_MAX_TOKEN_BYTES,
        },
    }
    if p.audiences:
        config["audiences"] = sorted(p.audiences)
    headers = dict(p.headers)
    params = set(p.params)
    if p.default_locations and (headers or params):
        # Envoy's defaults apply only when no location is named: name them explicitly.
        headers.setdefault("authorization", "Bearer ")
        params.add("access_token")
    if headers:
        config["from_headers"] = [
            {"name": name, **({"value_prefix": prefix} if prefix else {})}
            for name, prefix in sorted(headers.items())
        ]
    if params:
        config["from_params"] = sorted(params)
    if p.payload_header:
        config["forward_payload_header"] = p.payload_header
    return config


def jwt_authn_filter(
    request_authentications: Sequence[RequestAuthentication], jwks: Mapping[str, str]
) -> Json | None:
    """The listener's jwt_authn filter; None when no JWT rule selects the workload."""
    providers = _providers(request_authentications, jwks)
    if not providers:
        return None
    names = [provider_name(i) for i in range(len(providers))]
    requirement: Json = {
        "requires_any": {
            "requirements": [{"provider_name": n} for n in names] + [{"allow_missing": {}}]
        }
    }
    config: Json = {
        "@type": T_JWT_AUTHN,
        "providers": {n: _provider_config(p) for n, p in zip(names, providers, strict=True)},
        "rules": [{"match": {"prefix": "/"}, "requires": requirement}],
    }
    return {"name": FILTER_JWT_AUTHN, "typed_config": config}


# ---- RBAC matchers on the verified payload ---------------------------------------------------


def _metadata(path: Sequence[str], value: Json) -> Json:
    """A Principal on the request's dynamic metadata (``sourced_metadata``: Envoy 1.40 marks
    the older ``metadata`` principal deprecated)."""
    return {
        "sourced_metadata": {
            "metadata_matcher": {
                "filter": FILTER_JWT_AUTHN,
                "path": [{"key": PAYLOAD_KEY}, *({"key": k} for k in path)],
                "value": value,
            }
        }
    }


def _claim_string(path: Sequence[str], matcher: Json) -> Json:
    return _metadata(path, {"string_match": matcher})


def _string_match(match: ClaimMatch) -> Json:
    """The Envoy StringMatcher for one claim match; ``any`` is a non-empty value, as in Istio."""
    if match.kind == "any":
        return m.regex(".+")
    return {match.kind: match.value}


def request_principal(pattern: str) -> Json:
    """One ``requestPrincipals`` pattern as an RBAC Principal (iss AND sub)."""
    iss, sub = (_string_match(part) for part in pattern_parts(pattern))
    return m.and_principals([_claim_string(["iss"], iss), _claim_string(["sub"], sub)])


def _element_regex(pattern: str) -> str | None:
    """A regex matching a space-delimited string with an element matching ``pattern``; None
    when no element can (elements never hold whitespace)."""
    if pattern == "*":
        return r".*\S.*"
    body = pattern.strip("*")
    if not body or any(c.isspace() for c in body):
        return None  # elements are never empty and never hold whitespace
    lead, tail = r"(?:.*\s)?", r"(?:\s.*)?"
    if pattern.startswith("*"):
        return ".*" + re2_escape(body) + tail
    if pattern.endswith("*"):
        return lead + re2_escape(body) + ".*"
    return lead + re2_escape(body) + tail


def claim(path: Sequence[str], pattern: str) -> Json:
    """A claim (string, or list of strings) against one pattern, as an RBAC Principal."""
    string = m.string_matcher(pattern)
    options = [_metadata(path, {"list_match": {"one_of": {"string_match": string}}})]
    if len(path) == 1 and path[0] in SPACE_DELIMITED_CLAIMS:
        regex = _element_regex(pattern)
        if regex is not None:
            options.insert(0, _claim_string(path, m.regex(regex)))
    else:
        options.insert(0, _claim_string(path, string))
    return m.or_principals(options)


def condition_path(key: str) -> tuple[str, ...] | None:
    """The payload path a ``request.auth.*`` key reads (None for the principal, which is two
    claims)."""
    if key == "request.auth.audiences":
        return ("aud",)
    if key == "request.auth.presenter":
        return ("azp",)
    if key == "request.auth.principal":
        return None
    path = claim_path(key)
    if path is None:
        raise ValueError(f"unsupported condition key {key!r}")
    return path


def condition_value(key: str, pattern: str) -> Json:
    """One value of a ``request.auth.*`` condition as an RBAC Principal."""
    path = condition_path(key)
    if path is None:
        return request_principal(pattern)
    return claim(path, pattern)


__all__ = [
    "FILTER_JWT_AUTHN",
    "JWT_ROUTE_DISABLED",
    "NO_KEYS_JWKS",
    "PAYLOAD_KEY",
    "T_JWT_AUTHN",
    "claim",
    "condition_value",
    "jwt_authn_filter",
    "request_principal",
]
