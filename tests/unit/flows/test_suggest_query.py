"""``/flows/observed``: allowed flows only, summed over buckets and verdicts, filtered by window
and namespace, bounded (``truncated`` past the row limit), bad parameters a clear error."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meshward.flows import suggest_query
from meshward.flows.query import QueryError
from meshward.flows.records import FlowRecord
from meshward.flows.store import FlowStore
from meshward.flows.suggest import ObservedFlow

T0 = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)


def record(src: str, dst: str, path: str, *, decision: str = "allow", at: datetime = T0,
           policy: str = "", dry_run: str = "") -> FlowRecord:  # fmt: skip
    return FlowRecord(
        time=at, source=src, source_principal="", destination=dst, port=8080, method="GET",
        path=path, status=200 if decision == "allow" else 403, decision=decision, reason="",
        policy=policy, dry_run=dry_run, duration_ms=1, trace_id="", reporter=dst,
        direction="inbound", kind="http",
    )  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> FlowStore:
    s = FlowStore.open(str(tmp_path / "flows.db"))
    s.add(
        [
            record("shop/a", "shop/orders", "/orders/{*}"),
            record("shop/a", "shop/orders", "/orders/{*}", at=T0 + timedelta(minutes=5)),
            record("shop/a", "shop/orders", "/orders/{*}", policy="shop/p#0", dry_run="x/y"),
            record("shop/b", "shop/orders", "/admin", decision="deny"),
            record("shop/a", "ops/tool", "/run", at=T0 - timedelta(days=2)),
        ]
    )
    s.flush(T0 + timedelta(minutes=6))
    return s


def test_allowed_flows_summed_over_buckets_and_verdicts(store: FlowStore) -> None:
    answer = suggest_query.observed(store, {})
    assert answer["truncated"] is False
    rows = {(r["source"], r["destination"], r["path"]): r for r in answer["rows"]}
    assert set(rows) == {("shop/a", "shop/orders", "/orders/{*}"), ("shop/a", "ops/tool", "/run")}
    orders = rows[("shop/a", "shop/orders", "/orders/{*}")]
    assert orders["count"] == 3
    assert orders["first_seen"] == T0.timestamp()
    assert orders["last_seen"] == (T0 + timedelta(minutes=5)).timestamp()
    assert ObservedFlow.from_json(orders).describe() == "shop/a -> shop/orders:8080 GET /orders/{*}"


def test_filters(store: FlowStore) -> None:
    since = str((T0 - timedelta(hours=1)).timestamp())
    assert [r["destination"] for r in suggest_query.observed(store, {"since": since})["rows"]] == [
        "shop/orders"
    ]
    assert [
        r["destination"] for r in suggest_query.observed(store, {"namespace": "ops"})["rows"]
    ] == ["ops/tool"]
    assert suggest_query.observed(store, {"namespace": "sho"})["rows"] == []  # no prefix match
    for bad, message in (
        ({"since": "yesterday"}, "since must be a Unix time"),
        ({"namespace": "a/b"}, "one namespace name"),
        ({"limit": "5"}, "unknown parameter 'limit'"),
    ):
        with pytest.raises(QueryError, match=message):
            suggest_query.observed(store, bad)


def test_a_flood_is_cut_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suggest_query, "MAX_ROWS", 50)
    s = FlowStore.open(str(tmp_path / "flood.db"))
    s.add([record("shop/a", "shop/orders", f"/p{i}") for i in range(120)])
    s.flush(T0)
    answer = suggest_query.observed(s, {})
    assert answer["truncated"] is True and len(answer["rows"]) == 50
