"""Loopback port helpers. Servers here bind to 127.0.0.1 only."""

from __future__ import annotations

import os
import socket
import threading

LOOPBACK = "127.0.0.1"

#: Where ``free_port`` looks, unless MESHWARD_PORT_RANGE (``LOW-HIGH``) says otherwise. It lies
#: below Linux's ephemeral range (32768-60999 by default) on purpose: a port taken from the
#: kernel with ``bind(0)`` is in the range every outgoing connection draws its source port from,
#: so between "free a moment ago" and the moment Envoy binds it, any client socket on the machine
#: can take it (seen in CI: "cannot bind ... Address already in use" on a listener).
DEFAULT_PORT_RANGE = (20000, 32000)

_lock = threading.Lock()
_cursor: int | None = None


def port_range() -> tuple[int, int]:
    """The range ``free_port`` hands out from; parallel test workers are given disjoint ones."""
    spec = os.environ.get("MESHWARD_PORT_RANGE", "")
    low, sep, high = spec.partition("-")
    if sep and low.isdigit() and high.isdigit() and 1024 <= int(low) < int(high) <= 65535:
        return int(low), int(high)
    return DEFAULT_PORT_RANGE


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port that was free a moment ago and that this process has not handed out recently.

    A cursor walks the range (starting at an offset drawn from the pid, so two processes sharing
    a range rarely meet), so a port handed out but not yet bound by the process it was meant for
    is not handed out again until the whole range has gone by. Prefer binding to port 0 where the
    server allows it and reports the port back.
    """
    global _cursor
    low, high = port_range()
    span = high - low
    with _lock:
        if _cursor is None or not low <= _cursor < high:
            _cursor = low + (os.getpid() * 7919) % span
        for _ in range(span):
            port = _cursor
            _cursor = low + (_cursor - low + 1) % span
            if _bindable(port):
                return port
    raise OSError(f"no free loopback port in {low}-{high}")
