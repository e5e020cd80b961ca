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
