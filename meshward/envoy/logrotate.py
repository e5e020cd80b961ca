"""Keeping Envoy's file access logs bounded: rotate by size, tell Envoy to reopen.

Why: Envoy's file access logger appends forever and has no rotation of its own; a flood of
requests (each line carrying request data) can fill the disk (issue 13). Field sizes are capped
in the compiled log format (``%REQ(:PATH):1024%``, meshward.compile.observe); the total size is
capped here, the way logrotate's ``copytruncate``-free mode works with Envoy: when a log passes
``max_bytes / (backups + 1)`` it becomes ``<log>.1`` (``.1`` -> ``.2`` ..., the oldest deleted)
and Envoy is sent SIGUSR1, on which it reopens every access log (Envoy's documented signal).

The bound: ``max_bytes`` plus, for each of the ``backups + 1`` files, what Envoy writes between
two checks (``interval``, default 1 s) and before it reopens (its file flush interval). Readers read ``<log>`` and its backups
(meshward.telemetry.limits.read_rotated).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from meshward.telemetry.limits import DEFAULT_LOG_BACKUPS, DEFAULT_LOG_BYTES

log = logging.getLogger("meshward.envoy")


@dataclass(frozen=True)
class _Watched:
    path: Path
    pid: int


class AccessLogRotator:
    """``watch(path, envoy_pid)`` then ``start()`` (a thread checking every ``interval``), or
    call ``check()`` yourself. ``stop()`` ends the thread."""

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_LOG_BYTES,
        backups: int = DEFAULT_LOG_BACKUPS,
        interval: float = 1.0,
    ) -> None:
        if backups < 1 or max_bytes < 1024:
            raise ValueError("keep at least one backup and 1 KiB")
        self.max_bytes = max_bytes
        self.backups = backups
        self.interval = interval
        self.rotations = 0
        self._watched: list[_Watched] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def file_bytes(self) -> int:
        """The size at which one file is rotated."""
        return self.max_bytes // (self.backups + 1)

    def watch(self, path: Path, pid: int) -> None:
        self._watched.append(_Watched(path, pid))

    def check(self) -> list[Path]:
        """Rotate every watched log past its size; return the ones rotated."""
        rotated = []
        for item in self._watched:
            try:
                size = item.path.stat().st_size
            except OSError:
                continue
            if size < self.file_bytes:
                continue
            self._rotate(item.path)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(item.pid, signal.SIGUSR1)  # Envoy: reopen access logs
            self.rotations += 1
            rotated.append(item.path)
        return rotated

    def _rotate(self, path: Path) -> None:
        oldest = path.with_name(f"{path.name}.{self.backups}")
        with contextlib.suppress(FileNotFoundError):
            oldest.unlink()
        for index in range(self.backups - 1, 0, -1):
            source = path.with_name(f"{path.name}.{index}")
            with contextlib.suppress(FileNotFoundError):
                source.replace(path.with_name(f"{path.name}.{index + 1}"))
        path.replace(path.with_name(f"{path.name}.1"))

    def start(self) -> AccessLogRotator:
        def run() -> None:
            while not self._stop.wait(self.interval):
                try:
                    self.check()
                except OSError as exc:  # a full disk must not kill the rotator
                    log.warning("access log rotation failed: %s", exc)

        self._thread = threading.Thread(target=run, name="access-log-rotator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 1)
            self._thread = None


__all__ = ["AccessLogRotator"]
