"""The one process launcher of the demo, the tests and the benchmarks.

Every process a mesh needs (control plane, ext_authz, apps, agents, sidecars) is a child with its
own log file under ``<root>/logs``, bound to 127.0.0.1 on ports chosen at run time. Processes
are launched without waiting and then awaited together, so independent ones start in parallel.
One that fails to come up is named, with its last log lines; on exit, error or Ctrl-C every
process is stopped (SIGTERM to its process group, SIGKILL after a timeout) in reverse start
order. Tests kill (SIGKILL) and restart processes by name with the same command line.

Readiness is a callable: a ready file the process writes once it listens (``ready_file``), a
port that accepts connections (``port_open``), or Envoy's ``/ready`` (``launch_envoy``).

A worker driven line by line (a benchmark's simulated nodes, a test's bash) keeps its stdin and,
if asked, its stdout as pipes (``pipe_stdin`` / ``pipe_stdout``): :meth:`Component.write`,
:meth:`Component.readline`, and :meth:`Component.close_input` to end its input and let it finish.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from meshward.envoy.process import EnvoyProcess, EnvoyStartError, tail
from meshward.errors import UserError

ReadyCheck = Callable[[], bool]
WAIT_ANNOUNCE_SECONDS = 3.0
#: Unbuffered output: a process's log shows what it did up to the moment it died.
PYTHON_ENV = {"PYTHONUNBUFFERED": "1"}


def meshward_argv(*args: str) -> list[str]:
    """``python -m meshward ARGS`` with this interpreter (the venv the tests run in)."""
    return [sys.executable, "-m", "meshward", *args]


def read_ready(path: Path) -> dict[str, Any] | None:
    """The JSON object a ``--ready-file`` holds, or None while it is absent or half-written."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def ready_file(path: Path) -> ReadyCheck:
    """Ready once ``path`` holds a JSON object (servers write it after they bind)."""
    return lambda: read_ready(path) is not None


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


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
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    pipe_stdin: bool = False
    pipe_stdout: bool = False

    def alive(self) -> bool:
        if self.envoy is not None:
            return self.envoy.running()
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        if self.envoy is not None:
            return self.envoy.pid
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        if self.envoy is not None:
            return self.envoy.returncode
        return self.process.poll() if self.process is not None else None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process (not its group: an agent's Envoy has its own session)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the process group (no goodbye to anyone) and reap it."""
        if self.envoy is not None:
            pid = self.envoy.pid
            if pid is not None and self.envoy.running():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                self.envoy.stop(5)
            return
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self._close_pipes()

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL after ``timeout``; the exit code."""
        if self.envoy is not None:
            return self.envoy.stop(timeout)
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self._close_pipes()
        return proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- pipe-driven workers (launched with pipe_stdin / pipe_stdout) ---------------------------
    def write(self, text: str) -> None:
        """Send ``text`` to the process's stdin and flush it (BrokenPipeError if it is gone)."""
        stream = self.process.stdin if self.process is not None else None
        if stream is None:
            raise ValueError(f"{self.name} was launched without pipe_stdin")
        stream.write(text.encode())
        stream.flush()

    def readline(self) -> str:
        """One line of the process's stdout; "" once it closed it or was stopped."""
        stream = self.process.stdout if self.process is not None else None
        if stream is None:
            raise ValueError(f"{self.name} was launched without pipe_stdout")
        if stream.closed:  # stopped: nothing more will come
            return ""
        return stream.readline().decode(errors="replace")

    def close_input(self, timeout: float = 5.0) -> int | None:
        """End the process's input (EOF: a line-driven worker's cue to finish), give it
        ``timeout`` seconds to exit by itself, then :meth:`stop` it; the exit code."""
        proc = self.process
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        return self.stop()

    def _close_pipes(self) -> None:
        proc = self.process
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class ComponentFailed(UserError):
    """A component did not come up; the message names it and carries its last log lines."""


class StartFailed(Exception):
    """Raised by a ready check that knows the component will never be ready (e.g. an agent
    whose Envoy exited before it was ever ready); the message says why, with evidence."""


class Launcher:
    """Owns a set of processes. Use as a context manager so everything stops on any exit."""

    def __init__(
        self,
        root: Path,
        *,
        out: TextIO | None = None,
        quiet: bool = False,
        logs: Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.logs = logs or self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.components: dict[str, Component] = {}
        self.out = out or sys.stdout
        self.quiet = quiet
        self.started = time.monotonic()

    @property
    def state_dir(self) -> Path:  # the name the demo's code knows
        return self.root

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.out, flush=True)

    def __getitem__(self, name: str) -> Component:
        return self.components[name]

    # -- launching (no waiting) ----------------------------------------------------------------
    def launch(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready: ReadyCheck | None = None,
        ready_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        what: str = "",
        cwd: Path | None = None,
        pipe_stdin: bool = False,
        pipe_stdout: bool = False,
    ) -> Component:
        """Start ``argv`` in its own session (Ctrl-C reaches only us; we stop it in order) with
        stdout and stderr appended to ``logs/<name>.log``. Ready when ``ready()`` is true, or
        when ``ready_path`` holds JSON (it is removed first: a stale one proves nothing), or at
        once if neither is given; :meth:`wait_ready` waits for it. ``pipe_stdin`` keeps stdin a
        pipe (else /dev/null); ``pipe_stdout`` keeps stdout a pipe (stderr still goes to the
        log): for workers driven line by line, which must then be read or they block."""
        if ready_path is not None:
            ready_path.unlink(missing_ok=True)
            ready = ready_file(ready_path)
        log_path = self.logs / f"{name}.log"
        self.say(f"[start] {name}" + (f" ({what})" if what else ""))
        merged = {**PYTHON_ENV, **(env or {})}
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if pipe_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe_stdout else log,
                stderr=log if pipe_stdout else subprocess.STDOUT,
                env={**os.environ, **merged},
                cwd=cwd,
                start_new_session=True,
            )
        component = Component(
            name,
            log_path,
            process=proc,
            ready_check=ready or (lambda: True),
            timeout=timeout,
            argv=list(argv),
            env=merged,
            cwd=cwd,
            pipe_stdin=pipe_stdin,
            pipe_stdout=pipe_stdout,
        )
        self.components[name] = component
        return component

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready_path: Path,
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Launch a server that writes a ``--ready-file``, wait for it, return what it wrote
        (the addresses it bound)."""
        self.launch(name, argv, ready_path=ready_path, env=env, timeout=timeout)
        self.wait_ready([name])
        info = read_ready(ready_path)
        assert info is not None
        return info

    def restart(self, name: str, *, wait: bool = True) -> Component:
        """Stop ``name`` if it still runs and start it again with the same command line."""
        old = self.components[name]
        old.stop()
        if old.envoy is not None:
            envoy = EnvoyProcess(
                old.envoy.config,
                name=old.envoy.name,
                workdir=old.envoy.workdir,
                log_level=old.envoy.log_level,
                extra_args=old.envoy.extra_args,
            )
            component = self.launch_envoy(name, envoy, timeout=old.timeout)
        else:
            component = self.launch(
                name,
                old.argv,
                ready=old.ready_check,
                env=old.env,
                timeout=old.timeout,
                cwd=old.cwd,
                pipe_stdin=old.pipe_stdin,
                pipe_stdout=old.pipe_stdout,
            )
        if wait:
            self.wait_ready([name])
        return component

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` (its whole process group) and reap it."""
        self.components[name].kill()

    def stop(self, name: str, timeout: float = 5.0) -> int | None:
        return self.components[name].stop(timeout)

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
                        f"{component.name} exited ({component.returncode}) before it was ready; "
                        f"last log lines ({component.log_path}):\n{tail(component.log_path, 20)}"
                    )
                ok = False
                if component.ready_check is not None:
                    try:
                        with contextlib.suppress(OSError):
                            ok = component.ready_check()
                    except StartFailed as exc:
                        raise ComponentFailed(
                            f"{component.name} exited before it was ready: {exc}\n"
                            f"last log lines ({component.log_path}):\n"
                            f"{tail(component.log_path, 10)}"
                        ) from None
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
        names: Iterable[str] | None = None,
    ) -> float:
        """Wait for a condition that spans components (e.g. "every sidecar has its config"),
        with the same progress lines, failing early if a component (of ``names``, default all)
        dies; return the seconds it took."""
        started = time.monotonic()
        announced = started
        while True:
            self.check_alive(names)
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

    def check_alive(self, names: Iterable[str] | None = None) -> None:
        """Raise ComponentFailed naming the first component (of ``names``) that died."""
        chosen = self.components if names is None else {n: self.components[n] for n in names}
        for component in chosen.values():
            if not component.alive():
                raise ComponentFailed(
                    f"{component.name} died ({component.returncode}); last log lines "
                    f"({component.log_path}):\n{tail(component.log_path, 20)}"
                )

    def stop_all(self) -> None:
        for component in reversed(list(self.components.values())):
            with contextlib.suppress(Exception):
                component.stop()
        self.components.clear()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


#: The name the demo used for the launcher.
Supervisor = Launcher
