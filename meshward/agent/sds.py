"""SotW SDS for one Envoy, on a Unix socket (mode 0600), from the agent's credentials.

Names as Istio's agent serves them: ``default`` (the SVID: chain + key) and ``ROOTCA`` (the trust
bundle). Envoy opens one stream per secret it needs and accepts exactly the secret it asked for
in each response (``Unexpected SDS secrets length`` otherwise), so every response carries the
requested names only. A stream is answered when its requested names change, and pushed to when
the credentials change (renewal, new bundle); the version is the content's identity (the SVID
serial, the bundle hash), so a reconnecting Envoy that already holds a version gets it again
without churn. NACKs are counted and logged by type only: Envoy echoes the rejected message,
key included, in ``error_detail`` (DESIGN.md field notes), so it is never logged.

Every secret is built with :mod:`meshward.certs.sds`'s builders and validated before it is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2

from meshward.agent.identity import Credentials
from meshward.certs.sds import (
    DEFAULT_SECRET,
    ROOTCA_SECRET,
    SECRET_TYPE_URL,
    validate_secret,
)

log = logging.getLogger("meshward.agent.sds")
SOCKET_MODE = 0o600
MAX_STREAMS = 16  # one Envoy asks for a handful; anything more is not our Envoy


def _secrets(credentials: Credentials) -> dict[str, tuple[str, Any]]:
    """name -> (version, Secret), validated."""
    from envoy.config.core.v3 import base_pb2
    from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

    tls = secret_pb2.Secret(
        name=DEFAULT_SECRET,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=credentials.chain_pem),
            private_key=base_pb2.DataSource(inline_bytes=credentials.key_pem),
        ),
    )
    roots = secret_pb2.Secret(
        name=ROOTCA_SECRET,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=credentials.bundle_pem)
        ),
    )
    validate_secret(tls)
    validate_secret(roots)
    bundle_version = hashlib.sha256(credentials.bundle_pem).hexdigest()[:16]
    return {
        DEFAULT_SECRET: (f"{credentials.serial:x}", tls),
        ROOTCA_SECRET: (bundle_version, roots),
    }


class SdsServer(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves the current credentials; :meth:`update` swaps them and wakes every stream."""

    def __init__(self, credentials: Credentials) -> None:
        self._secrets = _secrets(credentials)
        self._changed = asyncio.Condition()
        self._generation = 0
        self._nonces = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self.streams = 0
        self.nacks = 0
        self.pushes = 0

    async def update(self, credentials: Credentials) -> None:
        secrets = _secrets(credentials)  # validate before anything changes
        async with self._changed:
            self._secrets = secrets
            self._generation += 1
            self._changed.notify_all()

    def _response(self, names: list[str]) -> tuple[str, Any]:
        chosen = [(n, *self._secrets[n]) for n in names if n in self._secrets]
        version = ".".join(f"{n}={v}" for n, v, _ in chosen)
        response = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=SECRET_TYPE_URL, nonce=str(next(self._nonces))
        )
        for _, _, secret in chosen:
            packed = any_pb2.Any()
            packed.Pack(secret)
            response.resources.append(packed)
        return version, response

    async def StreamSecrets(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        if self.streams >= MAX_STREAMS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many SDS streams")
        self.streams += 1
        requests: asyncio.Queue[Any] = asyncio.Queue(8)
        reader = asyncio.create_task(self._read(request_iterator, requests))
        names: list[str] = []
        sent_version: str | None = None
        try:
            while True:
                generation = self._generation
                request = await self._next(requests, generation)
                if request is _CLOSED:
                    return
                if request is not None:
                    if request.HasField("error_detail"):
                        self.nacks += 1
                        log.warning("Envoy rejected secrets %s (code %d); details not logged: "
                                    "they may echo the key", sorted(request.resource_names),
                                    request.error_detail.code)  # fmt: skip
                    if list(request.resource_names) != names:
                        names, sent_version = list(request.resource_names), None
                version, response = self._response(names)
                if names and version != sent_version:
                    sent_version = version
                    self.pushes += 1
                    yield response
        finally:
            reader.cancel()
            self.streams -= 1

    async def _read(self, iterator: AsyncIterator[Any], queue: asyncio.Queue[Any]) -> None:
        try:
            async for request in iterator:
                await queue.put(request)
        except (asyncio.CancelledError, grpc.RpcError):
            pass
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(_CLOSED)

    async def _next(self, queue: asyncio.Queue[Any], generation: int) -> Any:
        """The next request, or None when the credentials changed first."""
        if not queue.empty():
            return queue.get_nowait()
        getter = asyncio.ensure_future(queue.get())

        async def changed() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self._generation != generation)

        waiter = asyncio.ensure_future(changed())
        done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
        for task in (getter, waiter):
            if task not in done:
                task.cancel()
        if getter in done:
            return getter.result()
        return None

    async def FetchSecrets(self, request: Any, context: Any) -> Any:
        return self._response(list(request.resource_names))[1]

    async def start(self, socket_path: Path) -> None:
        """Listen on ``socket_path`` (replaced if stale), mode 0600 before anyone can connect:
        the socket is created inside a 0700 directory and chmod-ed before ``start``."""
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", MAX_STREAMS)])
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(self, server)
        if not server.add_insecure_port(f"unix:{socket_path}"):
            raise OSError(f"cannot listen on {socket_path}")
        await server.start()
        os.chmod(socket_path, SOCKET_MODE)
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0.2)
            self._server = None


_CLOSED = object()
