"""Hostile socket.io clients: every malformed frame or packet is answered (an error ack or
a close with a reason), logged once per connection, changes nothing and strands nothing;
sessions that never join are closed; clients that never read are dropped, not buffered
for. Real uvicorn nodes, real Redis, raw websocket frames (tests/rawsocket.py)."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import os
import socket as tcp
import time
from typing import Any

import pytest

from coordinator.app import STALLED
from coordinator.catchup import BUFFERED
from coordinator.ratelimit import Rate
from coordinator.server import NodeServer
from coordinator.serverconfig import NO_LIMITS, ServerConfig
from coordinator.websocket import CoalescingSansIOProtocol
from tests.helpers import wait_until
from tests.rawsocket import RawSocket
from tests.server_fixtures import ServerCluster

ACTION = '["oh_user_action",{"action":"message","args":{"content":"hi"}}]'


async def joined(servers: ServerCluster, node: NodeServer, conv: str = "conv") -> RawSocket:
    sock = await RawSocket.open(node.url, {"conversation_id": conv})
    answer = await sock.join(servers.token("alice"))
    assert "sid" in answer, answer
    return sock


async def events_in(node: NodeServer, sid: str) -> int:
    return int(await node.manager.state.redis.xlen(node.manager.keys.events(sid)))


async def forgotten_everywhere(node: NodeServer, user: str = "alice") -> bool:
    """No connection of ``user`` left on the node or in Redis."""
    redis = node.manager.state.redis
    return not node.manager.local_connections() and not await redis.hlen(
        node.manager.keys.user_conns(user)
    )


@pytest.mark.parametrize("frame", ["", "9zzz", "x"])
async def test_a_frame_engineio_cannot_read_closes_the_connection_and_forgets_it(
    servers: ServerCluster, frame: str
) -> None:
    """engine.io drops a session whose frame it cannot decode without closing it (the
    empty frame raised out of its handler): socket.io never heard of the disconnect, and
    the connection stayed joined here and in Redis until the ping timeout (45 s)."""
    (a,) = await servers.start(1)
    sock = await joined(servers, a)
    assert a.manager.local_connections()
    await sock.ws.send(frame)
    assert await sock.closed() == (1002, "malformed engine.io packet")
    await wait_until(lambda: forgotten_everywhere(a), timeout=3, what="connection forgotten")


async def test_an_engineio_close_from_the_client_ends_the_websocket(
    servers: ServerCluster,
) -> None:
    """engine.io ends its session on the client's CLOSE packet but went on reading the
    websocket, answering nothing: the node closes the websocket too."""
    (a,) = await servers.start(1)
    sock = await joined(servers, a)
    await sock.ws.send("1")
    assert await sock.closed() == (1000, "closed by the client (engine.io CLOSE)")
    await wait_until(lambda: forgotten_everywhere(a), timeout=3, what="connection forgotten")


MALFORMED_CLOSED = [
    ('2["oh_user_action",', "not a socket.io packet"),
    ("9", "unknown or unexpected packet type"),
    ('4{"message":"x"}', "unknown or unexpected packet type"),
    ('2/other,{id}["oh_user_action",{}]', "unknown namespace '/other'"),
    ("2" + "[" * 40 + "]" * 40, "an event is a list starting with its name"),
    ('2["oh_user_action",' + "[" * 40 + "]" * 40 + "]", "nested too deeply"),
    ('599-["oh_user_action",{"_placeholder":true,"num":0}]', "a binary packet carries 1 to 16"),
]
MALFORMED_ACKED = [
    ('2{id}{"a":1}', "an event is a list starting with its name"),
    ("2{id}[1]", "an event is a list starting with its name"),
    ('2{id}["connect",{"QUERY_STRING":"conversation_id=x"},{"token":"t"}]', "'connect'"),
    ('2{id}["disconnect"]', "not an event name a client may send: 'disconnect'"),
    ('2{id}["oh_user_action",{"action":"message","args":{"n":NaN}}]', "NaN or Infinity"),
    ('2{id}["oh_user_action",{"action":"message","args":{"n":1e999}}]', "NaN or Infinity"),
    ('2{id}["oh_user_action",{"action":"message","args":{"n":18446744073709551616}}]', "64 bits"),
    ('2{id}["oh_user_action",' + "[" * 40 + "]" * 40 + "]", "nested too deeply"),
]


async def test_malformed_packets_are_answered_logged_once_and_change_nothing(
    servers: ServerCluster, caplog: pytest.LogCaptureFixture
) -> None:
    (a,) = await servers.start(1)
    sock = await joined(servers, a)
    assert (await sock.call("oh_user_action", {"action": "message", "args": {}}))["ok"]

    async def answered() -> bool:  # the user event and its echo
        return await events_in(a, "conv") >= 2

    await wait_until(answered, timeout=5)
    before = await events_in(a, "conv")
    caplog.set_level(logging.INFO)
    caplog.clear()

    # Packets that asked for an ack get an error ack; the connection stays usable.
    for packet, why in MALFORMED_ACKED:
        ack_id = await sock.send_packet(packet)
        ack = await sock.ack(ack_id)
        assert ack["ok"] is False and why in ack["error"], (packet, ack)
    assert len(a.manager.local_connections()) == 1  # "disconnect" reached no handler
    reported = [r for r in caplog.records if "malformed packet" in r.getMessage()]
    assert len(reported) == 1, [r.getMessage() for r in reported]  # once per connection
    assert (await sock.call("nope", 1))["error"].startswith("unknown event 'nope'")

    # Anything else closes the connection, saying why; each was logged once.
    for packet, why in MALFORMED_CLOSED:
        other = await joined(servers, a)
        await other.send_packet(packet)
        code, reason = await other.closed()
        assert code == 1002 and reason.startswith(f"malformed packet: {why}"), (packet, reason)
    await wait_until(lambda: len(a.manager.local_connections()) == 1, timeout=5)
    lines = [r for r in caplog.records if "malformed packet" in r.getMessage()]
    assert len(lines) == 1 + len(MALFORMED_CLOSED)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert await events_in(a, "conv") == before
    assert (await sock.call("oh_user_action", {"action": "message", "args": {}}))["ok"]


async def test_binary_attachments_are_bounded_and_must_be_binary(servers: ServerCluster) -> None:
    (a,) = await servers.start(1, server_config=ServerConfig(**NO_LIMITS, max_message_bytes=4096))
    header = '52-["oh_user_action",{"action":"upload","args":{"a":{"_placeholder":true,"num":0}'
    header += ',"b":{"_placeholder":true,"num":1}}}]'
    # A text frame where an attachment belongs.
    sock = await joined(servers, a)
    await sock.send_packet(header)
    await sock.ws.send("4hello")
    assert await sock.closed() == (1002, "malformed packet: a binary attachment was expected")
    # Attachments adding up to more than the largest message.
    sock = await joined(servers, a)
    await sock.send_packet(header)
    await sock.ws.send(b"x" * 3000)
    await sock.ws.send(b"y" * 3000)
    code, reason = await sock.closed()
    assert (code, reason) == (1002, "malformed packet: attachments larger than 4096 bytes")
    # A placeholder naming an attachment that never comes: said so, not in the library's
    # words ("list index out of range").
    sock = await joined(servers, a)
    await sock.send_packet('51-["oh_user_action",{"args":{"a":{"_placeholder":true,"num":5}}}]')
    await sock.ws.send(b"z")
    assert await sock.closed() == (
        1002,
        "malformed packet: placeholders that do not match the packet's attachments",
    )
    # A binary frame nobody announced.
    sock = await joined(servers, a)
    await sock.ws.send(b"\x00\x01")
    assert await sock.closed() == (1002, "malformed packet: not a socket.io packet")
    # A message over the limit is refused by the websocket layer before it is buffered.
    sock = await joined(servers, a)
    await sock.ws.send("42" + "x" * 5000)
    assert (await sock.closed())[0] == 1009
    await wait_until(lambda: forgotten_everywhere(a), timeout=3, what="connections forgotten")


async def test_an_engineio_session_that_never_joins_is_closed(servers: ServerCluster) -> None:
    (a,) = await servers.start(1, server_config=ServerConfig(**NO_LIMITS, handshake_timeout=0.5))
    sio = a.manager.sink.sio  # type: ignore[attr-defined]
    silent = await RawSocket.open(a.url, {"conversation_id": "conv"})
    assert await silent.closed(within=5) == (1008, "no socket.io CONNECT within 0.5s")

    # A refused CONNECT may be retried, a few times, within the same deadline.
    refused = await RawSocket.open(a.url, {"conversation_id": "conv"})
    for _ in range(3):
        answer = await refused.join("not-a-token")
        assert answer == {"message": "authentication failed: malformed token"}
    await refused.ws.send('40{"token":"x"}')
    assert await refused.closed() == (1008, "more than 3 CONNECT attempts")

    # A session that joined in time stays.
    sock = await joined(servers, a)
    await asyncio.sleep(1.0)  # twice the deadline: the condition is that nothing happens
    assert (await sock.call("oh_user_action", {"action": "message", "args": {}}))["ok"]
    await wait_until(lambda: len(sio.eio.sockets) == 1, timeout=5, what="two sessions closed")


async def test_a_connect_the_node_cannot_read_is_refused_not_closed(
    servers: ServerCluster,
) -> None:
    """A CONNECT whose payload is malformed gets the protocol's refusal (CONNECT_ERROR,
    with the reason), as any refused join: a client shows it, where a closed connection
    would have a socket.io client reconnect with the same packet. It counts as an
    attempt; a good CONNECT after it joins."""
    (a,) = await servers.start(1)
    token = servers.token("alice")
    bad = [
        ('40{"token":"' + token + '","n":NaN}', "NaN or Infinity"),
        ('40{"token":"' + token + '","settings":{"n":18446744073709551616}}', "64 bits"),
        ('40{"token":"' + token + '","settings":' + "[" * 40 + "]" * 40 + "}", "nested too"),
    ]
    for packet, why in bad:
        sock = await RawSocket.open(a.url, {"conversation_id": "conv"})
        await sock.ws.send(packet)
        answer = await sock.recv_packet()
        assert answer.startswith("4{"), answer  # CONNECT_ERROR
        assert why in json.loads(answer[1:])["message"], answer
        assert "sid" in await sock.join(token)
        assert (await sock.call("oh_user_action", {"action": "message", "args": {}}))["ok"]
        await sock.aclose()
    # The limit on attempts counts malformed ones too.
    again = await RawSocket.open(a.url, {"conversation_id": "conv"})
    for _ in range(3):
        await again.ws.send('40{"n":NaN}')
        assert (await again.recv_packet()).startswith("4{")
    await again.ws.send('40{"n":NaN}')
    assert await again.closed() == (1008, "more than 3 CONNECT attempts")


async def test_queued_bounds_of_zero_are_no_limit(servers: ServerCluster) -> None:
    """A count of 0 is no limit, as the README says of every one: a client that reads
    nothing for a while is kept (with 0 it was dropped at its first event waiting)."""
    config = ServerConfig(**NO_LIMITS, max_queued_events=0, max_queued_bytes=0)
    (a,) = await servers.start(1, server_config=config)
    writer = await joined(servers, a)
    idle = await RawSocket.open(a.url, {"conversation_id": "conv"}, max_queue=2)
    await idle.join(servers.token("alice"))
    sio = a.manager.sink.sio  # type: ignore[attr-defined]
    action = {"action": "message", "args": {"content": "z" * 60_000}}
    most = 0
    for _ in range(80):  # about 10 MB, past the kernel's and uvicorn's buffers
        ack = await writer.call("oh_user_action", action)
        assert ack["ok"], ack
        most = max(most, *(socket.queue.qsize() for socket in sio.eio.sockets.values()))
    assert most > 0  # events did wait for it
    assert len(a.manager.local_connections()) == 2
    await idle.aclose()


@pytest.mark.parametrize(
    "bound", [{"max_queued_events": 20}, {"max_queued_bytes": 400_000}], ids=["events", "bytes"]
)
async def test_a_client_that_does_not_read_is_dropped_and_misses_nothing(
    servers: ServerCluster, bound: dict[str, int]
) -> None:
    (a,) = await servers.start(1, server_config=ServerConfig(**NO_LIMITS, **bound))
    sio = a.manager.sink.sio  # type: ignore[attr-defined]
    writer = await joined(servers, a)
    # websockets stops reading the socket once 2 messages wait: the kernel buffers fill,
    # then uvicorn's, then engine.io's queue.
    idle = await RawSocket.open(a.url, {"conversation_id": "conv"}, max_queue=2)
    await idle.join(servers.token("alice"))
    content = "z" * 60_000
    most = (0, 0)  # the most events, and bytes, that ever waited in engine.io's queues
    buffered = 0  # the most live events the node kept for a connection catching up
    # Dropped once engine.io's queue passes the bound; or, when an event out of order put
    # the connection in catch-up (its live events then wait in the node's bounded buffer,
    # not in engine.io's queue), once its replay waited app.STALLED for it to read.
    deadline = time.monotonic() + STALLED + 30
    while len(a.manager.local_connections()) == 2:
        for socket in sio.eio.sockets.values():
            waiting = [p for p in socket.queue._queue if p is not None]
            most = max(most[0], len(waiting)), max(most[1], sum(len(p.data) for p in waiting))
        for conn in a.manager.node.delivery.connections:
            buffered = max(buffered, len(conn.buffer))
        ack = await writer.call(
            "oh_user_action", {"action": "message", "args": {"content": content}}
        )
        assert ack["ok"], ack
        assert time.monotonic() < deadline, "the client that does not read was never dropped"
    last = ack["id"]
    assert buffered <= BUFFERED, buffered
    # Dropped without a close frame: it would wait behind everything the client did not
    # read. The connection is gone from the node and from Redis.
    await wait_until(lambda: len(a.manager.local_connections()) == 1, timeout=5)
    assert (await idle.closed(within=30))[0] == 1006
    # What waited for it stayed within the bound (and one event of 60 KB).
    assert most[0] <= bound.get("max_queued_events", 2_000) + 1, most
    assert most[1] <= bound.get("max_queued_bytes", 2 * 1024 * 1024) + 61_000, most
    # Reconnecting, it gets everything from the log.
    again = await RawSocket.open(a.url, {"conversation_id": "conv", "latest_event_id": 0})
    await again.join(servers.token("alice"))
    ids = [_event_id(packet) for packet in again.early]  # the replay precedes CONNECT
    while not ids or ids[-1] < last:
        packet = await again.recv_packet()
        ids.append(_event_id(packet))
    assert ids == list(range(1, len(ids) + 1)) and ids[-1] >= last  # gap-free, all there


async def test_events_keep_their_order_written_at_once_or_queued_behind_a_slow_reader(
    servers: ServerCluster,
) -> None:
    """A message goes straight to the client's websocket while nothing of it waits in
    engine.io's queue, and through the queue once the client stops reading (its buffers
    full); never one ahead of another: the client reads every event once, in order."""
    (a,) = await servers.start(1, server_config=ServerConfig(**NO_LIMITS))
    sio = a.manager.sink.sio  # type: ignore[attr-defined]
    writer = await joined(servers, a)
    slow = await RawSocket.open(a.url, {"conversation_id": "conv"}, max_queue=2)
    await slow.join(servers.token("alice"))
    at_once = sio.written_at_once
    content = "q" * 30_000
    queued = 0  # the most messages ever waiting in the slow client's queue
    last, sent = 0, 0
    while queued < 5 or sent < 10:
        ack = await writer.call(
            "oh_user_action", {"action": "message", "args": {"content": content}}
        )
        assert ack["ok"], ack
        last, sent = ack["id"], sent + 1
        assert sent < 1_000, "the slow client's messages never waited in engine.io's queue"
        socket = sio.eio.sockets[sio.manager.eio_sid_from_sid(slow.sid, "/")]
        queued = max(queued, sum(p is not None for p in socket.queue._queue))
    assert sio.written_at_once > at_once
    # It reads again while more events come: written at once again only after what
    # waited in the queue.
    ids = [_event_id(packet) for packet in slow.early]

    async def read_until(target: int) -> None:
        while not ids or ids[-1] < target:
            ids.append(_event_id(await slow.recv_packet()))

    reading = asyncio.ensure_future(read_until(10**9))
    for _ in range(30):
        ack = await writer.call("oh_user_action", {"action": "message", "args": {"content": "x"}})
        assert ack["ok"], ack
        last = ack["id"]
        await asyncio.sleep(0.01)
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)
    await read_until(last)
    assert ids == list(range(ids[0], ids[0] + len(ids))), ids  # in order, none twice
    assert ids[0] <= 2 and ids[-1] >= last


def _event_id(packet: str) -> int:
    import json

    name, event = json.loads(packet[1:])
    assert name == "oh_event"
    return int(event["id"])


async def test_events_before_joining_and_unexpected_acks(servers: ServerCluster) -> None:
    (a,) = await servers.start(1)
    sock = await RawSocket.open(a.url, {"conversation_id": "conv"})
    await sock.send_packet("2" + ACTION)
    assert await sock.closed() == (1002, "malformed packet: an event before a successful CONNECT")
    sock = await joined(servers, a)
    await sock.send_packet('37["whatever"]')  # an ack nobody asked for: dropped
    assert (await sock.call("oh_user_action", {"action": "message", "args": {}}))["ok"]


async def test_the_action_handler_takes_one_argument(servers: ServerCluster) -> None:
    (a,) = await servers.start(1)
    sock = await joined(servers, a)
    answers: list[Any] = [
        await sock.call("oh_user_action"),
        await sock.call("oh_user_action", {"action": "message"}, "extra"),
    ]
    assert (
        answers
        == [
            {"ok": False, "error": "oh_user_action takes one argument, the action"},
        ]
        * 2
    )


async def test_reserved_fields_of_an_action_are_refused(servers: ServerCluster) -> None:
    (a,) = await servers.start(1, server_config=ServerConfig(**NO_LIMITS))
    sock = await joined(servers, a)
    for field in ("status", "status_update", "observation"):
        ack = await sock.call("oh_user_action", {"action": "message", field: "x"})
        assert ack == {
            "ok": False,
            "error": f"'{field}' is reserved for the server's events; remove it",
        }
    # id, source and timestamp are the server's to set: a client's are replaced.
    ack = await sock.call(
        "oh_user_action", {"action": "message", "id": 99, "source": "agent", "timestamp": "x"}
    )
    assert ack["ok"] and ack["id"] == 1
    event = (await a.manager.events("conv"))[0]
    assert (event["id"], event["source"]) == (1, "user") and event["timestamp"] != "x"


async def test_rate_of_frames_of_one_connection_is_bounded(servers: ServerCluster) -> None:
    config = ServerConfig(**{**NO_LIMITS, "actions_per_connection": Rate(1, 1)})
    assert config.frames_per_connection == Rate(12, 22)
    (a,) = await servers.start(1, server_config=config)
    sock = await joined(servers, a)
    for _ in range(40):
        await sock.ws.send("3")  # engine.io pongs nobody asked for: cheap, still counted
    code, reason = await sock.closed()
    assert code == 1008 and reason.startswith("too many messages (limit 12/s (burst 22))")


async def test_a_session_refused_for_a_limit_ends_and_its_websocket_closes(
    servers: ServerCluster,
) -> None:
    """Refused for a limit, a session has nothing left to try: engine.io ends it after
    the refusal (CLOSE), and the websocket is closed even if the client keeps it."""
    config = ServerConfig(**{**NO_LIMITS, "joins_per_user": Rate(0.01, 1)})
    (a,) = await servers.start(1, server_config=config)
    await joined(servers, a)
    sock = await RawSocket.open(a.url, {"conversation_id": "conv"})
    answer = await sock.join(servers.token("alice"))
    assert answer["message"].startswith("rate limit: too many joins per user")
    assert answer["data"]["retry_after"] > 0
    assert await sock.ws.recv() == "1"  # engine.io's CLOSE, after the refusal
    assert await sock.closed() == (1000, "session closed")


async def _raw_websocket(node: NodeServer, rcvbuf: int = 4096) -> tuple[Any, Any]:
    """A raw TCP websocket to the node's socket.io path, for frames no websocket library
    sends (a small receive buffer: what the node writes backs up at once)."""
    sock = tcp.socket(tcp.AF_INET, tcp.SOCK_STREAM)
    sock.setsockopt(tcp.SOL_SOCKET, tcp.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", node.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{node.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def _pings(n: int) -> bytes:
    """``n`` masked websocket pings of 125 bytes each (the most a control frame holds)."""
    mask = b"\x01\x02\x03\x04"
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"p" * 125))
    return (b"\x89\xfd" + mask + payload) * n


def _websocket_protocols() -> list[CoalescingSansIOProtocol]:
    return [o for o in gc.get_objects() if type(o) is CoalescingSansIOProtocol]


async def test_pings_whose_pongs_are_never_read_hold_no_memory(servers: ServerCluster) -> None:
    """A peer that floods websocket pings and reads nothing: websockets queued a pong
    for each, and uvicorn read on whatever the app did, so the pongs piled up in the
    node's write buffer (1.2 GB in 40 s from one user's four sockets, the other users'
    round trips 70-600 times slower). Now a pong is written only while the peer reads."""
    (a,) = await servers.start(1)  # no rate limits: the write buffer's bound alone
    _, writer = await _raw_websocket(a)
    try:
        for _ in range(16):  # 16 MB of pings, past what the kernel's buffers take
            writer.write(_pings(8000))
            await writer.drain()
        await asyncio.sleep(0.5)  # the node reads what is left
        mine = writer.get_extra_info("sockname")
        (protocol,) = [
            p for p in _websocket_protocols() if p.transport.get_extra_info("peername") == mine
        ]
        waiting = protocol.transport.get_write_buffer_size()
        assert waiting < 1 << 20, waiting  # 64 KiB and one read's pongs at most
    finally:
        writer.transport.abort()


async def test_a_ping_flood_counts_as_messages_and_is_dropped(
    servers: ServerCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Pings count with the connection's messages (its frame rate): a flood of them
    drops the connection, said once in the log."""
    caplog.set_level(logging.INFO, logger="coordinator.edge")
    (a,) = await servers.start(1, server_config=ServerConfig())
    reader, writer = await _raw_websocket(a, rcvbuf=1 << 20)
    try:
        writer.write(_pings(2000))
        await writer.drain()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            while True:  # pongs for the burst, then the end
                await asyncio.wait_for(reader.readexactly(1 << 16), 10)
        assert "too many pings" in caplog.text
    finally:
        writer.transport.abort()


async def test_a_text_message_that_is_not_utf8_closes_with_a_line_not_a_traceback(
    servers: ServerCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn logged a traceback at ERROR for each (any client, no token, one per
    connection); now a line at INFO, throttled as the other malformed input's."""
    caplog.set_level(logging.INFO)
    (a,) = await servers.start(1)
    mask = b"\x01\x02\x03\x04"
    frame = b"\x81\x82" + mask + bytes(b ^ mask[i] for i, b in enumerate(b"\xff\xfe"))
    for _ in range(30):
        reader, writer = await _raw_websocket(a, rcvbuf=1 << 16)
        try:
            writer.write(frame)
            await writer.drain()
            # engine.io's OPEN (a text frame), then the close and the end.
            rest = await asyncio.wait_for(reader.read(), 10)
            close = rest[rest.rindex(b"\x88") :]
            assert int.from_bytes(close[2:4], "big") == 1007, close
        finally:
            writer.transport.abort()
    assert "Traceback" not in caplog.text and "Invalid UTF-8" not in caplog.text
    lines = [r for r in caplog.records if "is not UTF-8" in r.getMessage()]
    assert 1 <= len(lines) <= 21


async def test_a_peer_that_reads_nothing_is_dropped_after_its_1007_close(
    servers: ServerCluster,
) -> None:
    """A close waits for the write buffer to drain: a peer that sends a text message that
    is not UTF-8 and reads nothing would hold its connection, and its place, for good.
    The close is aborted after the connection's close_timeout."""
    (a,) = await servers.start(1)
    _, writer = await _raw_websocket(a)
    try:
        mine = writer.get_extra_info("sockname")
        (protocol,) = [
            p for p in _websocket_protocols() if p.transport.get_extra_info("peername") == mine
        ]
        # One ping a read (the pongs of one read are answered by its last) until the
        # kernel's buffers are full and the node's pongs wait in the node.
        protocol.transport.get_extra_info("socket").setsockopt(tcp.SOL_SOCKET, tcp.SO_SNDBUF, 4096)
        for _ in range(20_000):
            if protocol.transport.get_write_buffer_size() > 0:
                break
            writer.write(_pings(1))
            await asyncio.sleep(0.001)
        assert protocol.transport.get_write_buffer_size() > 0
        protocol.close_timeout = 0.5  # uvicorn's is 10 s
        mask = b"\x01\x02\x03\x04"
        writer.write(b"\x81\x82" + mask + bytes(b ^ mask[i] for i, b in enumerate(b"\xff\xfe")))
        await writer.drain()
        await wait_until(lambda: protocol.disconnected, what="connection dropped")
    finally:
        writer.transport.abort()


async def test_the_latest_ping_is_answered_once_its_peer_reads_again(
    servers: ServerCluster,
) -> None:
    """While a peer reads behind, only its latest ping's pong is kept, and written once
    it has read what waited: a client's websocket keepalive (python websockets, aiohttp)
    is answered after a long replay instead of timing out on a dropped pong."""
    (a,) = await servers.start(1)
    reader, writer = await _raw_websocket(a)
    try:
        for _ in range(16):  # more than the kernel's buffers take: the node's backs up
            writer.write(_pings(8000))
            await writer.drain()
        mask = b"\x01\x02\x03\x04"
        writer.write(b"\x89\x84" + mask + bytes(b ^ mask[i] for i, b in enumerate(b"last")))
        await writer.drain()
        seen = b""
        async with asyncio.timeout(20):
            while b"\x8a\x04last" not in seen:  # a pong frame with the payload "last"
                chunk = await reader.read(1 << 16)
                assert chunk, "closed before the latest pong came"
                seen = seen[-8:] + chunk
    finally:
        writer.transport.abort()
