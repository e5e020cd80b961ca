"""The control plane's admin endpoint: ``GET /status`` (JSON), ``/metrics`` (Prometheus),
``/healthz``. Loopback only; read-only; no secrets in anything it serves.

A few lines of asyncio instead of a web framework: three GET routes do not justify a dependency,
and running on the server's own loop means status is read without locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

#: Extra GET routes: path -> handler(query parameters) -> (status, content type, body).
Route = Callable[[dict[str, str]], tuple[int, str, bytes]]

MAX_REQUEST = 8192


class AdminServer:
    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes],
        routes: Mapping[str, Route] | None = None,
    ) -> None:
        self._status = status
        self._metrics = metrics
        self._routes = dict(routes or {})
        self._server: asyncio.Server | None = None
        self.port: int | None = None
        self.host = "127.0.0.1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        self.host = host
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    def _route(self, path: str) -> tuple[int, str, bytes]:
        path = path.partition("?")[0]
        if path == "/status":
            body = json.dumps(self._status(), indent=2, sort_keys=True, default=str) + "\n"
            return 200, "application/json", body.encode()
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics()
        if path in ("/healthz", "/ready"):
            return 200, "text/plain", b"ok\n"
        more = "".join(f", {p}" for p in sorted(self._routes))
        return 404, "text/plain", f"not found: try /status, /metrics{more} or /healthz\n".encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, _, rest = request_line.partition(" ")
            path = rest.split(" ", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"only GET\n"
            else:
                try:
                    route, _, query = path.partition("?")
                    if route in self._routes:  # database reads (flows): off the event loop
                        params = dict(parse_qsl(query)[:32])
                        handler = self._routes[route]
                        status, ctype, body = await asyncio.to_thread(handler, params)
                    else:
                        status, ctype, body = self._route(path)
                except Exception as exc:  # never let a status bug kill the endpoint
                    status, ctype, body = 500, "text/plain", f"{type(exc).__name__}\n".encode()
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found",
                      405: "Method Not Allowed"}.get(status, "Error")  # fmt: skip
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
