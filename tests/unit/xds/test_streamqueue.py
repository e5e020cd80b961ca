"""The stream's bounded queue (meshward.xds.streamqueue): asyncio.Queue's contract for one
reader and one loop."""

from __future__ import annotations

import asyncio

import pytest

from meshward.xds.streamqueue import StreamQueue


async def test_fifo_and_bounded() -> None:
    queue = StreamQueue(2)
    queue.put_nowait("a")
    queue.put_nowait("b")
    assert queue.full() and queue.qsize() == 2
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait("c")
    assert queue.get_nowait() == "a"
    assert queue.get_nowait() == "b"
    assert queue.empty()
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    with pytest.raises(ValueError):
        StreamQueue(0)


async def test_put_waits_while_full_and_get_while_empty() -> None:
    queue = StreamQueue(1)
    queue.put_nowait(1)
    put = asyncio.create_task(queue.put(2))
    await asyncio.sleep(0)
    assert not put.done() and queue.qsize() == 1  # the reader waits: flow control
    assert await queue.get() == 1
    await put
    assert queue.get_nowait() == 2
    get = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not get.done()
    queue.put_nowait(3)
    assert await get == 3


async def test_a_cancelled_get_loses_nothing() -> None:
    queue = StreamQueue(4)
    get = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait("x")  # wakes the getter ...
    get.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await get
    assert await queue.get() == "x"


async def test_a_flood_never_holds_more_than_its_bound() -> None:
    queue = StreamQueue(4)
    peak = 0

    async def reader() -> None:
        nonlocal peak
        for i in range(10_000):
            await queue.put(i)
            peak = max(peak, queue.qsize())
        await queue.put(None)

    task = asyncio.create_task(reader())
    seen = []
    while (item := await queue.get()) is not None:
        seen.append(item)
        if len(seen) % 97 == 0:
            await asyncio.sleep(0)  # the loop busy elsewhere now and then
    await task
    assert seen == list(range(10_000))
    assert 1 <= peak <= 4


async def test_one_waiter_each_side() -> None:
    queue = StreamQueue(1)
    first = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="one waiting consumer"):
        await queue.get()
    first.cancel()
    queue.put_nowait(1)
    second = asyncio.create_task(queue.put(2))
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="one waiting producer"):
        await queue.put(3)
    second.cancel()
