"""Starting and stopping the long-running parts the same way everywhere.

Every server Meshward runs (`xds serve`, `agent`, `extauthz serve` and its workers, `demo`)
stops on SIGTERM as it does on Ctrl-C, and every object with ``start()``/``stop()`` (an Envoy,
an ext_authz server, a control plane on its own thread) works as ``with x:``. Written once here
so a new entry point cannot forget SIGTERM (``kill <pid>``, a container stop) or leave its
handlers installed after it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Self

#: The signals that mean "stop cleanly": ``kill <pid>`` (and container stops), and Ctrl-C.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def on_stop_signals(callback: Callable[[], None]) -> Iterator[bool]:
    """Call ``callback`` (from the signal handler) on a stop signal while inside; the previous
    handlers come back on the way out. Yields False, installing nothing, off the main thread
    (Python only lets the main thread install handlers: a server run inside a test's thread)."""

    def handler(_signum: int, _frame: Any) -> None:
        callback()

    try:
        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield False
        return
    try:
        yield True
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def wait_for_stop_signal(poll: float = 0.5) -> None:
    """Block the main thread until a stop signal arrives (RuntimeError off the main thread,
    where no signal could ever end the wait)."""
    stop = threading.Event()
    with on_stop_signals(stop.set) as installed:
        if not installed:
            raise RuntimeError("only the main thread can wait for a stop signal")
        while not stop.wait(poll):
            pass


def stop_event() -> asyncio.Event:
    """An event the running loop sets on a stop signal (``await stop_event().wait()``)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    return stop


class StartStop:
    """``with x:`` for a part with ``start()`` and ``stop()``: starts it unless it is running
    already (:attr:`started`), and stops it however the block ends."""

    @property
    def started(self) -> bool:
        """Whether ``start()`` ran; a part that cannot tell is started by every ``with``."""
        return False

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> Any:
        raise NotImplementedError

    def __enter__(self) -> Self:
        if not self.started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
