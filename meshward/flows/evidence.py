"""Who decided a request, read back from what the mesh writes down (pure: lines in, facts out).

Two sources, both JSON lines:

- a sidecar's access log (fields: meshward.compile.observe.HTTP_LOG_FIELDS). On the callee's
  inbound listener ``response_code_details`` says who answered: ``rbac_access_denied_matched_
  policy[ns[<ns>]-policy[<name>]-rule[<i>]]`` (Envoy RBAC, DENY rule) or ``[none]`` (no ALLOW rule
  matched), ``ext_authz_denied`` / ``ext_authz_error`` (the Python service). The ``rbac``
  dynamic metadata names the ALLOW rule that let a request through (enforced, or the native
  ALLOW shadow rules that gate ext_authz) and every dry-run result; ``ext_authz`` metadata
  carries the service's decision, policy, rule and reason.
- the ext_authz decision log (meshward.extauthz.decisionlog): one line per denial, dry-run
  result, AUDIT match (and allow, with ``--log-allows``), each with the trace id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from meshward.compile.names import (
    DRY_RUN_ALLOW_PREFIX,
    DRY_RUN_DENY_PREFIX,
    INDEXED_ALLOW_POLICY,
    INDEXED_ALLOW_PREFIX,
    NATIVE_ALLOW_PREFIX,
)

RBAC = "Envoy RBAC"
EXTAUTHZ = "ext_authz"
MTLS = "mTLS"
NO_ROUTE = "no route"  # the caller's sidecar has no outbound listener for the callee
NO_POLICY = "no policy"
UPSTREAM = "app"

_RBAC_DENIED = "rbac_access_denied_matched_policy["
_POLICY_ID = re.compile(r"^ns\[(?P<ns>[^\]]*)\]-policy\[(?P<name>[^\]]*)\]-rule\[(?P<rule>\d+)\]$")


def parse_policy_id(policy_id: str | None) -> tuple[str | None, int | None]:
    """``ns[shop]-policy[orders-allow]-rule[0]`` -> ("shop/orders-allow", 0); ``none`` -> None."""
    if not policy_id or policy_id == "none":
        return None, None
    match = _POLICY_ID.match(policy_id)
    if match is None:
        return policy_id, None
    return f"{match['ns']}/{match['name']}", int(match["rule"])


def parse_time(value: Any) -> datetime | None:
    """Envoy's ``%START_TIME%`` and the decision log's ``ts`` (ISO 8601, ``Z``)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line that is a JSON object (Envoy's own log lines and torn writes are skipped)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


@dataclass(frozen=True)
class Verdict:
    """One request as a sidecar saw it, and who decided it."""

    workload: str  # the sidecar's workload ("ns/name")
    direction: str  # inbound (the callee decides) or outbound
    allowed: bool
    status: int
    decider: str  # RBAC, EXTAUTHZ, NO_POLICY, UPSTREAM
    policy: str | None  # "ns/name" of the deciding policy; None: no rule matched
    rule: int | None
    reason: str
    would_deny: tuple[str, ...] = ()  # dry-run policies that would have denied it
    trace_id: str = ""
    request_id: str = ""
    method: str = ""
    path: str = ""
    source: str = ""  # the caller's SPIFFE ID (mTLS), if any
    time: datetime | None = None
    details: str = ""  # %RESPONSE_CODE_DETAILS%
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def rule_ref(self) -> str:
        if self.policy is None:
            return "-"
        return self.policy if self.rule is None else f"{self.policy}#{self.rule}"


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def dry_run_denials(rbac: Mapping[str, Any]) -> tuple[str, ...]:
    """Dry-run policies whose shadow rules would have denied the request."""
    found = []
    for prefix in (DRY_RUN_DENY_PREFIX, DRY_RUN_ALLOW_PREFIX):
        if rbac.get(prefix + "shadow_engine_result") == "denied":
            policy, _ = parse_policy_id(_str(rbac.get(prefix + "shadow_effective_policy_id")))
            found.append(
                policy or f"(dry-run {'DENY' if prefix == DRY_RUN_DENY_PREFIX else 'ALLOW'})"
            )
    return tuple(found)


def _allowed_by(rbac: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """The native ALLOW rule that let a request through, if any."""
    enforced = _str(rbac.get("enforced_effective_policy_id"))
    if enforced == INDEXED_ALLOW_POLICY:
        enforced = _str(rbac.get(INDEXED_ALLOW_PREFIX + "shadow_effective_policy_id"))
    if enforced and rbac.get("enforced_engine_result") == "allowed":
        return parse_policy_id(enforced)
    if rbac.get(NATIVE_ALLOW_PREFIX + "shadow_engine_result") == "allowed":
        shadow = _str(rbac.get(NATIVE_ALLOW_PREFIX + "shadow_effective_policy_id"))
        if shadow == INDEXED_ALLOW_POLICY:
            shadow = _str(rbac.get(INDEXED_ALLOW_PREFIX + "shadow_effective_policy_id"))
        return parse_policy_id(shadow)
    return None, None


def _extauthz_policy(meta: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """The service reports the ALLOW policies it tried when none matched (no rule): that is
    "no rule matched", not a deciding policy."""
    rule = _int(meta.get("rule"))
    policy = _str(meta.get("policy")) or None
    if rule is None:
        return None, None
    return policy, rule


def verdict_from_access_log(entry: Mapping[str, Any]) -> Verdict | None:
    """A Verdict for one HTTP access-log line, or None if the line is not one."""
    if "response_code" not in entry:
        return None
    status = _int(entry.get("response_code")) or 0
    details = _str(entry.get("response_code_details"))
    rbac: Mapping[str, Any] = _mapping(entry.get("rbac"))
    extauthz: Mapping[str, Any] = _mapping(entry.get("ext_authz"))
    direction = _str(entry.get("direction")) or "inbound"
    allowed = 0 < status < 400
    decider, policy, rule, reason = UPSTREAM, None, None, ""
    if details.startswith(_RBAC_DENIED):
        decider = RBAC
        policy, rule = parse_policy_id(details[len(_RBAC_DENIED) : -1])
        reason = (
            f"DENY rule {policy}#{rule} matched"
            if policy is not None
            else "no ALLOW rule matched (default deny)"
        )
        allowed = False
    elif details.startswith("ext_authz_denied"):
        decider = EXTAUTHZ
        policy, rule = _extauthz_policy(extauthz)
        reason = _str(extauthz.get("reason")) or "denied by ext_authz"
        allowed = False
    elif details.startswith("ext_authz_error"):
        decider = EXTAUTHZ
        reason = "ext_authz unreachable or failed: denied (fail closed)"
        allowed = False
    elif direction == "inbound" and allowed:
        if extauthz.get("decision") == "allow":
            decider = EXTAUTHZ
            policy, rule = _extauthz_policy(extauthz)
            user = _str(extauthz.get("user"))
            reason = f"ALLOW rule matched (end user {user})" if user else "ALLOW rule matched"
        else:
            policy, rule = _allowed_by(rbac)
            if policy is not None:
                decider, reason = RBAC, "ALLOW rule matched"
            elif rbac:
                decider, reason = RBAC, "no DENY rule matched; no ALLOW policy selects it"
            else:
                decider, reason = NO_POLICY, "no policy selects this workload"
    elif not allowed:
        reason = details or f"HTTP {status}"
    return Verdict(
        workload=_str(entry.get("workload")),
        direction=direction,
        allowed=allowed,
        status=status,
        decider=decider,
        policy=policy,
        rule=rule,
        reason=reason,
        would_deny=dry_run_denials(rbac),
        trace_id=_str(entry.get("trace_id")),
        request_id=_str(entry.get("request_id")),
        method=_str(entry.get("method")),
        path=_str(entry.get("path")),
        source=_str(entry.get("peer_principal")),
        time=parse_time(entry.get("time")),
        details=details,
        raw=entry,
    )


@dataclass(frozen=True)
class DecisionRecord:
    """One line of the ext_authz decision log."""

    event: str  # decision, dry-run, audit
    decision: str  # allow / deny
    status: int | None
    workload: str
    policy: str | None
    rule: int | None
    reason: str
    source: str
    user: str
    method: str
    path: str
    trace_id: str
    time: datetime | None
    dry_run_policy: str | None = None
    would_deny: bool = False

    @property
    def denied(self) -> bool:
        return self.event == "decision" and self.decision == "deny"


def decision_from_log(entry: Mapping[str, Any]) -> DecisionRecord | None:
    if entry.get("source") != "extauthz" or "event" not in entry:
        return None
    rule = _int(entry.get("rule"))
    return DecisionRecord(
        event=_str(entry.get("event")),
        decision=_str(entry.get("decision")),
        status=_int(entry.get("status")),
        workload=_str(entry.get("workload")),
        policy=(_str(entry.get("policy")) or None) if rule is not None else None,
        rule=rule,
        reason=_str(entry.get("reason")),
        source=_str(entry.get("source_principal")),
        user=_str(entry.get("user")),
        method=_str(entry.get("method")),
        path=_str(entry.get("path")),
        trace_id=_str(entry.get("trace_id")),
        time=parse_time(entry.get("ts")),
        dry_run_policy=_str(entry.get("dry_run_policy")) or None,
        would_deny=bool(entry.get("would_deny")),
    )


def verdicts(text: str) -> list[Verdict]:
    return [v for v in (verdict_from_access_log(e) for e in json_lines(text)) if v is not None]


def decisions(text: str) -> list[DecisionRecord]:
    return [d for d in (decision_from_log(e) for e in json_lines(text)) if d is not None]


def with_decision_log(verdict: Verdict, records: Iterable[DecisionRecord]) -> Verdict:
    """Add what only the decision log knows: ext_authz-evaluated dry-run results, and the
    service's policy/rule/reason when the access log line lacks its metadata."""
    from dataclasses import replace

    same = [r for r in records if verdict.trace_id and r.trace_id == verdict.trace_id]
    extra = tuple(
        r.dry_run_policy
        for r in same
        if r.event == "dry-run" and r.would_deny and r.dry_run_policy
        if r.dry_run_policy not in verdict.would_deny
    )
    result = replace(verdict, would_deny=verdict.would_deny + extra) if extra else verdict
    if result.decider == EXTAUTHZ and not result.reason:
        for record in same:
            if record.event == "decision":
                return replace(result, policy=record.policy, rule=record.rule, reason=record.reason)
    return result
