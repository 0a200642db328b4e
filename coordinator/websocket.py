"""uvicorn's websockets sans-I/O protocol (``WebSocketsSansIOProtocol``, uvicorn >= 0.35)
with write coalescing: the frames one event-loop iteration writes to a connection leave
in one ``send()``.

An action's ack and its user event are written back to back, and on loopback or a LAN
each ``send()`` costs about as much as building the frame (the kernel runs the whole
TCP path, and wakes the reader, once per call). Buffering until the end of the current
loop iteration joins such frames into one segment without Nagle's wait for an ACK: the
delay is one loop iteration, and order is kept because every write of the connection
(frames, pings, the close) goes through the same buffer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Protocol, cast

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

from .ratelimit import LogThrottle

_NO_EXTRA: Mapping[str, Any] = MappingProxyType({})
_NOT_UTF8 = LogThrottle(logging.getLogger(__name__))


def unlink(transport: asyncio.BaseTransport) -> None:
    """Called once its connection is lost: asyncio's selector transports keep a bound
    method of their own for good (``_read_ready_cb``), a reference cycle that holds a
    closed connection's transport, socket and extras (7 objects) until a full collection
    of the cyclic GC, which a node runs rarely (``cli.FULL_COLLECTION_AFTER``). Its
    reader is off the selector by then: nothing calls it again. (uvloop's transports
    have no such attribute.)"""
    if getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None  # type: ignore[attr-defined]


class CoalescingTransport(asyncio.Transport):
    """A transport wrapper whose writes are joined and flushed once per loop iteration."""

    __slots__ = ("_loop", "_pending", "_transport")  # one per connection: no __dict__

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(_NO_EXTRA)  # ``get_extra_info`` asks the transport it wraps
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return False


class WebSocket(Protocol):
    """What the app in front (``edge.FrameGuard``) may ask of the connection's websocket
    protocol, which the scope holds under ``SOCKET_KEY``."""

    def abort(self) -> None:
        """Drop the connection at once, whatever is still waiting to be written."""

    def can_write_now(self) -> bool:
        """Whether a frame sent now goes into the transport without waiting."""

    def gone(self) -> bool:
        """The connection is closed or closing (its peer left, or it was dropped)."""

    # Asked for each ping the peer sends, before it is answered: False drops the
    # connection (the app's message bucket counts pings too; None: nothing counts them).
    on_ping: Callable[[], bool] | None


SOCKET_KEY = "coordinator.websocket"
# Bytes waiting in the transport (coalesced or not yet taken by the kernel) above which
# a frame is no longer written at once: asyncio's default high-water mark.
WRITE_NOW_LIMIT = 64 * 1024


class CoalescingSansIOProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets (sans-I/O) protocol writing through a CoalescingTransport.

    The HTTP protocol it takes over from counted the connection in the node's
    ``ConnectionGuard`` (``protocols.py``); it gives the count back when it closes.

    A peer that stopped reading must not hold the connection: uvicorn ends one that does
    not answer its pings, or its close, with ``transport.close()``, which waits for the
    write buffer to drain, and with a peer that reads nothing it never does. Here those
    ends abort the transport, and the app may abort it too (the scope's ``SOCKET_KEY``)."""

    _raw: asyncio.BaseTransport | None = None
    on_ping: Callable[[], bool] | None = None
    _pong: bytes | None = None  # the latest ping's answer, kept while the peer reads behind

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        super().connection_made(CoalescingTransport(cast(asyncio.Transport, transport), self.loop))

    def connection_lost(self, exc: Exception | None) -> None:
        guard = getattr(self.config, "guard", None)
        if guard is not None and self._raw is not None:
            guard.release(self._raw)
        if self._raw is not None:
            unlink(self._raw)
        super().connection_lost(exc)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the app's task starts on the next loop iteration
            scope[SOCKET_KEY] = self

    def abort(self) -> None:
        """Drop the connection now, whatever is still waiting to be written."""
        self.transport.abort()

    def gone(self) -> bool:
        """The connection is lost or its transport closing (the peer left, an abort)."""
        return self.disconnected or self.transport.is_closing()

    def can_write_now(self) -> bool:
        """A frame sent now goes into the transport without waiting: the handshake is
        done, the connection is not closing or paused, and less than WRITE_NOW_LIMIT
        bytes wait to be written (a client that reads slowly holds the rest back)."""
        return (
            self.handshake_complete
            and not self.disconnected
            and not self.close_sent
            and self.writable.is_set()
            and not self.transport.is_closing()
            and self.transport.get_write_buffer_size() < WRITE_NOW_LIMIT
        )

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        self.abort()

    def send_receive_event_to_app(self) -> None:
        """A whole message to the app; a text message that is not UTF-8 closes the
        connection (1007) in a line of its own, throttled: uvicorn logged a traceback at
        ERROR for each, and any client may send one per connection."""
        if self.curr_msg_data_type == "text" and not self.close_sent:
            data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
            if not data.isascii():  # the usual case is decoded once, by uvicorn
                try:
                    data.decode()
                except UnicodeDecodeError:
                    self.frames = []
                    peer = self.client[0] if self.client else "?"
                    _NOT_UTF8.info("closing websocket from %s: a text message is not UTF-8", peer)
                    self.conn.send_close(1007, "text message is not UTF-8")
                    self.handle_parser_exception()
                    # Its close waits for the write buffer to drain: a peer that reads
                    # nothing would hold the connection (and its place) for good.
                    self.close_timer = self.loop.call_later(self.close_timeout, self.abort)
                    return
        super().send_receive_event_to_app()

    def handle_ping(self) -> None:
        """Answer a ping, unless the peer sends them faster than the connection's message
        rate (dropped). websockets queues a pong for every ping and uvicorn read on
        whatever the app did: a peer that flooded pings and read nothing grew a node by
        1.2 GB in 40 s. While the peer reads behind (WRITE_NOW_LIMIT bytes waiting),
        only the latest ping's pong is kept, written once it catches up (RFC 6455 5.5.3
        lets a pong answer only the latest of several pings); a close's echo that came
        with them is written as it is."""
        frames = self.conn.data_to_send()
        counted = self.on_ping
        if counted is not None and not counted():
            return  # dropped by the app's guard
        pongs = [f for f in frames if _is_pong(f)]
        if pongs:
            self._pong = pongs[-1]
            self._answer_ping()
        others = [f for f in frames if not _is_pong(f)]
        if others:
            self.transport.write(b"".join(others))

    def _answer_ping(self) -> None:
        """Write the kept pong, if the peer has caught up."""
        pong = self._pong
        if pong is not None and self.transport.get_write_buffer_size() < WRITE_NOW_LIMIT:
            self._pong = None
            if not self.transport.is_closing():
                self.transport.write(pong)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._answer_ping()

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        self._answer_ping()
        if message["type"] == "websocket.close" and self.close_timer is not None:
            # uvicorn closes after close_timeout if the peer never answers our close.
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self.abort)


def _is_pong(frame: bytes) -> bool:
    """Whether a frame websockets made to send is a pong (opcode 0xA)."""
    return bool(frame) and frame[0] & 0x0F == 0x0A
