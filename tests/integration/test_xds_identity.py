"""Identities with real Envoy run by the operator (`meshward bootstrap`, no agent): SVID renewal
under traffic, and node authentication.

Each sidecar's key is made by `meshward bootstrap`, its SVID obtained by CSR, and Envoy reads
them through file-based SDS. `meshward bootstrap --renew` (what the operator's cron runs) is
re-run for both sidecars while traffic flows: no request fails and Envoy serves the new SVID
without a restart. The control plane serves no node its SVID or key, whoever asks.
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

from meshward.testing.ads_client import AdsClient, node_ssl_context
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
    mesh = Mesh(  # operator-run Envoy: key and SVID from `meshward bootstrap`, files
        policy_dir, root, [FRONTEND, ORDERS], sidecars="bootstrap", delta={ORDERS},
        svid_ttl=timedelta(minutes=5),
    )  # fmt: skip
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def envoy_serials(mesh: Mesh, ref: str) -> set[int]:
    certs = json.loads(mesh.envoys[ref].admin("/certs"))["certificates"]
    return {int(c["serial_number"], 16) for entry in certs for c in entry.get("cert_chain", [])}


def test_bootstrap_renewals_under_steady_traffic_drop_no_request(mesh: Mesh) -> None:
    results: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            results.append(mesh.request(FRONTEND, ORDERS, "/orders/1")[0])

    pids = {ref: mesh.envoys[ref].pid for ref in (FRONTEND, ORDERS)}
    thread = threading.Thread(target=traffic)
    thread.start()
    latest: dict[str, int] = {}
    try:
        for _ in range(2):  # as the operator's cron would, twice for each sidecar
            for ref in (FRONTEND, ORDERS):
                latest[ref] = int(mesh.renew_bootstrap(ref)["serial"], 16)
                time.sleep(0.5)
        deadline = time.monotonic() + 15
        while not all(latest[ref] in envoy_serials(mesh, ref) for ref in latest):
            assert time.monotonic() < deadline, {r: envoy_serials(mesh, r) for r in latest}
            time.sleep(0.2)
        time.sleep(0.5)  # traffic over the renewed certificates too
    finally:
        stop.set()
        thread.join(10)
    failures = [status for status in results if status != 200]
    assert len(results) > 50 and not failures, f"{len(failures)} of {len(results)} failed"
    assert {ref: mesh.envoys[ref].pid for ref in pids} == pids  # no restart
    # The control plane never saw an SVID of theirs it made: nothing to report per node.
    assert all("certificate" not in n for n in mesh.status()["nodes"])


def client_for(mesh: Mesh, identity_ref: str, node_id: str, **kwargs: Any) -> AdsClient:
    namespace, name = identity_ref.split("/")
    # A simulated node makes its own key and presents an SVID signed from its CSR.
    context = node_ssl_context(mesh.ca, f"spiffe://cluster.local/ns/{namespace}/sa/{name}")
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
async def test_a_node_gets_no_key_over_sds_not_even_its_own(
    mesh: Mesh, caplog: pytest.LogCaptureFixture, delta: bool
) -> None:
    """Over SDS the control plane serves the public trust bundle and nothing else: not the
    node's own SVID (it holds none), not another node's (audited)."""
    caplog.set_level(logging.WARNING)
    foreign = ("spiffe://cluster.local/ns/shop/sa/orders", "shop/orders/default")
    client = client_for(
        mesh, FRONTEND, f"{FRONTEND}/probe-{int(delta)}", delta=delta,
        subscriptions={typeurls.SECRET: ("default", "ROOTCA", *foreign)},
    )  # fmt: skip
    await run_for(client, 1.5)
    assert client.error is None
    secrets = client.views[typeurls.SECRET].resources
    assert sorted(secrets) == ["ROOTCA"]
    secret = secret_pb2.Secret()
    secrets["ROOTCA"].Unpack(secret)
    assert secret.HasField("validation_context") and not secret.HasField("tls_certificate")
    roots = x509.load_pem_x509_certificates(secret.validation_context.trusted_ca.inline_bytes)
    assert all(root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
               for root in roots)  # fmt: skip
    audited = [r.getMessage() for r in caplog.records if r.name == "meshward.xds.audit"]
    for name in foreign:
        assert any(repr(name) in line and "not its own" in line for line in audited), audited
    assert any("its secret 'default': nothing sent" in r.getMessage() for r in caplog.records)


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
