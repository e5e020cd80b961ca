"""The control plane's admin endpoint: ``GET /status`` (JSON), ``/metrics`` (Prometheus),
``/healthz``. Loopback only; read-only; no secrets in anything it serves.

``/status`` is a summary by default (counts over the fleet and the nodes that need attention,
cheap at thousands of nodes); ``/status?view=nodes`` gives the per-node documents, a page at a
time (``limit``, default and maximum 1,000; ``offset``; ``next_offset`` in ``page``), only the
nodes named by ``node=`` (node names or workload refs, repeatable) when given.

A few lines of asyncio instead of a web framework: three GET routes do not justify a dependency,
and running on the server's own loop means status is read without locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

#: Extra GET routes: path -> handler(query parameters) -> (status, content type, body).
Route = Callable[[dict[str, str]], tuple[int, str, bytes]]

MAX_REQUEST = 8192
MAX_PAGE = 1000  # per-node documents per /status?view=nodes answer
MAX_NODE_FILTERS = 100


class BadQuery(ValueError):
    """A /status query the endpoint cannot answer: a 400 with this message."""


def status_query(query: str) -> dict[str, Any]:
    """``/status`` query parameters as keyword arguments of ``XdsService.status``."""
    try:
        params = urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:
        raise BadQuery(f"unreadable query: {exc}") from None
    unknown = sorted(set(params) - {"view", "node", "offset", "limit"})
    if unknown:
        raise BadQuery(f"unknown parameter {unknown[0]!r}: use view, node, offset, limit")
    view = params.get("view", ["summary"])[-1]
    if view not in ("summary", "nodes"):
        raise BadQuery(f"view must be summary or nodes, not {view!r}")
    if view == "summary":
        if set(params) - {"view"}:
            raise BadQuery("node, offset and limit need view=nodes")
        return {"view": "summary"}
    nodes = params.get("node", [])
    if len(nodes) > MAX_NODE_FILTERS:
        raise BadQuery(f"at most {MAX_NODE_FILTERS} node= filters")
    return {
        "view": "nodes",
        "nodes": tuple(nodes),
        "offset": _count(params, "offset", 0, None),
        "limit": _count(params, "limit", MAX_PAGE, MAX_PAGE),
    }


def _count(params: dict[str, list[str]], name: str, default: int, most: int | None) -> int:
    if name not in params:
        return default
    text = params[name][-1]
    if not text.isdigit() or len(text) > 9:
        raise BadQuery(f"{name} must be a whole number, not {text[:20]!r}")
    value = int(text)
    if name == "limit" and value == 0:
        raise BadQuery("limit must be at least 1")
    if most is not None and value > most:
        raise BadQuery(f"{name} must be at most {most}")
    return value


class AdminServer:
    def __init__(
        self,
        status: Callable[..., dict[str, Any]],
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
        path, _, query = path.partition("?")
        if path == "/status":
            try:
                kwargs = status_query(query)
            except BadQuery as exc:
                return 400, "text/plain", f"{exc}\n".encode()
            # The per-node view is compact: indenting thousands of documents costs more than
            # building them.
            indent = 2 if kwargs["view"] == "summary" else None
            body = json.dumps(self._status(**kwargs), indent=indent, sort_keys=True, default=str)
            return 200, "application/json", (body + "\n").encode()
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
