"""A TCP proxy on 127.0.0.1 for fault tests: put it between one client and its server
(a node and Redis), then cut the link and restore it.

``cut()`` closes every open connection at once (both ends see a reset) and then refuses
new ones (accepted and reset at once) or, with ``blackhole=True``, holds them open without
forwarding a byte: what a partition looks like to a client that connects while it lasts.
``restore()`` forwards new connections again and resets the blackholed ones. When the
server closes a connection (Redis restarting), the proxy passes on what it already
received, then closes the client's side too. ``hold_replies()`` keeps what the server
sends from its clients (requests still go through) until ``release_replies()``.

All methods run on the event loop that ran ``start()``.
"""

from __future__ import annotations

import asyncio
import contextlib

HOST = "127.0.0.1"
CHUNK = 64 * 1024
CONNECT_TIMEOUT = 5.0


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target_port``."""

    def __init__(self, target_port: int, *, port: int = 0) -> None:
        self.target_port = target_port
        self.port = port  # 0: a free port, known after start()
        self.accepted = 0  # connections accepted so far, forwarded or not
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()  # both ends of forwarded connections
        self._held: set[asyncio.StreamWriter] = set()  # blackholed connections
        self._tasks: set[asyncio.Task[None]] = set()
        self._cut = False
        self._blackhole = False
        self._replies = asyncio.Event()  # set: server-to-client data flows
        self._replies.set()

    @property
    def url(self) -> str:
        """The proxy's address as a Redis URL (database 0)."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def connections(self) -> int:
        """Forwarded connections open now."""
        return len(self._open) // 2

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, HOST, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def cut(self, *, blackhole: bool = False) -> None:
        """Reset every open connection; refuse (or blackhole) new ones until ``restore()``."""
        self._cut = True
        self._blackhole = blackhole
        _abort_all(self._open)

    def hold_replies(self) -> None:
        """Hold what servers send to clients (kept, not dropped) until released."""
        self._replies.clear()

    def release_replies(self) -> None:
        self._replies.set()

    def restore(self) -> None:
        """Forward new connections again; blackholed ones are reset (their peer reconnects)."""
        self._cut = False
        _abort_all(self._held)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        _abort_all(self._open)
        _abort_all(self._held)
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        try:
            if self._cut:
                await self._refuse(reader, writer)
            else:
                await self._forward(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._blackhole:
            writer.transport.abort()
            return
        self._held.add(writer)
        try:
            while await reader.read(CHUNK):
                pass  # swallowed: the partition drops it
        except OSError:
            pass
        finally:
            self._held.discard(writer)
            writer.transport.abort()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(HOST, self.target_port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            writer.transport.abort()  # the server is down: the client sees a reset
            return
        if self._cut:  # cut while we connected
            up_writer.transport.abort()
            await self._refuse(reader, writer)
            return
        self._open.update((writer, up_writer))
        try:
            await asyncio.gather(
                _pipe(reader, up_writer), _pipe(up_reader, writer, gate=self._replies)
            )
        finally:
            self._open.difference_update((writer, up_writer))
            writer.transport.abort()
            up_writer.transport.abort()


async def _pipe(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, gate: asyncio.Event | None = None
) -> None:
    """Copy until end of input, then close ``dst`` (the other direction ends with it);
    each chunk waits for ``gate`` to be set."""
    try:
        while data := await src.read(CHUNK):
            if gate is not None:
                await gate.wait()
            dst.write(data)
            await dst.drain()
    except OSError:
        dst.transport.abort()
        return
    with contextlib.suppress(OSError):
        dst.close()


def _abort_all(writers: set[asyncio.StreamWriter]) -> None:
    for writer in list(writers):
        writer.transport.abort()
