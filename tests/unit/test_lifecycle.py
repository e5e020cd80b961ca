"""Stop signals and ``with`` for start/stop parts (meshward.lifecycle), with real signals sent to
this process."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any

import pytest

from meshward.lifecycle import (
    STOP_SIGNALS,
    StartStop,
    on_stop_signals,
    stop_event,
    wait_for_stop_signal,
)


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
def test_a_stop_signal_calls_back_and_the_previous_handlers_come_back(sig: signal.Signals) -> None:
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    seen: list[str] = []
    with on_stop_signals(lambda: seen.append("stop")) as installed:
        assert installed
        os.kill(os.getpid(), sig)
    assert seen == ["stop"]
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_off_the_main_thread_nothing_is_installed_and_waiting_is_refused() -> None:
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    result: dict[str, Any] = {}

    def worker() -> None:
        with on_stop_signals(lambda: None) as installed:
            result["installed"] = installed
        try:
            wait_for_stop_signal()
        except RuntimeError as exc:
            result["error"] = str(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert result == {
        "installed": False,
        "error": "only the main thread can wait for a stop signal",
    }
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_waiting_for_a_stop_signal_ends_with_sigterm() -> None:
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    wait_for_stop_signal(poll=0.05)  # returns (a hang here would time the test out)
    timer.join()


def test_the_loops_stop_event_is_set_by_sigterm() -> None:
    async def main() -> bool:
        stop = stop_event()
        asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 10)
        return stop.is_set()

    assert asyncio.run(main())


class _Part(StartStop):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.running = False

    @property
    def started(self) -> bool:
        return self.running

    def start(self) -> None:
        self.calls.append("start")
        self.running = True

    def stop(self) -> None:
        self.calls.append("stop")
        self.running = False


def test_with_starts_unless_started_and_stops_however_the_block_ends() -> None:
    part = _Part()
    with part as same:
        assert same is part and part.running
    assert part.calls == ["start", "stop"]
    part = _Part()
    part.start()
    with pytest.raises(KeyError), part:
        raise KeyError("boom")
    assert part.calls == ["start", "stop"] and not part.running
