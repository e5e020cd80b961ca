"""The summary's per-stream flags say what the per-node documents say (meshward.xds.status),
over every combination of requested / in sync / old or fresh change / rejected / type."""

from __future__ import annotations

import itertools

from meshward.xds import typeurls
from meshward.xds.enforcement import not_enforced
from meshward.xds.protocol import TypeState
from meshward.xds.snapshot import Snapshot, TypeSnapshot
from meshward.xds.status import FleetCounts, drifting, stream_flags, stream_types

NOW = 1000.0
THRESHOLD = 10.0


def _snapshot() -> Snapshot:
    return Snapshot(
        version="v",
        types={
            typeurls.LISTENER: TypeSnapshot(version="l2", resources={}, changed_at=NOW - 100),
            typeurls.ROUTE: TypeSnapshot(version="r2", resources={}, changed_at=NOW - 1),
            typeurls.SECRET: TypeSnapshot(version="s2", resources={}, changed_at=NOW - 100),
        },
    )


def test_stream_flags_agree_with_the_per_type_statuses() -> None:
    snapshot = _snapshot()
    choices = [(False, True), ("", "old", "current"), (False, True)]
    per_type = list(itertools.product(*choices))
    cases = 0
    for listener, route, secret in itertools.product(per_type, repeat=3):
        states = {}
        for type_url, (requested, acked, rejected), current in (
            (typeurls.LISTENER, listener, "l2"),
            (typeurls.ROUTE, route, "r2"),
            (typeurls.SECRET, secret, "s2"),
        ):
            states[type_url] = TypeState(
                type_url=type_url,
                requested=requested,
                acked_version=current if acked == "current" else acked,
                rejected={"x": "h"} if rejected else {},
            )
        statuses = stream_types(states, snapshot, NOW, THRESHOLD)
        want = (
            all(s.in_sync for s in statuses),
            drifting(statuses),
            not_enforced(statuses) is not None,
        )
        assert stream_flags(states, snapshot, NOW, THRESHOLD) == want, states
        cases += 1
    assert cases == 12**3


def test_fleet_counts_name_at_most_twenty_nodes_and_count_the_rest() -> None:
    counts = FleetCounts()
    for i in range(50):
        counts.add(f"ns/n{i}", [("sotw", (False, True, i % 2 == 0))])
    counts.add("ns/fine", [("delta", (True, False, False))])
    counts.add("ns/gone", [])
    out = counts.as_dict()
    assert out["total"] == 52 and out["connected"] == 51 and out["disconnected"] == 1
    assert out["drifting"] == 50 and out["not_enforced"] == 25 and out["in_sync"] == 1
    assert out["streams"] == {"sotw": 50, "delta": 1}
    assert len(out["attention"]) == 20 and out["attention_total"] == 50
    assert out["attention"][0] == {"node": "ns/n0", "problems": ["drift", "not enforced"]}
