"""The control plane's policy history: content-addressed sets, what each change did, rollback
recognized, everything bounded (entries, sets on disk, the audit log, the recorder queue), a
damaged index survived, and the restore that `policy rollback` does to a policy directory."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meshward.errors import UserError
from meshward.policy import load, parse
from meshward.policy.policyset import PolicySet
from meshward.policy_watch import PolicyWatcher
from meshward.xds.history import PolicyHistory, UnknownVersion, touched_workloads
from meshward.xds.history_cli import BACKUP_DIR, in_force_index, restore
from meshward.xds.history_service import MAX_QUEUE, HistoryService

NOW = datetime(2026, 12, 3, tzinfo=UTC)
BASE = "".join(
    f"""---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}
spec: {{ports: [{{name: http, port: 8080}}]}}
"""
    for name in ("frontend", "orders", "payments")
)


def deny(path: str) -> str:
    return f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-{path.strip("/") or "root"}, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["{path}"]}}}}]}}]
"""


def version(*extra: str) -> PolicySet:
    return parse({"p.yaml": BASE + "".join(extra)})


def test_entries_say_what_each_change_did_and_recognize_a_rollback(tmp_path: Path) -> None:
    history = PolicyHistory(tmp_path / "h")
    v1, v2 = version(), version(deny("/admin"))
    first = history.record(v1, now=NOW)
    assert first is not None and first.action == "start" and first.previous is None
    assert history.record(v1, now=NOW) is None  # the same version again: nothing new
    second = history.record(v2, now=NOW + timedelta(minutes=1))
    assert second is not None
    assert (second.action, second.previous, second.workloads) == ("apply", v1.version,
                                                                  ["shop/orders"])  # fmt: skip
    assert second.opened == []
    assert {"source": "shop/frontend", "destination": "shop/orders", "port": 8080,
            "method": "GET", "path": "/admin"} in second.closed  # fmt: skip
    back = history.record(v1, now=NOW + timedelta(minutes=2))
    assert back is not None and back.action == "rollback" and back.restores == first.applied_at
    assert {"source": "shop/payments", "destination": "shop/orders", "port": 8080,
            "method": "GET", "path": "/admin"} in back.opened  # fmt: skip
    assert [e["action"] for e in history.listing()] == ["rollback", "apply", "start"]
    # v1 is listed twice now (start, rollback): only the rollback, the newest, is in force
    assert in_force_index(history.listing(), v1.version) == 0
    assert in_force_index(history.listing(), v2.version) == 1
    assert in_force_index(history.listing(), "0" * 64) is None
    # content-addressed: the file is named by the version of what it holds
    for file in (tmp_path / "h" / "sets").glob("*.yaml"):
        assert parse({"x.yaml": file.read_text()}).version == file.stem
    # a restart reads the index back; the version in force is not recorded twice
    again = PolicyHistory(tmp_path / "h")
    assert [e["version"] for e in again.listing()] == [v1.version, v2.version, v1.version]
    assert again.record(v1, now=NOW) is None
    audit = [json.loads(x) for x in (tmp_path / "h" / "audit.log").read_text().splitlines()]
    assert [a["action"] for a in audit] == ["start", "apply", "rollback"]
    assert audit[1]["closed"] >= 1 and audit[1]["workloads"] == 1


def test_resolve_by_prefix(tmp_path: Path) -> None:
    history = PolicyHistory(tmp_path)
    v1 = version()
    history.record(v1, now=NOW)
    assert history.resolve(v1.version[:8]) == v1.version
    with pytest.raises(UnknownVersion, match="8 to 64 hex digits"):
        history.resolve(v1.version[:7])
    with pytest.raises(UnknownVersion, match="8 to 64 hex digits"):
        history.resolve("../../etc/passwd")
    with pytest.raises(UnknownVersion, match="not in the history"):
        history.resolve("0" * 12)
    assert history.set_text("../" + v1.version) is None


def test_a_flood_of_changes_stays_bounded(tmp_path: Path) -> None:
    history = PolicyHistory(tmp_path, keep=5, audit_max_bytes=2000, audit_backups=2)
    sets = [version(deny(f"/p{i}")) for i in range(40)]
    for i, s in enumerate(sets):
        history.record(s, now=NOW + timedelta(seconds=i))
    assert [e["version"] for e in history.listing()] == [s.version for s in sets[-5:]][::-1]
    assert sorted(p.stem for p in (tmp_path / "sets").glob("*.yaml")) == sorted(
        s.version for s in sets[-5:]
    )
    logs = sorted(p.name for p in tmp_path.glob("audit.log*"))
    assert logs == ["audit.log", "audit.log.1", "audit.log.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.glob("audit.log*"))
    with pytest.raises(ValueError):
        PolicyHistory(tmp_path, keep=0)


def test_a_damaged_index_is_moved_aside(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text("{not json")
    history = PolicyHistory(tmp_path)
    assert history.listing() == []
    assert (tmp_path / "index.json.unreadable").read_text() == "{not json"
    assert history.record(version(), now=NOW) is not None


def test_touched_workloads() -> None:
    v1, v2 = version(), version(deny("/admin"))
    assert touched_workloads(v1, v2) == ["shop/orders"]
    assert touched_workloads(v1, v1) == []
    assert touched_workloads(None, v1) == ["shop/frontend", "shop/orders", "shop/payments"]


def test_the_recorder_queue_is_bounded_and_keeps_the_newest(tmp_path: Path) -> None:
    sets = [version(deny(f"/q{i}")) for i in range(60)]
    current = {"set": version()}

    async def scenario() -> HistoryService:
        service = HistoryService(PolicyHistory(tmp_path, keep=100), lambda: current["set"],
                                 lambda: NOW)  # fmt: skip
        task = asyncio.create_task(service.run())
        await asyncio.sleep(0)  # run() creates its queue and queues the set in force
        for s in sets:  # a burst, faster than the recorder
            current["set"] = s
            service.applied(s)
        for _ in range(400):
            await asyncio.sleep(0.01)
            if service._queue is not None and service._queue.empty():
                break
        await asyncio.sleep(0.5)
        task.cancel()
        return service

    service = asyncio.run(scenario())
    # the set in force was already taken by the recorder: the burst fills the queue once
    assert service.skipped == len(sets) - MAX_QUEUE
    entries = service.history.listing()  # type: ignore[union-attr]
    assert entries[0]["version"] == sets[-1].version  # the newest is always recorded
    # every applied set is listed and kept; only the diffs of the skipped ones are missing
    assert len(entries) == 1 + len(sets)
    states = [e["diff"] for e in entries]
    assert states.count("skipped") == service.skipped and states[0] == "done"
    assert set(states) == {"done", "skipped"}
    assert all(service.history.set_text(s.version) == s.dump() for s in sets)  # type: ignore[union-attr]
    skipped = [e for e in entries if e["diff"] == "skipped"]
    assert skipped[0]["workloads"] == [] and skipped[0]["opened"] == []  # never reported wrong
    audit = (tmp_path / "audit.log").read_text()
    assert audit.count('"action": "skipped"') == service.skipped


def test_restore_swaps_the_directory_and_keeps_the_old_files(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policies"
    (policy_dir / "sub").mkdir(parents=True)
    (policy_dir / "base.yaml").write_text(BASE)
    (policy_dir / "sub" / "deny.yaml").write_text(deny("/admin"))
    (policy_dir / "README.md").write_text("not policy")
    target = version()
    watcher = PolicyWatcher([policy_dir], interval=0.01)
    watcher.load_initial()
    written, moved = restore(policy_dir, target.version, target.dump(), NOW)
    assert written == policy_dir / f"policy-{target.version[:12]}.yaml"
    assert load([policy_dir]).version == target.version  # the backup dir is hidden: never read
    assert sorted(p.relative_to(policy_dir / BACKUP_DIR).as_posix() for p in moved) == [
        "20261203T000000.000000Z/base.yaml", "20261203T000000.000000Z/sub/deny.yaml",
    ]  # fmt: skip
    assert (policy_dir / "README.md").exists()
    assert not any(p.name.endswith(".tmp") for p in policy_dir.iterdir())
    # the watcher sees a settled directory at its next polls and applies exactly the target
    assert not watcher.poll_once() and watcher.poll_once()
    assert watcher.current is not None and watcher.current.version == target.version
    with pytest.raises(UserError, match="not a directory"):
        restore(tmp_path / "missing", target.version, target.dump(), NOW)


def test_the_history_directory_flag(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import argparse
    import logging

    from meshward.xds.cli import _history_dir

    blocker = tmp_path / "a-file"
    blocker.write_text("")

    def args(**kw: object) -> argparse.Namespace:
        base: dict[str, object] = {
            "history_dir": None,
            "state_dir": None,
            "ca": str(tmp_path / "ca"),
        }
        return argparse.Namespace(**{**base, **kw})

    assert _history_dir(args(history_dir="off"), None) is None
    assert (
        _history_dir(args(state_dir=str(tmp_path / "state")), None)
        == tmp_path / "state" / "history"
    )
    flows = str(tmp_path / "var" / "flows.db")
    assert _history_dir(args(), flows) == tmp_path / "var" / "history"
    assert _history_dir(args(), "postgresql://db/x") == tmp_path / "history"
    # a default that cannot be created (think: a read-only CA mount) turns history off, loudly
    with caplog.at_level(logging.WARNING, logger="meshward.xds"):
        assert _history_dir(args(ca=str(blocker / "ca")), None) is None
    assert "no policy history" in caplog.text
    with pytest.raises(UserError, match="--history-dir"):
        _history_dir(args(history_dir=str(blocker / "h")), None)


def test_rejected_changes_are_audited(tmp_path: Path) -> None:
    history = PolicyHistory(tmp_path)
    v1 = version()
    history.record(v1, now=NOW)
    history.rejected(
        "bad.yaml#1 spec.action: 'ALOW' is not one of ...", now=NOW, current=v1.version
    )
    history.close()
    lines = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines()]
    assert lines[-1]["action"] == "rejected" and lines[-1]["version"] == v1.version
    assert "ALOW" in lines[-1]["error"]
    assert [e["action"] for e in PolicyHistory(tmp_path).listing()] == ["start"]  # not applied
