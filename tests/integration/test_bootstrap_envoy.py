"""Operator-run Envoy (`meshward bootstrap`, no agent) with real Envoy, real mTLS, real CSRs.

Each sidecar's key is made by `meshward bootstrap` on the node, its SVID obtained with a one-time
join token, and Envoy reads key, chain and bundle through file-based SDS (ADS connection and
data plane). `meshward bootstrap --renew` rewrites the files and the running Envoy presents the
new certificate without a restart. The control plane holds, logs and serves no private key.
"""

from __future__ import annotations

import json
import logging
import socket
import stat
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from meshward.testing.mesh import Mesh
from meshward.testing.sidecar import client_context
from meshward.testing.topology import allow_doc, shop_yaml

FRONTEND, ORDERS = "shop/frontend", "shop/orders"
POLICY = shop_yaml(
    ["frontend", "orders"], allow_doc("orders-allow-frontend", "orders", callers=["frontend"])
)


@pytest.fixture
def mesh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Mesh]:
    caplog.set_level(logging.DEBUG)  # the in-process control plane's logs, scanned below
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    (policy_dir / "mesh.yaml").write_text(POLICY)
    m = Mesh(policy_dir, tmp_path, [FRONTEND, ORDERS], sidecars="bootstrap",
             svid_ttl=timedelta(minutes=10))  # fmt: skip
    try:
        m.start()
        yield m
    finally:
        m.stop()


def _file_serial(mesh: Mesh, ref: str) -> int:
    data = (mesh.state_dir(ref) / "svid.pem").read_bytes()
    return x509.load_pem_x509_certificate(
        data[data.index(b"-----BEGIN CERTIFICATE") :]
    ).serial_number


def _presented_serial(mesh: Mesh, ref: str, tmp_path: Path) -> int:
    """The serial of the certificate ``ref``'s inbound listener presents (a fresh handshake)."""
    context = client_context(mesh.ca, "spiffe://cluster.local/ns/shop/sa/frontend", tmp_path)
    with (
        socket.create_connection(("127.0.0.1", mesh.inbound_port(ref)), timeout=5) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _key_line(mesh: Mesh, ref: str) -> bytes:
    data = (mesh.state_dir(ref) / "svid.pem").read_bytes()
    return data.split(b"-----END PRIVATE KEY-----")[0].splitlines()[1]


def test_operator_run_envoy_joins_serves_mtls_and_renews_live(
    mesh: Mesh, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    status, body = mesh.request(FRONTEND, ORDERS)
    assert status == 200, body
    # orders' Envoy saw frontend's file-SDS SVID (mTLS) and presented its own.
    assert "URI=spiffe://cluster.local/ns/shop/sa/frontend" in body
    assert "By=spiffe://cluster.local/ns/shop/sa/orders" in body
    for ref in mesh.refs:
        directory = mesh.state_dir(ref)
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE((directory / "svid.pem").stat().st_mode) == 0o600
        config = (directory / "envoy.json").read_text()
        assert "inline_bytes" not in config and "path_config_source" in config
    # The control plane made no SVID for them, and says where each node reads its secrets.
    control = mesh.xds.service.control
    for state in control.nodes.values():
        assert state.secrets_dir is not None
        assert control.node_details(state.node)["secrets"]["source"] == "files"

    before = _file_serial(mesh, ORDERS)
    assert _presented_serial(mesh, ORDERS, tmp_path) == before
    pid = mesh.envoys[ORDERS].pid
    renewed = mesh.renew_bootstrap(ORDERS)
    after = _file_serial(mesh, ORDERS)
    assert renewed["svid"] == "renewed" and int(renewed["serial"], 16) == after != before
    deadline = time.monotonic() + 15
    while _presented_serial(mesh, ORDERS, tmp_path) != after:  # Envoy watches the directory
        assert time.monotonic() < deadline, "the running Envoy never presented the renewed SVID"
        time.sleep(0.2)
    assert mesh.envoys[ORDERS].pid == pid  # no restart
    mesh.renew_bootstrap(FRONTEND)  # the caller's side too (its upstream TLS reads the files)
    time.sleep(1)
    status, body = mesh.request(FRONTEND, ORDERS)
    assert status == 200, body

    # What the control plane holds, logs and serves: no private key, none of the nodes' keys.
    held = [
        repr(vars(control)).encode(),
        repr(vars(mesh.xds.service.certs)).encode(),  # the certificate service (CSRs signed)
        json.dumps(mesh.xds.status(), default=str).encode(),
        caplog.text.encode(),
    ]
    served = 0
    for node in list(control.cache.nodes()):
        snapshot = control.cache.get(node)
        assert snapshot is not None
        for type_url in snapshot.types:
            for resource in snapshot.resources(type_url).values():
                held.append(resource.body.SerializeToString())
                served += 1
    assert served > 0
    blob = b"\n".join(held)
    assert b"PRIVATE KEY" not in blob
    ca_files = b"".join(p.read_bytes() for p in mesh.ca_dir.rglob("*") if p.is_file())
    for ref in mesh.refs:
        line = _key_line(mesh, ref)
        assert line not in blob and line not in ca_files


def test_bootstrap_renew_without_a_valid_svid_says_what_to_do(tmp_path: Path) -> None:
    import subprocess

    from meshward.testing.processes import meshward_argv

    done = subprocess.run(
        meshward_argv("bootstrap", "--renew", "--workload", "shop/payments", "--xds",
                      "127.0.0.1:1", "--out", str(tmp_path)),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "no valid SVID" in done.stderr and "join-token" in done.stderr
    assert "Traceback" not in done.stderr
