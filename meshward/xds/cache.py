"""Desired snapshots by node id, and the wake-up of the streams serving each node.

Single-threaded by design: only the server's event loop touches it (the control plane hops
onto the loop before calling :meth:`SnapshotCache.set`). A wake-up is a flag plus one queue item
per stream, so a burst of changes for one node costs that node's stream one planning pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from meshward.xds.resources import Resource
from meshward.xds.snapshot import ContentCache, Snapshot, build_snapshot

Waker = Callable[[], None]


class SnapshotCache:
    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, set[Waker]] = {}
        self.sets = 0  # snapshots that changed something (for tests and benchmarks)
        # Streams woken whose pushes are not written yet (the server counts them): a mesh-wide
        # fan-out wakes more nodes only while this is small, so a stream's own request never
        # queues behind thousands of pushes (meshward.xds.compiling.paced).
        self.pushing = 0
        # Type contents shared by every node that gets the same resources (meshward.xds.snapshot).
        self.contents = ContentCache()

    def build(self, node: str, resources: Mapping[str, Iterable[Resource]], now: float) -> Snapshot:
        """The node's next snapshot (not stored: see :meth:`set`), from its current one and
        sharing type contents with the other nodes (raises InconsistentSnapshot)."""
        return build_snapshot(self._snapshots.get(node), resources, now, contents=self.contents)

    def get(self, node: str) -> Snapshot | None:
        return self._snapshots.get(node)

    def set(self, node: str, snapshot: Snapshot) -> bool:
        """Store ``snapshot`` and wake the node's streams, unless nothing changed for it."""
        previous = self._snapshots.get(node)
        if previous is not None and not snapshot.changed_types(previous):
            return False
        self._snapshots[node] = snapshot
        self.sets += 1
        for wake in tuple(self._watchers.get(node, ())):
            wake()
        return True

    def discard(self, node: str) -> None:
        self._snapshots.pop(node, None)

    def watch(self, node: str, wake: Waker) -> None:
        self._watchers.setdefault(node, set()).add(wake)

    def unwatch(self, node: str, wake: Waker) -> None:
        watchers = self._watchers.get(node)
        if watchers is not None:
            watchers.discard(wake)
            if not watchers:
                del self._watchers[node]

    def watched(self, node: str) -> bool:
        return bool(self._watchers.get(node))

    def nodes(self) -> Iterator[str]:
        return iter(tuple(self._snapshots))

    def __len__(self) -> int:
        return len(self._snapshots)
