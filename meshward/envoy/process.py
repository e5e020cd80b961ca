"""Running one real Envoy process on loopback, and talking to its admin interface.

Many Envoys run side by side (demo, tests, benchmarks), so each gets ``--disable-hot-restart``
(no shared memory, nothing left in /dev/shm) and its admin on a Unix socket of its own, mode 0600,
never a TCP port (any local process could drain or stop a TCP admin: see
:mod:`meshward.envoy.admin`). Listeners may use port 0; :meth:`EnvoyProcess.listener_port` reads
the bound port from ``/listeners``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meshward.envoy.admin import (
    ADMIN_SOCKET_FILE,
    MAX_SOCKET_PATH,
    AdminClient,
    admin_pipe,
    admin_socket_of,
)
from meshward.envoy.binary import find_envoy
from meshward.lifecycle import StartStop


class EnvoyStartError(RuntimeError):
    """Envoy exited or never became ready; the message carries its last log lines."""


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, for error messages that name a failing component."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def validate_config(config: Mapping[str, Any], *, binary: Path | None = None) -> tuple[bool, str]:
    """Run ``envoy --mode validate`` on a bootstrap: (ok, Envoy's output)."""
    envoy = binary or find_envoy()
    with tempfile.TemporaryDirectory(prefix="meshward-validate-") as tmp:
        path = Path(tmp) / "envoy.json"
        path.write_text(json.dumps(config))
        proc = subprocess.run(
            [
                str(envoy),
                "--mode",
                "validate",
                "-c",
                str(path),
                "--disable-hot-restart",
                "-l",
                "warn",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


class EnvoyProcess(StartStop):
    """One Envoy with its own working directory, log file and admin socket.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The bootstrap's admin is
    kept where it is if it is a Unix socket (``pipe``), else put on ``<workdir>/admin.sock``
    (mode 0600; a short private directory under /tmp when that path is too long for a socket).
    """

    @property
    def started(self) -> bool:
        return self._proc is not None

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        name: str = "envoy",
        workdir: Path | None = None,
        binary: Path | None = None,
        concurrency: int = 1,
        log_level: str = "info",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"meshward-{name}-"))
        self._socket_dir: Path | None = None  # a private short directory, removed at stop()
        self.config, self.admin_socket = self._with_admin_socket(config)
        self.binary = binary or find_envoy()
        self.concurrency = concurrency
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.env = dict(env) if env is not None else None
        self.config_path = self.workdir / "envoy.json"
        self.log_path = self.workdir / "envoy.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def _with_admin_socket(self, config: Mapping[str, Any]) -> tuple[dict[str, Any], Path]:
        result: dict[str, Any] = json.loads(json.dumps(config))  # deep copy; proves it is JSON
        given = admin_socket_of(result)
        if given is not None:
            path = Path(given) if os.path.isabs(given) else self.workdir.resolve() / given
            result["admin"]["address"]["pipe"]["path"] = str(path)
            return result, path
        path = self.workdir.resolve() / ADMIN_SOCKET_FILE
        if len(str(path).encode()) > MAX_SOCKET_PATH:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="mw-admin-"))  # mode 0700
            path = self._socket_dir / ADMIN_SOCKET_FILE
        result["admin"] = {**result.get("admin", {}), **admin_pipe(path)}
        return result, path

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, *, wait: bool = True, timeout: float = 30.0) -> EnvoyProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=1))
        with contextlib.suppress(FileNotFoundError):
            self.admin_socket.unlink()  # a stale socket from an earlier run
        argv = [
            str(self.binary),
            "-c", str(self.config_path),
            "--disable-hot-restart",
            "--concurrency", str(self.concurrency),
            "--file-flush-interval-msec", "200",
            "-l", self.log_level,
            *self.extra_args,
        ]  # fmt: skip
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.env,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop Envoy
            )
        finally:
            log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """Envoy's exit code once it has exited; None while running or never started."""
        return self._proc.poll() if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until ``/ready`` answers LIVE; raise EnvoyStartError with the log if it won't."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                code = self._proc.returncode if self._proc else None
                raise EnvoyStartError(
                    f"{self.name}: Envoy exited with code {code} before it was ready\n"
                    f"{tail(self.log_path)}"
                )
            if self.ready():
                return
            time.sleep(0.05)
        raise EnvoyStartError(
            f"{self.name}: Envoy not LIVE after {timeout:.0f}s\n{tail(self.log_path)}"
        )

    def ready(self) -> bool:
        """True once the admin ``/ready`` answers LIVE (never blocks longer than a second)."""
        if not self.admin_socket.exists():
            return False
        with contextlib.suppress(OSError):
            status, body = self._get("/ready", timeout=1.0)
            return status == 200 and body.strip() == "LIVE"
        return False

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``. Returns the exit code (None if never started)."""
        proc = self._proc
        if proc is None:
            return None
        try:
            return self._stop(proc, timeout)
        finally:
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _stop(self, proc: subprocess.Popen[bytes], timeout: float) -> int | None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_path, lines)

    # -- admin (over its Unix socket) -------------------------------------------------------------
    def _get(self, path: str, *, timeout: float = 5.0, method: str = "GET") -> tuple[int, str]:
        return AdminClient(self.admin_socket, timeout=timeout).request(path, method=method)

    def admin(self, path: str, *, method: str = "GET") -> str:
        """GET (or POST) an admin path; raise on a non-2xx answer."""
        status, body = self._get(path, method=method)
        if status // 100 != 2:
            raise RuntimeError(f"{self.name}: admin {path} answered {status}: {body[:200]}")
        return body

    def stats(self, prefix: str | None = None) -> dict[str, int]:
        """Counters and gauges as integers (histograms are skipped)."""
        query = "/stats?format=json"
        if prefix:
            query += f"&filter=^{prefix}"
        data = json.loads(self.admin(query))
        return {
            item["name"]: int(item["value"])
            for item in data.get("stats", [])
            if "name" in item and isinstance(item.get("value"), int | float)
        }

    def stat(self, name: str) -> int:
        return self.stats().get(name, 0)

    def config_dump(self, resource: str | None = None) -> dict[str, Any]:
        path = "/config_dump" + (f"?resource={resource}" if resource else "")
        result: dict[str, Any] = json.loads(self.admin(path))
        return result

    def clusters(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.admin("/clusters?format=json"))
        return result

    def listeners(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.admin("/listeners?format=json"))
        return result

    def listener_port(self, name: str) -> int:
        """The port a listener is bound to (useful when the config asked for port 0)."""
        for listener in self.listeners().get("listener_statuses", []):
            if listener.get("name") == name:
                return int(listener["local_address"]["socket_address"]["port_value"])
        raise KeyError(f"{self.name}: no active listener named {name!r}")
