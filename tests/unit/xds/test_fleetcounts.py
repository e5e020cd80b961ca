"""Fleet counts kept on events (meshward.xds.fleetcounts) equal a recomputation from the
per-node view, over random sequences of connects, disconnects, pushes, ACKs, NACKs, new
versions, garbage collection and time passing; and they stay right through disconnects."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshward.testing.xds_resources import cluster, listener, secret
from meshward.xds import typeurls
from meshward.xds.cache import SnapshotCache
from meshward.xds.enforcement import not_enforced
from meshward.xds.fleetcounts import FleetTable, metrics_view
from meshward.xds.protocol import Push, Request, SotwProtocol
from meshward.xds.snapshot import build_snapshot
from meshward.xds.status import FleetCounts, drifting, stream_flags, stream_types

THRESHOLD = 10.0
NODES = [f"ns/w{i % 2}/r{i}" for i in range(4)]  # two workloads of two replicas
FIVE = [f"ns/w{i % 3}/r{i}" for i in range(5)]
TYPES = [typeurls.CLUSTER, typeurls.LISTENER, typeurls.SECRET]
SECRET_NAMES = ("default", "ROOTCA")


@dataclass
class Open:
    node: str
    mode: str
    protocol: SotwProtocol
    pushes: dict[str, Push] = field(default_factory=dict)


class Fleet:
    """The server's side of the hooks: what AdsServer does to the table on each event."""

    def __init__(self) -> None:
        self.cache = SnapshotCache()
        self.table = FleetTable(self.cache)
        self.streams: dict[int, Open] = {}
        self.ids = itertools.count(1)
        self.now = 1000.0

    def touch(self, sid: int) -> None:  # AdsServer._handle: after every request, and a plan
        self.table.touch(self.streams[sid].node)

    def open(self, node: str, mode: str) -> None:
        """As AdsServer._open: the control plane makes sure the node has a snapshot, the
        stream subscribes, and its loop plans at once."""
        if self.cache.get(node) is None:
            self.new_version(node, 0)
        sid = next(self.ids)
        protocol = SotwProtocol()
        self.streams[sid] = Open(node, mode, protocol)
        self.table.opened(node, sid, mode, protocol.states)
        for type_url in TYPES:
            names = SECRET_NAMES if type_url == typeurls.SECRET else ()
            protocol.receive(Request(type_url, "", names), self.now)
            self.touch(sid)
        self.plan(sid)

    def close(self, sid: int) -> None:
        node = self.streams.pop(sid).node
        self.table.closed(node, sid)  # the node stays known while its snapshot does

    def plan(self, sid: int) -> None:
        stream = self.streams[sid]
        snapshot = self.cache.get(stream.node)
        if snapshot is None:
            return
        marks = stream.protocol.status_marks
        pushes, events = stream.protocol.plan(snapshot, self.now)
        for push in pushes:
            stream.pushes[push.type_url] = push
        if events or stream.protocol.status_marks != marks:  # as AdsServer._loop
            self.touch(sid)

    def answer(self, sid: int, type_url: str, nack: bool) -> None:
        stream = self.streams[sid]
        push = stream.pushes.pop(type_url, None)
        if push is None:
            return
        state = stream.protocol.states[type_url]
        names = SECRET_NAMES if type_url == typeurls.SECRET else ()
        version = state.acked_version if nack else push.version
        stream.protocol.receive(
            Request(type_url, version, names, push.nonce, "bad config" if nack else None),
            self.now,
        )
        self.touch(sid)

    def new_version(self, node: str, variant: int) -> None:  # the table watches the cache
        resources = {
            typeurls.CLUSTER: [cluster(f"c{variant % 3}")],
            typeurls.LISTENER: [listener(f"l{variant % 2}")],
            typeurls.SECRET: [secret(name, f"s{variant % 4}") for name in SECRET_NAMES],
        }
        self.cache.set(node, build_snapshot(self.cache.get(node), resources, self.now, check=False))

    def collect(self, node: str) -> None:  # node GC: only nodes without a stream
        if not any(s.node == node for s in self.streams.values()):
            self.cache.discard(node)

    # -- the recomputation from the per-node view ------------------------------------------------
    def recomputed(self, failed: frozenset[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        counts = FleetCounts()
        extra: dict[str, Any] = {"nacking": 0, "out_of_sync_types": {}, "health": {}}
        by_node: dict[str, list[tuple[int, Open]]] = {}
        for sid, stream in sorted(self.streams.items()):
            by_node.setdefault(stream.node, []).append((sid, stream))
        for node in sorted(set(by_node) | set(self.cache.nodes())):
            snapshot = self.cache.get(node)
            streams = by_node.get(node, [])
            counts.add(
                node,
                [
                    (s.mode, stream_flags(s.protocol.states, snapshot, self.now, THRESHOLD))
                    for _, s in streams
                ],
                compile_failed="/".join(node.split("/")[:2]) in failed,
            )
            statuses = [
                stream_types(s.protocol.states, snapshot, self.now, THRESHOLD) for _, s in streams
            ]
            if not streams:
                continue
            if any(t.rejected for types in statuses for t in types):
                extra["nacking"] += 1
            for short in {
                typeurls.short(t.type_url) for ts in statuses for t in ts if not t.in_sync
            }:
                extra["out_of_sync_types"][short] = extra["out_of_sync_types"].get(short, 0) + 1
            extra["health"][node] = (
                any(drifting(ts) for ts in statuses),
                all(not_enforced(ts) is None for ts in statuses)
                and "/".join(node.split("/")[:2]) not in failed,
                all(t.in_sync for ts in statuses for t in ts),
            )
        return counts.as_dict(), extra


def check(fleet: Fleet, failed: frozenset[str]) -> None:
    want, extra = fleet.recomputed(failed)
    got = fleet.table.summary(fleet.now, THRESHOLD, failed)
    for key in ("total", "connected", "disconnected", "in_sync", "pending", "drifting",
                "not_enforced", "streams", "attention_total"):  # fmt: skip
        assert got[key] == want[key], (key, got, want)
    assert [a["node"] for a in got["attention"]] == [a["node"] for a in want["attention"]]
    assert [set(a["problems"]) for a in got["attention"]] == [
        set(a["problems"]) for a in want["attention"]
    ]
    assert got["nacking"] == extra["nacking"]
    assert got["out_of_sync_types"] == extra["out_of_sync_types"]
    # what the policy history's diff waits for: every connected node not yet in sync
    assert fleet.table.pending() == want["connected"] - want["in_sync"]
    view = metrics_view(fleet.table, fleet.now, THRESHOLD, failed, limit=3)
    assert len(view["nodes"]) == min(3, want["connected"])
    for node in view["nodes"]:
        drift, enforced, in_sync = extra["health"][node["node"]]
        assert (node["drift"], node["policy_enforced"]) == (drift, enforced)
        assert all(t["in_sync"] for s in node["streams"] for t in s["types"]) == in_sync
    assert sorted(view["drifting_nodes"]) == sorted(n for n, h in extra["health"].items() if h[0])


EVENT = st.one_of(
    st.tuples(st.just("open"), st.sampled_from(NODES), st.sampled_from(["sotw", "delta"])),
    st.tuples(st.just("close"), st.integers(0, 7)),
    st.tuples(st.just("ack-all"), st.integers(0, 7)),
    st.tuples(st.just("plan"), st.integers(0, 7)),
    st.tuples(st.just("plan"), st.integers(0, 7)),
    st.tuples(st.just("ack"), st.integers(0, 7), st.sampled_from(TYPES)),
    st.tuples(st.just("nack"), st.integers(0, 7), st.sampled_from(TYPES)),
    st.tuples(st.just("version"), st.sampled_from(NODES), st.integers(0, 11)),
    st.tuples(st.just("tick"), st.sampled_from([0.5, 4.0, 11.0])),
    st.tuples(st.just("collect"), st.sampled_from(NODES)),
)


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(EVENT, min_size=10, max_size=80),
    failed=st.frozensets(st.sampled_from(["ns/w0", "ns/w1", "ns/other"]), max_size=2),
)
def test_event_maintained_counts_equal_a_recomputation(
    events: list[tuple[Any, ...]], failed: frozenset[str]
) -> None:
    fleet = Fleet()
    for event in events:
        kind = event[0]
        sids = sorted(fleet.streams)
        if kind == "open":
            fleet.open(event[1], event[2])
        elif kind == "version":
            fleet.new_version(event[1], event[2])
        elif kind == "tick":
            fleet.now += event[1]
        elif kind == "collect":
            fleet.collect(event[1])
        elif sids:
            sid = sids[event[1] % len(sids)]
            if kind == "close":
                fleet.close(sid)
            elif kind == "plan":
                fleet.plan(sid)
            elif kind == "ack-all":
                for type_url in TYPES:
                    fleet.answer(sid, type_url, nack=False)
            else:
                fleet.answer(sid, event[2], nack=kind == "nack")
        check(fleet, failed)


def test_counts_stay_right_through_disconnects_and_reconnects() -> None:
    fleet = Fleet()
    for node in FIVE:
        fleet.new_version(node, 0)
        fleet.open(node, "sotw")
    for sid in list(fleet.streams):
        fleet.plan(sid)
    for sid in list(fleet.streams)[:3]:  # three nodes ACK everything, two ACK nothing
        for type_url in TYPES:
            fleet.answer(sid, type_url, nack=False)
    fleet.now += 11.0
    got = fleet.table.summary(fleet.now, THRESHOLD)
    assert (got["connected"], got["in_sync"], got["drifting"]) == (5, 3, 2)
    for sid in list(fleet.streams)[3:]:  # the two behind disconnect: no longer drifting
        fleet.close(sid)
    got = fleet.table.summary(fleet.now, THRESHOLD)
    assert (got["total"], got["connected"], got["disconnected"]) == (5, 3, 2)
    assert (got["in_sync"], got["drifting"], got["pending"], got["attention_total"]) == (3, 0, 0, 0)
    assert got["out_of_sync_types"] == {}
    fleet.new_version(FIVE[0], 1)  # a new version while connected: out of sync at once
    got = fleet.table.summary(fleet.now, THRESHOLD)
    assert (got["in_sync"], got["pending"]) == (2, 1)
    assert got["out_of_sync_types"] == {"CDS": 1, "LDS": 1, "SDS": 1}
    fleet.open(FIVE[4], "delta")  # one comes back
    got = fleet.table.summary(fleet.now, THRESHOLD)
    assert (got["connected"], got["streams"]) == (4, {"sotw": 3, "delta": 1})
    fleet.open(FIVE[1], "sotw")  # a second stream of a node in sync, not answered yet
    fleet.plan(max(fleet.streams))
    assert fleet.table.summary(fleet.now, THRESHOLD)["in_sync"] == 1
    fleet.close(max(fleet.streams))  # the lagging stream closes: the node is in sync again
    assert fleet.table.summary(fleet.now, THRESHOLD)["in_sync"] == 2
    check(fleet, frozenset())
    for sid in list(fleet.streams):
        fleet.close(sid)
    check(fleet, frozenset())
    got = fleet.table.summary(fleet.now, THRESHOLD)
    assert (got["connected"], got["in_sync"], got["nacking"], got["total"]) == (0, 0, 0, 5)
    assert fleet.table.first_nodes(10) == [] and not fleet.table.drifting(fleet.now, 0.0)


def test_a_flood_of_problem_nodes_lists_twenty_and_counts_the_rest() -> None:
    fleet = Fleet()
    for i in range(300):
        node = f"ns/flood/r{i:03}"
        fleet.new_version(node, 0)
        fleet.open(node, "sotw")
    fleet.now += 11.0
    got = fleet.table.summary(fleet.now, THRESHOLD)
    assert got["drifting"] == 300 and got["attention_total"] == 300
    assert len(got["attention"]) == 20 and got["attention"][0]["node"] == "ns/flood/r000"
    view = metrics_view(fleet.table, fleet.now, THRESHOLD, (), limit=50)
    assert len(view["nodes"]) == 50 and len(view["node_drift"]) == 50  # the same 50 drifting
    fleet.new_version("ns/calm/r0", 0)
    fleet.open("ns/calm/r0", "sotw")  # sorts before every flood node, not drifting
    view = metrics_view(fleet.table, fleet.now, THRESHOLD, (), limit=50)
    assert view["node_drift"]["ns/calm/r0"] is False and len(view["node_drift"]) == 51
