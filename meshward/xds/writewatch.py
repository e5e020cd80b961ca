"""Deadlines for the ADS server's writes: one watchdog task per server, not a timer per write.

A push a node does not read for ``limits.write_timeout`` closes its stream (HTTP/2 flow control
holds at most one unread push per stream, and a stuck stream must not keep its slot). An
``asyncio.timeout`` around every write did that with a timer per write (a Timeout object, a
handle pushed on the loop's heap, cancelled, dropped later): ~10-18 us of the event loop per
push measured here, i.e. per node and per change, the dearest part of a write after gRPC's own.
Here a write registers itself in a dict (O(1)) and one task wakes every :attr:`WriteWatch.tick`
while writes are in flight, cancelling those older than the timeout (the dict is in start
order, so a pass stops at the first young write). A write therefore expires between
``timeout`` and ``timeout + tick`` after it began; ``tick`` is a quarter of the timeout, at most
one second. Times are the event loop's clock, as ``asyncio.timeout``'s were.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable
from typing import Any

MAX_TICK = 1.0  # seconds


class WriteWatch:
    """Writes in flight and their deadline (single-threaded: the server's event loop)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.tick = min(MAX_TICK, timeout / 4)
        self._writing: dict[int, tuple[asyncio.Task[Any], float]] = {}
        self._expired: set[int] = set()
        self._ids = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self.expired = 0  # writes cancelled for their deadline (tests)

    async def write(self, write: Awaitable[Any]) -> bool:
        """Await ``write``; False when it was still pending after the timeout (it is
        cancelled). A cancellation from anywhere else propagates as usual."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        key = next(self._ids)
        self._writing[key] = (task, loop.time())
        if self._task is None:
            self._task = loop.create_task(self._watch())
        try:
            await write
        except asyncio.CancelledError:
            # Ours, and no other cancel pending (as asyncio.timeout decides): a timeout.
            if key in self._expired and task.uncancel() == 0:
                return False
            raise
        finally:
            del self._writing[key]
            self._expired.discard(key)
        return True

    async def _watch(self) -> None:
        try:
            while self._writing:
                await asyncio.sleep(self.tick)
                cutoff = asyncio.get_running_loop().time() - self.timeout
                for key, (task, began) in list(self._writing.items()):
                    if began > cutoff:
                        break  # the rest began later
                    if key not in self._expired:
                        self._expired.add(key)
                        self.expired += 1
                        task.cancel()
        finally:
            self._task = None

    def stop(self) -> None:
        """The server stops: no watchdog left behind (pending writes end with their calls)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
