"""SDS identities with real Envoy: SVID rotation under traffic, and node authentication.

The CA issues 60 s SVIDs (valid from 60 s in the past, against clock skew) and the rotation
schedule renews them at 52% of that 120 s lifetime, so every sidecar gets a new certificate
every ~2.4 s while traffic flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from meshward.certs import RotationSchedule
from meshward.certs.client_tls import client_ssl_context
from meshward.certs.verify import spiffe_id_of
from meshward.testing.ads_client import AdsClient
from meshward.testing.mesh import Mesh
from meshward.testing.topology import allow_doc, shop_yaml
from meshward.xds import typeurls

FRONTEND, ORDERS = "shop/frontend", "shop/orders"

POLICY = shop_yaml(
    ["frontend", "orders"], allow_doc("orders-allow-frontend", "orders", callers=["frontend"])
)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("xds-identity")
    policy_dir = root / "policies"
    policy_dir.mkdir()
    (policy_dir / "mesh.yaml").write_text(POLICY)
    mesh = Mesh(  # SVIDs the control plane issues and rotates: Envoy from `meshward bootstrap`
        policy_dir,
        root,
        [FRONTEND, ORDERS],
        sidecars="bootstrap",
        delta={ORDERS},
        svid_ttl=timedelta(seconds=60),
        schedule=RotationSchedule(renew_fraction=0.52, jitter=0.01),
    )
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def certificate(mesh: Mesh, ref: str) -> dict[str, Any]:
    node = next(n for n in mesh.status()["nodes"] if n["node"] == ref)
    return dict(node["certificate"])


def envoy_serials(mesh: Mesh, ref: str) -> set[str]:
    certs = json.loads(mesh.envoys[ref].admin("/certs"))["certificates"]
    return {c["serial_number"] for entry in certs for c in entry.get("cert_chain", [])}


def test_svid_rotation_under_steady_traffic_drops_no_request(mesh: Mesh) -> None:
    issued = {ref: certificate(mesh, ref)["issued"] for ref in (FRONTEND, ORDERS)}
    results: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            results.append(mesh.request(FRONTEND, ORDERS, "/orders/1")[0])

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = {ref: certificate(mesh, ref)["issued"] for ref in issued}
            if all(now[ref] >= issued[ref] + 2 for ref in issued):
                break
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(10)
    assert all(certificate(mesh, ref)["issued"] >= issued[ref] + 2 for ref in issued)
    failures = [status for status in results if status != 200]
    assert len(results) > 50 and not failures, f"{len(failures)} of {len(results)} failed"
    # Envoy serves the latest SVID (pushed over SDS, no restart).
    latest = certificate(mesh, ORDERS)["serial"]
    mesh.wait_converged()
    assert any(
        serial.lower().lstrip("0") == latest.lstrip("0") for serial in envoy_serials(mesh, ORDERS)
    )


def client_for(mesh: Mesh, identity_ref: str, node_id: str, **kwargs: Any) -> AdsClient:
    policy_td = "cluster.local"
    namespace, name = identity_ref.split("/")
    svid = mesh.ca.issue(f"spiffe://{policy_td}/ns/{namespace}/sa/{name}")
    context = client_ssl_context(
        svid.cert_chain_pem, svid.private_key_pem, mesh.ca.trust_bundle().roots_pem
    )
    return AdsClient(
        "127.0.0.1",
        mesh.xds.port,
        node_id,
        context,
        server_identity=mesh.xds.service.server_identity,
        **kwargs,
    )


async def run_for(client: AdsClient, seconds: float) -> None:
    task = asyncio.create_task(client.run())
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_identity_a_cannot_act_as_node_b(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meshward.xds.audit")
    client = client_for(mesh, FRONTEND, ORDERS, subscriptions={typeurls.SECRET: ("default",)})
    await asyncio.wait_for(client.run(), 10)
    assert client.error is not None and "PERMISSION_DENIED" in repr(client.error)
    assert not client.views.get(typeurls.SECRET)
    assert any(
        "may not act as node shop/orders" in r.getMessage() and r.name == "meshward.xds.audit"
        for r in caplog.records
    )


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_node_gets_only_its_own_key(
    mesh: Mesh, caplog: pytest.LogCaptureFixture, delta: bool
) -> None:
    caplog.set_level(logging.WARNING, logger="meshward.xds.audit")
    foreign = ("spiffe://cluster.local/ns/shop/sa/orders", "shop/orders/default")
    client = client_for(
        mesh, FRONTEND, f"{FRONTEND}/probe-{int(delta)}", delta=delta,
        subscriptions={typeurls.SECRET: ("default", "ROOTCA", *foreign)},
    )  # fmt: skip
    await run_for(client, 1.5)
    assert client.error is None
    secrets = client.views[typeurls.SECRET].resources
    assert sorted(secrets) == ["ROOTCA", "default"]
    secret = secret_pb2.Secret()
    secrets["default"].Unpack(secret)
    leaf = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)[0]
    assert str(spiffe_id_of(leaf)) == "spiffe://cluster.local/ns/shop/sa/frontend"
    audited = [r.getMessage() for r in caplog.records if r.name == "meshward.xds.audit"]
    for name in foreign:
        assert any(repr(name) in line and "not its own" in line for line in audited), audited


def test_plaintext_or_certless_clients_cannot_connect(mesh: Mesh, tmp_path: Path) -> None:
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=mesh.ca.trust_bundle().roots_pem.decode())
    context.set_alpn_protocols(["h2"])
    client = AdsClient("127.0.0.1", mesh.xds.port, FRONTEND, context)
    asyncio.run(asyncio.wait_for(client.run(), 10))
    assert client.error is not None
    assert not client.views
