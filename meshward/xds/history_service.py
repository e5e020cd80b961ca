"""The policy history wired to a running control plane: every applied set is recorded off the
event loop, in order; the admin address serves ``/policy`` (the set in force, canonical YAML),
``/history`` (the kept entries, newest first) and ``/history/set?version=V`` (a kept set).

The recorder queue is bounded: under a flood of changes (more than :data:`MAX_QUEUE` waiting)
intermediate sets are skipped, counted, and the skip itself goes to the audit log; the newest
set is always recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from meshward.policy import PolicySet
from meshward.xds.admin import Route
from meshward.xds.history import PolicyHistory, UnknownVersion

log = logging.getLogger("meshward.xds.history")
MAX_QUEUE = 16


class HistoryService:
    def __init__(
        self,
        history: PolicyHistory | None,
        current: Callable[[], PolicySet],
        clock: Callable[[], datetime],
    ) -> None:
        self.history = history
        self.current = current
        self.clock = clock
        self.skipped = 0
        self._dumped: tuple[str, bytes] = ("", b"")  # (version, /policy body): dumped once
        self._queue: asyncio.Queue[tuple[PolicySet, datetime]] | None = None

    # -- recording (on the event loop) ---------------------------------------------------------
    def applied(self, policy: PolicySet) -> None:
        if self.history is None or self._queue is None:
            return
        if self._queue.full():
            self._queue.get_nowait()
            self.skipped += 1
        self._queue.put_nowait((policy, self.clock()))

    def rejected(self, error: str) -> None:
        if self.history is not None:
            self.history.rejected(error, now=self.clock(), current=self.current().version)

    async def run(self) -> None:
        if self.history is None:
            return
        self._queue = asyncio.Queue(MAX_QUEUE)
        self._queue.put_nowait((self.current(), self.clock()))
        history = self.history
        while True:
            policy, now = await self._queue.get()
            try:
                await asyncio.to_thread(history.record, policy, now=now)
            except Exception:  # a full disk must not stop the control plane
                log.exception("recording policy %s in the history failed", policy.version[:12])

    def close(self) -> None:
        if self.history is not None:
            self.history.close()

    # -- admin routes (in the admin's threads) -------------------------------------------------
    def routes(self) -> dict[str, Route]:
        routes: dict[str, Route] = {"/policy": self._policy}
        if self.history is not None:
            routes["/history"] = self._listing
            routes["/history/set"] = self._set
        return routes

    def _policy(self, params: dict[str, str]) -> tuple[int, str, bytes]:
        policy = self.current()
        if self._dumped[0] != policy.version:
            text = f"# meshward policy version {policy.version}\n" + policy.dump()
            self._dumped = (policy.version, text.encode())
        return 200, "application/yaml", self._dumped[1]

    def _listing(self, params: dict[str, str]) -> tuple[int, str, bytes]:
        assert self.history is not None
        body: dict[str, Any] = {
            "current": self.current().version,
            "keep": self.history.keep,
            "skipped": self.skipped,
            "entries": self.history.listing(),
        }
        return 200, "application/json", (json.dumps(body, indent=1) + "\n").encode()

    def _set(self, params: dict[str, str]) -> tuple[int, str, bytes]:
        assert self.history is not None
        try:
            version = self.history.resolve(params.get("version", ""))
        except UnknownVersion as exc:
            return 404, "text/plain", f"{exc}\n".encode()
        text = self.history.set_text(version)
        if text is None:
            return 404, "text/plain", f"the set of version {version} is missing on disk\n".encode()
        return 200, "application/yaml", (f"# meshward policy version {version}\n" + text).encode()
