"""The agent's mTLS channel to the certificate service (Renew and the bundle polls) against a
real control plane over real TLS: one TLS context per SVID, kept across calls and reconnects,
a new one only when the credentials change."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from meshward.agent.run import Agent, AgentConfig
from meshward.agent.sds import SdsServer
from meshward.certs import CertificateAuthority
from meshward.certs.jointoken import load_or_create_key, mint
from meshward.compile import CompileOptions
from meshward.policy import parse
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.service import XdsService

ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
POLICY = """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: orders, namespace: shop, labels: {app: orders}}
spec: {ports: [{name: http, port: 8080, protocol: HTTP}]}
"""


class Proxy:
    """A TCP relay in front of the control plane: counts the agent's connections and can cut
    them all (a dropped connection, as a restart or a network blip makes)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def cut(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers.clear()

    async def stop(self) -> None:
        self.cut()
        assert self.server is not None
        self.server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[XdsService]:
    CertificateAuthority.init(tmp_path / "ca", "cluster.local")
    svc = XdsService(
        parse({"mesh.yaml": POLICY}),
        CertificateAuthority.load(tmp_path / "ca"),
        compiler_for(CompileOptions()),
        admin=None,
        join_listen="127.0.0.1:0",
        svid_ttl=timedelta(minutes=5),
    )
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


async def test_one_tls_context_per_svid_across_calls_and_reconnects(
    service: XdsService, tmp_path: Path
) -> None:
    proxy = Proxy(service.address)
    address = await proxy.start()
    state = Path(tempfile.mkdtemp(prefix="mwc-"))  # short: the SDS Unix socket path
    assert service.join_address is not None
    agent = Agent(
        AgentConfig(
            workload="shop/orders",
            xds=address,
            state_dir=state,
            spiffe_id=ORDERS,
            server_identity=service.server_identity,
            join=service.join_address,
            join_token=mint(load_or_create_key(tmp_path / "ca"), "shop/orders",
                            ttl=timedelta(minutes=5)),
            root_cert_pem=CertificateAuthority.load(tmp_path / "ca").trust_bundle().roots_pem,
            envoy=False,
        )
    )  # fmt: skip
    agent.sds = SdsServer(await agent.initial_credentials())
    await agent.sds.start(state / "sds.sock")

    def context() -> object:
        assert agent._channel is not None
        return agent._channel._context

    try:
        for _ in range(3):
            await agent._poll_bundle()
        first = context()
        assert proxy.connections == 1

        proxy.cut()  # the connection drops: the next calls dial again, with the same context
        for _ in range(2):
            await agent._poll_bundle()
        assert context() is first and proxy.connections == 2

        await agent._renew()  # on the open connection; the new SVID gets its own context
        assert agent.renewals == 1 and proxy.connections == 2
        await agent._poll_bundle()
        renewed = context()
        assert renewed is not first and proxy.connections == 3

        credentials = agent.credentials
        assert credentials is not None
        later = credentials.not_after + timedelta(seconds=1)
        agent._now = lambda: later  # type: ignore[method-assign]  # the SVID has expired
        service.control.wall_clock = lambda: later
        for n in range(2):  # refused, each on a fresh connection, no context rebuilt
            await agent._poll_bundle()
            assert context() is renewed and proxy.connections == 4 + n
        assert service.certs.counts.get("Bundle:certificate-expired") == 2
    finally:
        await agent.sds.stop()
        agent._close_channel()
        await proxy.stop()
        shutil.rmtree(state, ignore_errors=True)
