"""A socket.io client that sends whatever frames a test writes (websockets, no library in
between): to send what no well-behaved client would, and see exactly what comes back."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


class RawSocket:
    """One engine.io (v4) websocket; ``join`` does the socket.io CONNECT."""

    def __init__(self, ws: ClientConnection, open_packet: dict[str, Any]) -> None:
        self.ws = ws
        self.open_packet = open_packet
        self.sid = ""
        self._ack = 100
        self.early: list[str] = []  # events that came before the CONNECT answer

    @classmethod
    async def open(cls, url: str, query: dict[str, Any] | None = None, **kwargs: Any) -> RawSocket:
        q = {**(query or {}), "EIO": "4", "transport": "websocket"}
        address = url.replace("http://", "ws://", 1).rstrip("/") + "/socket.io/?" + urlencode(q)
        ws = await connect(address, compression=None, ping_interval=None, **kwargs)
        first = await asyncio.wait_for(ws.recv(), 10)
        assert isinstance(first, str) and first.startswith("0"), first
        return cls(ws, json.loads(first[1:]))

    async def join(self, token: str) -> dict[str, Any]:
        """Send CONNECT with the token; the server's answer (CONNECT or CONNECT_ERROR)."""
        await self.ws.send("40" + json.dumps({"token": token}))
        # "0{sid}" (CONNECT) or "4{message}" (refused); a join's replay may come first.
        reply = await self.recv_packet()
        while reply.startswith("2"):
            self.early.append(reply)
            reply = await self.recv_packet()
        answer = dict(json.loads(reply[1:]))
        if reply.startswith("0"):
            self.sid = answer["sid"]
        return answer

    async def recv_packet(self, within: float = 10.0) -> str:
        """The next socket.io packet (engine.io pings are answered and skipped)."""
        async with asyncio.timeout(within):
            while True:
                frame = await self.ws.recv()
                if isinstance(frame, str) and frame == "2":
                    await self.ws.send("3")
                    continue
                assert isinstance(frame, str) and frame.startswith("4"), frame
                return frame[1:]

    async def call(self, event: str, *args: Any, within: float = 10.0) -> Any:
        """Emit ``event`` asking for an ack; the ack's first argument (events the server
        sends meanwhile are skipped)."""
        self._ack += 1
        ack_id = self._ack
        await self.ws.send(f"42{ack_id}" + json.dumps([event, *args]))
        return await self.ack(ack_id, within)

    async def send_packet(self, packet: str) -> int:
        """Send ``packet`` (socket.io level, without the engine.io "4"); returns the ack id
        a test may put in it with ``{id}``."""
        self._ack += 1
        await self.ws.send("4" + packet.replace("{id}", str(self._ack)))
        return self._ack

    async def ack(self, ack_id: int, within: float = 10.0) -> Any:
        prefix = f"3{ack_id}"
        while True:
            packet = await self.recv_packet(within)
            if packet.startswith(prefix) and packet[len(prefix) : len(prefix) + 1] == "[":
                return json.loads(packet[len(prefix) :])[0]

    async def closed(self, within: float = 10.0) -> tuple[int | None, str]:
        """Wait for the server to close the connection: (close code, reason)."""
        try:
            async with asyncio.timeout(within):
                while True:
                    frame = await self.ws.recv()
                    if frame == "2":
                        await self.ws.send("3")
        except ConnectionClosed:
            pass
        return self.ws.close_code, self.ws.close_reason or ""

    async def aclose(self) -> None:
        await self.ws.close()
