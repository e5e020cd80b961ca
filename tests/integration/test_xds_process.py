"""The operator's path end to end: `meshward ca init`, `meshward xds serve` as a process,
`meshward bootstrap` files, a real Envoy started from them, `meshward status`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from meshward.cli import main
from meshward.envoy import EnvoyProcess
from meshward.testing.xds_resources import http_request

POLICY = """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: orders, namespace: shop, labels: {app: orders}}
spec: {ports: [{name: http, port: 8080, protocol: HTTP}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: permissive, namespace: meshward-system}
spec: {mtls: {mode: PERMISSIVE}}
"""


def test_serve_bootstrap_envoy_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], xds_serve: Any
) -> None:
    with xds_serve({"mesh.yaml": POLICY}) as server:  # tests/integration/conftest.py
        info, listen = server.info, server.listen
        try:
            assert main(["bootstrap", "--workload", "shop/orders", "--xds", info["ads"],
                         "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "sidecars")]) == 0  # fmt: skip
            config = json.loads((tmp_path / "sidecars" / "orders.shop" / "envoy.json").read_text())
            socket_path = tmp_path / "sidecars" / "orders.shop" / "admin.sock"
            assert config["admin"]["address"] == {"pipe": {"path": str(socket_path), "mode": 0o600}}
            with EnvoyProcess(config, name="orders", workdir=tmp_path / "envoy") as envoy:
                assert envoy.admin_socket == socket_path  # the bootstrap's own socket, 0600
                assert socket_path.stat().st_mode & 0o777 == 0o600
                deadline = time.monotonic() + 15
                while http_request(listen, "/x")[0] != 200:
                    assert time.monotonic() < deadline, envoy.log_tail()
                    time.sleep(0.1)
                capsys.readouterr()
                code = 1
                for _ in range(50):  # the first ACKs may still be in flight
                    code = main(["status", "--xds", info["admin"].removeprefix("http://")])
                    if code == 0 and "SYNCED" in capsys.readouterr().out:
                        break
                    time.sleep(0.1)
                assert code == 0
                main(["status", "--xds", info["admin"].removeprefix("http://"), "--json"])
                status = json.loads(capsys.readouterr().out)
                [node] = status["nodes"]
                assert node["node"] == "shop/orders" and node["certificate"]["issued"] == 1
        finally:
            assert server.stop() == 0  # SIGTERM: a clean exit
