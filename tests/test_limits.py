"""Rate limits and quotas: what one user (or connection) may take from a node or the
cluster. Over a limit a client gets a reason and a wait, never a silent disconnect, and
nothing it was refused reaches Redis. Real uvicorn nodes, real Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from coordinator.errors import LimitExceeded
from coordinator.ratelimit import Rate, TokenBucket, UserAllowance
from coordinator.serverconfig import NO_LIMITS, ServerConfig
from tests.helpers import wait_until
from tests.rawsocket import RawSocket
from tests.server_fixtures import ServerCluster


def limits(**changes: Any) -> ServerConfig:
    return ServerConfig(**{**NO_LIMITS, **changes})


def message(i: int) -> dict[str, Any]:
    return {"action": "message", "args": {"content": f"m{i}"}}


def test_token_bucket_refills_continuously() -> None:
    bucket = TokenBucket(Rate(2, 3), now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == 0.5  # the next token in half a second
    assert bucket.take(0.5) == 0.0
    assert bucket.take(10.0) == 0.0  # refilled to the burst, not beyond
    assert [bucket.take(10.0) for _ in range(3)] == [0.0, 0.0, 0.5]
    assert Rate.parse("20") == Rate(20, 40) and Rate.parse("0.5:10") == Rate(0.5, 10)
    assert Rate.parse("off").unlimited and TokenBucket(Rate.parse("0"), 0).take(0, 1e9) == 0


async def test_actions_per_connection(servers: ServerCluster) -> None:
    (a,) = await servers.start(1, server_config=limits(actions_per_connection=Rate(1, 5)))
    client = await servers.join(a, "conv", "alice")
    acks = [await client.act(message(i)) for i in range(8)]
    assert [ack["ok"] for ack in acks] == [True] * 5 + [False] * 3
    for ack in acks[5:]:
        assert ack["error"].startswith("rate limit: too many actions per connection")
        assert 0 < ack["retry_after"] <= 1.0
    assert client.connected
    await client.wait_ids(10)
    assert len(await a.manager.events("conv")) == 10  # 5 actions, 5 echoes: no more
    # Another connection of the same user has its own bucket.
    other = await servers.join(a, "conv", "alice")
    assert (await other.act(message(9)))["ok"]


async def test_actions_per_user_hold_across_nodes(servers: ServerCluster) -> None:
    a, b = await servers.start(2, server_config=limits(actions_per_user=Rate(0.5, 6)))
    ca = await servers.join(a, "conv", "alice")
    cb = await servers.join(b, "conv", "alice")
    started = time.monotonic()
    acks = await asyncio.gather(*(c.act(message(i)) for i in range(8) for c in (ca, cb)))
    elapsed = time.monotonic() - started
    accepted = [ack for ack in acks if ack["ok"]]
    # The burst, plus what refilled meanwhile (0.5 a second), over both nodes together.
    assert 6 <= len(accepted) <= 6 + int(elapsed * 0.5) + 1, (len(accepted), elapsed)
    refused = [ack for ack in acks if not ack["ok"]]
    assert refused and all("actions per user" in r["error"] for r in refused)
    assert all(r["retry_after"] > 0 for r in refused)
    # Bob is not held back by alice.
    bob = await servers.join(b, "bobs", "bob")
    assert (await bob.act(message(0)))["ok"]


async def test_bytes_of_actions_per_user(servers: ServerCluster) -> None:
    (a,) = await servers.start(1, server_config=limits(action_bytes_per_user=Rate(5_000, 25_000)))
    client = await servers.join(a, "conv", "alice")
    big = {"action": "message", "args": {"content": "x" * 8_000}}
    acks = [await client.act(big) for _ in range(4)]
    assert [ack["ok"] for ack in acks] == [True, True, True, False]
    assert acks[3]["error"].startswith(
        "rate limit: too many action bytes per user (limit 5,000/s (burst 25,000))"
    )
    assert 1.0 < acks[3]["retry_after"] <= 2.0  # what the 4th lacks, at 5,000 a second
    # Small actions still pass meanwhile.
    assert (await client.act(message(1)))["ok"]
    huge = {"action": "message", "args": {"content": "x" * 30_000}}
    ack = await client.act(huge)
    assert ack == {
        "ok": False,
        "error": "too large for the limit on action bytes per user (5,000/s (burst 25,000))",
    }


async def test_a_rest_create_with_a_message_counts_against_the_users_rates(
    servers: ServerCluster,
) -> None:
    """A create's message is an action as a socket.io one is: a client re-posting an
    existing id with a message met no rate at all before (each its own first action)."""
    (a,) = await servers.start(1, server_config=limits(action_bytes_per_user=Rate(5_000, 25_000)))
    body = {"conversation_id": "r1", "initial_user_msg": "x" * 8_000}
    answers = [
        await servers.request("POST", a, "/api/conversations", user="alice", json=body)
        for _ in range(4)
    ]
    assert [status for status, _ in answers] == [201, 200, 200, 429], answers
    assert answers[3][1]["error"].startswith("rate limit: too many action bytes per user")
    # Another user's rates are their own.
    bobs = {**body, "conversation_id": "b1"}
    status, _ = await servers.request("POST", a, "/api/conversations", user="bob", json=bobs)
    assert status == 201


async def test_a_user_allowance_takes_tokens_in_batches(servers: ServerCluster) -> None:
    """A steady stream of one user's actions costs one Redis call per batch."""
    (a,) = await servers.start(1)
    calls: list[int] = []

    async def take(user: str, want: int) -> tuple[int, float]:
        calls.append(want)
        return await a.manager.state.take_tokens(user, "actions", 100, 400, want)

    allowance = UserAllowance("actions per user", Rate(100, 400), take)
    assert allowance.batch == 10
    for _ in range(100):
        await allowance.take("alice")
    assert calls == [10] * 10


async def test_joins_per_user(servers: ServerCluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="coordinator.handlers")
    (a,) = await servers.start(1, server_config=limits(joins_per_user=Rate(0.1, 3)))
    for _ in range(3):
        await servers.join(a, "conv", "alice")
    client = servers.client()
    why = await client.refused(a.url, "conv", servers.token("alice"))
    assert why.startswith("rate limit: too many joins per user (limit 0.1/s (burst 3))")
    # The log names whom to block: the address, and the user (it named neither).
    assert " from 127.0.0.1 (user 'alice') refused: rate limit: too many joins" in caplog.text
    assert 0 < client.refusal["data"]["retry_after"] <= 10
    assert len(a.manager.local_connections()) == 3
    # Refused for a limit, the session ends (after the refusal went out): it holds
    # nothing while its client waits.
    sio = a.manager.sink.sio  # type: ignore[attr-defined]
    await wait_until(lambda: len(sio.eio.sockets) == 3, timeout=5, what="the session ended")
    await servers.join(a, "bobs", "bob")  # another user's joins are their own


async def test_a_client_that_stays_after_a_limit_refusal_is_closed(servers: ServerCluster) -> None:
    """A client that keeps its session after a refusal for a limit (python-socketio's
    closes it; a raw or careless one may not) has it ended by the node a moment later."""
    (a,) = await servers.start(1, server_config=limits(joins_per_user=Rate(0.1, 1)))
    await servers.join(a, "conv", "alice")
    raw = await RawSocket.open(a.url, {"conversation_id": "conv"})
    try:
        reply = await raw.join(servers.token("alice"))
        assert "too many joins per user" in reply["message"], reply
        assert await raw.closed(within=10) == (1000, "session closed")
    finally:
        await raw.aclose()
    sio = a.manager.sink.sio  # type: ignore[attr-defined]
    await wait_until(lambda: len(sio.eio.sockets) == 1, timeout=5, what="the session ended")


async def test_connections_per_user_are_capped_cluster_wide_and_given_back(
    servers: ServerCluster,
) -> None:
    a, b = await servers.start(2, max_connections_per_user=3)
    x = await servers.join(a, "x", "alice")  # x's loop runs on a
    y1 = await servers.join(a, "y", "alice")
    await servers.join(b, "y", "alice")
    channel = b.manager.keys.conv_channel("x")
    assert channel not in b.manager.node.subscriptions.channels

    client = servers.client()
    why = await client.refused(b.url, "x", servers.token("alice"))
    assert why == (
        "too many connections: user 'alice' has 3 open (the limit); close one to open another"
    )
    # The refused join left nothing: no connection, no subscription to x's channel.
    assert channel not in b.manager.node.subscriptions.channels
    assert len(await a.manager.get_connections(user_id="alice")) == 3
    await servers.join(b, "bobs", "bob")  # bob has connections of his own

    await y1.close()  # a disconnect gives its place back
    await wait_until(lambda: _count(a, "alice", 2), timeout=5, what="alice's connections down to 2")
    await servers.join(b, "x", "alice")

    # A node lost with alice's connections: the reaper gives their places back.
    await a.manager.node.halt()
    await wait_until(lambda: _count(b, "alice", 2), timeout=15, what="a's connections reaped")
    assert x.connected  # a halted node stops nothing; its client just hears no more
    await servers.join(b, "z", "alice")


async def test_a_refused_join_starts_nothing_and_evicts_nothing(servers: ServerCluster) -> None:
    """A join refused for a ``latest_event_id`` past its conversation's last event (bad
    input), or at the user's connection cap, neither creates nor takes its conversation:
    its loop does not start, so the user's cap on running loops evicts none of theirs."""
    (a,) = await servers.start(1, max_concurrent_conversations=2, max_connections_per_user=3)
    token = servers.token("alice")
    first = await servers.join(a, "r1", "alice")
    await servers.join(a, "r2", "alice")
    running = {"r1", "r2"}
    why = await servers.client().refused(a.url, "r3", token, latest_event_id=5)
    assert why == "latest_event_id 5 is beyond the last event (0) of conversation 'r3'"
    assert await a.manager.conversation("r3") == {}
    assert await a.manager.get_running_agent_loops("alice") == running
    # A stopped conversation is not taken either (its last event is 1, its start's note).
    await first.close()
    await a.manager.close_session("r1", "alice")
    why = await servers.client().refused(a.url, "r1", token, latest_event_id=9)
    assert why == "latest_event_id 9 is beyond the last event (1) of conversation 'r1'"
    assert await a.manager.get_running_agent_loops("alice") == {"r2"}

    await servers.join(a, "r1", "alice")
    await servers.join(a, "r2", "alice")  # three connections: the cap
    # Through the manager: over socket.io the refusal ends the session, and
    # python-engineio's client then waits out its 30 s write timeout (the test above).
    with pytest.raises(LimitExceeded, match="too many connections: user 'alice' has 3 open"):
        await a.manager.join_conversation("r4", "c4", {}, "alice")
    assert await a.manager.get_running_agent_loops("alice") == running
    assert not (await a.manager.conversation("r4")).get("owner")


async def _count(node: Any, user: str, n: int) -> bool:
    return len(await node.manager.get_connections(user_id=user)) == n


async def test_conversation_creations_per_user(servers: ServerCluster) -> None:
    (a,) = await servers.start(1, server_config=limits(creations_per_user=Rate(0.1, 2)))
    # Refused creations are not counted: a first message that is no action, or too large.
    for bad in ("x\ud800", "x" * 70_000, "x\ud800"):
        status, body = await servers.request(
            "POST", a, "/api/conversations", user="alice", json={"initial_user_msg": bad}
        )
        assert status == 400, body
    answers = [
        await servers.request(
            "POST", a, "/api/conversations", user="alice", json={"conversation_id": f"c{i}"}
        )
        for i in range(3)
    ]
    assert [status for status, _ in answers] == [201, 201, 429]
    status, body = answers[2]
    assert body["error"].startswith("rate limit: too many creations per user")
    assert 0 < body["retry_after"] <= 10
    assert await a.manager.conversation("c2") == {}
    # Posting one that exists creates nothing and is not counted.
    status, _ = await servers.request(
        "POST", a, "/api/conversations", user="alice", json={"conversation_id": "c0"}
    )
    assert status == 200
    # The Retry-After header names the wait in whole seconds.
    async with servers._http.post(  # type: ignore[union-attr]
        a.url + "/api/conversations",
        json={"conversation_id": "c9"},
        headers={"Authorization": f"Bearer {servers.token('alice')}"},
    ) as resp:
        assert resp.status == 429 and 1 <= int(resp.headers["retry-after"]) <= 10


async def test_rest_requests_per_user(servers: ServerCluster) -> None:
    """Every authenticated REST request counts against its user's rate, on all nodes:
    reads and closes had none (one user's flood of event pages took another's round
    trip p50 from 1.8 to 46 ms). Another user, and the unauthenticated probes, are not
    held back."""
    a, b = await servers.start(2, server_config=limits(requests_per_user=Rate(0.1, 5)))
    statuses = [
        (await servers.request("GET", a, "/api/conversations", user="mallory"))[0] for _ in range(8)
    ]
    assert statuses[:5] == [200] * 5 and statuses[-1] == 429, statuses
    status, body = await servers.request("DELETE", b, "/api/conversations/gone", user="mallory")
    assert status == 429 and body["error"].startswith("rate limit: too many requests per user")
    assert 0 < body["retry_after"] <= 10
    assert (await servers.request("GET", a, "/api/conversations", user="alice"))[0] == 200
    assert (await servers.request("GET", a, "/healthz"))[0] == 200
    _, text = await servers.request("GET", a, "/metrics")
    refused = statuses.count(429)
    assert f'coordinator_rate_limited_total{{node="n1"}} {refused}\n' in text, text
