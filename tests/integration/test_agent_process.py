"""The operator's path with the node agent: `meshward ca init`, `meshward xds serve
--join-listen` as a process (no `--secrets`: nodes bring their own keys by default, which the
status check below holds it to), `meshward ca join-token`, `meshward agent` as a process (its
Envoy answers through mTLS it set up), `meshward status`, SIGTERM everywhere."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from meshward.certs import CertificateAuthority
from meshward.cli import main
from meshward.net import free_port
from meshward.testing.echo import EchoServer
from meshward.testing.processes import Launcher, meshward_argv
from meshward.testing.topology import shop_yaml
from meshward.testing.xds_resources import http_request

POLICY = shop_yaml(["orders"], mtls="PERMISSIVE")


def test_serve_join_token_agent_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    CertificateAuthority.init(tmp_path / "ca", "cluster.local")
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "mesh.yaml").write_text(POLICY)
    listen = free_port()
    state = Path(tempfile.mkdtemp(prefix="mwa-"))  # short: Unix socket paths
    launcher = Launcher(tmp_path, quiet=True)
    with EchoServer("orders") as app:
        (tmp_path / "bindings.json").write_text(json.dumps({
            "shop/orders": {"ports": {"8080": {"listen": f"127.0.0.1:{listen}",
                                               "app": f"127.0.0.1:{app.port}"}}}
        }))  # fmt: skip
        try:
            info = launcher.start("xds", meshward_argv(
                "xds", "serve", "--policy", str(tmp_path / "policies"),
                "--ca", str(tmp_path / "ca"), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                "--bindings", str(tmp_path / "bindings.json"), "--ready-file", str(tmp_path / "ready.json"),
                "--join-listen", "127.0.0.1:0",
            ), ready_path=tmp_path / "ready.json")  # fmt: skip
            assert info["join"]
            capsys.readouterr()
            assert main(["ca", "join-token", "--dir", str(tmp_path / "ca"),
                         "--workload", "shop/orders", "--ttl", "2m"]) == 0  # fmt: skip
            (tmp_path / "orders.token").write_text(capsys.readouterr().out)
            (tmp_path / "root.pem").write_bytes(
                CertificateAuthority.load(tmp_path / "ca").trust_bundle().roots_pem
            )
            argv = meshward_argv(
                "agent", "--workload", "shop/orders",
                "--xds", info["ads"], "--join", info["join"], "--dir", str(state / "orders"),
                "--join-token-file", str(tmp_path / "orders.token"),
                "--root-cert", str(tmp_path / "root.pem"),
            )  # fmt: skip
            # PERMISSIVE: plaintext reaches the app once Envoy has its config
            agent = launcher.launch(
                "agent", argv, ready=lambda: http_request(listen, "/x")[0] == 200
            )
            launcher.wait_ready(["agent"])
            code = 1
            for _ in range(50):  # the first ACKs may still be in flight
                code = main(["status", "--xds", info["admin"].removeprefix("http://")])
                if code == 0 and "SYNCED" in capsys.readouterr().out:
                    break
                time.sleep(0.1)
            assert code == 0
            main(["status", "--xds", info["admin"].removeprefix("http://"), "--json"])
            [node] = json.loads(capsys.readouterr().out)["nodes"]
            assert node["node"] == "shop/orders"
            assert "certificate" not in node  # no SVID (and no key) made by the control plane
            [stream] = node["streams"]
            assert stream["identity"] == "spiffe://cluster.local/ns/shop/sa/orders"
            status = json.loads((state / "orders" / "status.json").read_text())
            assert status["state"] == "serving" and status["envoy"]["running"]
            # The token was spent: a second agent with it is refused, with the reason.
            again = subprocess.run(
                meshward_argv("agent", "--workload", "shop/orders",
                 "--xds", info["ads"], "--join", info["join"], "--dir", str(state / "other"),
                 "--join-token-file", str(tmp_path / "orders.token"),
                 "--root-cert", str(tmp_path / "root.pem"), "--no-envoy"),
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert again.returncode == 1
            assert "used: join token was already used" in again.stderr
            assert "Traceback" not in again.stderr
            assert agent.stop(30) == 0  # SIGTERM: drains Envoy, exits cleanly
            assert http_request(listen, "/x")[0] == 0  # Envoy drained and stopped with it
            assert launcher.stop("xds", 30) == 0
        finally:
            launcher.stop_all()
            shutil.rmtree(state, ignore_errors=True)
