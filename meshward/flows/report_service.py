"""``GET /report`` on the control plane's admin address: the policy set in force, the flow
store's totals for the window and the clock, handed to the pure :func:`meshward.flows.report.build`.

Query parameters: ``since`` (Unix seconds; default: everything the store keeps) and ``soon``
(seconds; an emergency allow ending within it is "expiring"; default one day). Reachability is
the costly part (every workload pair through the evaluator), so it is kept per policy version
and set of expired policies — the only inputs it depends on — one entry at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from meshward.flows.query import QueryError
from meshward.flows.reach import Reachability, reachability
from meshward.flows.report import DEFAULT_SOON, build
from meshward.flows.report_query import flow_totals
from meshward.policy.policyset import PolicySet

MAX_SOON = 366 * 24 * 3600
# Reports are computed off the event loop, one reachability at a time: two operators asking at
# once for a new policy version wait for one computation instead of running two.
_REACH_LOCK = threading.Lock()


def _number(query: Mapping[str, str], name: str, most: float | None = None) -> float | None:
    text = query.get(name)
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise QueryError(f"{name} must be a number of seconds, not {text[:30]!r}") from None
    if value != value or value < 0 or (most is not None and value > most):  # NaN, negative
        raise QueryError(f"{name} must be between 0 and {most or 'now'}")
    return value


def cached_reachability(
    cache: dict[Any, Any], policy_set: PolicySet, now: datetime
) -> Reachability:
    expired = frozenset(
        p.ref
        for p in policy_set.authorization_policies
        if p.expires_at is not None and p.expires_at <= now
    )
    key = (policy_set.version, expired)
    with _REACH_LOCK:
        found = cache.get(key)
        if isinstance(found, Reachability):
            return found
        result = reachability(policy_set, now=now)
        cache.clear()  # one entry: the policy in force
        cache[key] = result
        return result


def build_report(service: Any, query: Mapping[str, str], now: datetime) -> dict[str, Any]:
    """``service``: the :class:`meshward.flows.service.FlowService` (its store, its control
    plane's policy set and its reachability cache)."""
    unknown = sorted(set(query) - {"since", "soon"})
    if unknown:
        raise QueryError(f"unknown parameter {unknown[0][:40]!r}: use since, soon")
    since = _number(query, "since", now.timestamp())
    soon = _number(query, "soon", MAX_SOON)
    policy_set: PolicySet = service.control.policy
    totals, truncated = flow_totals(service.store, since)
    return build(
        policy_set,
        totals,
        now=now,
        since=None if since is None else datetime.fromtimestamp(since, UTC),
        soon=DEFAULT_SOON if soon is None else timedelta(seconds=soon),
        truncated=truncated,
        reach=cached_reachability(service.reach_cache, policy_set, now),
    )
