"""`xds serve`'s start: the ADS port opens before the first compile; streams are taken (TLS,
first request) but wait, counted nowhere and sent nothing, until the compile is done; a first
compile the caller refuses closes the port again (real gRPC and mTLS, simulated ADS clients)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from meshward.certs import CertificateAuthority
from meshward.compile import CompileOptions
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.compiling import config_compiler
from meshward.xds.service import XdsService
from tests.unit.xds.test_service import Clients, in_sync, policy, until, with_routes


class GatedCompiler:
    """The real compiler; its compiles wait for ``gate`` (a slow first compile, on demand)."""

    jwks = None

    def __init__(self) -> None:
        self.inner = compiler_for(CompileOptions())
        self.gate = threading.Event()
        self.calls = 0

    def config_compiler(self) -> Any:
        return _Gated(self, config_compiler(self.inner))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


class _Gated:
    def __init__(self, owner: GatedCompiler, real: Any) -> None:
        self.owner, self.real = owner, real

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.owner.calls += 1
        assert self.owner.gate.wait(30), "the test never opened the gate"
        return self.real(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_streams_wait_for_the_first_compile_and_get_nothing_before() -> None:
    ca = CertificateAuthority.ephemeral("cluster.local")
    compiler = GatedCompiler()
    service = XdsService(policy(), ca, compiler, compile_on_start=True)  # type: ignore[arg-type]
    assert not service.control.compiled and compiler.calls == 0  # nothing compiled yet
    starting = asyncio.create_task(service.start())
    clients = Clients(service, ca)
    try:
        await until(lambda: service.port is not None and compiler.calls == 1, what="listening")
        client = clients.open("shop/orders", subscriptions=with_routes("shop/orders"))
        await asyncio.wait_for(client.connected.wait(), 10)  # TLS done, requests sent
        assert client.error is None
        await asyncio.sleep(0.5)
        # Held before it counts anywhere: no stream, no node, no response, nothing sent.
        assert service.ads.streams == {} and service.control.nodes == {}
        assert not any(view.responses for view in client.views.values())
        assert not starting.done()
        compiler.gate.set()
        await asyncio.wait_for(starting, 30)
        assert service.control.compiled
        await until(lambda: in_sync(service, "shop/orders"), what="its config")
    finally:
        compiler.gate.set()
        await clients.close()
        await service.stop()


async def test_a_refused_first_compile_closes_the_port() -> None:
    ca = CertificateAuthority.ephemeral("cluster.local")
    compiler = GatedCompiler()
    compiler.gate.set()
    service = XdsService(policy(), ca, compiler, compile_on_start=True)  # type: ignore[arg-type]

    def refuse() -> None:
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError, match="refused"):
        await service.start(check=refuse)
    assert service.ads._server is None  # stopped: the port is closed
    assert service.admin is None
