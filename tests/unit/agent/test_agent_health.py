"""The agent's health endpoint: the verdict (pure) and the HTTP server (real sockets, floods)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from meshward.agent.health import MAX_CONNECTIONS, MAX_REQUEST, HealthServer, health, respond

SERVING: dict[str, Any] = {
    "state": "serving",
    "serial": "1f",
    "expired": False,
    "not_after": "2026-12-03T02:00:00+00:00",
    "last_renewal": "2026-12-03T01:30:00+00:00",
    "envoy": {"running": True, "restarts": 0, "last_exit": None},
}


def test_healthy_only_when_serving_a_valid_svid_with_envoy_up() -> None:
    assert health(SERVING) == []
    assert health({**SERVING, "envoy": None}) == []  # --no-envoy: nobody else to check
    assert health({**SERVING, "expired": True}) == ["SVID expired at 2026-12-03T02:00:00+00:00"]
    assert health({**SERVING, "serial": None}) == ["no SVID"]
    assert any("not 'serving'" in p for p in health({**SERVING, "state": "starting"}))
    down = {**SERVING, "envoy": {"running": False, "restarts": 3, "last_exit": -9}}
    assert health(down) == ["Envoy is not running (restarts 3, last exit -9)"]


def test_answers() -> None:
    assert respond("GET", "/healthz", SERVING)[0] == 200
    code, body = respond("GET", "/healthz?verbose=1", {**SERVING, "expired": True})
    assert code == 503 and body["healthy"] is False and body["problems"]
    assert respond("GET", "/status", SERVING) == (200, SERVING)
    assert respond("POST", "/healthz", SERVING)[0] == 405
    assert respond("GET", "/metrics", SERVING)[0] == 404


async def _get(address: str, payload: bytes) -> tuple[int, dict[str, Any]]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}


def test_server_over_real_sockets_bounded_against_floods() -> None:
    async def scenario() -> None:
        server = HealthServer(lambda: SERVING)
        address = await server.start("127.0.0.1:0")
        try:
            code, body = await _get(address, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert code == 200 and body["healthy"] is True
            big = b"GET /healthz HTTP/1.1\r\nX: " + b"a" * (MAX_REQUEST * 2) + b"\r\n\r\n"
            assert (await _get(address, big))[0] == 431
            assert (await _get(address, b"nonsense\r\n\r\n"))[0] == 400
            # a flood of connections: all answered or closed, none left open, still serving
            results = await asyncio.gather(
                *(
                    _get(address, b"GET /status HTTP/1.1\r\n\r\n")
                    for _ in range(MAX_CONNECTIONS * 3)
                ),
                return_exceptions=True,
            )
            assert sum(1 for r in results if isinstance(r, tuple) and r[0] == 200) >= 1
            assert server._open == 0
            assert (await _get(address, b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 200
        finally:
            await server.stop()

    asyncio.run(scenario())
