"""Where the wall time of the newest policy change went, stage by stage, as the control plane saw
it: ``detected`` (the watcher first saw the files change), ``loaded`` (parsed, validated and
checked against Envoy's limits), ``compile_started``, ``compiled`` (the result back on the event
loop), ``pushed`` (every affected node's snapshot set and its streams woken). The ACKs are per
node (``acked_at`` in ``/status?view=nodes``). Served under ``policy.last_change`` in
``/status``; the fleet benchmark prints it next to the convergence time. Bounded: the newest
change only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

STAGES = ("detected", "loaded", "compile_started", "compiled", "pushed")


class EditTimeline:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.version: str | None = None
        self.marks: dict[str, float] = {}

    def begin(self, version: str, marks: Mapping[str, float] | None = None) -> None:
        """A new change (``marks``: stages already passed, e.g. the watcher's)."""
        self.version = version
        self.marks = {k: float(v) for k, v in (marks or {}).items() if k in STAGES}

    def mark(self, version: str, stage: str, at: float | None = None) -> None:
        """``version`` passed ``stage`` (now, or at ``at``, Unix time); a change not begun
        (applied other than through the watcher) begins here."""
        if version != self.version:
            self.begin(version)
        self.marks.setdefault(stage, self.clock() if at is None else at)

    def status(self) -> dict[str, Any] | None:
        if self.version is None:
            return None
        first = min(self.marks.values(), default=0.0)
        return {
            "version": self.version,
            **{
                f"{stage}_at": datetime.fromtimestamp(self.marks[stage], UTC).isoformat()
                for stage in STAGES
                if stage in self.marks
            },
            "seconds": {
                stage: round(self.marks[stage] - first, 6)
                for stage in STAGES
                if stage in self.marks
            },
        }
