"""A minimal socket.io (protocol 5) client over one engine.io (v4) websocket.

Much lighter than python-socketio's client: one ``websockets`` connection and one reader
task per connection, no reconnection, no polling transport. Enough for load generation:
connect to the default namespace with an ``auth`` payload, emit events with acks, and
hand every received event to a callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect

EventHandler = Callable[[str, Any], None]


class Refused(Exception):
    """The server refused the namespace connection (socket.io CONNECT_ERROR)."""


class EioClient:
    def __init__(self, on_event: EventHandler | None = None) -> None:
        self.on_event = on_event
        self.ws: ClientConnection | None = None
        self.sid = ""
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self._next_ack = 0
        self._connected: asyncio.Future[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        self.closed = asyncio.Event()

    async def connect(
        self,
        base_url: str,
        query: dict[str, Any] | None = None,
        auth: dict[str, Any] | None = None,
        within: float = 30.0,
    ) -> None:
        q = {**(query or {}), "EIO": "4", "transport": "websocket"}
        url = base_url.replace("http://", "ws://", 1).rstrip("/") + "/socket.io/?" + urlencode(q)
        self.ws = await connect(
            url,
            compression=None,
            ping_interval=None,  # engine.io pings at its own level
            open_timeout=within,
            close_timeout=2,
            max_queue=None,
            proxy=None,
        )
        async with asyncio.timeout(within):
            opening = await self.ws.recv()
        if not isinstance(opening, str) or not opening.startswith("0"):
            raise Refused(f"unexpected engine.io open packet {opening!r}")
        loop = asyncio.get_running_loop()
        self._connected = loop.create_future()
        self._reader = asyncio.create_task(self._read())
        await self.ws.send("40" + (json.dumps(auth) if auth is not None else ""))
        try:
            async with asyncio.timeout(within):
                await asyncio.shield(self._connected)
        except BaseException:
            await self.close()
            raise

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for frame in self.ws:
                if isinstance(frame, bytes):
                    continue
                kind = frame[:1]
                if kind == "2":  # engine.io ping
                    await self.ws.send("3")
                elif kind == "4":
                    self._on_packet(frame[1:])
                elif kind == "1":
                    break
        except Exception:  # the connection dropped; close() below tells waiters
            pass
        finally:
            self.closed.set()
            for fut in self._acks.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("connection closed"))
                    fut.exception()  # whoever awaits it still gets it; no "never retrieved"
            if self._connected is not None and not self._connected.done():
                self._connected.set_exception(ConnectionError("connection closed"))
                self._connected.exception()

    def _on_packet(self, packet: str) -> None:
        kind, body = packet[:1], packet[1:]
        if kind == "2":  # EVENT
            if self.on_event is not None:
                start = body.find("[")
                name, *args = json.loads(body[start:])
                self.on_event(name, args[0] if args else None)
        elif kind == "3":  # ACK
            start = body.find("[")
            ack_id = int(body[:start])
            fut = self._acks.pop(ack_id, None)
            if fut is not None and not fut.done():
                args = json.loads(body[start:])
                fut.set_result(args[0] if args else None)
        elif kind == "0":  # CONNECT
            self.sid = json.loads(body).get("sid", "") if body else ""
            if self._connected is not None and not self._connected.done():
                self._connected.set_result(None)
        elif kind == "4":  # CONNECT_ERROR
            if self._connected is not None and not self._connected.done():
                self._connected.set_exception(Refused(body))
                self._connected.exception()
        elif kind == "1" and self.ws is not None:  # DISCONNECT: the reader ends on close
            self._closing = asyncio.ensure_future(self.ws.close())

    async def emit(self, event: str, data: Any) -> None:
        """Emit without an ack."""
        assert self.ws is not None
        await self.ws.send("42" + json.dumps([event, data], separators=(",", ":")))

    def emit_with_ack(self, event: str, data: Any) -> asyncio.Future[Any]:
        """Emit, returning a future for the ack. The frame is queued at once."""
        assert self.ws is not None
        self._next_ack += 1
        ack_id = self._next_ack
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._acks[ack_id] = fut
        frame = f"42{ack_id}" + json.dumps([event, data], separators=(",", ":"))
        task = asyncio.ensure_future(self.ws.send(frame))
        task.add_done_callback(_ignore)
        return fut

    async def call(self, event: str, data: Any, within: float = 15.0) -> Any:
        async with asyncio.timeout(within):
            return await self.emit_with_ack(event, data)

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.send("41")
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await self._reader


def _ignore(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
