"""A local mesh whose sidecars run under `meshward agent` (real agent processes, real Envoy).

The control plane runs in-process (``--secrets agent`` mode, joins on a kernel-chosen port) with
a CA on disk (join tokens need its key); every workload gets an echo backend and an agent
process (``python -m meshward agent``) that joins with a fresh token, serves SDS and starts its
Envoy. Agent state directories live under a short private /tmp directory: Unix socket paths are
limited to ~100 bytes.

Used by the agent integration tests and ``bench/certs.py``; test support only.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from meshward.xds.testing import http_request


class AgentMesh:
    def __init__(
        self,
        policy_dir: Path,
        workdir: Path,
        workloads: list[str],
        *,
        svid_ttl: timedelta = timedelta(hours=1),
        agent_args: tuple[str, ...] = (),
    ) -> None:
        self.policy_dir, self.workdir = Path(policy_dir), Path(workdir)
        self.refs = list(workloads)
        self.svid_ttl = svid_ttl
        self.agent_args = agent_args
        self.state_root = Path(tempfile.mkdtemp(prefix="mwa-"))
        self.ca_dir = self.workdir / "ca"
        self.echoes: dict[str, Any] = {}
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.bindings: dict[str, Any] = {}
        self.xds: Any = None
        self.trust_domain = "cluster.local"

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> AgentMesh:
        from meshward.certs import CertificateAuthority
        from meshward.compile import CompileOptions, runtime_bindings
        from meshward.demo.echo import EchoServer
        from meshward.net import free_port
        from meshward.policy import load
        from meshward.xds.compiler import compiler_for

        policy = load([self.policy_dir])
        self.trust_domain = policy.mesh.trust_domain
        CertificateAuthority.init(self.ca_dir, self.trust_domain)
        for ref in self.refs:
            echo = EchoServer(ref.split("/")[1])
            echo.__enter__()
            self.echoes[ref] = echo
        app_ports = {
            (w.ref, p.port): self.echoes[w.ref].port
            for w in policy.workloads
            if w.ref in self.echoes
            for p in w.ports
        }
        supply = (free_port() for _ in itertools.count())
        self.bindings = runtime_bindings(policy.workloads, supply, app_ports=app_ports)
        options = CompileOptions(
            bindings=self.bindings, listen_host="127.0.0.1", access_log_path="/dev/stdout"
        )
        self._compiler = compiler_for(options, agent_secrets=True)
        self.start_control_plane()
        for ref in self.refs:
            self.start_agent(ref, join=True)
        for ref in self.refs:
            self.wait_agent(ref, timeout)
        self.wait_converged(timeout)
        return self

    def start_control_plane(self, listen: str = "127.0.0.1:0") -> None:
        from meshward.certs import CertificateAuthority
        from meshward.xds.service import XdsServiceThread

        self.xds = XdsServiceThread(
            None,
            CertificateAuthority.load(self.ca_dir),
            self._compiler,
            listen=listen,
            policy_paths=[self.policy_dir],
            watch_interval=0.2,
            svid_ttl=self.svid_ttl,
            admin=None,
            join_listen="127.0.0.1:0",
            agent_secrets=True,
        ).start()

    def restart_control_plane(self, down: float) -> None:
        """Stop the control plane, stay down ``down`` seconds, start it on the same ADS port."""
        address = self.xds.service.address
        self.xds.stop()
        time.sleep(down)
        self.start_control_plane(address)

    def state_dir(self, ref: str) -> Path:
        return self.state_root / ref.replace("/", "-")

    def start_agent(self, ref: str, *, join: bool) -> subprocess.Popen[bytes]:
        from meshward.certs.jointoken import load_or_create_key, mint

        service = self.xds.service
        args = [
            sys.executable, "-m", "meshward", "agent",
            "--workload", ref,
            "--xds", service.address,
            "--dir", str(self.state_dir(ref)),
            "--trust-domain", self.trust_domain,
            "--envoy-arg=--drain-time-s", "--envoy-arg=1",
            "--envoy-arg=--drain-strategy", "--envoy-arg=immediate",
            "--drain-seconds", "0.5",
            *self.agent_args,
        ]  # fmt: skip
        if join:
            token_file = self.workdir / f"{ref.replace('/', '-')}.token"
            token = mint(load_or_create_key(self.ca_dir), ref, ttl=timedelta(minutes=10))
            token_file.write_text(token + "\n")
            roots = self.workdir / "root.pem"
            roots.write_bytes(service.control.ca.trust_bundle().roots_pem)
            args += ["--join", service.join_address, "--join-token-file", str(token_file),
                     "--root-cert", str(roots)]  # fmt: skip
        log = (self.workdir / f"agent-{ref.replace('/', '-')}.log").open("ab")
        try:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)  # fmt: skip
        finally:
            log.close()
        self.agents[ref] = proc
        return proc

    def agent_status(self, ref: str) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            data: dict[str, Any] = json.loads((self.state_dir(ref) / "status.json").read_text())
            return data
        return {}

    def agent_log(self, ref: str) -> str:
        path = self.workdir / f"agent-{ref.replace('/', '-')}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def envoy_log(self, ref: str) -> str:
        path = self.state_dir(ref) / "envoy" / "envoy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_agent(self, ref: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.agents[ref]
            if proc.poll() is not None:
                raise RuntimeError(f"agent {ref} exited {proc.returncode}:\n{self.agent_log(ref)}")
            status = self.agent_status(ref)
            if status.get("state") == "serving" and (status.get("envoy") or {}).get("running"):
                return status
            time.sleep(0.1)
        raise TimeoutError(f"agent {ref} not serving after {timeout}s:\n{self.agent_log(ref)}")

    def wait_for(self, ref: str, predicate: Any, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.agent_status(ref)
            if status and predicate(status):
                return status
            time.sleep(0.1)
        raise TimeoutError(f"agent {ref}: condition not met; status {self.agent_status(ref)}")

    def converged(self) -> bool:
        nodes = {n["node"]: n for n in self.xds.status()["nodes"]}
        for ref in self.refs:
            node = nodes.get(ref)
            if node is None or not node["connected"]:
                return False
            for stream in node["streams"]:
                if not stream["types"] or not all(t["in_sync"] for t in stream["types"]):
                    return False
        return True

    def wait_converged(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.converged():
                return
            time.sleep(0.1)
        logs = "\n".join(f"--- {r}\n{self.agent_log(r)[-2000:]}\n{self.envoy_log(r)[-2000:]}"
                         for r in self.refs)  # fmt: skip
        raise TimeoutError(f"mesh did not converge in {timeout}s: {self.xds.status()['nodes']}\n"
                           f"{logs}")  # fmt: skip

    def kill_agent(self, ref: str) -> None:
        """SIGKILL: no drain, no cleanup; its Envoy keeps running in its own session."""
        proc = self.agents[ref]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_agent(self, ref: str, timeout: float = 20.0) -> int | None:
        proc = self.agents[ref]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def _kill_envoy(self, ref: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.state_dir(ref) / "envoy" / "envoy.pid").read_text())
            os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        for ref in list(self.agents):
            self.stop_agent(ref)
            self._kill_envoy(ref)  # an Envoy whose agent was killed and never restarted
        if self.xds is not None:
            self.xds.stop()
        for echo in self.echoes.values():
            echo.__exit__(None, None, None)
        shutil.rmtree(self.state_root, ignore_errors=True)

    def __enter__(self) -> AgentMesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- traffic -----------------------------------------------------------------------------------
    def outbound_port(self, source: str, target: str, port: int = 8080) -> int:
        return int(self.bindings[source].outbound[f"{target}:{port}"].port)

    def inbound_port(self, ref: str, port: int = 8080) -> int:
        return int(self.bindings[ref].ports[port].listen.port)

    def request(self, source: str, target: str, path: str = "/") -> tuple[int, str]:
        return http_request(self.outbound_port(source, target), path, "GET", 5.0)
