"""The socket.io protocol end to end: real uvicorn nodes, real Redis, python-socketio clients."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis
import socketio

from coordinator.agentworker import AgentWorker
from coordinator.auth import issue_token
from coordinator.codec import TOO_MANY_CONVERSATIONS, notice_code
from coordinator.links import Link
from coordinator.server import NodeServer
from coordinator.serverconfig import ServerConfig
from coordinator.tasks import cancel_and_wait
from coordinator.websocket import CoalescingTransport
from tests.helpers import wait_until
from tests.server_fixtures import SECRET, ServerCluster, SioClient
from workers.channel import REPLY

MESSAGE = {"action": "message", "args": {"content": "hi"}}

ACTIONS_PER_CLIENT = 550  # two clients: 1,100 actions, 2,200 events
WINDOW = 25  # actions a client has in flight at once


def message(content: str) -> dict[str, Any]:
    return {"action": "message", "args": {"content": content}}


async def event_count(servers: ServerCluster, sid: str) -> int:
    redis: aioredis.Redis = servers.nodes[0].manager.state.redis
    return int(await redis.xlen(servers.nodes[0].manager.keys.events(sid)))


async def chat(client: SioClient, prefix: str, n: int) -> list[tuple[int, str]]:
    """Send ``n`` messages keeping WINDOW in flight; returns (ack id, content) in send order."""
    acked: list[tuple[int, str]] = []
    for start in range(0, n, WINDOW):
        contents = [f"{prefix}-{i}" for i in range(start, min(n, start + WINDOW))]
        ids = await asyncio.gather(*(client.say(c) for c in contents))
        acked += zip(ids, contents, strict=True)
    return acked


async def test_two_nodes_one_conversation_every_event_in_order(servers: ServerCluster) -> None:
    a, b = await servers.start(2)
    ca = await servers.join(a, "big", "alice")
    cb = await servers.join(b, "big", "alice")
    sent_a, sent_b = await asyncio.gather(
        chat(ca, "a", ACTIONS_PER_CLIENT), chat(cb, "b", ACTIONS_PER_CLIENT)
    )
    total = 4 * ACTIONS_PER_CLIENT  # every action and its echo
    await asyncio.gather(ca.wait_ids(total, within=60), cb.wait_ids(total, within=60))

    # One history, identical on both nodes: gap-free, no duplicate, nothing lost.
    assert ca.ids == list(range(1, total + 1))
    assert ca.events == cb.events
    acked = dict(sent_a + sent_b)
    assert len(acked) == 2 * ACTIONS_PER_CLIENT  # every ack id distinct
    users = [e for e in ca.events if e["source"] == "user"]
    replies = [e for e in ca.events if e["source"] == "agent"]
    assert {e["id"]: e["args"]["content"] for e in users} == acked
    # Each action got exactly one echo, in the order the actions were logged.
    assert [e["args"]["content"] for e in replies] == [e["args"]["content"] for e in users]
    for user_event, reply in zip(users, replies, strict=True):
        assert reply["id"] > user_event["id"]
    # A client's windows are sent one after another: their ids go up.
    for sent in (sent_a, sent_b):
        for prev, nxt in zip(sent[:-WINDOW], sent[WINDOW:], strict=True):
            assert nxt[0] > prev[0]
    assert await event_count(servers, "big") == total
    # The loop ran on exactly one node.
    assert len(a.manager.local_loops() | b.manager.local_loops()) == 1


async def test_reconnect_to_another_node_replays_exactly_the_missed_events(
    servers: ServerCluster,
) -> None:
    a, b, c = await servers.start(3)
    writer = await servers.join(a, "replay", "alice")
    reader = await servers.join(b, "replay", "alice")
    for i in range(3):
        await writer.say(f"before-{i}")
    await reader.wait_ids(6)
    seen = reader.ids[-1]
    await reader.close()

    for i in range(4):
        await writer.say(f"missed-{i}")
    await writer.wait_ids(14)

    back = await servers.join(c, "replay", "alice", latest_event_id=seen)
    await back.wait_ids(14)
    assert back.ids == list(range(seen + 1, 15))
    assert back.events == writer.events[seen:14]
    for i in range(3):
        await writer.say(f"live-{i}")
    await back.wait_ids(20)
    await writer.wait_ids(20)
    assert back.ids == list(range(seen + 1, 21))
    assert back.events == writer.events[seen:]

    # -1 and an absent latest_event_id both replay the whole conversation.
    for latest in (-1, None):
        full = await servers.join(b, "replay", "alice", latest_event_id=latest)
        await full.wait_ids(20)
        assert full.events == writer.events
        await full.close()


async def test_another_user_cannot_join_send_list_or_close(servers: ServerCluster) -> None:
    a, b = await servers.start(2)
    owner = await servers.join(a, "private", "alice")
    await owner.say("secret plan")
    await owner.wait_ids(2)
    before = await event_count(servers, "private")

    intruder = servers.client("mallory")
    why = await intruder.refused(b.url, "private", servers.token("mallory"))
    assert why == "forbidden: conversation 'private' belongs to another user"
    assert not intruder.connected
    # Same node as the owner's loop: refused too.
    why = await servers.client("mallory2").refused(a.url, "private", servers.token("mallory"))
    assert "belongs to another user" in why

    status, body = await servers.request("GET", b, "/api/conversations", user="mallory")
    assert (status, body) == (200, {"conversations": [], "next_page_id": None})
    # Another user's conversation answers exactly like one that does not exist.
    for method, node in (("DELETE", b), ("GET", a)):
        answer = await servers.request(method, node, "/api/conversations/private", user="mallory")
        missing = await servers.request(method, node, "/api/conversations/nothing", user="mallory")
        assert answer[0] == missing[0] == 404
        assert answer[1] == {"error": "no such conversation: 'private'"}
        assert missing[1] == {"error": "no such conversation: 'nothing'"}
    status, body = await servers.request(
        "POST",
        b,
        "/api/conversations",
        user="mallory",
        json={"conversation_id": "private", "initial_user_msg": "hi"},
    )
    assert status == 403

    assert await event_count(servers, "private") == before
    assert await a.manager.is_agent_loop_running("private")
    status, body = await servers.request("GET", b, "/api/conversations", user="alice")
    assert [c["conversation_id"] for c in body["conversations"]] == ["private"]
    assert owner.ids == [1, 2]


async def test_bad_connects_are_refused_with_a_reason_and_change_nothing(
    servers: ServerCluster,
) -> None:
    (a,) = await servers.start(1)
    owner = await servers.join(a, "conv", "alice")
    await owner.say("hello")
    await owner.wait_ids(2)
    good = servers.token("alice")
    forged = issue_token("alice", "not-the-secret")
    body, _, sig = good.partition(".")
    other_body = issue_token("mallory", "x").partition(".")[0]
    cases: list[tuple[tuple[Any, ...], dict[str, Any], str]] = [
        ((a.url, "conv", None), {}, "authentication failed: missing token"),
        ((a.url, "conv", forged), {}, "authentication failed: bad token signature"),
        ((a.url, "conv", f"{other_body}.{sig}"), {}, "bad token signature"),
        ((a.url, "conv", "garbage"), {}, "authentication failed: malformed token"),
        # JSON may carry what no JWT holds: a lone surrogate, a character past ASCII.
        ((a.url, "conv", f"{body}.\ud800"), {}, "authentication failed: malformed token"),
        ((a.url, "conv", f"{body}.\u00e9"), {}, "authentication failed: malformed token"),
        ((a.url, "conv", forged), {"token_in_query": True}, "bad token signature"),
        ((a.url, "no spaces!", good), {}, "invalid conversation id 'no spaces!'"),
        ((a.url, "x" * 129, good), {}, "invalid conversation id"),
        ((a.url, None, good), {}, "the conversation_id query parameter is required"),
        ((a.url, "conv", good, "ten"), {}, "latest_event_id (-1 for everything) must be an"),
        ((a.url, "conv", good, "-7"), {}, "must be from -1 to 9223372036854775807, got -7"),
        ((a.url, "conv", good, str(2**63)), {}, "must be from -1 to 9223372036854775807"),
        ((a.url, "conv", good, "\u0663"), {}, "must be an integer, got '\u0663'"),
    ]
    for args, kwargs, expected in cases:
        why = await servers.client().refused(*args, **kwargs)
        assert expected in why, (args, why)
    # An expired token says so plainly.
    expired = issue_token("alice", SECRET, 1, now=0)
    why = await servers.client().refused(a.url, "conv", expired)
    assert why == "authentication failed: token expired"
    # A query parameter given twice: which one counts is not guessed.
    for name, query, auth in [
        ("conversation_id", "conversation_id=a1&conversation_id=conv", {"token": good}),
        ("token", f"conversation_id=c&token={good}&token=x", None),
        ("latest_event_id", "conversation_id=c&latest_event_id=0&latest_event_id=9", None),
    ]:
        twice = servers.client()
        with pytest.raises(socketio.exceptions.ConnectionError):
            url = f"{a.url}?{query}" + ("" if auth or name == "token" else f"&token={good}")
            await twice.sio.connect(url, transports=["websocket"], wait_timeout=10, auth=auth)
        assert twice.refusal["message"] == f"{name} is given 2 times; give it once"

    assert await event_count(servers, "conv") == 2
    assert await a.manager.conversation("no-such") == {}
    assert list(a.manager.local_connections()) == [owner.sio.get_sid()]
    status, body = await servers.request("GET", a, "/api/conversations", user="alice")
    assert status == 200
    assert [c["conversation_id"] for c in body["conversations"]] == ["conv"]

    # The token may also come as a query parameter.
    via_query = servers.client()
    await via_query.connect(a.url, "conv", good, token_in_query=True)
    await via_query.wait_ids(2)


async def test_bad_actions_get_a_clear_ack_error_and_change_nothing(
    servers: ServerCluster,
) -> None:
    (a,) = await servers.start(1)
    client = await servers.join(a, "conv", "alice")
    await client.say("hello")
    await client.wait_ids(2)
    bad: list[tuple[Any, str]] = [
        ("just a string", "an action must be an object, got str"),
        ([1, 2], "an action must be an object, got list"),
        ({"args": {}}, "an action needs a non-empty string 'action' field"),
        ({"action": "message", "args": "x"}, "an action's 'args' must be an object"),
        (message("x" * 100_000), "bytes; the limit is 65536"),
        ({**message("x"), "client_action_id": 7}, "'client_action_id' must be a printable"),
        ({**message("x"), "client_action_id": ""}, "1 to 64 characters"),
        ({**message("x"), "client_action_id": "k" * 65}, "1 to 64 characters"),
        ({**message("x"), "client_action_id": "a\nb"}, "printable"),
    ]
    for data, expected in bad:
        ack = await client.act(data)
        assert ack["ok"] is False and expected in ack["error"], ack
        assert "Traceback" not in ack["error"]
    assert await event_count(servers, "conv") == 2

    # Above the socket.io message limit (1 MB) the server drops the connection.
    huge = servers.client("huge")
    await huge.connect(a.url, "conv", servers.token("alice"))
    await huge.wait_ids(2)
    await huge.sio.emit("oh_user_action", message("y" * 1_200_000))
    await wait_until(lambda: not huge.connected, timeout=10, what="oversize client dropped")
    await wait_until(
        lambda: len(a.manager.local_connections()) == 1, timeout=10, what="connection forgotten"
    )
    assert await event_count(servers, "conv") == 2

    # The well-behaved client is unaffected.
    assert await client.say("still here") == 3
    await client.wait_ids(4)


async def test_an_action_sent_again_with_its_client_action_id_is_logged_and_answered_once(
    servers: ServerCluster,
) -> None:
    """A client that lost an acknowledgement sends the action again with the same
    client_action_id, through another node: it gets the first event id back, and the
    action is logged and answered once. Another id is another action."""
    a, b = await servers.start(2)
    ca = await servers.join(a, "idem", "alice")
    cb = await servers.join(b, "idem", "alice")
    first = await ca.act({**message("once"), "client_action_id": "k-1"})
    again = await cb.act({**message("once"), "client_action_id": "k-1"})
    other = await cb.act({**message("twice"), "client_action_id": "k-2"})
    assert first["ok"] and again == first, (first, again)
    assert other["ok"] and other["id"] != first["id"]
    await ca.wait_ids(4)
    contents = [(e["source"], e["args"]["content"]) for e in ca.events]
    assert sorted(contents) == sorted(
        [("user", "once"), ("agent", "once"), ("user", "twice"), ("agent", "twice")]
    )
    logged = next(e for e in ca.events if e["id"] == first["id"])
    assert logged["client_action_id"] == "k-1"  # kept in the log, for the client
    # A second copy would have been logged before its acknowledgement came back.
    assert await event_count(servers, "idem") == 4


async def test_a_node_says_it_drains_while_it_drains(servers: ServerCluster) -> None:
    """A real drain (what SIGTERM runs), made to last by an agent that is slow to close:
    /healthz says draining, joins and creates are refused as draining (503), never "the
    manager is not running" (/healthz's 'degraded', a 500 with a stack trace, joins
    refused as 'error': the manager let go of its node before draining it); once
    stopped, a request is a 503 too."""
    (a,) = await servers.start(1, agent="tests.agents:SlowCloseAgent", drain_timeout=3.0)
    client = await servers.join(a, "busy", "alice")
    assert await client.say("hi") == 1
    draining = asyncio.ensure_future(a.manager.drain())
    try:
        await wait_until(lambda: a.manager.draining, what="the drain begun")
        status, body = await servers.request("GET", a, "/healthz")
        assert status == 503 and body["status"] == "draining" and body["draining"] is True
        assert body["registered"] is True
        status, body = await servers.request(
            "POST", a, "/api/conversations", user="alice", json={"conversation_id": "new"}
        )
        assert status == 503 and "draining" in body["error"], body
        why = await servers.client().refused(a.url, "other", servers.token("alice"))
        assert "draining" in why
        assert not draining.done()  # all of it while the drain waited on the agent
    finally:
        await draining
    status, body = await servers.request("GET", a, "/api/conversations", user="alice")
    assert status == 503 and body["error"] == "this node is shutting down; try another node"


async def test_draining_node_refuses_connections(servers: ServerCluster) -> None:
    a, b = await servers.start(2)
    b.manager.node.intake.draining = True  # what a graceful stop sets first
    try:
        why = await servers.client().refused(b.url, "conv", servers.token("alice"))
        assert "draining" in why
        status, body = await servers.request(
            "POST", b, "/api/conversations", user="alice", json={"conversation_id": "conv"}
        )
        assert status == 503 and "draining" in body["error"]
        status, body = await servers.request("GET", b, "/healthz")
        assert status == 503 and body["draining"] is True and body["status"] == "draining"
        assert await a.manager.conversation("conv") == {}
    finally:
        b.manager.node.intake.draining = False
    client = await servers.join(a, "conv", "alice")
    assert await client.say("hi") == 1
    # A connection the drain's farewell forgot, its disconnect still on the way: its
    # action is told to go elsewhere, not that its connection "is not joined".
    a.manager.node.intake.draining = True
    try:
        (cid,) = a.manager.local_connections()
        await a.manager.disconnect_from_session(cid)  # as the farewell does
        ack = await client.act({"action": "message", "args": {"content": "late"}})
        assert ack["ok"] is False and "is shutting down; reconnect" in ack["error"], ack
        assert cid not in ack["error"]
    finally:
        a.manager.node.intake.draining = False


async def test_cap_and_single_activation_hold_for_starts_through_the_server(
    servers: ServerCluster,
) -> None:
    nodes = await servers.start(3, max_concurrent_conversations=2)
    sids = [f"cap{i}" for i in range(8)]
    violations: list[str] = []
    samples = [0]

    def snapshot() -> None:
        # All nodes live in this event loop: reading them back to back is one instant.
        seen: dict[str, str] = {}
        for node in nodes:
            for sid in node.manager.local_loops():
                if sid in seen:
                    violations.append(f"{sid} on {seen[sid]} and {node.node_id}")
                seen[sid] = node.node_id
        samples[0] += 1
        if len(seen) > 2:
            violations.append(f"{len(seen)} loops at once: {sorted(seen)}")

    async def watch() -> None:
        while True:
            snapshot()
            await asyncio.sleep(0)

    async def start_one(i: int, sid: str) -> None:
        node = nodes[i % len(nodes)]
        if i % 2:
            client = servers.client(f"carol@{node.node_id}")
            try:
                await client.connect(node.url, sid, servers.token("carol"))
            except socketio.exceptions.ConnectionError:
                # Evicted while it joined: told why, then refused (not left connected).
                assert "was closed while joining" in str(client.refusal), client.refusal
        else:
            status, body = await servers.request(
                "POST", node, "/api/conversations", user="carol", json={"conversation_id": sid}
            )
            assert status in (200, 201), body

    watcher = asyncio.create_task(watch())
    try:
        # Every conversation started twice at once, through different nodes.
        await asyncio.gather(
            *(start_one(i, sid) for i, sid in enumerate(sids)),
            *(start_one(i + 1, sid) for i, sid in enumerate(sids)),
        )
    finally:
        await cancel_and_wait([watcher], within=5)
    assert not violations, violations[:5]

    async def per_node() -> dict[str, list[str]]:
        out = {}
        for node in nodes:
            status, body = await servers.request("GET", node, "/api/node", user="carol")
            assert status == 200
            out[node.node_id] = body["loops"]
        return out

    async def settled() -> bool:
        running = await nodes[0].manager.get_running_agent_loops("carol")
        return len(running) <= 2

    await wait_until(settled, timeout=20, what="cap of 2 running loops")
    loops = await per_node()
    everywhere = [sid for sids_ in loops.values() for sid in sids_]
    assert len(everywhere) == len(set(everywhere)) <= 2, loops
    assert set(everywhere) <= set(sids)
    status, body = await servers.request("GET", nodes[0], "/api/cluster", user="carol")
    assert status == 200
    assert {k: sorted(v) for k, v in body["loops"].items()} == {
        k: sorted(v) for k, v in loops.items()
    }
    status, body = await servers.request("GET", nodes[1], "/api/conversations", user="carol")
    assert status == 200
    listed = body["conversations"]
    assert sorted(c["conversation_id"] for c in listed) == sorted(sids)
    assert sum(c["running"] for c in listed) == len(everywhere)
    for conv in listed:
        if conv["running"]:
            assert conv["conversation_id"] in loops[conv["owner"]]
        else:
            # A conversation that lost its slot tells its clients why.
            events = await nodes[0].manager.events(conv["conversation_id"])
            assert any(notice_code(e) == TOO_MANY_CONVERSATIONS for e in events), events
    print(f"running: {loops}; snapshots taken: {samples[0]}")


async def test_node_stop_disconnects_clients_and_forgets_them(servers: ServerCluster) -> None:
    a, b = await servers.start(2)
    client = await servers.join(b, "conv", "alice")
    await client.say("hi")
    await wait_until(
        lambda: a.manager.get_connections(user_id="alice"), timeout=5, what="connection visible"
    )
    await b.aclose()
    servers.nodes.remove(b)
    await wait_until(lambda: not client.connected, timeout=10, what="client disconnected")
    assert await a.manager.get_connections(user_id="alice") == {}
    assert isinstance(b, NodeServer)


async def test_an_action_with_binary_data_reaches_the_clients_as_binary(
    servers: ServerCluster,
) -> None:
    """Events go out as JSON packets without socket.io's scan for binary data; one that
    holds bytes (a client may attach them to an action) still goes out, as a binary
    packet, to every client of the conversation."""
    a, b = await servers.start(2)
    ca = await servers.join(a, "bin", "alice")
    cb = await servers.join(b, "bin", "alice")
    ack = await ca.act({"action": "upload", "args": {"name": "x", "data": b"\x00\x01\xff"}})
    assert ack["ok"] is True
    await ca.say("after")
    await asyncio.gather(ca.wait_ids(3), cb.wait_ids(3))
    for client in (ca, cb):
        upload = client.events[0]
        assert upload["id"] == ack["id"] and upload["args"]["data"] == b"\x00\x01\xff"
        assert [e["args"]["content"] for e in client.events[1:]] == ["after", "after"]
    # REST's JSON has no bytes: they come in base64 (before, the page was a 500).
    status, page = await servers.request("GET", b, "/api/conversations/bin/events", user="alice")
    assert status == 200 and page["events"][0]["args"]["data"] == {"base64": "AAH/"}


@pytest.fixture
def writes(monkeypatch: Any) -> list[tuple[str, Any]]:
    """Every write of this process's nodes, in order: ("client", bytes) for a client's
    socket (once per loop iteration), ("redis", bytes) on a link, ("worker", message) to
    an agent worker."""
    made: list[tuple[str, Any]] = []
    flush, send_all, send = CoalescingTransport.flush, Link.send_all, AgentWorker.send

    def client(self: CoalescingTransport) -> None:
        made.append(("client", b"".join(getattr(self, "_pending"))))  # noqa: B009
        flush(self)

    def redis(self: Link, commands: Any, timeout: float) -> Any:
        made.append(("redis", b"".join(commands)))
        return send_all(self, commands, timeout)

    def worker(self: AgentWorker, message: list[Any]) -> None:
        made.append(("worker", message))
        send(self, message)

    monkeypatch.setattr(CoalescingTransport, "flush", client)
    monkeypatch.setattr(Link, "send_all", redis)
    monkeypatch.setattr(AgentWorker, "send", worker)
    return made


@pytest.mark.parametrize("isolation", ["none", "process"])
async def test_an_agents_answer_is_written_to_the_client_before_the_agent_goes_on(
    servers: ServerCluster, writes: list[tuple[str, Any]], isolation: str
) -> None:
    """An agent that answers and returns at once: its answer's frame is written to the
    client's socket before the node's next write for that agent, which is, in the node's
    process, the commit of the state the agent ended in (``awaiting_user_input``), and
    for an agent in a worker, the emit's reply that lets it go on. Frames to a client are
    written when the loop iteration ends; those writes, made in the same step, went first
    (the client waited for the closing commit's packing and writing, or for the write
    that wakes the worker)."""
    (node,) = await servers.start(1, agent_isolation=isolation, agent_state_events=True)
    client = await servers.join(node, "order", "alice")
    await client.wait_ids(1)  # the state the agent's start left it in
    for round_ in range(3):
        writes.clear()
        content = f"answer-{round_}"
        asked = await client.say(content)  # acked: its events may not be here yet
        await client.wait_for(
            lambda asked=asked: any(  # not the last round's closing state
                e["id"] > asked and e.get("extras", {}).get("agent_state") == "awaiting_user_input"
                for e in client.events
            ),
            "this round's closing state",
        )
        answer = next(
            i
            for i, (to, data) in enumerate(writes)
            if to == "client" and b'"source":"agent"' in data and content.encode() in data
        )
        if isolation == "none":
            after = next(
                i
                for i, (to, data) in enumerate(writes)
                if to == "redis" and b"awaiting_user_input" in data
            )
        else:
            after = next(
                i for i, (to, data) in enumerate(writes) if to == "worker" and data[0] == REPLY
            )
        assert answer < after, [(to, data[:60]) for to, data in writes]


async def test_a_connection_ends_when_its_token_expires(
    servers: ServerCluster, redis_client: aioredis.Redis
) -> None:
    """A token is checked at connect; the connection ends at its ``exp`` (a user whose
    access was withdrawn keeps no socket open for the token's remaining days): the
    client is told STATUS$TOKEN_EXPIRED and disconnected by the server, no action is
    accepted after ``exp``, and a connection whose token lives on is not touched."""
    (a,) = await servers.start(1)
    short = issue_token("alice", SECRET, 3)
    exp = jwt.decode(short, options={"verify_signature": False})["exp"]
    ending = servers.client("ending")
    await ending.connect(a.url, "expiring", short)
    staying = await servers.join(a, "expiring", "alice")

    acks = []
    while ending.connected:  # actions across the token's expiry, one every 20 ms
        sent = time.time()
        with contextlib.suppress(
            socketio.exceptions.TimeoutError, socketio.exceptions.BadNamespaceError
        ):
            acks.append((sent, await ending.sio.call("oh_user_action", MESSAGE, timeout=5)))
        await asyncio.sleep(0.02)
        assert time.time() < exp + 10, "still connected 10 s after its token expired"
    refused = [ack for _, ack in acks if not ack["ok"]]
    assert {ack["error"] for ack in refused} <= {
        "authentication failed: token expired; reconnect with a fresh token"
    }
    accepted = [(sent, ack["id"]) for sent, ack in acks if ack["ok"]]
    assert accepted
    # Accepted only if checked before exp: sent before it (one clock, one machine).
    assert all(sent < exp for sent, _ in accepted), [s - exp for s, _ in accepted]
    await staying.wait_ids(max(n for _, n in accepted) + 1)

    (update,) = ending.updates
    assert update["id"] == "STATUS$TOKEN_EXPIRED"
    assert ending.disconnects == ["server disconnect"], ending.disconnects
    await wait_until(
        lambda: _connections(redis_client, "expiring", 1), what="its connection gone from Redis"
    )
    assert staying.connected
    assert (await staying.act(MESSAGE))["ok"]
    _, text = await servers.request("GET", a, "/metrics")
    assert 'coordinator_tokens_expired_total{node="n1"} 1\n' in text, text


async def _connections(redis_client: aioredis.Redis, sid: str, n: int) -> bool:
    return await redis_client.hlen(f"coord:{{c:{sid}}}:conns") == n


async def test_an_action_after_the_manager_stopped_is_told_to_reconnect(
    servers: ServerCluster,
) -> None:
    """A drain that runs out of time stops the manager while its clients are still
    connected: an action then got the Python API's "the manager is not started (use
    'async with')"; it is told the node shuts down, to send it again elsewhere."""
    (a,) = await servers.start(1, server_config=ServerConfig())  # limits asked of Redis
    alice = await servers.join(a, "late", "alice")
    await a.manager.aclose()
    for _ in range(3):
        ack = await alice.act(MESSAGE)
        assert ack == {
            "ok": False,
            "error": "node n1 is shutting down; reconnect and send it again",
        }, ack
    status, body = await servers.request("GET", a, "/api/conversations", user="alice")
    assert (status, body["error"]) == (503, "this node is shutting down; try another node")
