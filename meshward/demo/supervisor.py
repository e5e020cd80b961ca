"""Starting and stopping the local mesh's processes, with progress an operator can follow.

Every component (control plane, ext_authz, shop services, sidecars) is a child process with its
own log file. Components are launched without waiting and then awaited together, so independent
processes start in parallel. A component that fails to come up is named, with its last log
lines; every process is stopped on exit, on error and on Ctrl-C, in reverse start order.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TextIO

from meshward.envoy.process import EnvoyProcess, EnvoyStartError, tail
from meshward.errors import UserError

ReadyCheck = Callable[[], bool]
WAIT_ANNOUNCE_SECONDS = 3.0


@dataclass
class Component:
    name: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    envoy: EnvoyProcess | None = None
    started_at: float = field(default_factory=time.monotonic)
    ready_check: ReadyCheck | None = None
    timeout: float = 30.0
    ready: bool = False

    def alive(self) -> bool:
        if self.envoy is not None:
            return self.envoy.running()
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        if self.envoy is not None:
            return self.envoy.pid
        return self.process.pid if self.process is not None else None

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
        self.started = time.monotonic()

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.out, flush=True)

    # -- launching (no waiting) ----------------------------------------------------------------
    def launch(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready: ReadyCheck,
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        what: str = "",
    ) -> Component:
        """Start ``argv`` in its own session (Ctrl-C reaches only us; we stop it in order) with
        stdout and stderr in ``logs/<name>.log``; :meth:`wait_ready` waits for ``ready()``."""
        log_path = self.logs / f"{name}.log"
        self.say(f"[start] {name}" + (f" ({what})" if what else ""))
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        component = Component(name, log_path, process=proc, ready_check=ready, timeout=timeout)
        self.components[name] = component
        return component

    def launch_envoy(
        self, name: str, envoy: EnvoyProcess, *, timeout: float = 30.0, what: str = "Envoy"
    ) -> Component:
        self.say(f"[start] {name}" + (f" ({what})" if what else ""))
        component = Component(
            name, envoy.log_path, envoy=envoy, ready_check=envoy.ready, timeout=timeout
        )
        self.components[name] = component
        try:
            envoy.start(wait=False)
        except (OSError, EnvoyStartError) as err:
            raise ComponentFailed(f"{name} did not start: {err}") from err
        return component

    # -- waiting -------------------------------------------------------------------------------
    def wait_ready(self, names: Iterable[str] | None = None) -> None:
        """Wait until every named (default: every not yet ready) component is ready, all at
        once; raise ComponentFailed naming the first that died or timed out."""
        pending = [
            self.components[n]
            for n in (names if names is not None else list(self.components))
            if not self.components[n].ready
        ]
        announced = time.monotonic()
        while pending:
            for component in list(pending):
                if not component.alive():
                    raise ComponentFailed(
                        f"{component.name} exited before it was ready; last log lines "
                        f"({component.log_path}):\n{tail(component.log_path, 20)}"
                    )
                ok = False
                if component.ready_check is not None:
                    with contextlib.suppress(OSError):
                        ok = component.ready_check()
                if ok:
                    component.ready = True
                    pending.remove(component)
                    took = time.monotonic() - component.started_at
                    self.say(f"[ready] {component.name} ({took:.1f}s)")
                elif time.monotonic() - component.started_at > component.timeout:
                    raise ComponentFailed(
                        f"{component.name} not ready after {component.timeout:.0f}s; last log "
                        f"lines ({component.log_path}):\n{tail(component.log_path, 20)}"
                    )
            if pending and time.monotonic() - announced > WAIT_ANNOUNCE_SECONDS:
                self.say(f"[wait ] {', '.join(c.name for c in pending)} ...")
                announced = time.monotonic()
            if pending:
                time.sleep(0.05)

    def wait_for(
        self,
        label: str,
        check: ReadyCheck,
        *,
        timeout: float,
        explain: Callable[[], str] = lambda: "",
    ) -> float:
        """Wait for a condition that spans components (e.g. "every sidecar has its config"),
        with the same progress lines; return the seconds it took."""
        started = time.monotonic()
        announced = started
        while True:
            self.check_alive()
            with contextlib.suppress(OSError):
                if check():
                    took = time.monotonic() - started
                    self.say(f"[ready] {label} ({took:.1f}s)")
                    return took
            now = time.monotonic()
            if now - started > timeout:
                detail = explain()
                raise ComponentFailed(
                    f"{label}: not reached after {timeout:.0f}s" + (f"\n{detail}" if detail else "")
                )
            if now - announced > WAIT_ANNOUNCE_SECONDS:
                self.say(f"[wait ] {label} ...")
                announced = now
            time.sleep(0.05)

    def check_alive(self) -> None:
        """Raise ComponentFailed naming the first component that died."""
        for component in self.components.values():
            if not component.alive():
                raise ComponentFailed(
                    f"{component.name} died; last log lines ({component.log_path}):\n"
                    f"{tail(component.log_path, 20)}"
                )

    def stop_all(self) -> None:
        for component in reversed(list(self.components.values())):
            with contextlib.suppress(Exception):
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
