"""uvicorn's HTTP protocol (h11) with the node's connection limits and a request deadline.

uvicorn keeps a connection that sends nothing, or half a request head, forever: its
keep-alive timeout starts only after a response. Here a connection must deliver a whole
request (head and body) within ``request_timeout`` of connecting, or of the first byte of
its next request; else it gets 408 and is closed. Every connection is counted by the
node's ``ConnectionGuard`` from the moment it is accepted (the websocket protocol it may
upgrade to gives the count back when it closes: ``websocket.py``), and one over a limit
is answered 503 and closed before anything else is read.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .connlimits import ConnectionGuard


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
    """uvicorn's h11 protocol, counted by the guard and held to a request deadline."""

    _deadline: asyncio.TimerHandle | None = None
    _counted = False
    _refused = False

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
        if self._refused:
            return  # uvicorn never knew it
        self._disarm()
        guard = guard_of(self)
        if guard is not None and self._counted:
            guard.release(self.transport)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
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
