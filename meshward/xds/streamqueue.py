"""The bounded queue between an ADS stream's reader and its loop: asyncio.Queue's semantics for
one waiting producer and one waiting consumer, without its per-call overhead.

Every request a node sends (every ACK of a fan-out) passes through this queue, and so does every
wake-up. ``asyncio.Queue`` checks its loop binding on every put and get and keeps lists of
waiters for any number of producers and consumers; with in-process streams
(bench/xds_messages.py, py-spy) that was ~8% of the server's own time per message. A stream has
exactly one task awaiting :meth:`put` (its reader) and one awaiting :meth:`get` (its loop);
anything else only uses :meth:`put_nowait` (wake-ups, end of stream). Same contract otherwise:
bounded (``put`` waits while full, so gRPC's flow control pushes back on the node;
``put_nowait`` raises ``asyncio.QueueFull``), FIFO, ``get`` waits while empty.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class StreamQueue:
    __slots__ = ("_getter", "_items", "_putter", "maxsize")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("a stream queue holds at least one item")
        self.maxsize = maxsize
        self._items: deque[Any] = deque()
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return len(self._items) >= self.maxsize

    def put_nowait(self, item: Any) -> None:
        if len(self._items) >= self.maxsize:
            raise asyncio.QueueFull
        self._items.append(item)
        getter = self._getter
        if getter is not None:
            self._getter = None
            if not getter.done():
                getter.set_result(None)

    async def put(self, item: Any) -> None:
        while len(self._items) >= self.maxsize:
            if self._putter is not None:
                raise RuntimeError("a stream queue has one waiting producer")
            putter = self._putter = asyncio.get_running_loop().create_future()
            try:
                await putter
            finally:
                if self._putter is putter:
                    self._putter = None
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        putter = self._putter
        if putter is not None:
            self._putter = None
            if not putter.done():
                putter.set_result(None)
        return item

    async def get(self) -> Any:
        while not self._items:
            if self._getter is not None:
                raise RuntimeError("a stream queue has one waiting consumer")
            getter = self._getter = asyncio.get_running_loop().create_future()
            try:
                await getter
            finally:
                if self._getter is getter:
                    self._getter = None
        return self.get_nowait()
