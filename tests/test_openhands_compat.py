"""Drop-in for OpenHands' clients and the seed's manager semantics (issue #16), with
in-process nodes on real Redis: the event shape OpenHands' web client reads, agent state
changes as observations, transient status updates that take no event id, closing and
eviction ending the conversation's connections on every node."""

from __future__ import annotations

import itertools
from typing import Any

from coordinator.codec import AGENT_STATE_CHANGED, CONVERSATION_CLOSED, TOO_MANY_CONVERSATIONS
from tests.helpers import RecordingSink, wait_until


def shape_problem(event: dict[str, Any]) -> str | None:
    """Why OpenHands' web client would not read ``event`` as a logged event, or None."""
    for name in ("id", "source", "message", "timestamp"):
        if name not in event:
            return f"no {name!r}"
    if type(event["id"]) is not int or not isinstance(event["message"], str):
        return "id not an int or message not a string"
    if isinstance(event.get("action"), str):
        return None if isinstance(event.get("args"), dict) else "an action without args"
    if isinstance(event.get("observation"), str):
        ok = isinstance(event.get("content"), str) and isinstance(event.get("extras"), dict)
        return None if ok else "an observation without content and extras"
    return "neither an action nor an observation"


def is_status_update(update: dict[str, Any]) -> bool:
    return (
        update.get("status_update") is True
        and update.get("type") in ("info", "error")
        and isinstance(update.get("id"), str)
        and isinstance(update.get("message"), str)
    )


def echoed(sink: RecordingSink, cid: str, content: str) -> bool:
    return any(
        e.get("source") == "agent" and e.get("args", {}).get("content") == content
        for e in sink.events[cid]
    )


async def test_events_have_openhands_shape_and_close_ends_connections_everywhere(
    make_nodes: Any,
) -> None:
    a, b = await make_nodes(2)
    sink_a, sink_b = make_nodes.sinks["node1"], make_nodes.sinks["node2"]
    await a.join_conversation("oh", "ca", {}, "alice")
    await b.join_conversation("oh", "cb", {}, "alice")
    await a.send_to_event_stream("ca", {"action": "message", "args": {"content": "hi"}})
    for sink, cid in ((sink_a, "ca"), (sink_b, "cb")):
        await wait_until(lambda s=sink, c=cid: echoed(s, c, "hi"), what="the echo")
    user = next(e for e in sink_a.events["ca"] if e["source"] == "user")
    assert user["action"] == "message" and user["message"] == "hi"

    assert await b.close_session("oh", "alice")  # the loop runs on a
    for sink, cid in ((sink_a, "ca"), (sink_b, "cb")):
        await wait_until(lambda s=sink, c=cid: c in s.disconnected, what=f"{cid} disconnected")
        closed = sink.events[cid][-1]
        assert closed["observation"] == AGENT_STATE_CHANGED
        assert closed["extras"] == {"agent_state": "stopped", "reason": CONVERSATION_CLOSED}
        assert closed["message"]
        (update,) = sink.updates[cid]
        assert is_status_update(update) and update["id"] == CONVERSATION_CLOSED
        assert update["type"] == "info" and update["message"] == closed["message"]
        for event in sink.events[cid]:
            assert shape_problem(event) is None, (shape_problem(event), event)
    # Removed from the connection maps, on their nodes and in Redis.
    assert a.local_connections() == {} and b.local_connections() == {}
    assert await a.get_connections("alice") == {}

    # The status update took no event id: the log goes on right after the notice, and
    # replaying it (an older notice) closes nothing.
    last = sink_a.events["ca"][-1]["id"]
    await a.join_conversation("oh", "again", {}, "alice")
    await a.send_to_event_stream("again", {"action": "message", "args": {"content": "back"}})
    await wait_until(lambda: echoed(sink_a, "again", "back"), what="the echo after reopening")
    ids = [e["id"] for e in sink_a.events["again"]]
    assert ids == list(range(1, len(ids) + 1)) and ids[last] == last + 1
    assert "again" not in sink_a.disconnected and not sink_a.updates["again"]
    assert all(shape_problem(e) is None for e in await a.events("oh"))


async def test_eviction_tells_then_closes_the_evicted_conversations_connections(
    make_nodes: Any,
) -> None:
    a, b = await make_nodes(2, max_concurrent_conversations=1)
    sink = make_nodes.sinks["node1"]
    await a.join_conversation("old", "c-old", {}, "alice")
    await b.maybe_start_agent_loop("new", {}, "alice")  # evicts "old", wherever it runs
    await wait_until(lambda: "c-old" in sink.disconnected, what="the evicted client closed")
    (update,) = sink.updates["c-old"]
    assert is_status_update(update)
    assert (update["id"], update["type"]) == (TOO_MANY_CONVERSATIONS, "error")
    notice = sink.events["c-old"][-1]
    assert notice["extras"]["reason"] == TOO_MANY_CONVERSATIONS
    assert a.local_connections() == {}
    assert await b.get_connections("alice") == {}
    assert await b.get_running_agent_loops("alice") == {"new"}


async def test_joining_again_is_a_no_op_and_joining_elsewhere_moves_the_connection(
    make_nodes: Any,
) -> None:
    (a,) = await make_nodes(1)
    sink = make_nodes.sinks["node1"]
    await a.join_conversation("x", "c", {}, "alice")
    await a.send_to_event_stream("c", {"action": "message", "args": {"content": "one"}})
    await wait_until(lambda: echoed(sink, "c", "one"), what="the first echo")
    info = await a.join_conversation("x", "c", {}, "alice")  # the same: nothing changes
    assert info.running
    await a.send_to_event_stream("c", {"action": "message", "args": {"content": "two"}})
    await wait_until(lambda: echoed(sink, "c", "two"), what="the second echo")
    assert [e["id"] for e in sink.events["c"]] == [1, 2, 3, 4]  # no duplicate delivery
    assert await a.get_connections("alice") == {"c": "x"}

    await a.join_conversation("y", "c", {}, "alice")  # another: the connection moves
    assert a.local_connections() == {"c": "y"}
    assert await a.get_connections("alice") == {"c": "y"}
    await a.join_conversation("x", "watcher", {}, "alice")
    await a.send_to_event_stream("watcher", {"action": "message", "args": {"content": "x3"}})
    await a.send_to_event_stream("c", {"action": "message", "args": {"content": "y1"}})
    await wait_until(lambda: echoed(sink, "c", "y1"), what="the echo in y")
    await wait_until(lambda: echoed(sink, "watcher", "x3"), what="the echo in x")
    assert not echoed(sink, "c", "x3")  # x's events no longer reach it


async def test_closing_a_conversation_no_node_runs_closes_its_connections(
    make_nodes: Any,
) -> None:
    a, b = await make_nodes(2)
    sink = make_nodes.sinks["node2"]
    await a.maybe_start_agent_loop("idle", {}, "alice")
    await b.join_conversation("idle", "cb", {}, "alice")
    await a.node.loops.stop("idle", None)  # as an idle sweep would: no loop, no notice
    assert not await b.close_session("idle", "alice")
    await wait_until(lambda: "cb" in sink.disconnected, what="the connection closed")
    assert [u["id"] for u in sink.updates["cb"]] == [CONVERSATION_CLOSED]
    assert b.local_connections() == {} and await a.get_connections("alice") == {}


async def test_a_closed_conversations_socketio_clients_are_told_and_disconnected(
    servers: Any,
) -> None:
    a, b = await servers.start(2)
    on_a = await servers.join(a, "sio-close", "alice")
    on_b = await servers.join(b, "sio-close", "alice")
    await on_a.say("hi")
    await on_b.wait_for(lambda: any(e["source"] == "agent" for e in on_b.events), "the echo")
    status, body = await servers.request("DELETE", b, "/api/conversations/sio-close", user="alice")
    assert (status, body) == (200, {"closed": True})
    for client in (on_a, on_b):
        await client.wait_for(lambda c=client: not c.connected, "the server's disconnect")
        assert [u["id"] for u in client.updates] == [CONVERSATION_CLOSED]
        assert all(is_status_update(u) for u in client.updates)
        assert client.events[-1]["extras"]["reason"] == CONVERSATION_CLOSED
        assert all(shape_problem(e) is None for e in client.events)
    assert a.manager.local_connections() == {} == b.manager.local_connections()
    assert await a.manager.get_connections("alice") == {}


def test_the_terminal_chat_prints_notices_and_status_updates() -> None:
    from coordinator import codec
    from coordinator.chat import format_event

    closed = {**codec.closed_event(), "id": 9}
    assert format_event(closed) == "[9] environment: The conversation was closed. (agent stopped)"
    update = codec.notice_update(closed)
    assert update is not None and is_status_update(update)
    assert format_event(update) == (
        "[status] STATUS$CONVERSATION_CLOSED: The conversation was closed."
    )
    said = codec.agent_event({"action": "message", "args": {"content": "hi"}})
    assert format_event({**said, "id": 3}) == "[3] agent: hi" and said["message"] == "hi"


def states(events: list[dict[str, Any]]) -> list[str]:
    """The agent states the ``agent_state_changed`` observations among ``events`` name."""
    return [
        e["extras"]["agent_state"] for e in events if e.get("observation") == AGENT_STATE_CHANGED
    ]


def assert_one_action_noted(events: list[dict[str, Any]], action: int) -> None:
    """The loop's start, the action, "running", the answer, awaiting input again."""
    seen = [(e["id"], e["source"], e.get("action") or e["extras"]["agent_state"]) for e in events]
    assert seen == [
        (1, "environment", "awaiting_user_input"),
        (action, "user", "message"),
        (3, "environment", "running"),
        (4, "agent", "message"),
        (5, "environment", "awaiting_user_input"),
    ]


def hi(content: str = "hi") -> dict[str, Any]:
    return {"action": "message", "args": {"content": content}}


async def test_agent_state_changes_are_logged_as_openhands_logs_them(make_nodes: Any) -> None:
    """OpenHands' web client starts at "loading", with its input disabled, and follows the
    logged agent_state_changed observations: a loop logs the state its start left the
    agent in, "running" before the agent's first answer to an action, and the state it
    ends the action in; a replay anywhere restores the same view."""
    a, b = await make_nodes(2, agent_state_events=True)
    sink = make_nodes.sinks["node1"]
    await a.join_conversation("st", "c", {}, "alice")
    await wait_until(lambda: states(sink.events["c"]) == ["awaiting_user_input"], what="start")
    action = await a.send_to_event_stream("c", hi())
    await wait_until(lambda: len(states(sink.events["c"])) == 3, what="the action's states")
    assert_one_action_noted(sink.events["c"], action)
    assert all(shape_problem(e) is None for e in sink.events["c"])
    assert (await a.conversation("st"))["state"] == "awaiting_user_input"
    await b.join_conversation("st", "cb", {}, "alice", latest_event_id=0)
    replayed = make_nodes.sinks["node2"].events["cb"]
    await wait_until(lambda: len(replayed) >= 5, what="the replay")
    assert replayed[:5] == sink.events["c"]


async def test_an_agent_that_thinks_is_shown_running_before_it_answers(make_nodes: Any) -> None:
    """An agent that has not answered its action within RUNNING_NOTE_AFTER (0.1 s; here
    it sleeps 2 s, as a real one waits for its model) has "running" logged on its own:
    its clients see it working while it thinks, not with its answer."""
    (a,) = await make_nodes(1, agent="tests.agents:BadAgent", agent_state_events=True)
    sink = make_nodes.sinks["node1"]
    await a.join_conversation("think", "c", {}, "alice")
    await wait_until(lambda: states(sink.events["c"]) == ["awaiting_user_input"], what="start")
    action = await a.send_to_event_stream("c", hi("slow 2"))
    await wait_until(lambda: states(sink.events["c"])[-1] == "running", what="shown running")
    assert not echoed(sink, "c", "slow 2"), "running shown only with the answer"
    await wait_until(lambda: len(states(sink.events["c"])) == 3, what="awaiting input again")
    assert_one_action_noted(sink.events["c"], action)


async def test_an_action_whose_agent_was_only_thinking_is_dispatched_again_after_its_node_dies(
    make_nodes: Any,
) -> None:
    """The "running" note logged on its own does not count the action as processed: a
    successor after a lost node dispatches it again, and it is answered once."""
    a, b = await make_nodes(2, agent="tests.agents:BadAgent", agent_state_events=True)
    sink_a, sink_b = make_nodes.sinks["node1"], make_nodes.sinks["node2"]
    await a.join_conversation("dies", "ca", {}, "alice")
    await b.join_conversation("dies", "cb", {}, "alice")
    await wait_until(lambda: "dies" in a.local_loops(), what="a runs the loop")
    await a.send_to_event_stream("ca", hi("slow 2"))
    await wait_until(lambda: states(sink_b.events["cb"])[-1] == "running", what="running")
    await a.node.halt()  # killed while its agent thinks

    async def a_dead() -> bool:
        return not await b.node.directory.alive(a.inc)

    await wait_until(a_dead, timeout=10, what="a's lease expired")
    await wait_until(lambda: echoed(sink_b, "cb", "slow 2"), timeout=15, what="answered by b")
    assert "dies" in b.local_loops()
    answers = [e for e in sink_b.events["cb"] if e["source"] == "agent"]
    assert [e["args"]["content"] for e in answers] == ["slow 2"]
    assert not echoed(sink_a, "ca", "slow 2")


async def test_an_emit_is_given_its_own_id_when_a_state_change_follows_it(
    make_nodes: Any,
) -> None:
    (a,) = await make_nodes(1, agent="tests.agents:StateThenEmitAgent", agent_state_events=True)
    sink = make_nodes.sinks["node1"]
    await a.join_conversation("ids", "c", {}, "alice")
    await a.send_to_event_stream("c", hi())
    await wait_until(lambda: len(sink.events["c"]) >= 7, what="three answers")
    logged = {e["id"]: e for e in sink.events["c"]}
    answers = [e for e in sink.events["c"] if e["source"] == "agent"]
    assert [e["args"]["content"].split()[0] for e in answers] == ["first", "after", "after"]
    for before, later in itertools.pairwise(answers):
        assert int(later["args"]["content"].split()[1]) == before["id"]
    # running before the first answer, awaiting input after the second (logged with it)
    assert states(list(logged.values())) == [
        "awaiting_user_input",
        "running",
        "awaiting_user_input",
    ]
    assert logged[answers[1]["id"] + 1]["observation"] == AGENT_STATE_CHANGED


async def test_agent_state_events_off_logs_only_the_coordinators_own(make_nodes: Any) -> None:
    (a,) = await make_nodes(1, agent_state_events=False)
    sink = make_nodes.sinks["node1"]
    await a.join_conversation("quiet", "c", {}, "alice")
    await a.send_to_event_stream("c", hi())
    await wait_until(lambda: echoed(sink, "c", "hi"), what="the echo")
    assert await a.close_session("quiet", "alice")
    await wait_until(lambda: "c" in sink.disconnected, what="closed")
    assert [e["source"] for e in sink.events["c"]] == ["user", "agent", "environment"]
    assert states(sink.events["c"]) == ["stopped"]  # the close, with its reason
