"""The policy history wired to a running control plane: every applied set gets its entry at once
and what the change did is worked out off the event loop, in order, after the rollout's pushes
are out; the admin address serves ``/policy`` (the set in force, canonical YAML), ``/history``
(the kept entries, newest first; ``?wait=S``: first wait up to S seconds until no entry's diff is
pending and the newest entry is the set in force) and ``/history/set?version=V`` (a kept set).

Why after the pushes: the diff probes every caller class of every touched workload with the
policy evaluator, and the set is dumped as YAML; in a thread beside the event loop that holds
the GIL while the loop sends the change and reads its ACKs, so it waits until the control plane
has no push in flight and no connected node left out of sync, then :data:`ACK_GRACE`. At 5,000
nodes on a busy machine the ACKs of a mesh-wide change came in for up to 5.5 s after the last
push: a fixed 3 s bound started the diff and the dump in the middle of them (loop lags of
0.2-0.3 s, a probe stream waiting 1.1 s for an answer). So the wait is bounded by the rollout's
progress: it ends once the backlog has not fallen for :data:`STALLED` seconds (a node that
NACKs or never answers stays out of sync), and in any case after :data:`MAX_DEFER`.

The recorder queue is bounded: under a flood of changes (more than :data:`MAX_QUEUE` waiting)
the diffs of intermediate sets are skipped (their entries say ``skipped``; their sets are still
kept), counted, and the skip itself goes to the audit log; the newest set's diff is always
worked out.
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
from meshward.xds.history import Entry, PolicyHistory, UnknownVersion

log = logging.getLogger("meshward.xds.history")
MAX_QUEUE = 16
MAX_DEFER = 60.0  # seconds a diff waits for the rollout's pushes and ACKs at most ...
STALLED = 2.0  # ... and no longer than this once the rollout's backlog stops falling
ACK_GRACE = 0.2  # seconds after the last push, for the ACKs to come back first
MAX_READ_WAIT = 30.0  # /history?wait=S is capped at this

Item = tuple[Entry, PolicySet, PolicySet | None, datetime]


class HistoryService:
    def __init__(
        self,
        history: PolicyHistory | None,
        current: Callable[[], PolicySet],
        clock: Callable[[], datetime],
        backlog: Callable[[], int] | None = None,
    ) -> None:
        """``backlog``: the rollout still under way (pushes in flight plus nodes not yet in
        sync), which a diff waits for; None: no wait."""
        self.history = history
        self.current = current
        self.clock = clock
        self.backlog = backlog
        self.skipped = 0
        self._dumped: tuple[str, bytes] = ("", b"")  # (version, /policy body): dumped once
        self._queue: asyncio.Queue[Item] | None = None

    # -- recording (on the event loop) ---------------------------------------------------------
    def applied(self, policy: PolicySet) -> None:
        if self.history is None or self._queue is None:
            return
        now = self.clock()
        begun = self.history.begin(policy, now=now)  # listed at once, diff pending
        if begun is None:
            return
        if self._queue.full():
            dropped = self._queue.get_nowait()
            self.skipped += 1
            self._queue.put_nowait((*begun, now))
            self._skip(dropped)
            return
        self._queue.put_nowait((*begun, now))

    def _skip(self, item: Item) -> None:
        assert self.history is not None
        self.history.skip(item[0], now=item[3])

    def rejected(self, error: str) -> None:
        if self.history is not None:
            self.history.rejected(error, now=self.clock(), current=self.current().version)

    async def run(self) -> None:
        if self.history is None:
            return
        self._queue = asyncio.Queue(MAX_QUEUE)
        history = self.history
        first = history.begin(self.current(), now=self.clock())
        if first is not None:
            self._queue.put_nowait((*first, self.clock()))
        while True:
            entry, policy, previous, now = await self._queue.get()
            await self._after_pushes()
            try:
                await asyncio.to_thread(history.complete, entry, policy, previous, now=now)
            except Exception:  # a full disk must not stop the control plane
                log.exception("recording policy %s in the history failed", policy.version[:12])

    async def _after_pushes(self) -> None:
        """Until the rollout is out and ACKed (then ACK_GRACE more), or its backlog has not
        fallen for STALLED seconds, at most MAX_DEFER seconds."""
        if self.backlog is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MAX_DEFER
        lowest, moved = self.backlog(), loop.time()
        while lowest > 0 and loop.time() < min(deadline, moved + STALLED):
            await asyncio.sleep(0.02)
            left = self.backlog()
            if left < lowest:
                lowest, moved = left, loop.time()
        await asyncio.sleep(max(0.0, min(ACK_GRACE, deadline - loop.time())))

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
        wait = params.get("wait")
        if wait is not None:
            try:
                seconds = float(wait)
            except ValueError:
                seconds = -1.0
            if not 0 <= seconds <= MAX_READ_WAIT:
                reason = f"wait: seconds from 0 to {MAX_READ_WAIT:g}, not {wait[:40]!r}\n"
                return 400, "text/plain", reason.encode()
            self.history.wait_settled(seconds, self.current().version)
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
