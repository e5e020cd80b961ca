"""Step 3 of a Check (OPA-Envoy's "decision"): the input's decision, from the cache when the
workload's plan makes it cacheable, else from meshward.policy.evaluate (the only judge).

A cached entry lives until the TTL, the token's exp or the next policy expiry, whichever comes
first; its key is (policy version, workload, every attribute the workload's rules read).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from meshward.extauthz.cache import DecisionCache
from meshward.extauthz.inputs import CheckInput
from meshward.extauthz.snapshot import PreparedWorkload, Snapshot
from meshward.policy.model import Action, Decision, Request, Workload

Custom = Callable[..., tuple[bool, str]]
Evaluate = Callable[..., Decision]

# Accounted bytes of a cached decision besides its strings: the CachedDecision, its Decision,
# their dicts and tuples (measured ~700 on CPython 3.12), and per memoized allow response the
# upb message, its Python wrapper and the memo key tuple (measured ~3x the serialized size + 600).
DECISION_OVERHEAD = 1024


@dataclass
class CachedDecision:
    """A decision as cached: the evaluator's answer plus allow responses memoized per identity
    (principal, user, token location) so a hit builds no protobuf."""

    decision: Decision
    # The policy a denial names: the deciding one, or (no ALLOW policy matched) the ALLOW
    # policies that were in force, comma-separated, so the caller knows what to ask for.
    policy: str | None = None
    responses: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    memo_bytes: int = 0  # accounted bytes of ``responses`` (kept up to date with it)

    def accounted_bytes(self) -> int:
        """What the decision cache charges for this value (see meshward.extauthz.cache)."""
        d = self.decision
        strings = len(d.reason) + len(d.policy or "") + len(self.policy or "")
        strings += sum(len(r.policy) + 64 for r in d.dry_run)
        strings += sum(len(p) + 64 for p in d.audit_policies)
        return DECISION_OVERHEAD + 2 * strings + self.memo_bytes


def decision_cache(
    max_bytes: int, ttl: float, *, timer: Callable[[], float] = time.monotonic
) -> DecisionCache[CachedDecision]:
    """The cache an Authorizer uses, weighing each decision by its accounted bytes."""
    return DecisionCache(max_bytes, ttl, timer=timer, sizeof=CachedDecision.accounted_bytes)


@dataclass(frozen=True)
class Outcome:
    cached: CachedDecision
    hit: bool | None  # None: the workload's decisions are not cacheable
    key: tuple[object, ...] | None  # the cache key (to recharge when the entry grows)


@dataclass(frozen=True)
class Decider:
    """How to decide: the evaluator and CUSTOM hook, clocks, the cache, and a callback per
    evaluation (the Authorizer counts them)."""

    cache: DecisionCache[CachedDecision]
    evaluate: Evaluate
    custom: Custom | None = None
    wall: Callable[[], float] = time.time
    clock: Callable[[], float] = time.monotonic
    on_evaluate: Callable[[], None] = lambda: None


def decide(inp: CheckInput, snapshot: Snapshot, how: Decider) -> Outcome:
    """The decision for ``inp``: a cache hit, or one evaluation (cached when cacheable)."""

    def compute() -> tuple[CachedDecision, float]:
        wall = how.wall()  # one instant for the decision, the denial and the expiry
        now = datetime.fromtimestamp(wall, UTC)
        how.on_evaluate()
        decision = how.evaluate(
            snapshot.policy_set,
            inp.plan.workload,
            evaluation_request(inp),
            now=now,
            custom=how.custom,
        )
        policy = decision.policy
        if policy is None and not decision.allowed:
            policy = unmatched_allows(snapshot.policy_set, inp.plan.workload, now)
        until = expiry(inp.plan, inp.expires_at, wall, how.clock(), how.cache.ttl)
        return CachedDecision(decision, policy), until

    if inp.plan.key_of is None:
        cached, _ = compute()
        return Outcome(cached, None, None)
    key = (snapshot.version, inp.ref, *inp.plan.key_of(inp.facts))
    cached, hit = how.cache.get_or_compute(key, compute)
    return Outcome(cached, hit, key)


def evaluation_request(inp: CheckInput) -> Request:
    """The evaluator's Request: the raw path (it normalizes and judges it itself), copies of
    headers and claims (a CUSTOM hook may keep them)."""
    facts = inp.facts
    return Request(
        method=facts.method,
        path=inp.raw_path,
        host=facts.host,
        destination_port=facts.destination_port,
        source_principal=facts.source_principal,
        source_ip=facts.source_ip,
        destination_ip=facts.destination_ip,
        headers=dict(facts.headers),
        claims=dict(facts.claims) if facts.claims is not None else None,
        sni=facts.sni,
    )


def unmatched_allows(policy_set: Any, workload: Workload, now: datetime) -> str | None:
    """The ALLOW policies in force when none matched: what a denial names."""
    refs = [
        p.ref
        for p in policy_set.policies_for(workload, now)
        if p.action is Action.ALLOW and not p.dry_run
    ]
    return ",".join(refs) or None


def expiry(
    plan: PreparedWorkload, expires_at: float | None, wall: float, mono: float, ttl: float
) -> float:
    """Monotonic instant the entry must be gone: TTL, the token's exp, the next policy
    expiry, whichever comes first (``wall`` and ``mono`` are the same instant)."""
    until = mono + ttl
    if expires_at is not None:
        until = min(until, mono + (expires_at - wall))
    next_expiry = plan.next_expiry(wall)
    if next_expiry is not None:
        until = min(until, mono + (next_expiry - wall))
    return until
