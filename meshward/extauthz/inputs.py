"""Step 2 of a Check (OPA-Envoy's "input"): the request's plain values turned into what the
policy reads (meshward.extauthz.cache_key.RequestFacts) for one workload of one policy version, or a
Rejection decided before any rule is read.

Those rejections (unknown workload, bad path or Host, invalid token, plaintext under STRICT)
come first on purpose: they depend on fields the decision cache key may not hold (a rule-free
key would otherwise serve one bad Host's denial to good requests), so they are never cached.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshward.extauthz.cache_key import RequestFacts
from meshward.extauthz.request import HttpCheck
from meshward.extauthz.result import Rejection
from meshward.extauthz.snapshot import PreparedWorkload, Snapshot
from meshward.extauthz.tokens import (
    JwtVerifier,
    TokenRejected,
    VerifiedToken,
    payload_expiry,
    payload_principal,
)
from meshward.policy.evaluator import REJECTED_BEFORE_AUTHORIZATION, plaintext_refusal
from meshward.policy.model import Request
from meshward.policy.paths import PathRejected, check_request_target, normalize_path

# Paths repeat; normalizing is pure. (lru_cache does not keep exceptions: rejected paths redo it.)
# Only short paths are memoized: 8192 memoized 16 KiB paths would hold ~256 MiB (issue 13).
_MEMO_PATH_CHARS = 512
_normalize_memo = functools.lru_cache(maxsize=8192)(normalize_path)


def normalize(path: str) -> str:
    return _normalize_memo(path) if len(path) <= _MEMO_PATH_CHARS else normalize_path(path)


@dataclass(frozen=True)
class CheckInput:
    """Everything the decision reads: the workload, the request facts, the verified identity."""

    ref: str
    plan: PreparedWorkload
    facts: RequestFacts
    raw_path: str  # the evaluator normalizes again (and judges the raw form's attacks)
    token: VerifiedToken | None  # verified here (jwtEnforcement: extauthz), else None
    user: str | None  # the request principal, from our token or jwt_authn's payload
    expires_at: float | None  # the token's exp (epoch seconds): a cached decision ends there


def workload_of(check: HttpCheck, snapshot: Snapshot) -> str | Rejection:
    """The compiler's per-route context extension, else the workload the server identity names."""
    if check.workload:
        return check.workload
    if not check.destination_principal:
        why = "no context_extensions.workload and no destination principal"
    else:
        ref, why = snapshot.workload_for_principal(check.destination_principal)
        if ref is not None:
            return ref
    return Rejection(
        403,
        f"cannot identify the workload: {why}",
        "unknown_workload",
        method=check.method,
        path=check.raw_path,
        source_principal=check.source_principal,
    )


def build(check: HttpCheck, snapshot: Snapshot, verifier: JwtVerifier) -> CheckInput | Rejection:
    """The decision's input for ``check`` under ``snapshot``, or why it is refused first."""
    ref = workload_of(check, snapshot)
    if isinstance(ref, Rejection):
        return ref
    seen_path = check.raw_path  # what a rejection reports: the normalized path once known

    def refuse(
        status: int, reason: str, code: str, policy: str | None = None, rule: int | None = None
    ) -> Rejection:
        return Rejection(
            status,
            reason,
            code,
            method=check.method,
            path=seen_path,
            source_principal=check.source_principal,
            workload=ref,
            policy=policy,
            rule=rule,
        )

    plan = snapshot.plan(ref)
    if plan is None:
        return refuse(
            403,
            f"unknown workload {ref} (not in policy version {snapshot.version[:12]})",
            "unknown_workload",
        )
    headers = check.headers
    if plan.reads_headers and any(k != k.lower() for k in headers):
        # Envoy sends lowercase names; anything else is lowercased exactly as the evaluator
        # does, so the cache key sees the header values the rules will see.
        headers = {k.lower(): v for k, v in headers.items()}
    try:
        path = normalize(check.raw_path)
    except ValueError as exc:  # PathRejected: Envoy rejects these before us when configured
        return refuse(403, f"path rejected: {exc}", "request_rejected")
    seen_path = path

    token: VerifiedToken | None = None
    claims: Mapping[str, Any] | None = None
    if plan.jwt_rules and snapshot.jwt_native:
        # jwt_authn verified the token before us (401 when invalid) and may have removed
        # it: the verified payload is in the Check's metadata context.
        claims = check.jwt_payload()
    elif plan.jwt_rules:
        try:
            token = verifier.authenticate(
                plan.jwt_rules, headers, check.raw_path, rules_id=plan.rules_id
            )
        except TokenRejected as exc:
            owner, index = plan.token_owner()
            return refuse(401, exc.reason, "invalid_token", owner, index)
    if token is not None:
        claims = token.claims
    refusal = refused_before_rules(check, snapshot, plan, path)
    if refusal is not None:
        return refuse(403, *refusal)
    return CheckInput(
        ref=ref,
        plan=plan,
        facts=RequestFacts(
            method=check.method,
            path=path,
            host=check.host,
            destination_port=check.destination_port,
            source_principal=check.source_principal,
            source_ip=check.source_ip,
            destination_ip=check.destination_ip,
            sni=check.sni,
            headers=headers,
            claims=claims,
        ),
        raw_path=check.raw_path,
        token=token,
        user=token.principal if token is not None else payload_principal(claims),
        expires_at=token.expires_at if token is not None else payload_expiry(claims),
    )


def refused_before_rules(
    check: HttpCheck, snapshot: Snapshot, plan: PreparedWorkload, path: str
) -> tuple[str, str] | None:
    """(reason, code) of a refusal the evaluator makes before reading any rule, by its own
    checks (a bad request target; plaintext where mTLS is STRICT), else None."""
    try:
        check_request_target(check.host, path)
        refusal = plaintext_refusal(
            snapshot.policy_set,
            plan.workload,
            Request(
                source_principal=check.source_principal,
                destination_port=check.destination_port,
            ),
        )
    except PathRejected as exc:
        return f"{REJECTED_BEFORE_AUTHORIZATION}: {exc}", "request_rejected"
    return None if refusal is None else (refusal, "mtls_required")
