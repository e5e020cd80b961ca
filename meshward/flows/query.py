"""Reading the flow store: the rows behind ``/flows`` and ``/denials`` (admin endpoints) and
``meshward flows|denials --xds``. Query parameters are validated here: a bad value is a 400
with a message, never a traceback."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from meshward.flows.store import FlowStore, denials_table, flows_table

MAX_LIMIT = 1000
DECISIONS = ("allow", "deny", "error")


class QueryError(ValueError):
    """A bad query parameter (the admin answers 400 with this message)."""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _params(query: Mapping[str, str]) -> tuple[float | None, int]:
    since = query.get("since")
    limit_text = query.get("limit", "200")
    if not limit_text.isdigit() or not 0 < int(limit_text) <= MAX_LIMIT:
        raise QueryError(f"limit must be 1..{MAX_LIMIT}")
    cutoff = None
    if since:
        try:
            cutoff = float(since)
        except ValueError:
            raise QueryError("since must be a Unix time in seconds") from None
    return cutoff, int(limit_text)


def flows(store: FlowStore, query: Mapping[str, str]) -> list[dict[str, Any]]:
    """Flows summed over buckets, most recent first. Filters: from, to, decision, since."""
    cutoff, limit = _params(query)
    t = flows_table.c
    decision = query.get("decision")
    if decision and decision not in DECISIONS:
        raise QueryError(f"decision must be one of {', '.join(DECISIONS)}")
    keys = [t.source, t.destination, t.port, t.method, t.path, t.decision, t.policy, t.dry_run]
    stmt = sa.select(
        *keys,
        sa.func.sum(t.count).label("count"),
        sa.func.sum(t.duration_ms_sum).label("duration_ms_sum"),
        sa.func.min(t.first_seen).label("first_seen"),
        sa.func.max(t.last_seen).label("last_seen"),
        sa.func.max(t.last_trace_id).label("trace_id"),
        sa.func.max(t.reason).label("reason"),
    ).group_by(*keys)
    if query.get("from"):
        stmt = stmt.where(t.source == query["from"])
    if query.get("to"):
        stmt = stmt.where(t.destination == query["to"])
    if decision:
        stmt = stmt.where(t.decision == decision)
    if cutoff is not None:
        stmt = stmt.where(t.last_seen >= cutoff)
    stmt = stmt.order_by(sa.desc("last_seen")).limit(limit)
    with store.engine.connect() as conn:
        rows = conn.execute(stmt).mappings().all()
    return [
        {
            "source": r["source"],
            "destination": r["destination"],
            "port": r["port"],
            "method": r["method"],
            "path": r["path"],
            "decision": r["decision"],
            "policy": r["policy"] or None,
            "dry_run": r["dry_run"].split(",") if r["dry_run"] else [],
            "reason": r["reason"],
            "count": int(r["count"]),
            "mean_duration_ms": round(int(r["duration_ms_sum"]) / max(1, int(r["count"])), 1),
            "first_seen": _iso(r["first_seen"]),
            "last_seen": _iso(r["last_seen"]),
            "trace_id": r["trace_id"] or None,
        }
        for r in rows
    ]


def denials(store: FlowStore, query: Mapping[str, str]) -> list[dict[str, Any]]:
    """Denials one by one, most recent first. Filters: from, to, trace, since."""
    cutoff, limit = _params(query)
    t = denials_table.c
    stmt = sa.select(denials_table)
    if query.get("from"):
        stmt = stmt.where(t.source == query["from"])
    if query.get("to"):
        stmt = stmt.where(t.destination == query["to"])
    if query.get("trace"):
        stmt = stmt.where(t.trace_id == query["trace"].lower())
    if cutoff is not None:
        stmt = stmt.where(t.time >= cutoff)
    stmt = stmt.order_by(t.id.desc()).limit(limit)
    with store.engine.connect() as conn:
        rows = conn.execute(stmt).mappings().all()
    return [
        {
            "time": _iso(r["time"]),
            "source": r["source"],
            "source_principal": r["source_principal"] or None,
            "destination": r["destination"],
            "port": r["port"],
            "method": r["method"],
            "path": r["path"],
            "status": r["status"],
            "reason": r["reason"],
            "policy": r["policy"] or None,
            "trace_id": r["trace_id"] or None,
            "kind": r["kind"],
        }
        for r in rows
    ]
