"""Per-conversation lifetimes (issue #16 item 6), on real Redis: ``close_delay`` and a
maximum running time asked for at creation (REST body), within the node's bounds
(``max_close_delay``, ``max_running_time``), recorded with the conversation so any node
that runs it applies them."""

from __future__ import annotations

from typing import Any

from coordinator.codec import RUNNING_TIME_EXCEEDED
from coordinator.config import Lifetimes
from tests.helpers import wait_until

QUICK = dict(close_delay=60.0, cleanup_interval=0.1, idle_flush_interval=0.1)


async def test_a_conversations_own_close_delay_closes_it_sooner(make_nodes: Any) -> None:
    a, b = await make_nodes(2, **QUICK)
    await a.maybe_start_agent_loop("short", {}, "alice", lifetimes=Lifetimes(close_delay=0.5))
    await a.maybe_start_agent_loop("long", {}, "alice")
    assert (await a.conversation("short"))["close_delay"] == "0.5"
    await wait_until(lambda: "short" not in a.local_loops(), timeout=5, what="short closed")
    assert "long" in a.local_loops()  # the node's close_delay (60 s) for the other

    # Recorded with the conversation: another node that starts it applies it too.
    await b.maybe_start_agent_loop("short", {}, "alice")
    assert b.runner("short").close_delay == 0.5
    await wait_until(lambda: "short" not in b.local_loops(), timeout=5, what="closed on b")


async def test_a_loop_past_its_running_time_is_closed_and_its_clients_told(
    make_nodes: Any,
) -> None:
    (a,) = await make_nodes(1, **QUICK)
    sink = make_nodes.sinks["node1"]
    await a.maybe_start_agent_loop("brief", {}, "bob", lifetimes=Lifetimes(max_running_time=0.5))
    await a.join_conversation("brief", "c", {}, "bob")
    await a.maybe_start_agent_loop("other", {}, "bob")
    await wait_until(lambda: "c" in sink.disconnected, timeout=5, what="the client closed")
    assert [u["id"] for u in sink.updates["c"]] == [RUNNING_TIME_EXCEEDED]
    assert sink.events["c"][-1]["extras"]["reason"] == RUNNING_TIME_EXCEEDED
    assert a.local_loops() == {"other"}  # no running-time limit for it


async def test_the_nodes_running_time_bounds_every_conversation(make_nodes: Any) -> None:
    (a,) = await make_nodes(1, max_running_time=0.5, **QUICK)
    await a.maybe_start_agent_loop("any", {}, "carl")
    await wait_until(lambda: not a.local_loops(), timeout=5, what="stopped at the node's bound")
    # A conversation asking for more than a node allows gets the node's bound there.
    assert Lifetimes(max_running_time=10.0).effective(a.config)[1] == 0.5


async def test_lifetimes_in_the_rest_body_are_checked_against_the_bounds(servers: Any) -> None:
    (a,) = await servers.start(1, max_close_delay=100.0, max_running_time=50.0)

    async def create(**body: Any) -> tuple[int, Any]:
        return await servers.request("POST", a, "/api/conversations", user="dora", json=body)

    for bad in (
        {"close_delay": 101},
        {"close_delay": 0},
        {"close_delay": "5"},
        {"close_delay": True},
        {"max_running_time": 51},
        {"max_running_time": -1},
    ):
        status, body = await create(**bad)
        assert status == 400 and next(iter(bad)) in body["error"], (bad, body)
    status, body = await create(conversation_id="ok", close_delay=30, max_running_time=40.5)
    assert status == 201, body
    meta = await a.manager.conversation("ok")
    assert (meta["close_delay"], meta["max_running_time"]) == ("30.0", "40.5")
    runner = a.manager.runner("ok")
    assert runner is not None and runner.close_delay == 30.0 and runner.stop_at > 0
