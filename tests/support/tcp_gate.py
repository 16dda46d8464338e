"""A loopback TCP forwarder that can be shut and opened: a dependency that is down, then up.

Shut, nothing listens on its port, so a client gets "connection refused", exactly as from a
server that has not started; open, every connection is piped to the real server.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from tests.support.apps import free_port


class TcpGate:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def open(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._forward, self.host, self.port)

    async def shut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _forward(self, client_reader: asyncio.StreamReader,
                       client_writer: asyncio.StreamWriter) -> None:
        target_reader, target_writer = await asyncio.open_connection(self.host, self.target_port)
        pipes = [asyncio.create_task(self._pipe(client_reader, target_writer)),
                 asyncio.create_task(self._pipe(target_reader, client_writer))]
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._pipes.difference_update(pipes)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.close()

    async def __aenter__(self) -> TcpGate:
        return self  # starts shut

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.shut()
