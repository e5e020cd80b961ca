"""`meshward xds serve` as the fleet benchmarks start and read it (bench/xds_fleet.py,
bench/xds_restart.py): one place for its command line, its launch and ready file, and the
/proc readings (CPU per process and per thread, RSS) their figures are made of, so the two
benchmarks measure the same server the same way.

The server runs on 127.0.0.1 with limits raised (simulated replicas share their service's
certificate: per-identity limits sized for real sidecars would refuse a burst of them), access
log off and text logs. ``python_path`` runs it from another checkout (``git archive`` of an
older commit) to compare code side by side: with ``-P``, because with ``-m`` Python puts the
working directory first on sys.path, before PYTHONPATH, and every checkout would have run this
one's code. ``$MESHWARD_BENCH_SERVER_TREE`` sets it for every server a benchmark starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshward.testing.processes import Launcher, read_ready

#: A directory holding another ``meshward`` package (``git archive BASE meshward | tar -x -C
#: DIR``): every BenchServer started without a ``python_path`` runs that tree's server, while
#: the benchmark (its nodes, its measurements) stays this checkout's: an A/B of the server
#: alone, e.g. ``MESHWARD_BENCH_SERVER_TREE=/tmp/base python bench/xds_fleet.py --burst-only``.
SERVER_TREE_ENV = "MESHWARD_BENCH_SERVER_TREE"
#: How often the server looks at the policy files (an edit's detection is part of its timing).
WATCH_INTERVAL = 0.05
#: What gRPC core names its threads (/proc/PID/task/TID/comm, cut at 15 characters).
GRPC_THREADS = frozenset(
    {"event_engine", "grpc_global_tim", "default-executo", "resolver-execut", "timer_manager"}
)


def server_argv(
    work: Path, *, ads_port: int = 0, python_path: str | None = None, extra: Sequence[str] = ()
) -> list[str]:
    """``xds serve`` on ``work/policies`` and ``work/ca``, its ready file ``work/server.ready.json``.

    ``--secrets agent`` is the default since f087831 and spelled out for ``python_path``: a
    checkout from before it (053edbf..f087831, e.g. bench/README.md's "before", 8719a88)
    defaults to making and serving every node's key, which is not what the nodes here expect."""
    return [
        sys.executable, *(["-P"] if python_path else []), "-m", "meshward", "xds", "serve",
        "--policy", str(work / "policies"), "--ca", str(work / "ca"), "--secrets", "agent",
        "--listen", f"127.0.0.1:{ads_port}", "--admin", "127.0.0.1:0", "--access-log", "off",
        "--watch-interval", str(WATCH_INTERVAL), "--ready-file", str(work / "server.ready.json"),
        "--listen-host", "127.0.0.1", "--log-format", "text",
        "--max-instances", "100000", "--max-streams", "100000",
        *extra,
    ]  # fmt: skip


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (every thread); 0.0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_thread(pid: int) -> dict[str, float]:
    """CPU seconds of a gRPC server process ``pid``: its event loop (main thread: every stream's
    Python work), gRPC core's threads (TLS handshakes, socket I/O), the rest (compile, watcher)."""
    tck = os.sysconf("SC_CLK_TCK")
    out = {"loop": 0.0, "grpc": 0.0, "other": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tck
        key = "loop" if int(task.name) == pid else "grpc" if comm in GRPC_THREADS else "other"
        out[key] += cpu
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class BenchServer:
    """One ``xds serve`` process started through the launcher under ``name`` (its log
    ``<name>.log``). ``wait=False`` returns once it is launched (clients may connect as soon
    as its fixed ``ads_port`` listens); :meth:`finish` then waits for the ready file."""

    def __init__(
        self,
        launcher: Launcher,
        work: Path,
        *,
        name: str = "xds",
        ads_port: int = 0,
        python_path: str | None = None,
        extra: Sequence[str] = (),
        wait: bool = True,
        timeout: float = 900,
    ) -> None:
        self.launcher, self.name = launcher, name
        self.ready = work / "server.ready.json"
        python_path = python_path or os.environ.get(SERVER_TREE_ENV) or None
        argv = server_argv(work, ads_port=ads_port, python_path=python_path, extra=extra)
        env = {"PYTHONPATH": python_path} if python_path else {}
        launcher.launch(name, argv, ready_path=self.ready, env=env, timeout=timeout)
        component = launcher[name]
        assert component.pid is not None
        self.pid: int = component.pid
        self.log = component.log_path
        if wait:
            self.finish()

    def finish(self) -> None:
        """Wait for the ready file (written once listening with the first compile done) and
        read the addresses it names."""
        self.launcher.wait_ready([self.name])
        info = read_ready(self.ready)
        assert info is not None
        self.ready_at = self.ready.stat().st_mtime
        self.ads_port = int(info["ads"].rsplit(":", 1)[1])
        self.admin: str = info["admin"]
        self.identity: str = info["server_identity"]
        self.join: str | None = info.get("join")

    def status(self) -> dict[str, Any]:
        """GET /status (the summary)."""
        with urllib.request.urlopen(self.admin + "/status", timeout=120) as response:
            found: dict[str, Any] = json.loads(response.read())
            return found

    def stop(self, timeout: float = 20) -> None:
        self.launcher.stop(self.name, timeout=timeout)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def cpu_seconds(self) -> float:
        return process_cpu(self.pid)

    def cpu_by_thread(self) -> dict[str, float]:
        return cpu_by_thread(self.pid)

    def _children(self) -> set[int]:
        children: set[int] = set()
        for task in Path(f"/proc/{self.pid}/task").iterdir():  # (a thread spawns the worker)
            with contextlib.suppress(OSError):
                children.update(int(c) for c in (task / "children").read_text().split())
        return children

    def compiler_cpu_seconds(self) -> float:
        """CPU of the server's child processes (the compile worker), which cpu_seconds leaves
        out."""
        return sum(process_cpu(child) for child in self._children())

    def compiler_rss_mb(self) -> float:
        """Resident memory of the server's child processes (the compile worker), which
        rss_mb leaves out: the control plane's memory is both."""
        total = 0.0
        for child in self._children():
            with contextlib.suppress(OSError):
                total += rss_mb(child)
        return total
