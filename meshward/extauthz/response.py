"""Step 4 of a Check (OPA-Envoy's "response"): the CheckResult and CheckResponse for a decision
or a rejection: what Envoy does with it, and what the caller and the app see.

Allow: OK plus identity headers for the app. Headers the app trusts (``x-meshward-*``, the JWT
payload header) are always either set by us or removed, so a client cannot forge them by sending
them itself. Deny: the status, headers and JSON body reach the client as sent (Envoy passes a
Denied response through unchanged; access log flag ``UAEX``). Dynamic metadata lands under
``envoy.filters.http.ext_authz`` for the access log: ``%DYNAMIC_METADATA(envoy.filters.http.ext_authz:policy)%``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from meshward.extauthz.decision import CachedDecision, Outcome
from meshward.extauthz.inputs import CheckInput
from meshward.extauthz.result import CheckResult, Rejection
from meshward.policy.model import Action
from meshward.telemetry.limits import clip

PRINCIPAL_HEADER = "x-meshward-principal"
USER_HEADER = "x-meshward-user"
DENIED_BY_HEADER = "x-meshward-denied-by"
DENIED_BY_SERVICE = "meshward-extauthz"  # no policy decided: malformed request, internal error

_OVERWRITE = base_pb2.HeaderValueOption.HeaderAppendAction.Value("OVERWRITE_IF_EXISTS_OR_ADD")
_JSON = base_pb2.HeaderValueOption(
    header=base_pb2.HeaderValue(key="content-type", value="application/json"),
    append_action=_OVERWRITE,
)
_OK_STATUS = status_pb2.Status(code=code_pb2.OK)


def _header(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def _set_metadata(response: Any, fields: Mapping[str, Any]) -> None:
    response.dynamic_metadata.update({k: v for k, v in fields.items() if v is not None})


def allow(
    *,
    set_headers: Iterable[tuple[str, str]] = (),
    remove_headers: Sequence[str] = (),
    remove_params: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    ok = external_auth_pb2.OkHttpResponse(
        headers=[_header(k, v) for k, v in set_headers],
        headers_to_remove=list(remove_headers),
        query_parameters_to_remove=list(remove_params),
    )
    response = external_auth_pb2.CheckResponse(status=_OK_STATUS, ok_response=ok)
    if metadata:
        _set_metadata(response, metadata)
    return response


#: Stable reason codes of a denial (the quiet body's ``code``; also in the decision log and the
#: access log's ext_authz metadata). Callers may branch on them; they never name a policy.
REASON_CODES = {
    "denied_by_policy": "a DENY or CUSTOM policy matched the request",
    "no_matching_allow": "ALLOW policies select the workload and none matched",
    "invalid_token": "a token was presented and rejected (401)",
    "mtls_required": "plaintext request where mTLS is STRICT",
    "request_rejected": "the request was refused before any rule (path, Host)",
    "request_too_large": "path or headers over ext_authz's limits",
    "malformed_request": "the CheckRequest lacks the HTTP attributes",
    "unknown_workload": "the Check names no workload of the policy set",
    "internal_error": "ext_authz failed; denied (fail closed)",
}


def deny_body(
    *,
    policy: str | None,
    rule: int | None,
    reason: str,
    trace_id: str,
    code: str = "denied",
    verbose: bool = True,
    error: str = "access denied",
) -> str:
    """Quiet: what went wrong in general (``code``) and where operators look (``trace_id``).
    Verbose adds the policy, rule and reason (development meshes only: it tells any caller
    which policies guard the workload)."""
    body: dict[str, object] = {"error": error, "code": code, "trace_id": trace_id}
    if verbose:
        body.update(policy=policy, rule=rule, reason=reason)
    return json.dumps(body, separators=(",", ":"))


def deny(
    *,
    http_status: int,
    policy: str | None,
    rule: int | None,
    reason: str,
    trace_id: str,
    code: str = "denied",
    verbose: bool = False,
    denied_by: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    www_authenticate: str | None = None,
) -> Any:
    """403 (policy) or 401 (token) with a JSON body: quiet by default (code + trace id, no
    ``x-meshward-denied-by``), the full reason when ``verbose``."""
    grpc_code = code_pb2.UNAUTHENTICATED if http_status == 401 else code_pb2.PERMISSION_DENIED
    headers = [_JSON]
    if verbose:
        headers.append(_header(DENIED_BY_HEADER, denied_by or policy or DENIED_BY_SERVICE))
    if www_authenticate:
        headers.append(_header("www-authenticate", www_authenticate))
    denied = external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=http_status),
        headers=headers,
        body=deny_body(
            policy=policy,
            rule=rule,
            reason=reason,
            trace_id=trace_id,
            code=code,
            verbose=verbose,
            error="unauthenticated" if http_status == 401 else "access denied",
        ),
    )
    response = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=grpc_code, message=reason if verbose else code),
        denied_response=denied,
    )
    if metadata:
        _set_metadata(response, metadata)
    return response


def deny_response(result: CheckResult, trace_id: str) -> Any:
    """The Denied response: quiet (code + trace id) unless the mesh asks for verbose bodies."""
    www_authenticate = None
    if result.http_status == 401:
        www_authenticate = 'Bearer error="invalid_token"'
        if result.verbose:
            www_authenticate += f', error_description="{_quote(result.reason)}"'
    return deny(
        http_status=result.http_status,
        policy=result.policy,
        rule=result.rule,
        reason=result.reason,
        trace_id=trace_id,
        code=result.code or "denied",
        verbose=result.verbose,
        metadata=decision_metadata(result),
        www_authenticate=www_authenticate,
    )


def _quote(text: str) -> str:
    return text.replace("\\", "").replace('"', "'")[:200]


def decision_metadata(result: CheckResult) -> dict[str, Any]:
    """Envoy's access log reads these (``%DYNAMIC_METADATA(envoy.filters.http.ext_authz)%``).
    Allows carry the essentials only: Envoy parses this on every request."""
    cache = None if result.cache_hit is None else ("hit" if result.cache_hit else "miss")
    if result.allowed:
        return {
            "decision": "allow",
            "policy": result.policy,
            "rule": result.rule,
            "user": result.user,
            "cache": cache,
            "policy_version": result.policy_version[:12] or None,
        }
    return {
        "decision": "deny",
        "status": result.http_status,
        "code": result.code or None,
        "policy": result.policy,
        "rule": result.rule,
        "reason": clip(result.reason),  # the access log: bounded lines
        "workload": result.workload,
        "user": result.user,
        "policy_version": result.policy_version[:12] or None,
        "cache": cache,
    }


def empty_allow() -> Any:
    """The cheapest valid answer: the floor the benchmark compares against."""
    return external_auth_pb2.CheckResponse(status=_OK_STATUS)


RESPONSE_OVERHEAD = 1024  # accounted bytes of a memoized allow response besides 3x its size
MEMO_LIMIT = 16  # allow responses memoized per decision (identities sharing it)


def respond(
    inp: CheckInput,
    outcome: Outcome,
    *,
    version: str,
    verbose: bool,
    trace_id: str,
    recharge: Callable[[tuple[object, ...]], None] = lambda key: None,
) -> CheckResult:
    """The result of a decided Check. ``recharge(key)``: the cache entry grew (a memoized
    allow response) and must be charged again."""
    decision = outcome.cached.decision
    result = CheckResult(
        response=None,
        allowed=decision.allowed,
        http_status=200 if decision.allowed else 403,
        reason=decision.reason,
        policy=outcome.cached.policy if not decision.allowed else decision.policy,
        rule=decision.rule,
        workload=inp.ref,
        source_principal=inp.facts.source_principal,
        user=inp.user,
        method=inp.facts.method,
        path=inp.facts.path,
        cache_hit=outcome.hit,
        policy_version=version,
        dry_run=decision.dry_run,
        audit_policies=decision.audit_policies if decision.audit else (),
    )
    if decision.allowed:
        result.response, grew = allow_for(inp, outcome.cached, result)
        if grew and outcome.key is not None:
            recharge(outcome.key)  # the entry grew: charge it, evicting others to fit
    else:
        result.code = (
            "denied_by_policy"
            if decision.action in (Action.DENY, Action.CUSTOM)
            else "no_matching_allow"
        )
        result.verbose = verbose
        result.response = deny_response(result, trace_id)
    return result


def allow_for(inp: CheckInput, cached: CachedDecision, result: CheckResult) -> tuple[Any, bool]:
    """(the OK response, whether it was built now and memoized on ``cached``). Identity
    headers are set or removed, never left to the client; the token is removed unless its
    rule forwards it (Istio's default: the app never sees it)."""
    token = inp.token
    memo_key = (
        result.source_principal,
        result.user,
        result.cache_hit,
        token.location if token else None,
        token.payload_segment if token and token.rule.output_payload_to_header else None,
    )
    found = cached.responses.get(memo_key)
    if found is not None:
        return found, False
    set_headers: list[tuple[str, str]] = []
    remove: list[str] = []
    remove_params: list[str] = []
    if result.source_principal:
        set_headers.append((PRINCIPAL_HEADER, result.source_principal))
    else:
        remove.append(PRINCIPAL_HEADER)
    payload_headers = inp.plan.payload_headers
    if token is not None:
        set_headers.append((USER_HEADER, token.principal))
        payload_header = token.rule.output_payload_to_header
        if payload_header:
            set_headers.append((payload_header.lower(), token.payload_segment))
        remove.extend(h for h in payload_headers if h != (payload_header or "").lower())
        if not token.rule.forward_original_token:
            if token.location.header is not None:
                remove.append(token.location.header)
            elif token.location.param is not None:
                remove_params.append(token.location.param)
    else:
        remove.append(USER_HEADER)
        remove.extend(payload_headers)
    built = allow(
        set_headers=set_headers,
        remove_headers=remove,
        remove_params=remove_params,
        metadata=decision_metadata(result),
    )
    size = RESPONSE_OVERHEAD + 3 * built.ByteSize() + sum(len(str(p)) for p in memo_key)
    if len(cached.responses) >= MEMO_LIMIT:  # many identities share it: keep the memo small
        cached.responses.clear()
        cached.memo_bytes = 0
    cached.responses[memo_key] = built
    cached.memo_bytes += size
    return built, True


def rejected(rejection: Rejection, *, version: str, verbose: bool, trace_id: str) -> CheckResult:
    """The result of a Check refused before any rule was read."""
    result = CheckResult(
        response=None,
        allowed=False,
        http_status=rejection.status,
        reason=rejection.reason,
        code=rejection.code,
        verbose=verbose,
        policy=rejection.policy,
        rule=rejection.rule,
        workload=rejection.workload,
        source_principal=rejection.source_principal,
        method=rejection.method,
        path=rejection.path,
        policy_version=version,
    )
    result.response = deny_response(result, trace_id)
    return result
