"""Fleet counts kept up to date on events, so reading them does not walk every node.

The `/status` summary and the `/metrics` fleet gauges were one pass over every stream per read
(~10-25 us per node: 0.1 s and more at 5,000 nodes, per request). :class:`FleetTable` instead
keeps each connected node's *contribution* (in sync or not, which types are out of sync and
since when, rejected, NACKing, its stream modes) and the totals of those contributions. The
server tells it when something a contribution depends on may have changed:

- a stream opened or closed (:meth:`FleetTable.opened`, :meth:`FleetTable.closed`);
- a stream's protocol state changed: a request (ACK, NACK, subscription) or a plan
  (:meth:`FleetTable.touch`, called from the server's event handling);
- the node's desired snapshot changed: the table watches the node in the snapshot cache while
  it has streams, as the streams do (new version).

Each event recomputes that one node from its streams (a few types per stream) and moves the
totals by the difference, so a read is O(1) for the counts, O(log n) for drift (out-of-sync
nodes sorted by since when: drift is a matter of time passing, not of an event), and
O(nodes needing attention) for the names listed (at most :data:`ATTENTION_LIMIT`) and the
compile failures (the connected nodes of the workloads that failed). The per-node rules are
those of :func:`meshward.xds.status.stream_flags`; a property test replays random event
sequences and compares every read with a recomputation from the per-node view
(:class:`meshward.xds.status.FleetCounts`).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from meshward.xds import typeurls
from meshward.xds.cache import SnapshotCache
from meshward.xds.protocol import TypeState
from meshward.xds.snapshot import Snapshot
from meshward.xds.status import ATTENTION_LIMIT, iso


class Contribution(NamedTuple):
    """What one connected node adds to the totals (a named tuple: one is built on every
    event of the node, i.e. per ACK of a fan-out, and compared with the last one in C)."""

    in_sync: bool
    rejected: bool  # a listener/route (not a secret) NACKed and not in sync: not enforcing
    nacking: bool  # some type's latest content was NACKed (secrets included)
    out_of_sync: frozenset[str]  # type URLs out of sync on any of its streams
    behind_since: float | None  # earliest "out of sync since" of those types (drift clock)
    has_snapshot: bool
    last_policy_ack: float  # latest ACK of a non-secret type (monotonic; 0: none); stays last


@dataclass
class _Stream:
    mode: str
    states: Mapping[str, TypeState]
    not_after: datetime | None


def contribution(streams: Collection[_Stream], snapshot: Snapshot | None) -> Contribution:
    """One node from its streams, by the rules of meshward.xds.status.stream_flags."""
    in_sync, rejected, nacking = True, False, False
    out: set[str] | None = None
    since: float | None = None
    last_ack = 0.0
    for stream in streams:
        for type_url, st in stream.states.items():
            if not st.requested:
                continue
            if st.acked_at > last_ack and type_url != typeurls.SECRET:
                last_ack = st.acked_at
            if st.rejected:
                nacking = True
            desired = snapshot.type_version(type_url) if snapshot is not None else ""
            if st.acked_version == desired:
                continue
            in_sync = False
            if out is None:
                out = set()
            out.add(type_url)
            began = max(
                snapshot.changed_at(type_url) if snapshot is not None else 0.0, st.requested_at
            )
            since = began if since is None else min(since, began)
            rejected = rejected or (type_url != typeurls.SECRET and bool(st.rejected))
    return Contribution(
        in_sync, rejected, nacking, frozenset(out) if out else _IN_SYNC, since,
        snapshot is not None, last_ack,
    )  # fmt: skip


_IN_SYNC: frozenset[str] = frozenset()


def workload_of(node: str) -> str:
    return "/".join(node.split("/")[:2])


class FleetTable:
    """The connected nodes' contributions and their totals (see the module docstring).
    Single-threaded: only the server's event loop calls it, as for the snapshot cache."""

    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self._streams: dict[str, dict[int, _Stream]] = {}
        self._entries: dict[str, Contribution] = {}
        self._wakers: dict[str, Callable[[], None]] = {}
        self._behind: list[tuple[float, str]] = []  # (since, node), sorted: the drift clock
        self._rejected: set[str] = set()
        self._by_workload: dict[str, set[str]] = {}  # connected nodes per workload ref
        self._names: list[str] = []  # connected node names, sorted (bounded per-node series)
        self.in_sync = 0
        self.nacking = 0
        self.without_snapshot = 0
        self.out_of_sync_types: Counter[str] = Counter()
        self.streams: Counter[str] = Counter()
        self.last_policy_ack = 0.0  # latest non-secret ACK of any node (monotonic)

    # -- events ----------------------------------------------------------------------------------
    def opened(
        self,
        node: str,
        stream_id: int,
        mode: str,
        states: Mapping[str, TypeState],
        not_after: datetime | None = None,
    ) -> None:
        streams = self._streams.get(node)
        if streams is None:
            streams = self._streams[node] = {}
            bisect.insort(self._names, node)
            self._by_workload.setdefault(workload_of(node), set()).add(node)
            waker = self._wakers[node] = lambda: self.touch(node)
            self.cache.watch(node, waker)
        streams[stream_id] = _Stream(mode, states, not_after)
        self.streams[mode] += 1
        self.touch(node)

    def closed(self, node: str, stream_id: int) -> None:
        streams = self._streams.get(node)
        if streams is None or stream_id not in streams:
            return
        self.streams[streams.pop(stream_id).mode] -= 1
        if streams:
            self.touch(node)
            return
        del self._streams[node]
        self._remove(node)
        del self._names[bisect.bisect_left(self._names, node)]
        peers = self._by_workload[workload_of(node)]
        peers.discard(node)
        if not peers:
            del self._by_workload[workload_of(node)]
        self.cache.unwatch(node, self._wakers.pop(node))

    def touch(self, node: str) -> None:
        """Recompute ``node`` (its protocol state or its snapshot may have changed)."""
        streams = self._streams.get(node)
        if streams is None:
            return
        new = contribution(streams.values(), self.cache.get(node))
        old = self._entries.get(node)
        if old == new:
            return
        if new.last_policy_ack > self.last_policy_ack:
            self.last_policy_ack = new.last_policy_ack
        self._entries[node] = new
        if old is not None:
            if old[:-1] == new[:-1]:
                return  # only its latest ACK moved (every ACK of a node in sync)
            self._retire(node, old)
        self.in_sync += new.in_sync
        self.nacking += new.nacking
        self.without_snapshot += not new.has_snapshot
        if new.out_of_sync:
            counts = self.out_of_sync_types  # (item by item: Counter.update and .subtract
            for type_url in new.out_of_sync:  # check for a Mapping first, an ABC check)
                counts[type_url] += 1
        if new.rejected:
            self._rejected.add(node)
        if new.behind_since is not None:
            bisect.insort(self._behind, (new.behind_since, node))

    def _remove(self, node: str) -> None:
        old = self._entries.pop(node, None)
        if old is not None:
            self._retire(node, old)

    def _retire(self, node: str, old: Contribution) -> None:
        """Take ``old`` (the node's entry until now) out of the totals."""
        self.in_sync -= old.in_sync
        self.nacking -= old.nacking
        self.without_snapshot -= not old.has_snapshot
        if old.out_of_sync:
            counts = self.out_of_sync_types
            for type_url in old.out_of_sync:
                left = counts[type_url] - 1
                if left > 0:
                    counts[type_url] = left
                else:
                    counts.pop(type_url, None)
        if old.rejected:
            self._rejected.discard(node)
        if old.behind_since is not None:
            key = (old.behind_since, node)
            del self._behind[bisect.bisect_left(self._behind, key)]

    # -- reads -----------------------------------------------------------------------------------
    @property
    def connected(self) -> int:
        return len(self._streams)

    def drifting(self, now: float, threshold: float) -> list[str]:
        """Connected nodes out of sync for longer than ``threshold`` seconds (O(log n) + their
        number)."""
        cutoff = now - threshold
        return [node for _, node in self._behind[: bisect.bisect_left(self._behind, (cutoff, ""))]]

    def not_enforced(self, failed_workloads: Collection[str] = ()) -> set[str]:
        """Connected nodes that rejected a listener or route, or whose workload failed to
        compile (they run their last good config, not the policy set in force)."""
        names = set(self._rejected)
        for ref in failed_workloads:
            names |= self._by_workload.get(ref, set())
        return names

    def pending(self) -> int:
        """Connected nodes not in sync (O(1)): a rollout's ACKs still to come, or nodes stuck."""
        return self.connected - self.in_sync

    def summary(
        self, now: float, threshold: float, failed_workloads: Collection[str] = ()
    ) -> dict[str, Any]:
        """The same document as meshward.xds.status.FleetCounts.as_dict, plus NACKing nodes
        and the per-type out-of-sync counts."""
        drifting = self.drifting(now, threshold)
        not_enforced = self.not_enforced(failed_workloads)
        attention = set(drifting) | not_enforced
        drift_set = set(drifting)
        listed = []
        for node in sorted(attention)[:ATTENTION_LIMIT]:
            problems = ["drift"] if node in drift_set else []
            if node in not_enforced:
                problems.append("not enforced")
            listed.append({"node": node, "problems": problems})
        connected = self.connected
        total = len(self.cache) + self.without_snapshot
        return {
            "total": total,
            "connected": connected,
            "disconnected": total - connected,
            "in_sync": self.in_sync,
            "pending": connected - self.in_sync - len(drifting),
            "drifting": len(drifting),
            "not_enforced": len(not_enforced),
            "nacking": self.nacking,
            "out_of_sync_types": {
                typeurls.short(t): n for t, n in sorted(self.out_of_sync_types.items()) if n
            },
            "streams": {"sotw": self.streams["sotw"], "delta": self.streams["delta"]},
            "attention": listed,
            "attention_total": len(attention),
        }

    def first_nodes(self, limit: int) -> list[str]:
        """The first ``limit`` connected nodes by name (the bounded per-node metric series)."""
        return self._names[:limit]

    def node_health(
        self,
        names: list[str],
        now: float,
        threshold: float,
        failed_workloads: Collection[str] = (),
    ) -> Iterator[dict[str, Any]]:
        """Per named connected node, what the per-node metrics read (the shape of
        meshward.telemetry.fleet's node documents), from the kept contributions and the
        streams' states (O(types) per node)."""
        cutoff = now - threshold
        wall_offset = time.time() - now
        for node in names:
            entry = self._entries.get(node)
            streams = self._streams.get(node)
            if entry is None or streams is None:
                continue
            snapshot = self.cache.get(node)
            entries = []
            for stream in streams.values():
                types = []
                for type_url, st in stream.states.items():
                    if not st.requested:
                        continue
                    desired = snapshot.type_version(type_url) if snapshot else ""
                    acked = st.acked_at
                    types.append(
                        {
                            "type": typeurls.short(type_url),
                            "in_sync": st.acked_version == desired,
                            "acked_at": iso(acked + wall_offset) if acked else None,
                        }
                    )
                not_after = stream.not_after
                entries.append(
                    {
                        "types": types,
                        "ads_credentials": {"not_after": not_after.isoformat()}
                        if not_after
                        else None,
                    }
                )
            yield {
                "node": node,
                "connected": True,
                "drift": entry.behind_since is not None and entry.behind_since < cutoff,
                "policy_enforced": not entry.rejected and workload_of(node) not in failed_workloads,
                "streams": entries,
            }


def metrics_view(
    table: FleetTable,
    now: float,
    threshold: float,
    failed_workloads: Collection[str],
    limit: int,
) -> dict[str, Any]:
    """What a /metrics scrape reads (meshward.telemetry.fleet, meshward.xds.metrics): the
    counts, the drifting nodes by name, the latest policy ACK, per-node health for the first
    ``limit`` nodes by name only (the per-node series are bounded to that many anyway), and the
    per-node drift flags of those plus up to ``limit`` drifting nodes."""
    nodes = list(table.node_health(table.first_nodes(limit), now, threshold, failed_workloads))
    last = table.last_policy_ack
    drifting = table.drifting(now, threshold)
    return {
        "fleet": table.summary(now, threshold, failed_workloads),
        "drifting_nodes": drifting,
        "last_policy_ack": iso(last + time.time() - now) if last else None,
        # the first nodes by name, and every drifting node (at most ``limit`` of them)
        "node_drift": {n["node"]: n["drift"] for n in nodes}
        | dict.fromkeys(drifting[:limit], True),
        "nodes": nodes,
    }
