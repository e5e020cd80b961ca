"""The agent's SDS server on a Unix socket, with a real gRPC client speaking as Envoy does."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

from meshward.agent.identity import Credentials, key_pem, make_csr, new_key
from meshward.agent.sds import SdsServer
from meshward.certs import CertificateAuthority
from meshward.certs.sds import SECRET_TYPE_URL

ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.ephemeral("cluster.local")


def issued(ca: CertificateAuthority) -> Credentials:
    key = new_key()
    svid = ca.issue_for_csr(make_csr(key, ORDERS), ORDERS)
    return Credentials.build(key_pem(key), svid.cert_chain_pem, ca.trust_bundle().roots_pem, "t")


@pytest.fixture
async def served(ca: CertificateAuthority, tmp_path: Path) -> AsyncIterator[tuple[SdsServer, Path]]:
    server = SdsServer(issued(ca))
    path = tmp_path / "sds.sock"
    await server.start(path)
    try:
        yield server, path
    finally:
        await server.stop()


class Envoyish:
    """One SotW SDS stream: send requests, read responses."""

    def __init__(self, path: Path) -> None:
        self.channel = grpc.aio.insecure_channel(f"unix:{path}")
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(self.channel)
        self.call = stub.StreamSecrets(self._iterate())

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            item = await self.requests.get()
            if item is None:
                return
            yield item

    async def ask(self, names: list[str], version: str = "", nonce: str = "",
                  error: str | None = None) -> None:  # fmt: skip
        request = discovery_pb2.DiscoveryRequest(
            type_url=SECRET_TYPE_URL, resource_names=names, version_info=version,
            response_nonce=nonce,
        )  # fmt: skip
        if error:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.requests.put(request)

    async def read(self) -> Any:
        return await asyncio.wait_for(self.call.read(), 5)

    async def close(self) -> None:
        await self.requests.put(None)
        await self.channel.close()


def names(response: Any) -> list[str]:
    result = []
    for packed in response.resources:
        secret = secret_pb2.Secret()
        packed.Unpack(secret)
        result.append(secret.name)
    return result


async def test_socket_is_private(served: tuple[SdsServer, Path]) -> None:
    assert stat.S_IMODE(os.stat(served[1]).st_mode) == 0o600


async def test_each_stream_gets_exactly_what_it_asked_for(served: tuple[SdsServer, Path]) -> None:
    _, path = served
    default, rootca = Envoyish(path), Envoyish(path)
    try:
        await default.ask(["default"])
        await rootca.ask(["ROOTCA"])
        first = await default.read()
        assert names(first) == ["default"]  # Envoy refuses a response with more secrets
        assert names(await rootca.read()) == ["ROOTCA"]
        # ACK: no new response until something changes.
        await default.ask(["default"], first.version_info, first.nonce)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(default.call.read(), 0.5)
    finally:
        await default.close()
        await rootca.close()


async def test_new_credentials_are_pushed(
    served: tuple[SdsServer, Path], ca: CertificateAuthority
) -> None:
    server, path = served
    envoy = Envoyish(path)
    try:
        await envoy.ask(["default"])
        first = await envoy.read()
        await envoy.ask(["default"], first.version_info, first.nonce)
        fresh = issued(ca)
        await server.update(fresh)
        pushed = await envoy.read()
        assert pushed.version_info != first.version_info
        assert f"{fresh.serial:x}" in pushed.version_info
        secret = secret_pb2.Secret()
        pushed.resources[0].Unpack(secret)
        assert secret.tls_certificate.private_key.inline_bytes == fresh.key_pem
    finally:
        await envoy.close()


async def test_nack_details_are_never_logged(
    served: tuple[SdsServer, Path], caplog: pytest.LogCaptureFixture
) -> None:
    server, path = served
    envoy = Envoyish(path)
    try:
        await envoy.ask(["default"])
        first = await envoy.read()
        await envoy.ask(["default"], "", first.nonce, error="bad key -----BEGIN PRIVATE KEY----- x")
        for _ in range(50):
            if server.nacks:
                break
            await asyncio.sleep(0.05)
        assert server.nacks == 1
        assert "PRIVATE KEY" not in caplog.text
    finally:
        await envoy.close()
