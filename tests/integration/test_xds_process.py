"""The operator's path end to end: `meshward ca init`, `meshward xds serve` as a process (its
default mode), `meshward ca join-token`, `meshward bootstrap` (the key made on the node, the SVID
by CSR, files read through file-based SDS), a real Envoy started from them, `meshward status`;
then a scan of everything the control plane holds, logs, serves and exports for private keys."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from meshward.certs import CertificateAuthority
from meshward.cli import main
from meshward.envoy import EnvoyProcess
from meshward.testing.topology import shop_yaml
from meshward.testing.xds_resources import http_request

POLICY = shop_yaml(["orders"], mtls="PERMISSIVE")


def test_serve_bootstrap_envoy_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], xds_serve: Any
) -> None:
    with xds_serve({"mesh.yaml": POLICY}, "--log-format", "json") as server:  # conftest.py
        info, listen, launcher = server.info, server.listen, server.launcher
        sidecars = Path(tempfile.mkdtemp(prefix="mwb-"))  # short: the admin socket lives there
        try:
            token = tmp_path / "orders.token"
            assert main(["ca", "join-token", "--dir", str(tmp_path / "ca"),
                         "--workload", "shop/orders"]) == 0  # fmt: skip
            token.write_text(capsys.readouterr().out)
            roots = tmp_path / "roots.pem"
            roots.write_bytes(CertificateAuthority.load(tmp_path / "ca").trust_bundle().roots_pem)
            assert main(["bootstrap", "--workload", "shop/orders", "--xds", info["ads"],
                         "--join", info["join"], "--join-token-file", str(token),
                         "--root-cert", str(roots), "--out", str(sidecars)]) == 0  # fmt: skip
            assert "nothing renews it by itself" in capsys.readouterr().out
            config = json.loads((sidecars / "orders.shop" / "envoy.json").read_text())
            socket_path = sidecars / "orders.shop" / "admin.sock"
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
                assert node["node"] == "shop/orders" and "certificate" not in node
                assert node["secrets"] == {"source": "files",
                                           "directory": str(sidecars / "orders.shop")}  # fmt: skip
                key_line = _key_line(sidecars / "orders.shop" / "svid.pem")
                _scan_for_keys(info, tmp_path, key_line)
        finally:
            assert server.stop() == 0  # SIGTERM: a clean exit
            shutil.rmtree(sidecars, ignore_errors=True)
        log = launcher["xds"].log().encode()  # everything the control plane logged
        assert b"ADS on" in log  # (its startup line: the log was captured)
        assert b"PRIVATE KEY" not in log and key_line not in log


def _key_line(path: Path) -> bytes:
    """A line from the middle of the node's private key (base64 body)."""
    return path.read_bytes().split(b"-----END PRIVATE KEY-----")[0].splitlines()[1]


def _scan_for_keys(info: dict[str, str], state: Path, line: bytes) -> None:
    """What the control plane serves (/status in every view, /metrics, /policy, /history),
    exports and stores (flow store, history, CA directory, spent tokens): the node's key
    nowhere, and no private key at all outside the CA's own key files."""
    import urllib.request

    admin = info["admin"]
    served = b""
    for path in ("/status", "/status?view=nodes", "/metrics", "/policy", "/history"):
        with urllib.request.urlopen(admin + path, timeout=5) as response:
            served += response.read()
    assert b"shop/orders" in served
    assert b"PRIVATE KEY" not in served and line not in served
    for path in state.rglob("*"):
        if path.is_file() and not path.name.endswith(".sock"):
            data = path.read_bytes()
            assert line not in data, path
            if path.name not in ("root.key", "intermediate.key", "join-token.key"):
                assert b"PRIVATE KEY" not in data, path
