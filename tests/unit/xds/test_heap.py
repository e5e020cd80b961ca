"""The control plane's heap policy (meshward.xds.heap): what a fan-out allocates is frozen a
batch at a time, so no collection pass walks it, and the reference cycles frozen meanwhile are
collected once the frozen heap has grown past its bound (flooded here)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from meshward.xds.heap import Heap


@pytest.fixture
def heap() -> Iterator[Heap]:
    gc.unfreeze()
    made = Heap(growth=1.1, floor=1_000)
    made.start()
    try:
        yield made
    finally:
        made.stop()
    assert gc.get_freeze_count() == 0


class Node:
    """A cycle, as some long-lived objects are (a stream and its callbacks)."""

    def __init__(self) -> None:
        self.me = self


def test_settle_freezes_what_was_allocated_since(heap: Heap) -> None:
    young = [[i] for i in range(500)]
    walked = {id(o) for o in gc.get_objects()}
    assert all(id(y) in walked for y in young[:10])
    heap.settle()
    walked = {id(o) for o in gc.get_objects()}  # what any collection pass would walk
    assert not any(id(y) in walked for y in young)
    assert heap.settles == 1 and not heap.thaw_due()  # live objects frozen: nothing to thaw


def test_frozen_objects_are_still_freed_by_reference_counting(heap: Heap) -> None:
    heap.settle()
    before = gc.get_freeze_count()
    kept = [[i] for i in range(2_000)]
    heap.settle()
    after = gc.get_freeze_count()
    assert after >= before + len(kept)
    del kept
    # Relative to ``after``: other threads of a shared test process may allocate (and a settle
    # freeze) meanwhile, but nothing is frozen again between here and the count below.
    assert gc.get_freeze_count() <= after - 2_000
    assert not heap.thaw_due()


def test_a_flood_of_frozen_cycles_is_collected_once_the_heap_has_grown_past_its_bound(
    heap: Heap,
) -> None:
    reference = heap.reference
    assert reference is not None
    rounds = 0
    while not heap.thaw_due():  # cycles that become garbage after being frozen: kept
        cycles = [Node() for _ in range(500)]
        heap.settle()
        del cycles
        rounds += 1
        assert rounds < 10_000, "the bound never tripped"
    blocks = sys.getallocatedblocks()  # the heap's size, counted in O(1)
    assert reference * heap.growth < blocks <= reference * heap.growth + 2_000  # the bound
    freed = heap.thaw()
    assert freed >= rounds * 500 * 0.9
    assert heap.thaws == 1 and not heap.thaw_due()
    assert sys.getallocatedblocks() < reference + (blocks - reference) / 2


def test_a_fleets_worth_of_closed_streams_makes_a_thaw_due(heap: Heap) -> None:
    """Closed gRPC streams leave reference cycles behind (frozen while the stream lived): a
    thaw is due once as many streams closed as there are nodes (at least ``streams``)."""
    heap.streams = 100
    for _ in range(99):
        heap.stream_closed()
    assert not heap.thaw_due(nodes=50)
    heap.stream_closed()
    assert not heap.thaw_due(nodes=500)  # a bigger fleet: its own size of closed streams
    assert heap.thaw_due(nodes=50)
    heap.thaw()
    assert heap.closed == 0 and not heap.thaw_due(nodes=50)


def test_nothing_is_frozen_unless_started() -> None:
    gc.unfreeze()
    idle = Heap()
    idle.settle()
    assert gc.get_freeze_count() == 0 and idle.settles == 0 and not idle.thaw_due()
