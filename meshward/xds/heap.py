"""The control plane's heap and Python's cyclic garbage collector.

A compiled mesh is hundreds of thousands of long-lived objects (protos, packed resources,
snapshots). Every full collection walks all of them, and the collector runs at points chosen
by allocation counts, i.e. on the event loop in the middle of serving streams: py-spy on a
300-service, 903-node fleet showed 13% of the server's busy samples in ``gc_collect_main``
during a cold start and 30% during a mesh-wide edit, each full pass a stall of every stream.
Freezing the heap once it holds the first compile moves those objects to the permanent
generation: later collections walk only what was allocated since.

That alone was not enough at fleet scale: everything a node's connection and its snapshots add
after that first freeze stays in the collected generations, and a mesh-wide edit at 1,000
services x 5 replicas (5,005 nodes) still ran a 2.5 s full collection on the loop, and gen-1
passes of 0.2-0.3 s, in the middle of the fan-out (gc callbacks timing each pass). So the
fan-out :meth:`Heap.settle`\\ s after every batch of nodes it wakes: ``gc.freeze`` only links
the young generations onto the permanent one (O(1)), and a collection then never walks more
than what one batch allocated.

The cost is bounded: a frozen object is still freed by reference counting when dropped; only
one that is (or becomes) part of a reference cycle is kept until the next :meth:`Heap.thaw`.
The cycles seen at fleet scale (gc callbacks with ``DEBUG_SAVEALL``) are gRPC's per-call
objects: ~5 per stream opened and ~33 per stream closed; the fan-out itself makes none. So a
thaw is due when as many streams have closed since the last one as there are nodes (at least
``streams``), or, for cycles of any other origin, when the frozen heap has grown to ``growth``
times its size after the last full collection (and by ``floor`` memory blocks; counted with
``sys.getallocatedblocks``, O(1): ``gc.get_freeze_count`` walks every frozen object, 0.3 s of
the loop's samples at 5,005 nodes when it was asked every few seconds): a fleet connecting
is live growth, not garbage, and thawing for it would pause every stream right after a cold
start. The thaw is a full collection (a pause of every stream, as the collector's own full
passes are), so the control plane asks for it only when no compile or fan-out is under way.
When the control plane stops (tests run many in one process) the heap is unfrozen and
collected as usual.
"""

from __future__ import annotations

import gc
import sys

#: The frozen heap may grow to this many times its size after the last full collection
#: before the next thaw collects the reference cycles kept meanwhile ...
GROWTH = 4.0
#: ... and by at least this many memory blocks (a small heap is not thawed over a few objects).
FLOOR = 1_000_000
#: Streams closed since the last thaw that make one due (or as many as there are nodes).
STREAMS = 1_000


def freeze() -> int:
    """Collect what is garbage now, then freeze the rest; returns how many objects were
    frozen in all (``gc.get_freeze_count``)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze() -> None:
    """Give the frozen objects back to the collector (the control plane stopped)."""
    gc.unfreeze()


class Heap:
    """When the control plane freezes and collects (see the module's docstring)."""

    def __init__(
        self, *, growth: float = GROWTH, floor: int = FLOOR, streams: int = STREAMS
    ) -> None:
        self.growth = growth
        self.floor = floor
        self.streams = streams
        self.reference: int | None = None  # allocated blocks after the start or the last thaw
        self.closed = 0  # streams closed since
        self.settles = 0
        self.thaws = 0

    def start(self) -> int:
        """Collect, then freeze the heap as the first compile left it."""
        frozen = freeze()
        self.reference = sys.getallocatedblocks()
        self.closed = 0
        return frozen

    def settle(self) -> None:
        """Freeze what was allocated since the last settle (O(1): no object is walked); only
        between :meth:`start` and :meth:`stop` (a control plane driven without its timers, as
        in tests, never freezes what nothing would unfreeze)."""
        if self.reference is None:
            return
        gc.freeze()
        self.settles += 1

    def stream_closed(self) -> None:
        self.closed += 1

    def thaw_due(self, nodes: int = 0) -> bool:
        """``nodes``: how many the control plane serves (a fleet's worth of closed streams)."""
        if self.reference is None:
            return False
        if self.closed >= max(self.streams, nodes):
            return True
        blocks = sys.getallocatedblocks()
        return blocks > self.reference * self.growth and blocks - self.reference > self.floor

    def thaw(self) -> int:
        """A full collection of the whole heap, then freeze what lives; returns how many
        objects it freed."""
        gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        self.reference = sys.getallocatedblocks()
        self.closed = 0
        self.thaws += 1
        return freed

    def stop(self) -> None:
        unfreeze()
        self.reference = None
