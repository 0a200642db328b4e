"""Interest-based routing: events reach only nodes with connections (or the loop)."""

from __future__ import annotations

from tests.helpers import wait_until


async def test_events_reach_only_interested_nodes(make_nodes) -> None:
    a, b, c = await make_nodes(3)
    await a.join_conversation("routed", "ca", {}, "ivy")  # loop and a client on a
    await b.join_conversation("routed", "cb", {}, "ivy")  # a client on b
    before = {n.node_id: n._subs.messages for n in (a, b, c)}
    for i in range(50):
        await b.send_to_event_stream("cb", {"action": "message", "args": {"content": str(i)}})
    sink_b = make_nodes.sinks["node2"]
    await wait_until(lambda: len(sink_b.events["cb"]) >= 100, what="100 events on b")
    got = {n.node_id: n._subs.messages - before[n.node_id] for n in (a, b, c)}
    assert got["node1"] == 100 and got["node2"] == 100
    assert got["node3"] == 0  # no connection, no loop: no traffic

    # Once b's client leaves, b stops receiving the conversation's events.
    await b.disconnect_from_session("cb")
    mark = b._subs.messages
    await a.send_to_event_stream("ca", {"action": "message", "args": {"content": "x"}})
    sink_a = make_nodes.sinks["node1"]
    await wait_until(lambda: len(sink_a.events["ca"]) >= 102, what="2 more events on a")
    assert b._subs.messages == mark


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
