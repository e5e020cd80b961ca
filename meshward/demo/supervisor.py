"""Starting and stopping the local mesh's processes, with progress an operator can follow.

Every component (control plane, ext_authz, shop services, sidecars) is a child process with its
own log file. A component that fails to come up is named, with its last log lines; every process
is stopped on exit, on error and on Ctrl-C, children first in reverse start order.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TextIO

from meshward.envoy.process import EnvoyProcess, EnvoyStartError
from meshward.errors import UserError

ReadyCheck = Callable[[], bool]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Component:
    name: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    envoy: EnvoyProcess | None = None
    started_at: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        if self.envoy is not None:
            return self.envoy.running()
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.envoy is not None:
            self.envoy.stop(timeout)
            return
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class ComponentFailed(UserError):
    """A component did not come up; the message names it and carries its last log lines."""


class Supervisor:
    """Owns the mesh's processes. Use as a context manager so everything stops on any exit."""

    def __init__(self, state_dir: Path, *, out: TextIO | None = None, quiet: bool = False) -> None:
        self.state_dir = state_dir
        self.logs = state_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.components: dict[str, Component] = {}
        self.out = out or sys.stdout
        self.quiet = quiet

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.out, flush=True)

    def start_process(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready: ReadyCheck,
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Component:
        """Start ``argv`` and wait until ``ready()`` holds; raise ComponentFailed otherwise."""
        log_path = self.logs / f"{name}.log"
        self.say(f"[start] {name}")
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # our own signal handling stops it, in order
            )
        component = Component(name, log_path, process=proc)
        self.components[name] = component
        self._wait(component, ready, timeout)
        return component

    def start_envoy(self, name: str, envoy: EnvoyProcess, *, timeout: float = 30.0) -> Component:
        self.say(f"[start] {name} (Envoy)")
        component = Component(name, envoy.log_path, envoy=envoy)
        self.components[name] = component
        try:
            envoy.start(timeout=timeout)
        except EnvoyStartError as err:
            raise ComponentFailed(f"{name} did not start:\n{err}") from err
        self.say(f"[ready] {name}")
        return component

    def _wait(self, component: Component, ready: ReadyCheck, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        announced = time.monotonic()
        while time.monotonic() < deadline:
            if not component.alive():
                raise ComponentFailed(
                    f"{component.name} exited before it was ready; last log lines "
                    f"({component.log_path}):\n{_tail(component.log_path)}"
                )
            with contextlib.suppress(OSError):
                if ready():
                    self.say(f"[ready] {component.name}")
                    return
            if time.monotonic() - announced > 3:
                self.say(f"[wait ] {component.name} ...")
                announced = time.monotonic()
            time.sleep(0.05)
        raise ComponentFailed(
            f"{component.name} not ready after {timeout:.0f}s; last log lines "
            f"({component.log_path}):\n{_tail(component.log_path)}"
        )

    def check_alive(self) -> None:
        """Raise ComponentFailed naming the first component that died."""
        for component in self.components.values():
            if not component.alive():
                raise ComponentFailed(
                    f"{component.name} died; last log lines ({component.log_path}):\n"
                    f"{_tail(component.log_path)}"
                )

    def stop_all(self) -> None:
        for component in reversed(list(self.components.values())):
            component.stop()
        self.components.clear()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
