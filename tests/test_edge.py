"""What a client can hold before it authenticates: connections that send nothing or half
a request are closed, connections are capped per node and per address (X-Forwarded-For
only from trusted proxies), polling is opt-in, CORS is closed by default, /metrics may
live on a port of its own. Real uvicorn nodes, raw TCP where a library would be polite."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from typing import Any

import aiohttp
import pytest
from engineio.async_socket import AsyncSocket
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from coordinator.auth import issue_token
from coordinator.connlimits import address_key
from coordinator.edge import Receiver
from coordinator.ratelimit import Rate
from coordinator.server import NodeServer
from coordinator.serverconfig import NO_LIMITS, ServerConfig
from coordinator.websocket import CoalescingSansIOProtocol
from tests.helpers import wait_until
from tests.rawsocket import RawSocket
from tests.server_fixtures import SECRET, ServerCluster
from tests.test_metrics import samples


def edge(**changes: Any) -> ServerConfig:
    return ServerConfig(**{**NO_LIMITS, **changes})


async def tcp(
    node: NodeServer, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", node.port, local_addr=(source, 0))


async def answer(reader: asyncio.StreamReader, within: float = 10.0) -> tuple[str, float]:
    """Everything the server writes until it closes, and how long that took."""
    started = time.monotonic()
    async with asyncio.timeout(within):
        data = await reader.read()
    return data.decode("latin-1"), time.monotonic() - started


async def test_connections_that_send_nothing_or_half_a_request_are_closed(
    servers: ServerCluster,
) -> None:
    (a,) = await servers.start(1, server_config=edge(request_timeout=0.5))
    silent = await tcp(a)
    half = await tcp(a)
    half[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
    slow_body = await tcp(a)
    slow_body[1].write(
        b"POST /api/conversations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
    )
    for reader, _ in (silent, half):
        text, took = await answer(reader)
        assert text.startswith("HTTP/1.1 408 Request Timeout\r\n"), text
        assert '"no complete request within 0.5s"' in text and took < 3
    text, took = await answer(slow_body[0])
    assert took < 3  # cut off: the request was under way, nobody is told
    # A connection that asks and is answered in time stays for keep-alive.
    reader, writer = await tcp(a)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    for _, w in (silent, half, slow_body, (reader, writer)):
        w.close()
    await wait_until(lambda: len(a.guard) == 0, timeout=10, what="every connection released")


async def test_connections_are_capped_per_address_and_per_node(servers: ServerCluster) -> None:
    (a,) = await servers.start(
        1, server_config=edge(max_connections=5, max_connections_per_address=3)
    )
    held = [await tcp(a, "127.0.0.2") for _ in range(3)]
    await wait_until(lambda: a.guard.count("127.0.0.2") == 3, timeout=5)
    reader, _ = await tcp(a, "127.0.0.2")
    text, _ = await answer(reader)
    assert text.startswith("HTTP/1.1 503 Service Unavailable\r\n") and "retry-after: 1" in text
    assert "too many connections from 127.0.0.2 (at most 3 per address)" in text
    # Other addresses still get in, up to the node's cap.
    held += [await tcp(a, "127.0.0.3") for _ in range(2)]
    await wait_until(lambda: len(a.guard) == 5, timeout=5)
    reader, _ = await tcp(a, "127.0.0.4")
    text, _ = await answer(reader)
    assert "this node holds its maximum of 5 connections" in text
    # What /metrics says is the guard's that refused them (it read another, empty one).
    got = samples(a.manager.metrics.render().decode(), "n1")
    assert got["coordinator_open_connections"] == 5
    assert got["coordinator_connections_refused_total"] == 2
    # Closing one makes room; websocket sessions count the same way.
    held.pop()[1].close()
    await wait_until(lambda: len(a.guard) == 4, timeout=5)
    sock = await RawSocket.open(a.url, {"conversation_id": "c"})
    assert len(a.guard) == 5
    await sock.aclose()
    for _, writer in held:
        writer.close()
    await wait_until(lambda: len(a.guard) == 0, timeout=10, what="every connection released")
    assert a.guard.refused == {"address": 1, "node": 1}


async def test_new_connections_are_limited_in_rate_per_address(servers: ServerCluster) -> None:
    (a,) = await servers.start(1, server_config=edge(connections_per_address=Rate(0.5, 3)))
    for _ in range(3):
        reader, writer = await tcp(a, "127.0.0.2")
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await answer(reader))[0].startswith("HTTP/1.1 200 ")
    reader, _ = await tcp(a, "127.0.0.2")
    text, _ = await answer(reader)
    assert text.startswith("HTTP/1.1 503 ")
    assert "too many new connections from 127.0.0.2 (limit 0.5/s (burst 3)); retry in" in text
    # Another address has its own allowance.
    reader, writer = await tcp(a, "127.0.0.3")
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await answer(reader))[0].startswith("HTTP/1.1 200 ")
    assert a.guard.refused == {"rate": 1}
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff") == "2001:db8::/64"


async def test_forwarded_clients_are_counted_only_behind_a_trusted_proxy(
    servers: ServerCluster,
) -> None:
    (trusting,) = await servers.start(
        1, server_config=edge(max_connections_per_address=2, trusted_proxies=("127.0.0.1",))
    )
    (plain,) = await servers.start(1, server_config=edge(max_connections_per_address=2))

    async def session(node: NodeServer, forwarded: str) -> Any:
        url = node.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
        return await connect(url, additional_headers={"X-Forwarded-For": forwarded})

    # Through the trusted proxy: two sessions for each client it names.
    mine = [await session(trusting, "10.0.0.1"), await session(trusting, "10.0.0.1")]
    with pytest.raises(InvalidStatus) as refused:
        await session(trusting, "192.0.2.7, 10.0.0.1")  # the proxy's own hop is the client
    assert refused.value.response.status_code == 429
    assert json.loads(refused.value.response.body) == {
        "error": "too many connections from 10.0.0.1 (at most 2 per address)"
    }
    mine.append(await session(trusting, "10.0.0.2"))
    # A node that trusts nobody ignores the header: the peer's address is the client's.
    theirs = [await session(plain, "10.0.0.9"), await session(plain, "10.0.0.8")]
    with pytest.raises(InvalidStatus):
        await session(plain, "10.0.0.7")
    for ws in mine + theirs:
        await ws.close()
    await wait_until(lambda: trusting.guard.count("10.0.0.1") == 0, timeout=5)


async def test_polling_is_opt_in_and_a_polling_session_must_join_in_time(
    servers: ServerCluster,
) -> None:
    (ws_only,) = await servers.start(1)
    (polling,) = await servers.start(
        1, server_config=edge(allow_polling=True, handshake_timeout=0.5)
    )
    handshake = "/socket.io/?EIO=4&transport=polling"
    status, body = await servers.request("GET", ws_only, handshake)
    assert status == 400 and "Invalid transport" in body
    status, body = await servers.request("GET", polling, handshake)
    assert status == 200 and '"sid"' in body
    sio = polling.manager.sink.sio  # type: ignore[attr-defined]
    assert len(sio.eio.sockets) == 1
    await wait_until(lambda: not sio.eio.sockets, timeout=5, what="the silent session closed")


async def test_cors_is_closed_unless_origins_are_configured(servers: ServerCluster) -> None:
    closed = (await servers.start(1))[0]
    opened = (await servers.start(1, server_config=edge(cors_origins=("https://app.example",))))[0]
    async with aiohttp.ClientSession() as http:
        for node, origin, allowed in [
            (closed, "https://app.example", None),
            (opened, "https://app.example", "https://app.example"),
            (opened, "https://evil.example", None),
        ]:
            async with http.get(node.url + "/healthz", headers={"Origin": origin}) as resp:
                assert resp.headers.get("access-control-allow-origin") == allowed
        async with http.options(
            opened.url + "/api/conversations", headers={"Origin": "https://app.example"}
        ) as resp:
            assert resp.status == 204
            assert resp.headers["access-control-allow-methods"] == "GET, POST"
    # socket.io: a browser page from another origin cannot open a websocket by default.
    path = "/socket.io/?EIO=4&transport=websocket"
    for node, origin, ok in [
        (closed, "https://app.example", False),
        (closed, f"http://127.0.0.1:{closed.port}", True),  # the same origin
        (opened, "https://app.example", True),
        (opened, "https://evil.example", False),
    ]:
        url = node.url.replace("http", "ws") + path
        try:
            ws = await connect(url, origin=origin)  # type: ignore[arg-type]
        except InvalidStatus:
            assert not ok, (node.port, origin)
        else:
            assert ok, (node.port, origin)
            await ws.close()


async def test_metrics_on_a_port_of_their_own(servers: ServerCluster) -> None:
    (a,) = await servers.start(1, server_config=edge(metrics_port=0))
    assert a.metrics_url != f"{a.url}/metrics"
    async with aiohttp.ClientSession() as http:
        async with http.get(a.metrics_url) as resp:
            text = await resp.text()
            assert resp.status == 200 and "coordinator_open_connections" in text
        async with http.get(a.url + "/metrics") as resp:
            assert resp.status == 404
        async with http.get(a.metrics_url.replace("/metrics", "/healthz")) as resp:
            assert resp.status == 404
        async with http.get(a.url + "/healthz") as resp:
            assert resp.status == 200


async def test_a_closed_connection_leaves_no_reference_cycle(servers: ServerCluster) -> None:
    """A connection that ends leaves no reference cycle holding it (engine.io's read task
    kept its OSError, whose traceback held the task; the scope held the protocol; a
    class engine.io made per request held ``receive``; asyncio's transport keeps a
    bound method of its own): it is freed as its last user
    lets go, not by a full collection that walks every live connection (BENCHMARKS.md,
    issue #17)."""
    (node,) = await servers.start(1)
    eio = node.manager.sink.sio.eio  # type: ignore[attr-defined]
    # Each session's ping task is kept (to end with the session) and forgotten when done.
    client = await servers.join(node, "pinged", "alice")
    (ping,) = eio.ping_tasks.values()
    ping.cancel()  # done early: its done callback forgets it
    await wait_until(lambda: not eio.ping_tasks, timeout=2, what="the ping task forgotten")
    await client.close()
    gc.collect()
    gc.disable()
    try:
        for i in range(3):
            client = await servers.join(node, f"freed-{i}", "alice")
            await client.act({"action": "message", "args": {"content": "hi"}})
            await client.close()
        # The node ends each session's websocket within its grace period (1 s).
        await asyncio.sleep(3)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        kinds = (CoalescingSansIOProtocol, AsyncSocket, Receiver, type)
        cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, kinds)]
        assert cyclic == []  # a class engine.io made for each connection's environ too
        # asyncio's transport and its socket (the clients' own, in this process, apart).
        transports = [o for o in gc.garbage if isinstance(o, asyncio.Transport)]
        assert [t for t in transports if t.get_extra_info("sockname")[1] == node.port] == []
        assert eio.ping_tasks == {}  # ended with their sessions
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def _long_history(servers: ServerCluster, events: int, size: int) -> Any:
    """A node and a conversation ``big`` of ``events`` agent events of ``size`` bytes."""
    (a,) = await servers.start(1, agent="workers.scripted:ScriptedAgent")
    settings = {"reply_size": size, "replies": events, "think_time": 0}
    body = {"conversation_id": "big", "settings": settings}
    status, _ = await servers.request("POST", a, "/api/conversations", user="alice", json=body)
    assert status == 201
    writer = await servers.join(a, "big", "alice")
    first = await writer.say("go")
    await writer.wait_ids(first + events, within=60)
    await writer.close()
    connections = a.manager.node.delivery.connections
    await wait_until(lambda: not list(connections), what="the writer gone")
    return a


async def _replaying(a: Any, read: int) -> RawSocket:
    """A client joining ``big`` at id 0 that has read ``read`` of its replay's events
    (its websocket reads ahead of it one frame at most)."""
    query = {"conversation_id": "big", "latest_event_id": 0}
    raw = await RawSocket.open(a.url, query, max_queue=1, max_size=None)
    await raw.ws.send("40" + json.dumps({"token": issue_token("alice", SECRET)}))
    for _ in range(read):
        await raw.recv_packet()
    return raw


async def test_a_client_that_leaves_in_its_replay_is_forgotten_at_once(
    servers: ServerCluster,
) -> None:
    """A client that closes its connection in the middle of its join's replay: the join
    ends there and the node forgets it (locally and in Redis, where it counts under its
    user's connection cap). Before, the replay went on to a connection that was gone,
    each event waiting STALLED (10 s) for a client that would never read it: the probe's
    clients stayed counted for 50 s, and a flaky client reconnecting at 0 locked its own
    user out ("too many connections") with no connection open."""
    a = await _long_history(servers, 300, 20_000)
    connections = a.manager.node.delivery.connections
    raw = await _replaying(a, 20)
    raw.ws.transport.abort()
    await wait_until(lambda: not list(connections), timeout=3, what="the connection forgotten")
    conns, redis = a.manager.keys.conv_conns("big"), a.manager.state.redis

    async def forgotten() -> bool:
        return await redis.hlen(conns) == 0

    await wait_until(forgotten, timeout=3, what="Redis forgot it")


async def test_a_client_that_stops_reading_in_its_replay_is_dropped_once(
    servers: ServerCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that stops reading mid-replay is dropped after STALLED seconds, once,
    and its join ends with it. Before, each event after the drop waited STALLED again
    ("read too slowly" logged every STALLED seconds) while the join held the client's
    place and the events read for it."""
    monkeypatch.setattr("coordinator.app.STALLED", 0.5)
    caplog.set_level(logging.INFO, logger="coordinator")
    a = await _long_history(servers, 200, 100_000)  # more than the sockets' buffers take
    connections = a.manager.node.delivery.connections
    raw = await _replaying(a, 1)  # and no more: the kernel's buffers fill
    try:
        await wait_until(lambda: not list(connections), timeout=5, what="the connection dropped")
    finally:
        await raw.aclose()
    dropped = [r for r in caplog.records if "read too slowly" in r.getMessage()]
    assert len(dropped) == 1, [r.getMessage() for r in dropped]


async def _polling_client(servers: ServerCluster, conversation: str) -> Any:
    """A python-socketio client on the polling transport only, joined to
    ``conversation`` on a node that allows polling."""
    (node,) = await servers.start(1, server_config=edge(allow_polling=True))
    client = servers.client("polling")
    await client.sio.connect(
        f"{node.url}?conversation_id={conversation}",
        auth={"token": servers.token("alice")},
        transports=["polling"],
        wait_timeout=10,
    )
    return client


async def test_a_long_polling_client_joins_and_talks(servers: ServerCluster) -> None:
    """With polling allowed, a client that never upgrades: its packets come as POST
    bodies (engine.io reads them through the request environ's ``wsgi.input``), a
    large one included, and its events as answers to its GETs."""
    client = await _polling_client(servers, "polled")
    assert client.sio.transport() == "polling"
    for text in ("hi", "x" * 50_000, "bye"):
        ack = await client.act({"action": "message", "args": {"content": text}})
        assert ack["ok"], ack
    await client.wait_ids(6)
    assert [e["args"]["content"] for e in client.events if e["source"] == "user"] == [
        "hi",
        "x" * 50_000,
        "bye",
    ]
    # python-engineio's polling client waits out its pending GET when it disconnects
    # (30 s, against plain python-socketio as well): aborted here.
    await client.sio.eio.disconnect(abort=True)


@pytest.mark.parametrize(
    "scope, events",
    [
        (  # a websocket: headers given twice, one not UTF-8, the query
            {
                "type": "websocket",
                "path": "/socket.io/",
                "query_string": b"EIO=4&transport=websocket&conversation_id=c1",
                "headers": [
                    (b"host", b"127.0.0.1:8000"),
                    (b"x-forwarded-for", b"10.0.0.1"),
                    (b"x-forwarded-for", b"10.0.0.2"),
                    (b"x-forwarded-proto", b"https"),
                    (b"bad", b"\xff"),
                ],
            },
            [{"type": "websocket.connect"}],
        ),
        (  # a polling POST whose body comes in three pieces; a query that is not UTF-8
            {
                "type": "http",
                "method": "POST",
                "path": "/socket.io/",
                "query_string": b"EIO=4&transport=polling&x=\xff",
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"9")],
            },
            [
                {"type": "http.request", "body": b"abc", "more_body": True},
                {"type": "http.request", "body": b"def", "more_body": True},
                {"type": "http.request", "body": b"ghi", "more_body": False},
            ],
        ),
        ({"type": "http", "path": "/", "headers": []}, [{"type": "http.disconnect"}]),
    ],
)
async def test_the_request_environ_is_engineios_own(
    scope: dict[str, Any], events: list[dict[str, Any]]
) -> None:
    """``asgienviron.translate_request`` stands in for engine.io's (which makes a class
    per request): for the engine.io installed, the same environ and the same body, read
    whole or in pieces."""
    from engineio.async_drivers import asgi

    from coordinator.asgienviron import translate_request

    async def send(message: Any) -> None:
        pass

    websocket = scope["type"] == "websocket"  # its input is None: read once, whole
    for reads in [[None]] if websocket else ([None], [4, None], [100]):
        made = []
        for translate in (asgi.translate_request, translate_request):
            pending = iter(events)

            async def receive(pending: Any = pending) -> Any:
                return next(pending)

            environ = await translate(scope, receive, send)
            body = environ.pop("wsgi.input", None)
            for key in ("asgi.receive", "asgi.send"):
                environ.pop(key, None)
            pieces = [await body.read(n) for n in reads] if body is not None else []
            made.append((environ, pieces))
        assert made[0] == made[1], reads


async def test_a_polling_post_over_the_message_bound_ends_its_session_and_its_request(
    servers: ServerCluster,
) -> None:
    """A polling POST over maxPayload ends its session: engine.io's close then waited
    for the client to poll for its CLOSE packet, and one that never did held the
    request's task until the node stopped (a task per such POST, no token needed)."""
    (node,) = await servers.start(1, server_config=edge(allow_polling=True))
    status, body = await servers.request("GET", node, "/socket.io/?EIO=4&transport=polling")
    assert status == 200, body
    sid = json.loads(body[1:])["sid"]
    sio = node.manager.sink.sio  # type: ignore[attr-defined]

    def handling() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if "handle_request" in repr(t.get_coro())]

    # Answered at once (it waited for the client to go away: 15 s here, for good in the
    # probe, whose client had reset).
    status, _ = await servers.request(
        "POST", node, f"/socket.io/?EIO=4&transport=polling&sid={sid}", data=b"4" * (2 << 20)
    )
    assert status == 400
    await wait_until(lambda: not sio.eio.sockets and not handling(), timeout=10, what="it ended")


async def test_a_polling_client_may_send_a_burst_in_one_post(servers: ServerCluster) -> None:
    """A polling client sends what it has queued in one POST: python-engineio refused
    a body of more than 16 packets whole (an ERROR traceback, and 200 to the client: its
    messages were lost without a word). The body's size is bounded already."""
    client = await _polling_client(servers, "burst")
    acks = await asyncio.gather(
        *(client.act({"action": "message", "args": {"content": str(i)}}) for i in range(40))
    )
    assert all(ack["ok"] for ack in acks), acks
    await client.sio.eio.disconnect(abort=True)


async def test_polling_bodies_engineio_cannot_decode_log_a_few_lines(
    servers: ServerCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A polling POST python-engineio cannot decode (here more packets than it takes)
    logged an ERROR traceback each, from any client without a token: at most 2 lines a
    second now, as the node's own refusals."""
    (node,) = await servers.start(1, server_config=edge(allow_polling=True))
    status, body = await servers.request("GET", node, "/socket.io/?EIO=4&transport=polling")
    sid = json.loads(body[1:])["sid"]
    too_many = "\x1e".join(["4a"] * 1025).encode()
    began = time.monotonic()
    for _ in range(40):
        status, _ = await servers.request(
            "POST", node, f"/socket.io/?EIO=4&transport=polling&sid={sid}", data=too_many
        )
        assert status == 200  # python-engineio's answer
    took = time.monotonic() - began
    lines = [r for r in caplog.records if r.name == "coordinator.engineio"]
    assert 1 <= len(lines) <= 20 + 2 * took + 1, (len(lines), took)
    assert len(lines) < 40


async def test_a_polling_session_that_does_not_poll_is_held_to_the_queued_bytes(
    servers: ServerCluster,
) -> None:
    """Events waiting for a polling session count against --max-queued-bytes as a
    websocket's do: they were not counted, and a session that never polled held up to
    --max-queued-events of the largest events (9 MB each in a probe)."""
    config = edge(allow_polling=True, max_queued_events=0, max_queued_bytes=100_000)
    (node,) = await servers.start(1, server_config=config)
    token = servers.token("alice")
    query = "/socket.io/?EIO=4&transport=polling"
    status, body = await servers.request("GET", node, f"{query}&conversation_id=quiet")
    sid = json.loads(body[1:])["sid"]
    connect = "40" + json.dumps({"token": token})
    status, _ = await servers.request("POST", node, f"{query}&sid={sid}", data=connect.encode())
    assert status == 200
    sio = node.manager.sink.sio  # type: ignore[attr-defined]
    await wait_until(lambda: len(node.manager.local_connections()) == 1, what="joined")
    talker = await servers.join(node, "quiet", "alice")
    for _ in range(6):  # each action and its answer: about 60 KB for the quiet session
        assert (await talker.act({"action": "message", "args": {"content": "x" * 30_000}}))["ok"]
    await wait_until(lambda: sid not in sio.eio.sockets, timeout=10, what="the quiet one dropped")
    assert talker.connected


async def test_polling_handshakes_over_one_connection_count_as_new_connections(
    servers: ServerCluster,
) -> None:
    """Each polling handshake opens an engine.io session: over keep-alive connections
    they escaped the per-address rate of new connections (2,460 sessions a second from
    eight connections in a probe, each held for the handshake timeout)."""
    config = edge(allow_polling=True, connections_per_address=Rate(1, 10))
    (node,) = await servers.start(1, server_config=config)
    statuses = [
        (await servers.request("GET", node, "/socket.io/?EIO=4&transport=polling"))[0]
        for _ in range(20)
    ]
    assert statuses.count(200) <= 11 and statuses[-1] == 429, statuses
    # A query that only looks as if it named a session opens one all the same.
    status, _ = await servers.request("GET", node, "/socket.io/?EIO=4&transport=polling&xsid=1")
    assert status == 429
    # Other requests are not counted.
    status, body = await servers.request("GET", node, "/healthz")
    assert status == 200, body
