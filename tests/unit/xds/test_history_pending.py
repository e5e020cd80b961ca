"""The history's diff off the rollout's critical path: an entry is listed the moment its set is
applied (diff pending, set served from memory), the diff waits for the pushes, readers that need
it wait for it (bounded), and nothing is lost or reported wrong meanwhile."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from meshward.policy.policyset import PolicySet
from meshward.testing.policy_edits import addressed_fleet, edits
from meshward.testing.topology import fleet
from meshward.xds import history_service
from meshward.xds.history import PolicyHistory, touched_workloads
from meshward.xds.history_service import HistoryService
from tests.unit.xds.test_history import NOW, deny, version


def _touched_by_comparing_every_workload(old: PolicySet, new: PolicySet) -> list[str]:
    """The definition, checked the slow way: every workload's selected documents compared."""
    if old.mesh != new.mesh:
        return sorted({w.ref for w in (*old.workloads, *new.workloads)})
    out = []
    for ref in sorted({w.ref for w in (*old.workloads, *new.workloads)}):
        a, b = old.workload(ref), new.workload(ref)
        if a is None or b is None or a != b or (
            old.policies_for(a), old.peer_authentications_for(a),
            old.request_authentications_for(a),
        ) != (
            new.policies_for(b), new.peer_authentications_for(b),
            new.request_authentications_for(b),
        ):  # fmt: skip
            out.append(ref)
    return out


def test_touched_workloads_from_the_changed_documents_only() -> None:
    old = addressed_fleet()
    for name, new in edits(old).items():
        for a, b in ((old, new), (new, old)):
            assert touched_workloads(a, b) == _touched_by_comparing_every_workload(a, b), name
    ps = fleet(40)
    dropped = PolicySet.create(mesh=ps.mesh, workloads=ps.workloads[1:],
                               authorization_policies=ps.authorization_policies)  # fmt: skip
    assert touched_workloads(ps, dropped) == [ps.workloads[0].ref]
    assert touched_workloads(ps, ps) == []


def _service(tmp_path: Path, current: dict[str, PolicySet], backlog: list[int]) -> HistoryService:
    return HistoryService(
        PolicyHistory(tmp_path, keep=5), lambda: current["set"], lambda: NOW,
        backlog=lambda: backlog[0],
    )  # fmt: skip


def _listing(service: HistoryService, **params: str) -> tuple[int, Any]:
    status, _, body = service.routes()["/history"](params)
    return status, json.loads(body) if status == 200 else body.decode()


def test_an_entry_is_listed_at_once_and_its_diff_waits_for_the_pushes(tmp_path: Path) -> None:
    v1, v2 = version(), version(deny("/admin"))
    current = {"set": v1}
    backlog = [0]

    async def scenario() -> None:
        service = _service(tmp_path, current, backlog)
        task = asyncio.create_task(service.run())
        assert service.history is not None
        assert await asyncio.to_thread(service.history.wait_settled, 5, v1.version)
        backlog[0] = 3  # pushes in flight
        current["set"] = v2
        service.applied(v2)
        # listed at once, before any diff; its set is already served (from memory)
        status, body = _listing(service)
        assert status == 200 and body["entries"][0]["version"] == v2.version
        assert body["entries"][0]["diff"] == "pending" and body["entries"][0]["closed"] == []
        assert service.history.set_text(v2.version) == v2.dump()
        assert not (tmp_path / "sets" / f"{v2.version}.yaml").exists()
        await asyncio.sleep(0.5)  # pushes still in flight: the diff waits
        assert service.history.listing()[0]["diff"] == "pending"
        # a reader asking to wait gets the entry with its diff once the pushes are out
        waited = asyncio.create_task(asyncio.to_thread(_listing, service, wait="10"))
        await asyncio.sleep(0.2)
        assert not waited.done()
        backlog[0] = 0
        status, body = await waited
        newest = body["entries"][0]
        assert (newest["diff"], newest["workloads"]) == ("done", ["shop/orders"])
        assert {"source": "shop/frontend", "destination": "shop/orders", "port": 8080,
                "method": "GET", "path": "/admin"} in newest["closed"]  # fmt: skip
        assert (tmp_path / "sets" / f"{v2.version}.yaml").read_text() == v2.dump()
        task.cancel()

    asyncio.run(scenario())


def _settles_under(tmp_path: Path, backlog: list[int], path: str, timeout: float) -> bool:
    """Whether an edit's diff is done within ``timeout`` while ``backlog`` stays as it is."""
    v1, v2 = version(), version(deny(path))
    current = {"set": v1}

    async def scenario() -> bool:
        service = _service(tmp_path, current, backlog)
        task = asyncio.create_task(service.run())
        await asyncio.sleep(0)
        current["set"] = v2
        service.applied(v2)
        assert service.history is not None
        settled = await asyncio.to_thread(service.history.wait_settled, timeout, v2.version)
        task.cancel()
        return settled

    return asyncio.run(scenario())


def test_pushes_that_never_end_delay_the_diff_only_boundedly(tmp_path: Path) -> None:
    assert _settles_under(tmp_path, [10**6], "/x", 15)  # a push backlog that never drains


def test_the_diff_waits_for_a_slow_rollout_while_it_progresses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 5,000 nodes the ACKs of a mesh-wide change came in for longer than a fixed 3 s bound:
    the diff (GIL-heavy, beside the loop) must wait for them as long as they keep coming."""
    monkeypatch.setattr(history_service, "STALLED", 0.5)
    v1, v2 = version(), version(deny("/slow"))
    current = {"set": v1}
    backlog = [0]
    seen: list[int] = []

    async def scenario() -> None:
        service = _service(tmp_path, current, backlog)
        history = service.history
        assert history is not None
        complete = history.complete

        def recorded(*args: Any, **kwargs: Any) -> None:
            seen.append(backlog[0])
            complete(*args, **kwargs)

        task = asyncio.create_task(service.run())
        assert await asyncio.to_thread(history.wait_settled, 5, v1.version)
        history.complete = recorded  # type: ignore[method-assign]
        backlog[0] = 40
        current["set"] = v2
        service.applied(v2)
        while backlog[0] > 0:  # one ACK every 0.1 s: 4 s in all, never 0.5 s without one
            await asyncio.sleep(0.1)
            backlog[0] -= 1
        assert await asyncio.to_thread(history.wait_settled, 5, v2.version)
        task.cancel()

    asyncio.run(scenario())
    assert seen == [0]


def test_a_rollout_that_stops_progressing_delays_the_diff_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that NACKs stays out of sync: the diff goes ahead once the backlog has stopped
    falling for STALLED seconds, not after MAX_DEFER."""
    monkeypatch.setattr(history_service, "STALLED", 0.3)
    assert _settles_under(tmp_path, [7], "/stuck", 2.5)


def test_read_waits_are_bounded_and_checked(tmp_path: Path) -> None:
    v1 = version()
    service = _service(tmp_path, {"set": v1}, [0])
    assert service.history is not None
    begun = service.history.begin(v1, now=NOW)  # never completed
    assert begun is not None
    done = threading.Event()
    result: list[tuple[int, Any]] = []

    def read() -> None:
        result.append(_listing(service, wait="0.3"))
        done.set()

    threading.Thread(target=read).start()
    assert done.wait(5)  # gave up after 0.3 s and answered with what there is
    assert result[0][1]["entries"][0]["diff"] == "pending"
    for bad in ("-1", "31", "soon", "nan"):
        status, body = _listing(service, wait=bad)
        assert status == 400 and "wait" in body


def test_an_entry_pending_when_the_control_plane_stopped_says_so(tmp_path: Path) -> None:
    v1, v2 = version(), version(deny("/y"))
    history = PolicyHistory(tmp_path)
    history.record(v1, now=NOW)
    begun = history.begin(v2, now=NOW)
    assert begun is not None
    history.settle(begun[0], "pending")  # the index is written with it pending, then a stop
    history.close()
    again = PolicyHistory(tmp_path)
    newest = again.listing()[0]
    assert (newest["version"], newest["diff"]) == (v2.version, "interrupted")
    assert again.set_text(v2.version) == v2.dump()  # its set was kept
    assert again.wait_settled(0.1)  # nothing left pending
