"""The Envoy harness against real Envoy processes: proxying, admin reads, many at once."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from meshward.demo.echo import EchoServer
from meshward.envoy import EnvoyProcess, EnvoyStartError
from meshward.envoy.bootstrap import static_proxy
from meshward.envoy.process import validate_config


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
    admin_urls = {envoy.admin_url for envoy in envoys}
    assert len(admin_urls) == 5  # five distinct kernel-chosen admin ports
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
