"""uvicorn's HTTP protocol (h11) with the node's connection limits and a request deadline.

uvicorn keeps a connection that sends nothing, or half a request head, forever: its
keep-alive timeout starts only after a response. Here a connection must deliver a whole
request (head and body) within ``request_timeout`` of connecting, or of the first byte of
its next request; else it gets 408 and is closed. Every connection is counted by the
node's ``ConnectionGuard`` from the moment it is accepted (the websocket protocol it may
upgrade to gives the count back when it closes: ``websocket.py``), and one over a limit
is answered 503 and closed before anything else is read.

An answer must keep moving too: uvicorn writes a response into the transport and, past
its high-water mark, makes the app wait, but never gives up on a client that does not
read, and closing a connection waits for its buffers to empty. So while an answer waits
for the client (the app held back, or the answer done but not all taken) the bytes it
has not taken yet, in the transport and in the kernel, must go down by ``MIN_PROGRESS``
(or to none) within each ``request_timeout``; else the connection is reset (its buffers
freed at once) and the app told it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import socket
import struct
import sys
import termios
from typing import Any, cast

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .connlimits import ConnectionGuard
from .ratelimit import LogThrottle
from .websocket import unlink

log = logging.getLogger(__name__)
_stalled = LogThrottle(log)  # at most 2 lines a second, however many are dropped
# Bytes an answer may leave in the kernel's send buffer, once written, without being
# watched (a client with a full receive window holds that much until the keep-alive
# timeout closes its connection; the kernel's socket then finishes or gives up).
KERNEL_SLACK = 64 * 1024
# Bytes of an answer waiting for its client that must leave within each request_timeout
# (or all that is left): a reading client takes far more; a client that reads nothing
# still lets a few KB in (what was in flight, a window probe), and one that reads a
# few bytes now and then does not hold its answer (and the node's page) for hours.
MIN_PROGRESS = 16 * 1024
# How the kernel's unsent and unacknowledged bytes of a socket are read (Linux: SIOCOUTQ).
_OUTQ = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None


class NodeConfig(uvicorn.Config):
    """uvicorn's configuration plus what the node's protocols need."""

    def __init__(
        self, app: Any, *, guard: ConnectionGuard, request_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard
        self.request_timeout = request_timeout


def guard_of(protocol: Any) -> ConnectionGuard | None:
    """The guard of a protocol built from a NodeConfig (None from a plain uvicorn.Config)."""
    return getattr(protocol.config, "guard", None)


def raw_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 response that closes the connection, written without h11 (it
    may precede any request)."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, counted by the guard and held to a request deadline, its
    answers to a write deadline."""

    _deadline: asyncio.TimerHandle | None = None
    _counted = False
    _refused = False
    _write_watch: asyncio.TimerHandle | None = None
    _unsent = 0  # bytes the answer had not delivered at the write watch's last look
    _idle_expired = False  # the keep-alive timeout came while an answer was leaving

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        guard = guard_of(self)
        if guard is not None:
            refusal = guard.admit(transport)
            if refusal is not None:
                # Before uvicorn sets the connection up: a flood of refused connections
                # costs the node as little as it can.
                self._refused = True
                transport.write(
                    raw_response(503, "Service Unavailable", refusal, "retry-after: 1\r\n")
                )
                transport.close()
                return
            self._counted = True
        super().connection_made(transport)
        if self._counted:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        unlink(self.transport)
        if self._refused:
            return  # uvicorn never knew it
        self._disarm()
        self._unwatch_writes()
        guard = guard_of(self)
        if guard is not None and self._counted:
            guard.release(self.transport)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._idle_expired = False
        super().data_received(data)
        if self.transport.get_protocol() is not self:
            self._disarm()  # upgraded to a websocket: its own timeouts apply
        elif self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self._arm()  # a request is on its way (a head started, or its body)
        else:
            self._disarm()

    def _arm(self) -> None:
        timeout = cast(NodeConfig, self.config).request_timeout
        if self._deadline is None and not self.transport.is_closing():
            self._deadline = self.loop.call_later(timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
            timeout = cast(NodeConfig, self.config).request_timeout
            self.transport.write(
                raw_response(408, "Request Timeout", f"no complete request within {timeout:g}s")
            )
        self.transport.close()

    # -- the write deadline --------------------------------------------------------------
    def pause_writing(self) -> None:
        """The transport holds more than its high-water mark: the app waits for the
        client, which must take some of it in time."""
        super().pause_writing()
        self._watch_writes()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._unwatch_writes()  # the client took it down to the low-water mark
        if self.cycle is None or self.cycle.response_complete:
            self._watch_rest()  # the app is done: nothing more is written to wait on

    def on_response_complete(self) -> None:
        self._watch_rest()
        super().on_response_complete()

    def _watch_rest(self) -> None:
        """An answer is written: what the client has not taken of it must leave too."""
        if self.transport.get_write_buffer_size() or self._unsent_bytes() > KERNEL_SLACK:
            self._watch_writes()

    def timeout_keep_alive_handler(self) -> None:
        if self._write_watch is not None:
            # Closing now would wait for the buffer, or leave the kernel to send it: the
            # write watch closes the connection once the answer is out, or resets it.
            self._idle_expired = True
            return
        super().timeout_keep_alive_handler()

    def _unsent_bytes(self) -> int:
        """Bytes written and not yet taken by the client: the transport's, and the
        kernel's (sent but not acknowledged, or not sent)."""
        held = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if _OUTQ is None or sock is None:
            return held
        try:
            raw = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
        except (OSError, ValueError):  # closed meanwhile
            return held
        return held + int(struct.unpack("i", raw)[0])

    def _write_timeout(self) -> float | None:
        """The write deadline: the request deadline (None from a plain uvicorn.Config)."""
        timeout: float | None = getattr(self.config, "request_timeout", None)
        return timeout

    def _watch_writes(self) -> None:
        timeout = self._write_timeout()
        if self._write_watch is None and timeout is not None:
            self._unsent = self._unsent_bytes()
            self._write_watch = self.loop.call_later(timeout, self._writes_due)

    def _unwatch_writes(self) -> None:
        if self._write_watch is not None:
            self._write_watch.cancel()
            self._write_watch = None

    def _writes_due(self) -> None:
        """A look at an answer waiting for its client: out (the connection closed if the
        keep-alive timeout came meanwhile), moving or still being written (watched
        again), or stuck (the connection reset)."""
        self._write_watch = None
        if self.transport.get_protocol() is not self:
            return  # upgraded meanwhile
        unsent = self._unsent_bytes()
        if unsent == 0:
            if self._idle_expired:
                self._idle_expired = False
                super().timeout_keep_alive_handler()
            return
        cycle = self.cycle
        writing = cycle is not None and not cycle.response_complete and not self.flow.write_paused
        taken = self._unsent - unsent
        if taken >= min(MIN_PROGRESS, self._unsent) or writing:
            self._watch_writes()
            return
        host, port = self.client or ("?", 0)
        _stalled.info(
            "resetting the HTTP connection of %s:%d: it took %d bytes of its answer in %gs, "
            "%d wait",
            host,
            port,
            max(taken, 0),
            self._write_timeout(),
            unsent,
        )
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            # A reset: the kernel drops what it holds for the client at once.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()
