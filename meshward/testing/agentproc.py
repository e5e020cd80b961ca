"""A `meshward agent` process seen from outside: its command line, its first join token, its
health and readiness, and a handle on the Envoy it runs. The one mesh builder
(:mod:`meshward.testing.mesh`) starts agents with these; tests that start one by hand use them too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

from meshward.envoy.process import EnvoyProcess, tail
from meshward.testing.processes import ReadyCheck, StartFailed, meshward_argv

#: A listener update (an mTLS mode change, or a new kind of authorization filter; rule edits only
#: change the route config) leaves open connections on the old listener until they drain;
#: Envoy's default drains gradually over 600 s. Closing them at the next response keeps tests
#: that change the filter set quick.
ENVOY_DRAIN_ARGS = ("--drain-time-s", "2", "--drain-strategy", "immediate")


def slug(ref: str) -> str:
    return ref.replace("/", "-")


def agent_argv(
    ref: str,
    xds: str,
    state_dir: Path,
    *,
    trust_domain: str = "cluster.local",
    root_namespace: str = "meshward-system",
    service_account: str | None = None,
    join: str | None = None,
    token_file: Path | None = None,
    root_cert: Path | None = None,
    delta: bool = False,
    envoy_args: Iterable[str] = ENVOY_DRAIN_ARGS,
    drain_seconds: float = 0.5,
    log_level: str = "warning",
    extra: Iterable[str] = (),
) -> list[str]:
    """``meshward agent`` for one workload; with ``join``/``token_file``/``root_cert`` it makes
    first contact with a join token, without them it resumes from the SVID in ``state_dir``."""
    argv = meshward_argv(
        "agent", "--workload", ref, "--xds", xds, "--dir", str(state_dir),
        "--trust-domain", trust_domain, "--root-namespace", root_namespace,
        "--drain-seconds", str(drain_seconds), "--envoy-log-level", log_level,
        *(f"--envoy-arg={arg}" for arg in envoy_args),
    )  # fmt: skip
    if service_account:
        argv += ["--service-account", service_account]
    argv.append("--delta" if delta else "--sotw")
    if join is not None:
        assert token_file is not None and root_cert is not None
        argv += [
            "--join",
            join,
            "--join-token-file",
            str(token_file),
            "--root-cert",
            str(root_cert),
        ]
    return argv + list(extra)


def write_join_token(
    ca_dir: Path, ref: str, path: Path, ttl: timedelta = timedelta(minutes=10)
) -> Path:
    """A fresh one-time join token for ``ref`` (what `meshward ca join-token` prints), 0600."""
    from meshward.certs.jointoken import load_or_create_key, mint

    path.write_text(mint(load_or_create_key(ca_dir), ref, ttl=ttl) + "\n")
    path.chmod(0o600)
    return path


def bootstrap_sidecar(
    ca_dir: Path, ref: str, xds: str, join: str | None, out: Path, *extra: str
) -> dict[str, Any]:
    """`meshward bootstrap` as an operator runs it (a process): with ``join``, first contact
    with a fresh join token (and the CA's roots to authenticate the control plane); without,
    ``extra`` says what (e.g. ``--renew``). Its ``--json`` result; StartFailed if it failed."""
    import subprocess

    argv = meshward_argv("bootstrap", "--workload", ref, "--xds", xds, "--out", str(out), "--json")
    if join is not None:
        from meshward.certs import CertificateAuthority

        roots = out.parent / f"{slug(ref)}.roots.pem"
        roots.write_bytes(CertificateAuthority.load(ca_dir).trust_bundle().roots_pem)
        token = write_join_token(ca_dir, ref, out.parent / f"{slug(ref)}.token")
        argv += ["--join", join, "--join-token-file", str(token), "--root-cert", str(roots)]
    done = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise StartFailed(f"meshward bootstrap {ref} exited {done.returncode}: {done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def agent_status(state_dir: Path) -> dict[str, Any]:
    """The agent's health (its ``status.json``), {} while it has written none."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((state_dir / "status.json").read_text())
        if isinstance(data, dict):
            return data
    return {}


def agent_serving(state_dir: Path) -> ReadyCheck:
    """Ready once the agent holds an SVID and its Envoy answers ``/ready`` LIVE. An Envoy that
    exits before it was ever ready is a failed start (StartFailed, with Envoy's log), though the
    agent keeps restarting it with backoff as it should in production."""
    envoy = AgentEnvoy(state_dir)

    def check() -> bool:
        status = agent_status(state_dir)
        proxy = status.get("envoy") or {}
        if status.get("state") == "serving" and proxy.get("running") and envoy.ready():
            return True
        if proxy.get("restarts", 0) >= 1:
            raise StartFailed(
                f"its Envoy exited before it was ready; Envoy's last log lines "
                f"({envoy.log_path}):\n{tail(envoy.log_path, 10)}"
            )
        return False

    return check


class AgentEnvoy(EnvoyProcess):
    """The Envoy a `meshward agent` runs, seen from outside: its admin socket, log, pid and
    config in the agent's state directory. Admin helpers (stats, config_dump, ...) work as on
    any EnvoyProcess; starting and stopping it is the agent's job."""

    def __init__(self, state_dir: Path, name: str = "envoy") -> None:
        # Deliberately not EnvoyProcess.__init__: nothing here starts a process.
        self.name = name
        self.state_dir = state_dir
        self.workdir = state_dir / "envoy"
        self.admin_socket = state_dir / "admin.sock"
        self.config_path = self.workdir / "envoy.json"
        self.log_path = self.workdir / "envoy.log"
        self.log_level = "warning"
        self.extra_args = []
        self._socket_dir = None
        self._proc = None

    @property
    def config(self) -> dict[str, Any]:  # type: ignore[override]
        data: dict[str, Any] = json.loads(self.config_path.read_text())
        return data

    @property
    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.workdir / "envoy.pid").read_text())
        return None

    @property
    def returncode(self) -> int | None:
        return None

    def running(self) -> bool:
        pid = self.pid
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        # a zombie (its agent was SIGKILLed and nobody reaped it) does not serve
        with contextlib.suppress(OSError):
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        return True

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> EnvoyProcess:
        raise RuntimeError("the agent starts its Envoy")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGKILL an Envoy left behind (its agent was killed and not restarted)."""
        pid = self.pid
        if pid is not None and self.running():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return None
