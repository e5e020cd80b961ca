"""The flow store read for ``/report``: flows summed per (source, destination, port, decision,
policy#rule, dry-run verdicts) over a window. Method and path are left out on purpose: they are
what makes flows numerous, and no part of the report needs them, so the answer stays about
workloads x workloads x rules however busy the mesh is. Still bounded (``MAX_ROWS``)."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from meshward.flows.store import FlowStore, flows_table

MAX_ROWS = 50_000


@dataclass(frozen=True)
class FlowTotal:
    source: str
    destination: str
    port: int
    decision: str  # allow | deny | error
    policy: str  # "ns/name#rule" of the deciding rule, "" when none
    dry_run: tuple[str, ...]  # dry-run policies that would have denied these requests
    count: int


def flow_totals(
    store: FlowStore, since: float | None, limit: int = MAX_ROWS
) -> tuple[list[FlowTotal], bool]:
    """The totals (largest first) and whether ``limit`` cut them."""
    t = flows_table.c
    keys = [t.source, t.destination, t.port, t.decision, t.policy, t.dry_run]
    stmt = sa.select(*keys, sa.func.sum(t.count).label("count")).group_by(*keys)
    if since is not None:
        stmt = stmt.where(t.last_seen >= since)
    stmt = stmt.order_by(sa.desc("count")).limit(limit + 1)
    with store.engine.connect() as conn:
        rows = conn.execute(stmt).mappings().all()
    totals = [
        FlowTotal(
            source=r["source"],
            destination=r["destination"],
            port=int(r["port"]),
            decision=r["decision"],
            policy=r["policy"] or "",
            dry_run=tuple(p for p in (r["dry_run"] or "").split(",") if p),
            count=int(r["count"]),
        )
        for r in rows[:limit]
    ]
    return totals, len(rows) > limit
