"""What one Check decided and why: the record every later stage (response, span, metrics,
decision log) reads, so none of them has to look at the CheckRequest again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshward.policy.model import DryRunResult


@dataclass
class CheckResult:
    """What one Check decided and why: the response, plus everything spans and logs report."""

    response: Any
    allowed: bool
    http_status: int  # 200 allow, 403 deny, 401 bad token
    reason: str
    policy: str | None = None
    rule: int | None = None
    workload: str | None = None
    source_principal: str | None = None
    user: str | None = None
    method: str = ""
    path: str = ""
    cache_hit: bool | None = None  # None: not cacheable / not reached
    policy_version: str = ""
    dry_run: tuple[DryRunResult, ...] = ()
    audit_policies: tuple[str, ...] = ()
    code: str = ""  # a denial's stable reason code (meshward.extauthz.response.REASON_CODES)
    verbose: bool = False  # the mesh's denialDetails: verbose (the caller sees policy + reason)

    @property
    def decision(self) -> str:
        return "allow" if self.allowed else "deny"


@dataclass(frozen=True)
class Rejection:
    """A Check refused before any policy is read (malformed, too large, unknown workload, bad
    path, invalid token, plaintext under STRICT): each step returns one instead of raising."""

    status: int  # 403, or 401 for a token that does not verify
    reason: str
    code: str  # meshward.extauthz.response.REASON_CODES
    method: str = ""
    path: str = ""
    source_principal: str | None = None
    workload: str | None = None
    policy: str | None = None
    rule: int | None = None
