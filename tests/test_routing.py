"""Interest-based routing: events reach only nodes with connections (or the loop)."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.helpers import wait_until


async def test_events_reach_only_interested_nodes(make_nodes) -> None:
    a, b, c = await make_nodes(3)
    await a.join_conversation("routed", "ca", {}, "ivy")  # loop and a client on a
    await b.join_conversation("routed", "cb", {}, "ivy")  # a client on b
    before = {n.node_id: n.node.subscriptions.messages for n in (a, b, c)}
    for i in range(50):
        await b.send_to_event_stream("cb", {"action": "message", "args": {"content": str(i)}})
    sink_b = make_nodes.sinks["node2"]
    await wait_until(lambda: len(sink_b.events["cb"]) >= 100, what="100 events on b")
    got = {n.node_id: n.node.subscriptions.messages - before[n.node_id] for n in (a, b, c)}
    assert got["node1"] == 100 and got["node2"] == 100
    assert got["node3"] == 0  # no connection, no loop: no traffic

    # Once b's client leaves, b stops receiving the conversation's events.
    await b.disconnect_from_session("cb")
    mark = b.node.subscriptions.messages
    await a.send_to_event_stream("ca", {"action": "message", "args": {"content": "x"}})
    sink_a = make_nodes.sinks["node1"]
    await wait_until(lambda: len(sink_a.events["ca"]) >= 102, what="2 more events on a")
    assert b.node.subscriptions.messages == mark


async def test_action_accepted_while_the_owner_is_gone_waits_for_the_successor(
    make_nodes,
) -> None:
    a, b = await make_nodes(2)
    await a.join_conversation("orphan", "ca", {}, "joe")
    await b.join_conversation("orphan", "cb", {}, "joe")
    await a.aclose()  # the owner leaves (its loop is released)
    eid = await b.send_to_event_stream("cb", {"action": "message", "args": {"content": "hi"}})
    sink = make_nodes.sinks["node2"]
    await wait_until(
        lambda: any(e.get("source") == "agent" for e in sink.events["cb"]), what="reply"
    )
    assert "orphan" in b.local_loops()
    assert [e["id"] for e in sink.events["cb"]] == list(range(1, len(sink.events["cb"]) + 1))
    assert eid in [e["id"] for e in sink.events["cb"]]


async def _publishes(node) -> int:
    stats = await node.state.redis.info("commandstats")
    return int(stats.get("cmdstat_publish", {}).get("calls", 0))


async def test_nothing_is_published_while_only_the_writer_listens(make_nodes) -> None:
    a, b = await make_nodes(2)
    await a.join_conversation("alone", "ca", {}, "una")  # loop and its only client on a
    sink_a, sink_b = make_nodes.sinks["node1"], make_nodes.sinks["node2"]

    async def act(node, cid: str, n: int) -> None:
        for i in range(n):
            await node.send_to_event_stream(cid, {"action": "message", "args": {"content": str(i)}})

    published, heard = await _publishes(a), a.node.subscriptions.messages
    await act(a, "ca", 20)
    await wait_until(lambda: len(sink_a.events["ca"]) >= 40, what="20 actions answered on a")
    assert await _publishes(a) - published == 0 and a.node.subscriptions.messages == heard

    # A client on b joins: from then on every event is published, and b sees all of them.
    await b.join_conversation("alone", "cb", {}, "una")
    published = await _publishes(a)
    await act(a, "ca", 10)
    await wait_until(lambda: len(sink_b.events["cb"]) >= 60, what="b caught up and live")
    assert await _publishes(a) - published == 20
    assert [e["id"] for e in sink_b.events["cb"]] == list(range(1, 61))

    # It leaves: publishing stops again, and a's client still gets every event once, in order.
    await b.disconnect_from_session("cb")
    published = await _publishes(a)
    await act(a, "ca", 5)
    await wait_until(lambda: len(sink_a.events["ca"]) >= 70, what="5 more answered on a")
    assert await _publishes(a) - published == 0
    assert [e["id"] for e in sink_a.events["ca"]] == list(range(1, 71))


async def test_a_reply_whose_commit_reply_was_lost_still_reaches_local_clients(
    make_nodes,
) -> None:
    (a,) = await make_nodes(1)
    await a.join_conversation("retried", "ca", {}, "vic")
    sink = make_nodes.sinks["node1"]
    real_commit = a.state.commit
    lost: list[int] = []

    async def commit_then_lose_the_reply(*args: Any, **kwargs: Any) -> Any:
        r = await real_commit(*args, **kwargs)
        if kwargs.get("cause") and not lost:
            lost.append(r.first_id)  # written (and, with only a listening, not published)
            raise ConnectionError("reply lost")
        return r

    a.state.commit = commit_then_lose_the_reply  # type: ignore[method-assign]
    await a.send_to_event_stream("ca", {"action": "message", "args": {"content": "once"}})
    # The runner retries, the script answers "dup", and the client reads the log.
    await wait_until(
        lambda: any(e.get("source") == "agent" for e in sink.events["ca"]), what="the reply"
    )
    await asyncio.sleep(0.2)
    replies = [e for e in sink.events["ca"] if e.get("source") == "agent"]
    assert [e["id"] for e in replies] == lost
    assert [e["id"] for e in sink.events["ca"]] == list(range(1, len(sink.events["ca"]) + 1))


async def test_a_connection_joined_to_another_conversation_moves_there(make_nodes) -> None:
    """The seed's join of a connection already in a conversation moves it: from then on
    it gets the new conversation's events and its actions go there; the one it left
    reaches only the connections still in it."""
    (a,) = await make_nodes(1)
    sink = make_nodes.sinks["node1"]
    await a.join_conversation("left", "mover", {}, "mia")
    await a.join_conversation("left", "stayer", {}, "mia")
    await a.join_conversation("entered", "mover", {}, "mia")
    moved_at = len(sink.events["mover"])
    await a.send_to_event_stream("stayer", {"action": "message", "args": {"content": "old"}})
    await a.send_to_event_stream("mover", {"action": "message", "args": {"content": "new"}})

    def said(cid: str, text: str, since: int = 0) -> bool:
        return any(e.get("source") == "agent" and text in str(e) for e in sink.events[cid][since:])

    await wait_until(lambda: said("stayer", "old") and said("mover", "new"), what="answers")
    await asyncio.sleep(0.2)  # anything of "left" still on its way to "mover" arrives
    assert not said("mover", "old", moved_at)
    assert not said("stayer", "new")
    assert [c.cid for c in a.node.connections.room("left")] == ["stayer"]
    assert [c.cid for c in a.node.connections.room("entered")] == ["mover"]


async def test_joins_and_a_leave_of_one_connection_at_once_take_turns(make_nodes) -> None:
    """The Python API may join one connection id twice at once, or disconnect it while
    its join runs: one join at a time, the leave after it. Before, the second join of two
    was refused "closed while joining" with nothing closed and left its registration in
    Redis, and a leave during a join was lost (the connection stayed, here and in Redis)."""
    (a,) = await make_nodes(1)
    await asyncio.gather(
        a.join_conversation("a1", "twice", {}, "mia"),
        a.join_conversation("a2", "twice", {}, "mia"),
    )
    assert a.local_connections() == {"twice": "a2"}  # joined a1, then moved to a2
    assert await a.get_connections("mia") == {"twice": "a2"}
    same = [a.join_conversation("a2", "thrice", {}, "mia") for _ in range(3)]
    await asyncio.gather(*same)  # the seed's repeated join: nothing changes, no error
    assert await a.get_connections("mia") == {"twice": "a2", "thrice": "a2"}

    joining = asyncio.ensure_future(a.join_conversation("a3", "brief", {}, "mia"))
    await asyncio.sleep(0)  # the join is under way
    await a.disconnect_from_session("brief")
    await joining
    await a.disconnect_from_session("twice")
    await a.disconnect_from_session("thrice")
    assert a.local_connections() == {}
    assert await a.get_connections() == {}
    for sid in ("a1", "a2", "a3"):
        assert await a.state.redis.hlen(a.keys.conv_conns(sid)) == 0
