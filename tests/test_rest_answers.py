"""Large REST answers: written a piece at a time as the client reads them, and dropped
when it does not (real uvicorn node, real Redis, raw sockets). A page of events full of
control characters is about six times its packed size in JSON (each is ``\\u0001``)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import time
import tracemalloc
from typing import Any

import aiohttp
import pytest

from coordinator.server import NodeServer
from coordinator.serverconfig import NO_LIMITS, ServerConfig
from tests.helpers import wait_until
from tests.server_fixtures import ServerCluster, SioClient

# Each action: 20,000 control characters (120 KB of JSON in its socket.io frame, under the
# websocket limit), answered by the agent three times with the same: 80 KB packed, 480 KB
# of JSON; 45 of them are a page of 3.6 MB packed, 21.6 MB of JSON.
CONTROL = "\x01" * 20_000
ACTIONS = 45
EVENTS = ACTIONS * 4
DEADLINE = 1.0  # --request-timeout, which is also the write deadline


async def _filled(servers: ServerCluster) -> tuple[NodeServer, SioClient, str]:
    """A node (request timeout DEADLINE) and a conversation of EVENTS large events."""
    config = ServerConfig(**{**NO_LIMITS, "request_timeout": DEADLINE})
    (a,) = await servers.start(1, server_config=config, agent="workers.scripted:ScriptedAgent")
    settings = {"reply_size": len(CONTROL), "replies": 3, "think_time": 0}
    body = {"conversation_id": "ctrl", "settings": settings}
    status, _ = await servers.request("POST", a, "/api/conversations", user="alice", json=body)
    assert status == 201
    writer = await servers.join(a, "ctrl", "alice")
    for _ in range(ACTIONS):
        await writer.say(CONTROL)
    await writer.wait_ids(EVENTS)
    return a, writer, servers.token("alice")


async def _raw(node: NodeServer, source: str, request: bytes) -> socket.socket:
    """A TCP connection from ``source`` with a small receive buffer that sent ``request``."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((source, 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", node.port))
    await loop.sock_sendall(sock, request)
    return sock


def _get(path: str, token: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()


def _answering() -> list[asyncio.Task[Any]]:
    """The node's tasks still running the app for an HTTP request (uvicorn's, one each)."""
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and "RequestResponseCycle.run_asgi" in repr(t.get_coro())
    ]


async def test_an_answer_the_client_does_not_read_is_dropped_at_the_deadline(
    servers: ServerCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that asks for a page and never reads it is reset within the deadline,
    whether the node still writes the answer (21.6 MB: the kernel takes a few MB, the app
    waits for the rest) or has written it all (the kernel holds it); its connection and
    the task writing its answer are gone. A client that reads, slowly, gets all of it.
    Before: both held for good, with the whole answer in the node's memory (+755 MB
    for 32 such clients)."""
    a, _, token = await _filled(servers)
    caplog.set_level(logging.INFO, "coordinator.protocols")
    whole = _get("/api/conversations/ctrl/events?limit=1000", token)
    part = _get("/api/conversations/ctrl/events?limit=4", token)  # 480 KB: all in the kernel
    started = time.monotonic()
    stuck = [await _raw(a, "127.0.0.2", whole), await _raw(a, "127.0.0.2", part)]
    await wait_until(lambda: a.guard.count("127.0.0.2") == 2, timeout=5, what="both counted")
    await wait_until(
        lambda: a.guard.count("127.0.0.2") == 0,
        timeout=DEADLINE + 6,
        what="the connections of the clients that do not read dropped",
    )
    assert time.monotonic() - started < DEADLINE + 6
    # The app is told at once: nothing holds the page any more.
    await wait_until(lambda: not _answering(), timeout=2, what="the answers' tasks ended")
    loop = asyncio.get_running_loop()
    for sock in stuck:
        with pytest.raises(ConnectionResetError):  # reset: the node's buffers freed at once
            async with asyncio.timeout(5):
                while await loop.sock_recv(sock, 1 << 20):
                    pass
        sock.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "coordinator.protocols"]
    assert len(lines) == 2, lines
    assert all(
        line.startswith("resetting the HTTP connection of 127.0.0.2:")
        and f"bytes of its answer in {DEADLINE:g}s, " in line
        and token not in line
        for line in lines
    ), lines
    # A client that reads, 4 KiB every 20 ms (200 KB a second: the 480 KB take more than
    # the deadline), is not cut off.
    reader = await _raw(a, "127.0.0.3", _get("/api/conversations/ctrl/events?limit=4", token))
    got = bytearray()
    async with asyncio.timeout(60):
        while not got.endswith(b"\r\n0\r\n\r\n"):  # the last chunk
            data = await loop.sock_recv(reader, 4096)
            assert data, "closed before the answer's end"
            got += data
            await asyncio.sleep(0.02)
    reader.close()
    assert time.monotonic() - started > 2 * DEADLINE
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    page = json.loads(_dechunked(body))
    assert [e["id"] for e in page["events"]] == [1, 2, 3, 4] and page["more"] is True


def _dechunked(body: bytes) -> bytes:
    out = bytearray()
    while True:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return bytes(out)
        out += body[:n]
        body = body[n + 2 :]


async def test_a_page_of_control_characters_is_written_in_pieces(
    servers: ServerCluster,
) -> None:
    """Pages of events that are six times larger in JSON than packed give every event
    once, in exactly the bytes one ``json.dumps`` of the page writes (what clients got
    before), while the node holds a few pieces of the answer at a time, not all of it
    (before: the JSON text and its bytes, 43 MB more for this 21.6 MB page)."""
    a, writer, token = await _filled(servers)
    headers = {"Authorization": f"Bearer {token}"}
    got: list[dict[str, Any]] = []
    sizes = []
    after, first = 0, ""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        while True:
            url = f"{a.url}/api/conversations/ctrl/events?after={after}&limit=1000"
            async with http.get(url, headers=headers) as resp:
                assert resp.status == 200 and resp.content_type == "application/json"
                raw = await resp.read()
            page = json.loads(raw)
            assert raw == json.dumps(page, ensure_ascii=False, separators=(",", ":")).encode()
            assert set(page) == {"events", "next", "more"}
            got += page["events"]
            sizes.append(len(raw))
            if after == 0:
                first = hashlib.sha256(raw).hexdigest()
            after = page["next"]
            if not page["more"]:
                break
        assert [e["id"] for e in got] == list(range(1, EVENTS + 1))
        assert got == writer.events
        assert max(sizes) > 20_000_000  # a page of about 4 MiB packed
        # The same first page again, read as it comes while the node's allocations are
        # traced: it holds the page, not its JSON (21.6 MB; twice that before).
        url = f"{a.url}/api/conversations/ctrl/events?limit=1000"
        digest = hashlib.sha256()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            async with http.get(url, headers=headers) as resp:
                async for chunk in resp.content.iter_chunked(1 << 16):
                    digest.update(chunk)
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
    assert digest.hexdigest() == first
    # The page as Redis sent it and decoded (3.6 MB each), and a few pieces of its JSON.
    assert peak < sizes[0] // 2, (peak, sizes[0])
