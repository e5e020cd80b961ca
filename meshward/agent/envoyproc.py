"""The agent's Envoy: start it, restart it with backoff when it dies, adopt it after an agent
restart, drain it on shutdown.

Envoy runs in its own session (:class:`meshward.envoy.EnvoyProcess`), so an agent that is killed
leaves it serving with the certificate it holds (it keeps its listeners and reconnects to the
SDS socket when a new agent listens there). A restarted agent finds it through ``envoy.pid`` and
adopts it instead of starting a second Envoy that could not bind the same ports: the pid must be
alive and its command line must name this agent's bootstrap file (a recycled pid does not).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from meshward.envoy.admin import AdminClient
from meshward.envoy.process import EnvoyProcess

PID_FILE = "envoy.pid"
MIN_BACKOFF, MAX_BACKOFF = 0.5, 30.0
STABLE_AFTER = 60.0  # seconds up after which the backoff starts again from MIN_BACKOFF


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (an exited child not yet reaped) is not alive.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1] != "Z"
    except (OSError, IndexError):
        return True


class Supervisor:
    """Pure bookkeeping plus process calls; the agent's loop calls :meth:`tick` once a second."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        *,
        log_level: str = "warning",
        extra_args: tuple[str, ...] = (),
        drain_seconds: float = 2.0,
    ) -> None:
        self.config = config
        self.workdir = workdir
        self.log_level = log_level
        self.extra_args = extra_args
        self.drain_seconds = drain_seconds
        self.process: EnvoyProcess | None = None
        self.adopted_pid: int | None = None
        self.restarts = 0
        self.started_at: float | None = None
        self.next_start: float = 0.0
        self.backoff = MIN_BACKOFF
        self.last_exit: int | None = None

    @property
    def pid_file(self) -> Path:
        return self.workdir / PID_FILE

    @property
    def config_path(self) -> Path:
        return self.workdir / "envoy.json"

    def pid(self) -> int | None:
        if self.process is not None:
            return self.process.pid
        return self.adopted_pid

    def running(self) -> bool:
        if self.process is not None:
            return self.process.running()
        return self.adopted_pid is not None and _alive(self.adopted_pid)

    def adopt(self) -> bool:
        """Take over an Envoy a previous agent started (True if one is running)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return False
        if _alive(pid) and str(self.config_path) in _cmdline(pid):
            self.adopted_pid = pid
            self.started_at = time.monotonic()
            return True
        return False

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = EnvoyProcess(
            self.config,
            name="sidecar",
            workdir=self.workdir,
            log_level=self.log_level,
            extra_args=self.extra_args,
        )
        self.process.start(wait=False)
        self.adopted_pid = None
        self.started_at = time.monotonic()
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(f"{self.process.pid}\n")
        tmp.replace(self.pid_file)

    def tick(self, now: float) -> str | None:
        """Restart a dead Envoy when its backoff allows; returns what happened, if anything."""
        if self.running():
            if self.started_at is not None and now - self.started_at > STABLE_AFTER:
                self.backoff = MIN_BACKOFF
            return None
        if self.started_at is not None:  # it was running: schedule the restart
            self.last_exit = self.process.returncode if self.process is not None else None
            self.started_at = None
            self.next_start = now + self.backoff
            self.backoff = min(MAX_BACKOFF, self.backoff * 2)
            return (
                f"Envoy exited (code {self.last_exit}); restarting in {self.next_start - now:.1f}s"
            )
        if now >= self.next_start:
            self.restarts += 1
            self.start()
            return f"Envoy restarted (restart {self.restarts})"
        return None

    def ready(self) -> bool:
        try:
            status, body = AdminClient(self.admin_socket()).get("/ready", timeout=1.0)
        except OSError:
            return False
        return status == 200 and body.strip() == "LIVE"

    def admin_socket(self) -> str:
        return str(self.config["admin"]["address"]["pipe"]["path"])

    def drain_and_stop(self) -> None:
        """Stop taking new connections (drain listeners), let open ones finish, then SIGTERM."""
        pid = self.pid()
        if pid is None or not self.running():
            return
        with contextlib.suppress(OSError):
            AdminClient(self.admin_socket()).request(
                "/drain_listeners?graceful", method="POST", timeout=2.0
            )
            time.sleep(self.drain_seconds)
        if self.process is not None:
            self.process.stop()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
