"""Generator: ext_authz. The two ext_authz filters of a chain that needs the service (rules the
plan placed there, or end-user tokens to verify under ``jwtEnforcement: extauthz``), their
per-route configs and the token routes.

0. the token filter, before the RBAC filters: requests that may carry an end-user token
   (a route per token location, :func:`token_matches`) have the service verify it (401 when
   invalid) and decide; token-less requests never reach Python for it;
4. the late filter, after the RBAC filters, always gated on the native ALLOW shadow verdict
   (``filter_enabled_metadata``): it runs unless the native ALLOW rules allowed. When every
   request must reach the service (CUSTOM, JWT DENY rules) the route gives the ALLOW filter no
   shadow rules, so no verdict is ever written and the gate never skips it.

The ext_authz service learns which workload a Check is for (and the declared port, since
runtime ports differ) from the ``context_extensions`` of the route's ``ExtAuthzPerRoute``.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshward.compile import names
from meshward.compile.authz import jwt_authn
from meshward.compile.authz.chain import Json, Stage
from meshward.compile.authz.placement import TokenSource
from meshward.policy.paths import re2_escape

T_EXTAUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
T_EXTAUTHZ_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"


def _extauthz_config(timeout_ms: int, *, gated: bool, stat_prefix: str = "") -> Json:
    config: Json = {
        "@type": T_EXTAUTHZ,
        "grpc_service": {
            "envoy_grpc": {"cluster_name": names.CLUSTER_EXTAUTHZ},
            "timeout": _duration_ms(timeout_ms),
        },
        "transport_api_version": "V3",
        "failure_mode_allow": False,
        "include_peer_certificate": True,
        "include_tls_session": True,  # connection.sni for the evaluator
        # The payload jwt_authn verified (jwtEnforcement: native): CUSTOM providers and the
        # evaluator read the end-user claims from it, the token itself may be gone.
        "metadata_context_namespaces": [jwt_authn.FILTER_JWT_AUTHN],
    }
    if stat_prefix:
        config["stat_prefix"] = stat_prefix
    if gated:
        # Enabled unless the native ALLOW rules allowed: a missing verdict also calls ext_authz
        # (fail closed), never skips it.
        config["filter_enabled_metadata"] = {
            "filter": names.RBAC_METADATA_NAMESPACE,
            "path": [{"key": names.NATIVE_ALLOW_RESULT_KEY}],
            "value": {"string_match": {"exact": "allowed"}},
            "invert": True,
        }
    return config


def extauthz_filter(*, timeout_ms: int) -> Json:
    """The ext_authz filter after the RBAC filters, the same for every policy: always gated on
    the native ALLOW shadow verdict, which only the ALLOW union's route config produces."""
    config = _extauthz_config(timeout_ms, gated=True)
    return {"name": names.FILTER_EXTAUTHZ, "typed_config": config}


def token_filter(*, timeout_ms: int) -> Json:
    """The ext_authz filter before the RBAC filters, for requests that may carry a token."""
    config = _extauthz_config(timeout_ms, gated=False, stat_prefix="token")
    return {"name": names.FILTER_EXTAUTHZ_TOKEN, "typed_config": config}


def extauthz_per_route(workload_ref: str, declared_port: int) -> Json:
    return {
        "@type": T_EXTAUTHZ_ROUTE,
        "check_settings": {
            "context_extensions": {
                names.CONTEXT_WORKLOAD: workload_ref,
                names.CONTEXT_PORT: str(declared_port),
            }
        },
    }


EXTAUTHZ_DISABLED: Json = {"@type": T_EXTAUTHZ_ROUTE, "disabled": True}


def token_stage(*, timeout_ms: int) -> Stage:
    """The token filter: off on every route but the token routes."""
    return Stage(
        name=names.FILTER_EXTAUTHZ_TOKEN,
        filter=token_filter(timeout_ms=timeout_ms),
        per_route=EXTAUTHZ_DISABLED,  # token-less requests: off
        off=EXTAUTHZ_DISABLED,
    )


def late_stage(*, timeout_ms: int, context: Json | None) -> Stage:
    """The ext_authz filter after RBAC: on (with ``context``) when some rule needs the
    service, else off."""
    return Stage(
        name=names.FILTER_EXTAUTHZ,
        filter=extauthz_filter(timeout_ms=timeout_ms),
        per_route=context if context is not None else EXTAUTHZ_DISABLED,
        off=EXTAUTHZ_DISABLED,
    )


def token_routes(sources: Sequence[TokenSource], context: Json) -> list[Json]:
    """Routes (without action) for requests that may carry a token: the token filter has the
    service decide, the late filter is off (decided already)."""
    on_token_route = {
        names.FILTER_EXTAUTHZ_TOKEN: context,
        names.FILTER_EXTAUTHZ: EXTAUTHZ_DISABLED,
    }
    return [
        {**match, "typed_per_filter_config": on_token_route} for match in token_matches(sources)
    ]


def token_matches(sources: Sequence[TokenSource]) -> list[Json]:
    """Route ``name`` + ``match`` for requests that may carry a token: one route per header
    (present, whatever its value) and one for all query parameters (a regex on ``:path``).

    A superset of what the ext_authz service calls a token (it also wants the header's prefix,
    a non-empty value): sending a token-less request to it costs a Check, never a decision,
    since the service evaluates the whole policy.
    """
    out: list[Json] = []
    for source in sources:
        if source.header:
            out.append(
                {
                    "name": f"token-header-{source.header}",
                    "match": {
                        "prefix": "/",
                        "headers": [{"name": source.header, "present_match": True}],
                    },
                }
            )
    params = [s.param for s in sources if s.param]
    if params:
        alternatives = "|".join(_encoded_name(p) for p in params)
        # The query (before any '#') has a field `<name>=<non-empty value>`; the name may be
        # percent-encoded in part or in full, as the service decodes it.
        regex = rf"[^?]*\?(?:[^#]*&)?(?:{alternatives})=[^&#].*"
        out.append(
            {
                "name": "token-param",
                "match": {
                    "prefix": "/",
                    "headers": [
                        {"name": ":path", "string_match": {"safe_regex": {"regex": regex}}}
                    ],
                },
            }
        )
    return out


def _encoded_name(name: str) -> str:
    """A regex for ``name`` as it may appear in a query: each character literal or
    percent-encoded (either hex case); a space also as '+'."""
    parts = []
    for ch in name:
        encoded = "".join(
            "%" + "".join(f"[{h}{h.lower()}]" if h.isalpha() else h for h in f"{b:02X}")
            for b in ch.encode()
        )
        alts = [re2_escape(ch), encoded]
        if ch == " ":
            alts.append(r"\+")
        parts.append("(?:" + "|".join(alts) + ")")
    return "".join(parts)


def _duration_ms(ms: int) -> str:
    return f"{ms / 1000:g}s"
