"""Why a request is allowed or denied: the decision plus, for every policy selecting the
workload, which rule matched or the first field that did not."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from meshward.policy.canonical import format_time
from meshward.policy.evaluator import (
    REJECTED_BEFORE_AUTHORIZATION,
    CompiledPolicy,
    CustomProvider,
    RequestContext,
    context_for,
    evaluate,
    plan_for,
)
from meshward.policy.model import Action, Decision, Request, Workload
from meshward.policy.paths import PathRejected
from meshward.policy.policyset import PolicySet


@dataclass(frozen=True)
class RuleTrace:
    index: int
    matched: bool
    reason: str  # "matched", or the first field that did not match


@dataclass(frozen=True)
class PolicyTrace:
    policy: str
    action: Action
    dry_run: bool
    expired: bool
    origin: str | None
    rules: tuple[RuleTrace, ...]
    note: str = ""

    @property
    def matched_rule(self) -> int | None:
        return next((r.index for r in self.rules if r.matched), None)


@dataclass(frozen=True)
class Explanation:
    workload: str
    request: Request
    decision: Decision
    normalized_path: str | None
    policies: tuple[PolicyTrace, ...]
    # Why the sidecar answers 400 before any authorization runs (bad path or Host), or None.
    rejected: str | None = None
    # Why the request's end-user token is rejected with 401 before authorization, or None.
    token_rejected: str | None = None

    @property
    def status(self) -> int:
        """The HTTP status the sidecar answers with: 400 (rejected path or Host), 401 (invalid
        end-user token), 403 (denied) or 200."""
        if self.rejected is not None:
            return 400
        if self.token_rejected is not None:
            return 401
        return 200 if self.decision.allowed else 403

    def to_json(self) -> dict[str, Any]:
        d = self.decision
        return {
            "decision": d.verdict,
            "status": self.status,
            "token_rejected": self.token_rejected,
            "policy": d.policy,
            "rule": d.rule,
            "action": d.action.value if d.action else None,
            "reason": d.reason,
            "dry_run": [
                {
                    "policy": r.policy,
                    "action": r.action.value,
                    "matched": r.matched,
                    "rule": r.rule,
                    "would_deny": r.would_deny,
                    "decision": "deny" if r.would_deny else "allow",
                }
                for r in d.dry_run
            ],
            "audit": d.audit,
            "audit_policies": list(d.audit_policies),
            "workload": self.workload,
            "normalized_path": self.normalized_path,
            "rejected_before_authorization": self.rejected,
            "policies": [
                {
                    "policy": p.policy,
                    "action": p.action.value,
                    "dry_run": p.dry_run,
                    "expired": p.expired,
                    "origin": p.origin,
                    "matched_rule": p.matched_rule,
                    "note": p.note,
                    "rules": [
                        {"index": r.index, "matched": r.matched, "reason": r.reason}
                        for r in p.rules
                    ],
                }
                for p in self.policies
            ],
        }

    def render(self) -> str:
        d = self.decision
        lines = [f"{d.verdict.upper()}: {d.reason}"]
        if d.policy is not None:
            lines.append(f"  deciding policy: {d.policy} rule {d.rule} ({d.action})")
        if self.normalized_path is not None and self.normalized_path != self.request.path:
            lines.append(f"  path {self.request.path!r} normalized to {self.normalized_path!r}")
        for r in d.dry_run:
            verdict = "would DENY" if r.would_deny else "would allow"
            hit = f"matched rule {r.rule}" if r.matched else "no rule matched"
            lines.append(f"  dry-run {r.action.value} {r.policy}: {verdict} ({hit})")
        if d.audit:
            lines.append(f"  audited by: {', '.join(d.audit_policies)}")
        if self.token_rejected is not None:
            lines.append("  HTTP 401 from the sidecar: no authorization policy is evaluated")
        elif self.rejected is not None:
            lines.append(
                "  rejected before authorization: the sidecar answers HTTP 400 and evaluates "
                f"no policy: {self.rejected}"
            )
        elif not self.policies and self.normalized_path is None and not d.allowed:
            # refused before any HTTP (plaintext to a STRICT port): not "no policy selects it"
            lines.append("  refused before any HTTP: no authorization policy is evaluated")
        elif not self.policies:
            lines.append(f"  no authorization policy selects {self.workload}")
        for p in self.policies:
            flags = [p.action.value] + (["dry-run"] if p.dry_run else [])
            flags += ["EXPIRED"] if p.expired else []
            where = f" ({p.origin})" if p.origin else ""
            lines.append(f"  policy {p.policy} [{', '.join(flags)}]{where}")
            if p.note:
                lines.append(f"    {p.note}")
            for rt in p.rules:
                mark = "match" if rt.matched else "no match"
                lines.append(
                    f"    rule {rt.index}: {mark}" + ("" if rt.matched else f": {rt.reason}")
                )
        return "\n".join(lines)


def explain(
    policy_set: PolicySet,
    workload: Workload,
    request: Request,
    *,
    now: datetime,
    custom: CustomProvider | None = None,
    token_invalid: bool = False,
) -> Explanation:
    """``token_invalid``: the request carries an end-user token that does not verify (bad
    signature, expired, wrong audience, unknown issuer). Where a RequestAuthentication selects
    the workload that is a 401 before any authorization (Istio; Envoy's jwt_authn); elsewhere
    no one checks the token and the request is decided without a request principal."""
    when = now
    decision = evaluate(policy_set, workload, request, now=when, custom=custom)
    plan = plan_for(policy_set, workload)
    try:
        ctx = context_for(plan, request)
    except PathRejected as exc:
        # A plaintext request to a STRICT port is refused earlier still (no HTTP at all).
        rejected = str(exc) if decision.reason.startswith(REJECTED_BEFORE_AUTHORIZATION) else None
        return Explanation(workload.ref, request, decision, None, (), rejected=rejected)
    if token_invalid:
        authns = [
            f"{ra.namespace}/{ra.name}"
            for ra in policy_set.request_authentications_for(workload)
            if ra.jwt_rules
        ]
        if authns and not ctx.tcp:
            why = (
                "the end-user token does not verify: rejected before any authorization "
                f"(RequestAuthentication {', '.join(authns)}; Envoy's jwt_authn)"
            )
            denied = Decision(allowed=False, reason=why)
            return Explanation(workload.ref, request, denied, ctx.path, (), token_rejected=why)
    traces = tuple(_trace(cp, ctx, when) for cp in plan.policies)
    return Explanation(workload.ref, request, decision, ctx.path, traces)


def _trace(cp: CompiledPolicy, ctx: RequestContext, now: datetime) -> PolicyTrace:
    policy = cp.policy
    expired = policy.expires_at is not None and policy.expires_at <= now
    note = ""
    if expired and policy.expires_at is not None:
        note = f"expired at {format_time(policy.expires_at)}; not applied" + (
            " (matches nothing, but still counts as an ALLOW: the default deny stays)"
            if policy.action is Action.ALLOW and not policy.dry_run
            else ""
        )
    elif policy.expires_at is not None:
        note = f"emergency rule, applies until {format_time(policy.expires_at)}"
    if not policy.rules:
        note = (note + "; " if note else "") + "no rules: matches no request"
    rules = cp.rules_for(ctx)
    if ctx.tcp and len(rules) != len(cp.rules):
        note = (note + "; " if note else "") + (
            "TCP port: rules that need HTTP attributes never match"
        )
    traces = []
    for rule in rules:
        why = rule.mismatch(ctx)
        traces.append(RuleTrace(rule.index, why is None, why or "matched"))
    return PolicyTrace(
        policy=policy.ref,
        action=policy.action,
        dry_run=policy.dry_run,
        expired=expired,
        origin=str(policy.origin) if policy.origin else None,
        rules=tuple(traces),
        note=note,
    )
