"""`meshward bootstrap`'s credentials against a real certificate service (gRPC, TLS, CSRs): the
key is made on the node and kept 0600, a join token buys the first SVID, `--renew` replaces it
(new key, new serial) over mTLS, and what cannot work says why."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from meshward.agent import filecreds
from meshward.agent.filecreds import NodeIdentity
from meshward.agent.identity import CredentialStore
from meshward.certs import CertificateAuthority
from meshward.certs.jointoken import load_or_create_key, mint
from meshward.compile import CompileOptions
from meshward.errors import UserError
from meshward.policy import parse
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.service import XdsServiceThread

POLICY = """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: orders, namespace: shop, labels: {app: orders}}
spec: {ports: [{name: http, port: 8080, protocol: HTTP}]}
"""
ORDERS = NodeIdentity(
    "shop/orders", "", "spiffe://cluster.local/ns/shop/sa/orders",
    "spiffe://cluster.local/ns/meshward-system/sa/meshward-xds",
)  # fmt: skip


@pytest.fixture
def xds(tmp_path: Path) -> Iterator[XdsServiceThread]:
    CertificateAuthority.init(tmp_path / "ca", "cluster.local")
    thread = XdsServiceThread(
        parse({"mesh.yaml": POLICY}), CertificateAuthority.load(tmp_path / "ca"),
        compiler_for(CompileOptions()), admin=None, join_listen="127.0.0.1:0",
        svid_ttl=timedelta(minutes=5),
    ).start()  # fmt: skip
    try:
        yield thread
    finally:
        thread.stop()


def _token(tmp_path: Path, workload: str = "shop/orders") -> str:
    return mint(load_or_create_key(tmp_path / "ca"), workload, ttl=timedelta(minutes=5))


def _roots(tmp_path: Path) -> bytes:
    return CertificateAuthority.load(tmp_path / "ca").trust_bundle().roots_pem


def test_join_then_renew_keeps_the_key_on_the_node(xds: XdsServiceThread, tmp_path: Path) -> None:
    service = xds.service
    assert service is not None and service.join_address is not None
    store = CredentialStore(tmp_path / "orders.shop")
    assert filecreds.current(store, ORDERS) is None
    first = filecreds.join(store, ORDERS, service.join_address, _token(tmp_path), _roots(tmp_path))
    assert first.spiffe_id == ORDERS.spiffe_id
    assert stat.S_IMODE((store.directory / "svid.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    assert filecreds.current(store, ORDERS) == first  # on disk, valid: kept by a re-run
    lifetime = first.not_after - first.not_before
    assert timedelta(minutes=5) <= lifetime <= timedelta(minutes=7)  # the control plane's TTL
    second = filecreds.renew(store, ORDERS, service.address)
    assert second.serial != first.serial and second.key_pem != first.key_pem  # a new key
    assert filecreds.current(store, ORDERS) == second
    # The control plane kept nothing of it: no key, no per-node SVID.
    held = repr(vars(service.control)) + repr(vars(service.certs))
    assert "PRIVATE KEY" not in held and second.key_pem.decode().splitlines()[1] not in held


def test_what_cannot_work_says_why(xds: XdsServiceThread, tmp_path: Path) -> None:
    service = xds.service
    assert service is not None and service.join_address is not None
    store = CredentialStore(tmp_path / "orders.shop")
    with pytest.raises(UserError, match=r"no valid SVID .* to renew with"):
        filecreds.renew(store, ORDERS, service.address)
    with pytest.raises(UserError, match=r"joining the mesh .* failed: PERMISSION_DENIED"):
        filecreds.join(store, ORDERS, service.join_address, _token(tmp_path, "shop/frontend"),
                       _roots(tmp_path))  # fmt: skip
    token = _token(tmp_path)
    filecreds.join(store, ORDERS, service.join_address, token, _roots(tmp_path))
    with pytest.raises(UserError, match="used"):  # single use
        filecreds.join(CredentialStore(tmp_path / "other"), ORDERS, service.join_address,
                       token, _roots(tmp_path))  # fmt: skip
    other = NodeIdentity("shop/payments", "", "spiffe://cluster.local/ns/shop/sa/payments",
                         ORDERS.server_identity)  # fmt: skip
    with pytest.raises(UserError, match=r"holds an SVID for .*orders, not .*payments"):
        filecreds.current(store, other)
    with pytest.raises(UserError, match=r"renewal at 127.0.0.1:1 failed .* stays in place until"):
        filecreds.renew(store, ORDERS, "127.0.0.1:1")  # control plane unreachable
