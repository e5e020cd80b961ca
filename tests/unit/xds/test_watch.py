"""PolicyWatcher: only complete, valid changes are applied; the last good set stays otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshward.policy import PolicyError, PolicySet
from meshward.policy_watch import PolicyWatcher, policy_files

WORKLOAD = """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: orders, namespace: shop}
spec: {ports: [{name: http, port: 8080, protocol: HTTP}]}
"""
POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: shop}
spec:
  rules: [{to: [{operation: {methods: [%s]}}]}]
"""


def _touch_later(path: Path, text: str) -> None:
    """Write and bump mtime so a same-size rewrite within one clock tick is still seen."""
    path.write_text(text)
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    (tmp_path / "workloads.yaml").write_text(WORKLOAD)
    (tmp_path / "policy.yaml").write_text(POLICY % "GET")
    return tmp_path


def _settle(watcher: PolicyWatcher) -> bool:
    """Two polls: a change is applied only once it has held still for one interval."""
    first = watcher.poll_once()
    return watcher.poll_once() or first


def test_valid_change_is_applied_after_it_holds_still(policy_dir: Path) -> None:
    changes: list[PolicySet] = []
    watcher = PolicyWatcher([policy_dir], on_change=changes.append)
    initial = watcher.load_initial()

    _touch_later(policy_dir / "policy.yaml", POLICY % "POST")
    assert watcher.poll_once() is False  # first sight of the change: not applied yet
    assert watcher.poll_once() is True
    assert watcher.current is not None and watcher.current.version != initial.version
    assert changes == [watcher.current]


def test_invalid_change_keeps_the_last_good_version(policy_dir: Path) -> None:
    errors: list[PolicyError] = []
    watcher = PolicyWatcher([policy_dir], on_error=errors.append)
    good = watcher.load_initial()

    _touch_later(policy_dir / "policy.yaml", POLICY % "[not, a, method")
    assert _settle(watcher) is False
    assert watcher.current is good
    assert errors and "policy.yaml#1" in str(errors[0].problems[0])
    assert watcher.last_error is errors[0]

    _touch_later(policy_dir / "policy.yaml", POLICY % "DELETE")  # fixed: applied again
    assert _settle(watcher) is True
    assert watcher.last_error is None


def test_a_file_still_being_written_is_not_applied(policy_dir: Path) -> None:
    watcher = PolicyWatcher([policy_dir])
    good = watcher.load_initial()
    target = policy_dir / "policy.yaml"
    full = POLICY % "PUT"
    for cut in (len(full) // 3, 2 * len(full) // 3):  # grows between every poll
        _touch_later(target, full[:cut])
        assert watcher.poll_once() is False
        assert watcher.current is good
    _touch_later(target, full)
    assert watcher.poll_once() is False
    assert watcher.poll_once() is True


def test_editor_temp_files_are_never_read(policy_dir: Path) -> None:
    for junk in (".policy.yaml.swp", "#policy.yaml#", ".#policy.yaml", "policy.yaml~", "notes.txt"):
        (policy_dir / junk).write_text("{{{ not yaml")
    (policy_dir / ".git").mkdir()
    (policy_dir / ".git" / "x.yaml").write_text("{{{")
    assert {p.name for p in policy_files([policy_dir])} == {"policy.yaml", "workloads.yaml"}
    watcher = PolicyWatcher([policy_dir])
    watcher.load_initial()
    assert _settle(watcher) is False and watcher.last_error is None


def test_invalid_policy_at_start_is_an_error(policy_dir: Path) -> None:
    (policy_dir / "policy.yaml").write_text(POLICY % "[")
    with pytest.raises(PolicyError):
        PolicyWatcher([policy_dir]).start()


def test_thread_applies_changes(policy_dir: Path) -> None:
    import threading

    applied = threading.Event()
    watcher = PolicyWatcher([policy_dir], on_change=lambda _: applied.set(), interval=0.05).start()
    try:
        _touch_later(policy_dir / "policy.yaml", POLICY % "PATCH")
        assert applied.wait(5)
    finally:
        watcher.stop()


# -- events mode (watchfiles/inotify): the same rules, a stat per changed file ---------------------
def _events_watcher(policy_dir: Path, **kw: object) -> tuple[PolicyWatcher, list[PolicySet]]:
    changes: list[PolicySet] = []
    watcher = PolicyWatcher(
        [policy_dir],
        on_change=changes.append,
        interval=0.05,
        **kw,  # type: ignore[arg-type]
    ).start()
    assert watcher.mode == "events"
    return watcher, changes


def _wait_for(condition: object, seconds: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_events_apply_an_atomic_rename_with_one_stat(policy_dir: Path) -> None:
    watcher, changes = _events_watcher(policy_dir)
    try:
        before = watcher.stats
        tmp = policy_dir / ".policy.yaml.tmp"  # a hidden temp file, then rename: never read
        tmp.write_text(POLICY % "POST")
        tmp.replace(policy_dir / "policy.yaml")
        assert _wait_for(lambda: len(changes) == 1)
        assert "POST" in changes[0].dump()
        # the changed file only (on the change and on the confirmation), not the whole set
        assert watcher.stats - before <= 2
        assert watcher.marks["loaded"] >= watcher.marks["detected"]
    finally:
        watcher.stop()


def test_events_idle_watcher_stats_nothing(policy_dir: Path) -> None:
    import time

    watcher, _ = _events_watcher(policy_dir)
    try:
        assert watcher.watching.wait(5)  # set up (and caught up) on its thread, not in start()
        before = watcher.stats
        time.sleep(0.5)  # ten intervals: a polling watcher would have stat'ed 20 files
        assert watcher.stats == before
    finally:
        watcher.stop()


def test_events_follow_a_configmap_symlink_swap(tmp_path: Path) -> None:
    """Kubernetes ConfigMap volumes: files are symlinks through ``..data``, which is swapped
    atomically to a new timestamped directory on update."""
    root = tmp_path / "cm"
    first = root / "..2026_12_03_00_00_00.1"
    first.mkdir(parents=True)
    (first / "workloads.yaml").write_text(WORKLOAD)
    (first / "policy.yaml").write_text(POLICY % "GET")
    (root / "..data").symlink_to(first.name)
    for name in ("workloads.yaml", "policy.yaml"):
        (root / name).symlink_to(f"..data/{name}")
    watcher, changes = _events_watcher(root)
    try:
        second = root / "..2026_12_03_00_00_01.2"
        second.mkdir()
        (second / "workloads.yaml").write_text(WORKLOAD)
        (second / "policy.yaml").write_text(POLICY % "DELETE")
        (root / "..data_tmp").symlink_to(second.name)
        (root / "..data_tmp").replace(root / "..data")
        assert _wait_for(lambda: len(changes) == 1)
        assert "DELETE" in changes[0].dump()
    finally:
        watcher.stop()


def test_events_invalid_change_keeps_the_last_good_and_a_growing_file_waits(
    policy_dir: Path,
) -> None:
    import time

    errors: list[PolicyError] = []
    watcher, changes = _events_watcher(policy_dir, on_error=errors.append)
    good = watcher.current
    try:
        target = policy_dir / "policy.yaml"
        full = POLICY % "PUT"
        with target.open("w") as file:  # written in pieces, each well within an interval
            for i in range(0, len(full), 8):
                file.write(full[i : i + 8])
                file.flush()
                time.sleep(0.01)
        assert _wait_for(lambda: len(changes) == 1)
        assert not errors  # never loaded half-written
        assert "PUT" in changes[0].dump()
        target.write_text(POLICY % "[not, a, method")
        assert _wait_for(lambda: bool(errors))
        assert watcher.current is changes[0] and watcher.current is not good
        assert "policy.yaml#1" in str(errors[0].problems[0])
        (policy_dir / "policy.yaml~").write_text("{{{ editor backup")  # never read
        (policy_dir / "new.yaml").write_text(POLICY.replace("allow-get", "allow-new") % "HEAD")
        (policy_dir / "policy.yaml").unlink()
        assert _wait_for(lambda: len(changes) == 2)
        assert "allow-new" in changes[1].dump() and "allow-get" not in changes[1].dump()
    finally:
        watcher.stop()


def test_file_paths_and_events_off_fall_back_to_polling(policy_dir: Path) -> None:
    for watcher in (
        PolicyWatcher([policy_dir / "policy.yaml", policy_dir / "workloads.yaml"], interval=0.05),
        PolicyWatcher([policy_dir], interval=0.05, events=False),
    ):
        applied: list[PolicySet] = []
        watcher.on_change = applied.append
        watcher.start()
        try:
            assert watcher.mode == "polling"
            _touch_later(policy_dir / "policy.yaml", POLICY % "OPTIONS")
            assert _wait_for(lambda: bool(applied))  # noqa: B023
        finally:
            watcher.stop()
        (policy_dir / "policy.yaml").write_text(POLICY % "GET")


def test_events_follow_a_directory_removed_and_made_again(tmp_path: Path) -> None:
    """A deploy that removes the policy directory and writes a new one: the old directory's
    watch sees nothing more, so the watcher watches the new one (or polls while it is missing)
    instead of waiting for its 30-second rescan."""
    import shutil

    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "workloads.yaml").write_text(WORKLOAD)
    (policy_dir / "policy.yaml").write_text(POLICY % "GET")
    watcher, changes = _events_watcher(policy_dir)
    try:
        shutil.rmtree(policy_dir)
        staged = tmp_path / "staged"
        staged.mkdir()
        (staged / "workloads.yaml").write_text(WORKLOAD)
        (staged / "policy.yaml").write_text(POLICY % "TRACE")
        staged.rename(policy_dir)
        assert _wait_for(lambda: any("TRACE" in c.dump() for c in changes), seconds=10)
    finally:
        watcher.stop()


def test_start_does_not_wait_an_interval_for_the_first_event_batch(policy_dir: Path) -> None:
    """watchfiles yields its first batch only after a whole quiet interval; start() used to
    wait for it (a server's start-up, and every test with a long interval, paid it)."""
    import time

    began = time.monotonic()
    watcher = PolicyWatcher([policy_dir], interval=20).start()
    try:
        assert time.monotonic() - began < 10  # not the 20 s interval
        assert watcher.mode == "events"
    finally:
        watcher.stop()
