"""Envoy's file access log stays bounded (issue 13): the format caps request-controlled fields
(%REQ(:PATH):1024%), and AccessLogRotator rotates by size and makes Envoy reopen (SIGUSR1), so
a flood of long-path requests keeps the log and its backups under the cap. Real Envoy."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from meshward.envoy.logrotate import AccessLogRotator
from meshward.envoy.process import EnvoyProcess
from meshward.extauthz.envoyconfig import sidecar
from meshward.telemetry.limits import read_rotated, rotated_files

CAP = 64 * 1024
BATCH = 20  # requests between two checks (~23 KB of log)
LINE = 1200  # bytes per line at most, path cut at 1024


def _lines(path: Path) -> int:
    return len(read_rotated(path).splitlines())


def _wait_lines(path: Path, count: int) -> None:
    deadline = time.monotonic() + 10
    while _lines(path) < count:
        assert time.monotonic() < deadline, f"{_lines(path)} of {count} lines"
        time.sleep(0.05)


def test_a_flood_of_long_paths_keeps_the_access_log_under_its_cap(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    config = sidecar(workload="foo/httpbin", extauthz_port=None, access_log_path=str(log))
    rotator = AccessLogRotator(max_bytes=CAP, backups=3)
    with EnvoyProcess(config, name="logs", workdir=tmp_path / "envoy") as envoy:
        rotator.watch(log, envoy.pid or 0)
        url = f"http://127.0.0.1:{envoy.listener_port('ingress')}"
        sent = 0
        for batch in range(40):  # ~800 lines of ~1.2 KB: 15 times the cap
            for i in range(BATCH):
                path = f"/{batch}/{i}/" + "x" * 15_000
                with urllib.request.urlopen(url + path, timeout=5) as response:
                    assert response.status == 200
            sent += BATCH
            # Everything sent so far is logged somewhere (no line is lost by a rotation)...
            deadline = time.monotonic() + 10
            while not log.exists() or log.stat().st_size == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.3)  # Envoy flushes every 200 ms
            rotator.check()
            # ...and the log with its backups never holds more than the cap plus, per file,
            # what was written between two checks.
            total = sum(p.stat().st_size for p in rotated_files(log))
            assert total <= CAP + 4 * BATCH * LINE, (batch, total)
        assert rotator.rotations >= 5
        assert [p.name for p in rotated_files(log)][:3] == [
            "access.log.3",
            "access.log.2",
            "access.log.1",
        ]
        lines = read_rotated(log).splitlines()
        assert all(len(line) < LINE for line in lines)  # the path is cut at 1024 bytes
        newest = json.loads(lines[-1])
        assert newest["path"] == f"/39/{BATCH - 1}/" + "x" * (1024 - len(f"/39/{BATCH - 1}/"))
