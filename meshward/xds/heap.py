"""The control plane's heap and Python's cyclic garbage collector.

A compiled mesh is hundreds of thousands of long-lived objects (protos, packed resources,
snapshots). Every full collection walks all of them, and the collector runs at points chosen
by allocation counts, i.e. on the event loop in the middle of serving streams: py-spy on a
300-service, 903-node fleet showed 13% of the server's busy samples in ``gc_collect_main``
during a cold start and 30% during a mesh-wide edit, each full pass a stall of every stream.
Freezing the heap once it holds the first compile moves those objects to the permanent
generation: later collections walk only what was allocated since.

The cost is bounded: a frozen object is still freed by reference counting when dropped; only
one that becomes part of a reference cycle is kept, so at most the heap as frozen (once) can be
retained, never more per edit. When the control plane stops (tests run many in one process)
the heap is unfrozen again, and collected as usual.
"""

from __future__ import annotations

import gc


def freeze() -> int:
    """Collect what is garbage now, then freeze the rest; returns how many objects were
    frozen in all (``gc.get_freeze_count``)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze() -> None:
    """Give the frozen objects back to the collector (the control plane stopped)."""
    gc.unfreeze()
