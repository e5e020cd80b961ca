"""Polling until something holds, for tests of processes that converge in their own time.

One helper instead of a copy per test module (there were seven, with different argument orders,
poll intervals and failure messages): it returns what the check returned, so a test can wait
for a value and use it, and its failure names what was awaited and the last "not yet" error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    check: Callable[[], T],
    timeout: float = 15.0,
    what: str = "condition",
    *,
    interval: float = 0.05,
    tolerate: tuple[type[Exception], ...] = (),
) -> T:
    """Call ``check`` every ``interval`` seconds until it returns something truthy, and return
    that; AssertionError after ``timeout`` seconds. ``tolerate``: exceptions that only mean
    "not yet" (e.g. OSError while a server starts); any other propagates at once."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except tolerate as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what}"
                + (f" (last error: {last_error})" if last_error is not None else "")
            )
        time.sleep(interval)
