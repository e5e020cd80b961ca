"""The ADS server's write deadlines (meshward.xds.writewatch): one watchdog, not a timer per write."""

from __future__ import annotations

import asyncio

import pytest

from meshward.xds.writewatch import WriteWatch


async def test_a_write_that_completes_is_true_and_leaves_nothing_behind() -> None:
    watch = WriteWatch(60.0)
    assert await watch.write(asyncio.sleep(0))
    assert await watch.write(asyncio.sleep(0))
    assert not watch._writing and not watch._expired and watch.expired == 0
    watch.stop()
    assert watch._task is None


async def test_a_write_never_read_is_cancelled_after_the_timeout() -> None:
    watch = WriteWatch(0.05)
    stuck = asyncio.Event()
    assert not await watch.write(stuck.wait())
    assert watch.expired == 1 and not watch._writing and not watch._expired
    # The task that waited is not left cancelled: it goes on writing.
    assert await watch.write(asyncio.sleep(0))
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_only_the_old_writes_expire() -> None:
    watch = WriteWatch(0.4)
    old = asyncio.create_task(watch.write(asyncio.Event().wait()))
    await asyncio.sleep(0.3)
    young = asyncio.Event()
    late = asyncio.create_task(watch.write(young.wait()))
    assert await old is False
    assert not late.done()  # began later: its own deadline
    young.set()
    assert await late is True
    assert watch.expired == 1


async def test_a_cancel_from_elsewhere_is_not_a_timeout() -> None:
    watch = WriteWatch(60.0)
    task = asyncio.create_task(watch.write(asyncio.Event().wait()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not watch._writing and watch.expired == 0


async def test_many_writes_in_flight_are_tracked_and_released() -> None:
    watch = WriteWatch(60.0)
    gates = [asyncio.Event() for _ in range(1000)]
    tasks = [asyncio.create_task(watch.write(g.wait())) for g in gates]
    await asyncio.sleep(0)
    assert len(watch._writing) == 1000
    for gate in gates:
        gate.set()
    assert all(await asyncio.gather(*tasks))
    assert not watch._writing
    watch.stop()
