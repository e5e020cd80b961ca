"""``GET /flows/observed``: every allowed flow of a window summed over buckets and verdicts,
what `meshward policy suggest` is made of.

Unlike ``/flows`` (a page of the most recent rows for people) this answers the whole window,
because a suggestion built from a page would deny whatever fell off it. It is still bounded:
at most :data:`MAX_ROWS` groups, and ``truncated`` says when there were more (the CLI then warns
that the suggestion is built from part of the evidence).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from meshward.flows.query import QueryError
from meshward.flows.records import ALLOW
from meshward.flows.store import FlowStore, flows_table

MAX_ROWS = 50_000


def observed(store: FlowStore, query: Mapping[str, str]) -> dict[str, Any]:
    """Filters: ``since`` (Unix seconds: flows last seen from then on), ``namespace`` (of the
    destination)."""
    unknown = sorted(set(query) - {"since", "namespace"})
    if unknown:
        raise QueryError(f"unknown parameter {unknown[0]!r}: use since, namespace")
    t = flows_table.c
    keys = [t.source, t.destination, t.port, t.method, t.path]
    stmt = (
        sa.select(
            *keys,
            sa.func.sum(t.count).label("count"),
            sa.func.min(t.first_seen).label("first_seen"),
            sa.func.max(t.last_seen).label("last_seen"),
        )
        .where(t.decision == ALLOW)
        .group_by(*keys)
        .order_by(*keys)
        .limit(MAX_ROWS + 1)
    )
    if query.get("since"):
        try:
            cutoff = float(query["since"])
        except ValueError:
            raise QueryError("since must be a Unix time in seconds") from None
        stmt = stmt.where(t.last_seen >= cutoff)
    namespace = query.get("namespace")
    if namespace:
        if "/" in namespace or len(namespace) > 63:
            raise QueryError("namespace must be one namespace name")
        stmt = stmt.where(t.destination.startswith(namespace + "/", autoescape=True))
    with store.engine.connect() as conn:
        rows = conn.execute(stmt).mappings().all()
    return {
        "truncated": len(rows) > MAX_ROWS,
        "rows": [
            {
                "source": r["source"],
                "destination": r["destination"],
                "port": int(r["port"]),
                "method": r["method"],
                "path": r["path"],
                "count": int(r["count"]),
                "first_seen": float(r["first_seen"]),
                "last_seen": float(r["last_seen"]),
            }
            for r in rows[:MAX_ROWS]
        ],
    }
