"""The ADS server's gRPC core options that connection bursts depend on."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from meshward.xds import server as server_module
from meshward.xds.server import (
    PENDING_CALLS_HARD,
    PENDING_CALLS_SOFT,
    UNREQUESTED_CALL_SECONDS,
    AdsServer,
)


class _Stop(Exception):
    pass


class _Source:
    cache = None


async def test_new_streams_may_wait_for_the_loop_longer_than_cores_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In a burst of thousands of nodes new calls pile up in core faster than the event loop
    takes them; with core's defaults (1,000 / 3,000 pending, 30 s) core cancels them unseen
    (bench/xds_fleet.py --burst-only: 782-1,271 of 5,050 streams)."""
    seen: dict[str, Any] = {}

    def fake_server(*, options: list[tuple[str, Any]]) -> Any:
        seen.update(options)
        raise _Stop

    monkeypatch.setattr(server_module.grpc.aio, "server", fake_server)
    with pytest.raises(_Stop):
        await AdsServer(source=_Source()).start("127.0.0.1:0", None)  # type: ignore[arg-type]
    assert seen["grpc.server_max_unrequested_time_in_server"] == UNREQUESTED_CALL_SECONDS >= 120
    assert seen["grpc.server.max_pending_requests"] == PENDING_CALLS_SOFT >= 5000
    assert seen["grpc.server.max_pending_requests_hard_limit"] == PENDING_CALLS_HARD >= 10_000
    assert seen["grpc.so_reuseport"] == 0
    assert grpc.aio.server is fake_server  # (the patch was in force)
