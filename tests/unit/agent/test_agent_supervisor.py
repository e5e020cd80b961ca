"""Envoy supervision bookkeeping: restart with doubling backoff, reset once stable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshward.agent import envoyproc
from meshward.agent.envoyproc import MAX_BACKOFF, MIN_BACKOFF, STABLE_AFTER, Supervisor


class FakeSupervisor(Supervisor):
    """Process calls replaced: ``alive`` says whether 'Envoy' runs; ``start`` counts."""

    def __init__(self, tmp: Path) -> None:
        super().__init__({"admin": {}}, tmp)
        self.alive = False
        self.starts = 0

    def running(self) -> bool:
        return self.alive

    def start(self) -> None:
        self.starts += 1
        self.alive = True
        self.started_at = self.now

    now = 0.0


def tick(sup: FakeSupervisor, now: float) -> Any:
    sup.now = now
    return sup.tick(now)


def test_restarts_back_off_and_reset_after_a_stable_run(tmp_path: Path) -> None:
    sup = FakeSupervisor(tmp_path)
    sup.start()
    delays = []
    now = 0.0
    for _ in range(8):  # crash loop: it dies right after each start
        sup.alive = False
        assert "restarting in" in tick(sup, now)
        delay = sup.next_start - now
        delays.append(delay)
        assert tick(sup, now + delay - 0.01) is None  # not before its time
        now += delay
        assert "restarted" in tick(sup, now)
    assert delays[:4] == [MIN_BACKOFF, MIN_BACKOFF * 2, MIN_BACKOFF * 4, MIN_BACKOFF * 8]
    assert max(delays) <= MAX_BACKOFF
    assert sup.restarts == 8
    tick(sup, now + STABLE_AFTER + 1)  # up long enough: the next crash restarts quickly again
    sup.alive = False
    tick(sup, now + STABLE_AFTER + 2)
    assert sup.next_start - (now + STABLE_AFTER + 2) == MIN_BACKOFF


def test_adopt_refuses_a_recycled_pid(tmp_path: Path) -> None:
    import os

    sup = Supervisor({"admin": {}}, tmp_path)
    (tmp_path / envoyproc.PID_FILE).write_text(f"{os.getpid()}\n")  # alive, but not our Envoy
    assert not sup.adopt()
    (tmp_path / envoyproc.PID_FILE).write_text("not a pid")
    assert not sup.adopt()
