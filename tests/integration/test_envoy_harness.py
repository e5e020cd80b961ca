"""The Envoy harness against real Envoy processes: proxying, admin reads, many at once."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from meshward.envoy import EnvoyProcess, EnvoyStartError
from meshward.envoy.bootstrap import static_proxy
from meshward.envoy.process import validate_config
from meshward.testing.echo import EchoServer


def _get(port: int, path: str) -> tuple[int, dict[str, object]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.status, json.loads(response.read())


def test_static_proxy_reaches_python_backend(
    envoy_factory, echo_server: EchoServer, tmp_path: Path
) -> None:
    access_log = tmp_path / "access.log"
    envoy = envoy_factory(
        static_proxy(echo_server.port, access_log_path=str(access_log)), name="proxy"
    )
    port = envoy.listener_port("ingress")

    status, body = _get(port, "/hello/world?x=1")

    assert status == 200
    assert body["service"] == "echo"
    assert body["path"] == "/hello/world?x=1"
    assert "x-request-id" in body["headers"]  # added by Envoy: the request really went through it
    assert envoy.stat("cluster.upstream.upstream_rq_completed") >= 1
    assert envoy.config_dump()["configs"]
    assert any(c["name"] == "upstream" for c in envoy.clusters()["cluster_statuses"])


def test_five_envoys_run_at_once_and_all_stop(envoy_factory, echo_server: EchoServer) -> None:
    envoys = [
        envoy_factory(static_proxy(echo_server.port), name=f"e{i}", wait=False) for i in range(5)
    ]
    for envoy in envoys:
        envoy.wait_ready(60)
    sockets = {envoy.admin_socket for envoy in envoys}
    assert len(sockets) == 5  # five distinct admin sockets, one per workdir
    for envoy in envoys:
        status, body = _get(envoy.listener_port("ingress"), "/")
        assert status == 200 and body["service"] == "echo"
    for envoy in envoys:
        envoy.stop()
    assert not any(envoy.running() for envoy in envoys)


def test_bad_config_fails_fast_with_log(tmp_path: Path) -> None:
    broken = {"static_resources": {"clusters": [{"name": "x", "type": "NOT_A_TYPE"}]}}
    envoy = EnvoyProcess(broken, name="broken", workdir=tmp_path / "broken")
    with pytest.raises(EnvoyStartError, match="exited"):
        envoy.start(timeout=30)
    envoy.stop()


def test_validate_mode_judges_configs(echo_server: EchoServer) -> None:
    ok, output = validate_config(static_proxy(echo_server.port))
    assert ok, output
    ok, output = validate_config(
        {"static_resources": {"listeners": [{"name": "l", "address": {}}]}}
    )
    assert not ok and output


def test_stop_kills_an_envoy_that_ignores_sigterm(envoy_factory, echo_server: EchoServer) -> None:
    import os
    import signal

    envoy = envoy_factory(static_proxy(echo_server.port), name="stubborn")
    assert envoy.pid is not None
    os.kill(envoy.pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    envoy.stop(timeout=1)
    assert not envoy.running()


def test_returncode_is_known_after_exit(envoy_factory, echo_server: EchoServer) -> None:
    envoy = envoy_factory(static_proxy(echo_server.port), name="rc")
    assert envoy.returncode is None
    envoy.stop()
    assert envoy.returncode == 0  # SIGTERM: Envoy shuts down cleanly


def _listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on: its socket inodes matched against /proc/net/tcp*."""
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_admin_is_a_private_unix_socket_and_never_a_tcp_port(
    envoy_factory, echo_server: EchoServer
) -> None:
    import stat

    config = static_proxy(echo_server.port)
    # Even a config asking for a TCP admin gets the socket: no local process can drain,
    # reconfigure or stop a sidecar (or read its config_dump) through a port.
    config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
    envoy = envoy_factory(config, name="private")
    mode = envoy.admin_socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert envoy.pid is not None
    assert _listening_tcp_ports(envoy.pid) == {envoy.listener_port("ingress")}
    # Meshward's tools read it through the socket.
    assert envoy.ready()
    assert envoy.stats("cluster.upstream")
    assert envoy.config_dump()["configs"]
    assert "ingress" in json.dumps(envoy.listeners())
