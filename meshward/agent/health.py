"""The agent's health endpoint: a tiny HTTP server (``--health-listen``, loopback by intent).

A kubelet-style probe or an operator asks ``GET /healthz``: 200 while the agent serves a valid
SVID and (when it runs one) its Envoy is up, 503 with the reasons otherwise; ``GET /status``
gives the whole status document (SVID serial and expiry, last renewal, renewal failures, Envoy
pid and restarts). Nothing secret is in it. Requests are bounded (size, time, one per
connection) so a misbehaving client cannot hold the agent's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

MAX_REQUEST = 8192  # bytes of request line + headers
READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 32  # beyond, new connections are closed at once

StatusSource = Callable[[], dict[str, Any]]


def health(status: dict[str, Any]) -> list[str]:
    """Why the agent is unhealthy (empty: healthy). Pure: ``status`` is :meth:`Agent.status`."""
    problems = []
    if status.get("state") != "serving":
        problems.append(f"state is {status.get('state')!r}, not 'serving'")
    if not status.get("serial"):
        problems.append("no SVID")
    elif status.get("expired"):
        problems.append(f"SVID expired at {status.get('not_after')}")
    envoy = status.get("envoy")
    if envoy is not None and not envoy.get("running"):
        problems.append(f"Envoy is not running (restarts {envoy.get('restarts')}, "
                        f"last exit {envoy.get('last_exit')})")  # fmt: skip
    return problems


def respond(method: str, path: str, status: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for one request. Pure."""
    if method not in ("GET", "HEAD"):
        return 405, {"error": f"method {method} not allowed; use GET"}
    path = path.split("?", 1)[0]
    if path == "/healthz":
        problems = health(status)
        body = {
            "healthy": not problems,
            "problems": problems,
            "not_after": status.get("not_after"),
            "last_renewal": status.get("last_renewal"),
            "envoy_running": (status.get("envoy") or {}).get("running"),
        }
        return (200 if not problems else 503), body
    if path == "/status":
        return 200, status
    return 404, {"error": f"no such path {path}; try /healthz or /status"}


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}  # fmt: skip


class HealthServer:
    def __init__(self, source: StatusSource) -> None:
        self.source = source
        self.server: asyncio.Server | None = None
        self.address = ""
        self._open = 0

    async def start(self, listen: str) -> str:
        host, _, port = listen.rpartition(":")
        self.server = await asyncio.start_server(
            self._handle, host.strip("[]"), int(port), limit=MAX_REQUEST
        )
        bound = self.server.sockets[0].getsockname()
        self.address = f"{bound[0]}:{bound[1]}"
        return self.address

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                return
            code, body = await self._answer(reader)
            data = json.dumps(body, sort_keys=True).encode() + b"\n"
            head = (
                f"HTTP/1.1 {code} {REASONS.get(code, '')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head + data)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        finally:
            self._open -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            return 431, {"error": f"request over {MAX_REQUEST} bytes"}
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            return 400, {"error": "incomplete request"}
        if len(raw) > MAX_REQUEST:
            return 431, {"error": f"request over {MAX_REQUEST} bytes"}
        parts = raw.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[1].startswith("/"):
            return 400, {"error": "expected 'GET /healthz HTTP/1.1'"}
        return respond(parts[0], parts[1], self.source())
