"""The attacks of ``bench/attacks.py``, each run in a process of its own:

    python -m bench.attackers NAME URL TOKEN SECONDS [--source ADDRESS]

prints one JSON line of what it achieved. Every attack comes from ``--source``
(127.0.0.2 by default: the attacked node counts it apart from the canary on 127.0.0.1,
as it would count another machine). A slot whose connection the node closes opens
another after RETRY seconds, so an attacker keeps up the pressure without spinning the
machine it shares with the node.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from websockets.asyncio.client import ClientConnection, connect

RETRY = 0.05
BIG_FRAME = 15_500_000
WORKERS = 20
HELD = 500

Stats = Counter[str]


class Attack:
    def __init__(self, url: str, token: str, seconds: float, source: str) -> None:
        self.url = url
        self.token = token
        self.until = time.monotonic() + seconds
        self.source = source
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.stats: Stats = Counter()
        self.acked: list[int] = []

    @property
    def running(self) -> bool:
        return time.monotonic() < self.until

    def ws_url(self, query: str = "") -> str:
        base = self.url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        return base + query

    async def websocket(self, query: str = "", **kwargs: Any) -> ClientConnection:
        return await connect(
            self.ws_url(query),
            compression=None,
            ping_interval=None,
            open_timeout=10,
            local_addr=(self.source, 0),
            **kwargs,
        )

    async def joined(
        self, conversation: str, query: str = "", **kwargs: Any
    ) -> ClientConnection | None:
        """A socket.io connection joined to ``conversation`` (``query``: more of the
        URL's, e.g. ``&latest_event_id=0``), or None if refused."""
        ws = await self.websocket(f"&conversation_id={conversation}{query}", **kwargs)
        await ws.recv()
        await ws.send("40" + json.dumps({"token": self.token}))
        while True:
            frame = await ws.recv()
            if isinstance(frame, str) and frame.startswith("40"):
                return ws
            if isinstance(frame, str) and frame.startswith("44"):
                self.stats["join refused"] += 1
                await ws.close()
                return None

    async def slots(self, n: int, slot: Callable[[], Awaitable[None]]) -> None:
        """Run ``slot`` again and again in ``n`` parallel slots until the time is up."""

        async def loop() -> None:
            while self.running:
                try:
                    await slot()
                except (TimeoutError, OSError, Exception) as exc:
                    self.stats[f"error {type(exc).__name__}"] += 1
                await asyncio.sleep(RETRY)

        tasks = [asyncio.ensure_future(loop()) for _ in range(n)]
        await asyncio.sleep(max(0.0, self.until - time.monotonic()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def hold_tcp(self, first: bytes, trickle: bytes | None) -> None:
        """A TCP connection that sends ``first`` and then, if given, ``trickle`` once a
        second, until the node closes it."""
        reader, writer = await asyncio.open_connection(
            self.host, self.port, local_addr=(self.source, 0)
        )
        self.stats["opened"] += 1
        try:
            if first:
                writer.write(first)
            while self.running:
                try:
                    async with asyncio.timeout(1.0):
                        data = await reader.read(4096)
                except TimeoutError:
                    if trickle:
                        writer.write(trickle)
                    continue
                if not data:
                    self.stats["closed by the node"] += 1
                    return
                if data.startswith(b"HTTP/1.1 "):
                    self.stats["answered " + data[9:12].decode("latin-1")] += 1
        finally:
            writer.close()


# -- the attacks ----------------------------------------------------------------------
async def big_frames(a: Attack) -> None:
    """20 connections, no token, each sending 15.5 MB websocket messages."""
    payload = b"4" + b"x" * BIG_FRAME

    async def slot() -> None:
        ws = await a.websocket(max_size=None)
        try:
            await ws.recv()
            await ws.send(payload)
            await ws.wait_closed()
        except Exception:
            pass
        a.stats[f"closed {ws.close_code}"] += 1

    await a.slots(WORKERS, slot)


async def idle_tcp(a: Attack) -> None:
    """500 TCP connections that send nothing."""
    await a.slots(HELD, lambda: a.hold_tcp(b"", None))


async def half_headers(a: Attack) -> None:
    """500 connections sending a request head one header line a second, never ending it."""
    await a.slots(HELD, lambda: a.hold_tcp(b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-a: b\r\n"))


async def no_connect(a: Attack) -> None:
    """500 engine.io websocket sessions that never send the socket.io CONNECT."""

    async def slot() -> None:
        ws = await a.websocket()
        a.stats["opened"] += 1
        with contextlib.suppress(Exception):
            while True:
                if await ws.recv() == "2":
                    await ws.send("3")  # a live client: it answers engine.io's pings
        a.stats[f"closed {ws.close_code}"] += 1

    await a.slots(HELD, slot)


async def polling_flood(a: Attack) -> None:
    """8 clients requesting polling handshakes as fast as the node answers."""
    connector = aiohttp.TCPConnector(local_addr=(a.source, 0), limit=8)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def slot() -> None:
            while a.running:
                async with http.get(a.url + "/socket.io/?EIO=4&transport=polling") as resp:
                    await resp.read()
                    a.stats[f"status {resp.status}"] += 1

        await a.slots(8, slot)


async def malformed(a: Attack) -> None:
    """20 connections, no token, each sending a 20-byte malformed packet, again and again."""

    async def slot() -> None:
        ws = await a.websocket()
        await ws.recv()
        await ws.send('42["oh_user_action",')
        with contextlib.suppress(Exception):
            await ws.wait_closed()
        a.stats[f"closed {ws.close_code}"] += 1

    await a.slots(WORKERS, slot)


async def action_flood(a: Attack) -> None:
    """One authenticated socket sending actions as fast as it can, 100 in flight; when
    the node closes it, it joins again."""
    sent = 0

    async def slot() -> None:
        nonlocal sent
        ws = await a.joined("flood")
        if ws is None:
            await asyncio.sleep(1.0)
            return
        a.stats["joined"] += 1
        waiting: set[int] = set()
        room = asyncio.Event()

        async def reader() -> None:
            with contextlib.suppress(Exception):
                async for frame in ws:
                    if isinstance(frame, str) and frame.startswith("43"):
                        start = frame.index("[")
                        ack = json.loads(frame[start:])[0]
                        waiting.discard(int(frame[2:start]))
                        if ack.get("ok"):
                            a.stats["accepted"] += 1
                            a.acked.append(ack["id"])
                        else:
                            a.stats["refused: " + ack["error"].split(" (")[0]] += 1
                        room.set()

        task = asyncio.ensure_future(reader())
        try:
            while a.running and not task.done():
                while len(waiting) < 100:
                    sent += 1
                    waiting.add(sent)
                    action = {"action": "message", "args": {"content": f"flood-{sent}"}}
                    await ws.send(f"42{sent}" + json.dumps(["oh_user_action", action]))
                    a.stats["sent"] += 1
                room.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await room.wait()
        except Exception:
            pass
        a.stats[f"closed {ws.close_code}"] += 1 if ws.close_code else 0
        await ws.close()
        task.cancel()

    await a.slots(1, slot)


async def connection_flood(a: Attack) -> None:
    """One user opening 200 connections to one conversation, each acting 5 times a second."""

    async def slot() -> None:
        ws = await a.joined("crowd")
        if ws is None:
            await asyncio.sleep(1.0)
            return
        a.stats["joined"] += 1
        n = 0
        with contextlib.suppress(Exception):
            while a.running:
                n += 1
                action = {"action": "message", "args": {"content": "crowd"}}
                await ws.send(f"42{n}" + json.dumps(["oh_user_action", action]))
                a.stats["actions sent"] += 1
                await asyncio.sleep(0.2)
        await ws.close()

    await a.slots(200, slot)


async def slow_readers(a: Attack) -> None:
    """One user's 31 connections that never read, in a conversation another of its
    connections fills with 60 KB actions as fast as its limits let it."""

    async def reader() -> None:
        ws = await a.joined("slow", max_queue=1)  # websockets stops reading the socket
        if ws is None:
            await asyncio.sleep(1.0)
            return
        a.stats["joined"] += 1
        await ws.wait_closed()
        a.stats["dropped by the node"] += 1

    async def writer() -> None:
        ws = await a.joined("slow")
        if ws is None:
            return
        content = "z" * 60_000
        n = 0
        with contextlib.suppress(Exception):
            while a.running:
                n += 1
                action = {"action": "message", "args": {"content": content}}
                await ws.send(f"42{n}" + json.dumps(["oh_user_action", action]))
                a.stats["actions sent"] += 1
                await asyncio.sleep(0.02)

    await asyncio.gather(a.slots(31, reader), a.slots(1, writer))


async def creation_flood(a: Attack) -> None:
    """Conversations created through REST as fast as the node answers (4 clients)."""
    connector = aiohttp.TCPConnector(local_addr=(a.source, 0), limit=4)
    headers = {"Authorization": f"Bearer {a.token}"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:

        async def slot() -> None:
            while a.running:
                async with http.post(a.url + "/api/conversations", json={}) as resp:
                    await resp.read()
                    a.stats[f"status {resp.status}"] += 1

        await a.slots(4, slot)


async def replays(a: Attack) -> None:
    """One user's conversation of 200 small messages, then 40 of 60 KB (as fast as its
    limits let it write them), and 31 of its connections joining it at
    ``latest_event_id`` 0 again and again, each reading its replay to the end."""
    ws = await a.joined("replayed")
    if ws is None:
        return
    n = 0
    with contextlib.suppress(Exception):
        for i in range(240):
            content = f"{i}" if i < 200 else f"{i}" + "r" * 60_000
            while a.running:  # again while its limits refuse it
                n += 1
                action = {"action": "message", "args": {"content": content}}
                await ws.send(f"42{n}" + json.dumps(["oh_user_action", action]))
                while not (frame := await ws.recv()).startswith("43"):
                    pass
                if json.loads(frame[frame.index("[") :])[0].get("ok"):
                    a.stats["actions written"] += 1
                    break
                await asyncio.sleep(0.2)
    await ws.close()

    async def reader() -> None:
        ws = await a.joined("replayed", "&latest_event_id=0")
        if ws is None:
            await asyncio.sleep(1.0)
            return
        a.stats["replays"] += 1
        with contextlib.suppress(TimeoutError):
            while True:
                async with asyncio.timeout(0.5):  # the replay's end: nothing more comes
                    frame = await ws.recv()
                a.stats["replayed bytes"] += len(frame)
        await ws.close()

    await a.slots(31, reader)


ATTACKS: dict[str, Callable[[Attack], Awaitable[None]]] = {
    "big-frames": big_frames,
    "idle-tcp": idle_tcp,
    "half-headers": half_headers,
    "no-connect": no_connect,
    "polling-flood": polling_flood,
    "malformed": malformed,
    "action-flood": action_flood,
    "connection-flood": connection_flood,
    "slow-readers": slow_readers,
    "creation-flood": creation_flood,
    "replays": replays,
}


def describe(name: str) -> str:
    doc = ATTACKS[name].__doc__ or ""
    return " ".join(doc.split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attackers")
    parser.add_argument("attack", choices=sorted(ATTACKS))
    parser.add_argument("url")
    parser.add_argument("token")
    parser.add_argument("seconds", type=float)
    parser.add_argument("--source", default="127.0.0.2")
    args = parser.parse_args(argv)
    attack = Attack(args.url, args.token, args.seconds, args.source)
    asyncio.run(ATTACKS[args.attack](attack))
    print(json.dumps({"stats": dict(attack.stats), "acked": attack.acked}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
