"""A TCP relay in front of a real port, for tests that must see connections (TLS runs end to
end through it): how many a client opened (did calls share one?), and :meth:`TcpRelay.cut`
to drop them all at once, as a restart or a network blip does."""

from __future__ import annotations

import asyncio
import contextlib


class TcpRelay:
    """``async with TcpRelay("127.0.0.1:PORT") as address``: connect to ``address`` instead."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.connections = 0
        self.server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()

    def cut(self) -> None:
        """Close every connection carried so far (both sides)."""
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()
            self._writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
