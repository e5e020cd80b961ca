"""The flow service's store writer: a database that is down drops batches (counted) and is
logged once a minute, not at every flush."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from meshward.flows.service import FlowService


def test_a_failing_store_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    control = SimpleNamespace(authorize=lambda node, identity: None)
    service = FlowService(str(tmp_path / "flows.db"), control)

    def down(now: object = None) -> int:
        raise sa.exc.OperationalError("INSERT", {}, Exception("connection refused"))

    service.store.flush = down  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="meshward.flows"):
        for _ in range(20):
            asyncio.run(service.flush())
    failures = [r for r in caplog.records if "flow store write failed" in r.getMessage()]
    assert len(failures) == 1
