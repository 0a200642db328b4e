"""Speculative dispatch: an action sent through the node that runs its loop reaches the
agent before its accept has answered, and the agent's commit travels right behind it.
What must hold: nothing reaches the log or a client unless the action was logged under
the id the agent was given; when it was not, the agent is replaced and every action is
answered once, in log order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from coordinator import ConversationManager
from coordinator.backends import StandaloneBackend
from coordinator.codec import pack
from coordinator.keys import KeySchema
from coordinator.state import RedisState
from tests.helpers import RecordingSink, fast_config, wait_until
from tests.tcpproxy import TcpProxy
from workers.echo import EchoAgent
from workers.protocol import AgentContext
from workers.scripted import ScriptedAgent


class Agents:
    """An agent factory that remembers every agent it made."""

    def __init__(self, cls: type = ScriptedAgent) -> None:
        self.cls = cls
        self.made: list[Any] = []

    def __call__(self, context: AgentContext) -> Any:
        agent = self.cls(context, think_time=0) if self.cls is ScriptedAgent else self.cls(context)
        self.made.append(agent)
        return agent


class NotSpeculative(EchoAgent):
    speculative = False


@pytest.fixture
async def node(redis_url: str) -> AsyncIterator[Any]:
    made: list[ConversationManager] = []

    async def start(
        agents: Agents | None = None, lane_url: str | None = None, **overrides: Any
    ) -> Any:
        """A node; with ``lane_url`` its accept and commit go there (a TCP proxy)."""
        sink = RecordingSink()
        config = fast_config(redis_url, f"spec{len(made) + 1}", **overrides)
        manager = ConversationManager(
            config,
            sink=sink,
            agent_factory=agents or Agents(),
            backend=StandaloneBackend(config, lane_url=lane_url),
        )
        await manager.start()
        made.append(manager)
        return manager, sink

    yield start
    for manager in made:
        await manager.aclose()


def message(content: str, **extra: Any) -> dict[str, Any]:
    return {"action": "message", "args": {"content": content}, **extra}


def answers(sink: RecordingSink, cid: str) -> list[tuple[int, str]]:
    """(id answered, content) of each agent event delivered to ``cid``."""
    return [
        (e["args"]["in_reply_to"], e["args"]["content"].rstrip(". "))
        for e in sink.events[cid]
        if e["source"] == "agent"
    ]


@pytest.mark.parametrize(("speculative", "logged"), [(True, ["user", "agent"]), (False, ["user"])])
async def test_the_answer_is_logged_before_the_node_has_heard_back_from_its_accept(
    node: Any, redis_client: Any, speculative: bool, logged: list[str]
) -> None:
    """With the lane's replies held back, the action's accept and the agent's commit
    both reach Redis: the agent started before the accept answered. Without speculative
    dispatch only the accept gets there."""
    agents = Agents()
    proxy = await TcpProxy(redis_client.connection_pool.connection_kwargs["port"]).start()
    # Only accept and commit go through the proxy.
    manager, sink = await node(
        agents, lane_url=proxy.url, speculative_dispatch=speculative, redis_timeout=10.0
    )
    await manager.join_conversation("held", "c1", {}, "alice", None)
    try:
        await manager.send_to_event_stream("c1", message("warm up"))
        await wait_until(lambda: len(answers(sink, "c1")) == 1)
        before = manager.metrics.speculative_dispatches
        proxy.hold_replies()
        send = asyncio.create_task(manager.send_to_event_stream("c1", message("hi")))

        async def log_sources() -> list[str]:
            return [e["source"] for _, e in await manager.state.events_after("held", 2)]

        await wait_until(lambda: _equals(log_sources(), logged), what="log")
        assert not send.done()  # the accept's reply is still held
        proxy.release_replies()
        event_id = await send
        await wait_until(lambda: len(answers(sink, "c1")) == 2)
        assert answers(sink, "c1")[1] == (event_id, "hi")
        assert sink.ids("c1") == [1, 2, 3, 4]
        stats = manager.metrics
        assert (stats.speculative_dispatches - before, stats.speculations_lost) == (
            int(speculative),
            0,
        )
        assert len(agents.made) == 1
    finally:
        await manager.aclose()
        await proxy.aclose()


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_an_action_logged_first_by_another_node_voids_the_prediction(
    node: Any, redis_client: Any
) -> None:
    """Another node's action lands in the log before ours and the owner has not heard of
    it yet (its channel message still on the way): ours gets the next id, not the one
    the agent was given. The answer given under the wrong id is refused by Redis, the
    agent is replaced, and the fresh one answers both actions in log order."""
    agents = Agents()
    manager, sink = await node(agents)
    await manager.join_conversation("race", "c1", {}, "alice", None)
    await manager.send_to_event_stream("c1", message("first"))
    await wait_until(lambda: len(answers(sink, "c1")) == 1)
    # Logged as another node would, but not published: the owner does not see it.
    other = RedisState(redis_client, KeySchema(manager.config.key_prefix))
    foreign = await other.accept(
        "race",
        "alice",
        pack({"action": "message", "args": {"content": "foreign"}, "source": "user"}),
        1000,
        100,
        publisher=manager.inc,
        floor=0,
    )
    assert foreign.status == "ok" and foreign.event_id == 3
    ours = await manager.send_to_event_stream("c1", message("ours"))
    assert ours == 4
    await wait_until(lambda: len(answers(sink, "c1")) == 3, what="three answers")
    assert answers(sink, "c1") == [(1, "first"), (3, "foreign"), (4, "ours")]
    logged = [
        (i, e["source"], e["args"].get("in_reply_to"), e["args"]["content"].rstrip(". "))
        for i, e in await manager.state.events_after("race", 0)
    ]
    assert logged == [
        (1, "user", None, "first"),
        (2, "agent", 1, "first"),
        (3, "user", None, "foreign"),
        (4, "user", None, "ours"),
        (5, "agent", 3, "foreign"),
        (6, "agent", 4, "ours"),
    ]
    assert sink.ids("c1") == [1, 2, 3, 4, 5, 6]
    assert manager.metrics.speculations_lost == 1
    assert len(agents.made) == 2  # the one that saw "ours" as action 3 was replaced
    assert (await manager.state.meta("race"))["applied"] == "4"


async def test_a_resent_action_through_the_owner_is_not_answered_again(node: Any) -> None:
    """A client's retry with the same client_action_id gets the first id back; the agent
    that started on it speculatively is replaced and nothing more is logged."""
    manager, sink = await node()
    await manager.join_conversation("dup", "c1", {}, "alice", None)
    first = await manager.send_to_event_stream("c1", message("once", client_action_id="k1"))
    await wait_until(lambda: len(answers(sink, "c1")) == 1)
    again = await manager.send_to_event_stream("c1", message("once", client_action_id="k1"))
    assert again == first
    after = await manager.send_to_event_stream("c1", message("next"))
    await wait_until(lambda: len(answers(sink, "c1")) == 2)
    assert answers(sink, "c1") == [(first, "once"), (after, "next")]
    assert [i for i, _ in await manager.state.events_after("dup", 0)] == [1, 2, 3, 4]
    assert manager.metrics.speculations_lost == 1


async def test_replies_lost_after_redis_ran_both_calls_are_retried_into_one_answer(
    node: Any, redis_client: Any
) -> None:
    """The link drops after Redis logged the speculative action and its answer but before
    the node heard back: the lane's retries find both done (accept token, commit dedup);
    the client gets its id, one user event and one answer."""
    agents = Agents()
    proxy = await TcpProxy(redis_client.connection_pool.connection_kwargs["port"]).start()
    manager, sink = await node(agents, lane_url=proxy.url, redis_timeout=2.0)
    await manager.join_conversation("lost", "c1", {}, "alice", None)
    try:
        await manager.send_to_event_stream("c1", message("warm up"))
        await wait_until(lambda: len(answers(sink, "c1")) == 1)
        proxy.hold_replies()
        send = asyncio.create_task(manager.send_to_event_stream("c1", message("hi")))

        async def logged() -> int:
            return len(await manager.state.events_after("lost", 0))

        await wait_until(lambda: _equals(logged(), 4), what="action and answer logged")
        proxy.cut()
        proxy.restore()
        proxy.release_replies()
        assert await send == 3
        await wait_until(lambda: len(answers(sink, "c1")) == 2)
        assert answers(sink, "c1") == [(1, "warm up"), (3, "hi")]
        assert sink.ids("c1") == [1, 2, 3, 4]
        assert await logged() == 4
        assert manager.metrics.speculations_lost == 0 and len(agents.made) == 1
    finally:
        await manager.aclose()
        await proxy.aclose()


async def test_lost_replies_log_the_agent_state_notes_once_too(
    node: Any, redis_client: Any
) -> None:
    """As above with the agent's state notes on: the answer's commit carries the
    "running" note, and the "awaiting_user_input" note after it is a commit of its own,
    sent once the answer's reply is back; every one is logged and delivered once."""
    proxy = await TcpProxy(redis_client.connection_pool.connection_kwargs["port"]).start()
    manager, sink = await node(
        Agents(), lane_url=proxy.url, redis_timeout=2.0, agent_state_events=True
    )
    await manager.join_conversation("noted", "c1", {}, "alice", None)
    try:
        await manager.send_to_event_stream("c1", message("warm up"))
        await wait_until(lambda: len(sink.events["c1"]) == 5, what="warm up and its notes")
        proxy.hold_replies()
        send = asyncio.create_task(manager.send_to_event_stream("c1", message("hi")))

        async def logged() -> list[str]:
            return [
                e.get("action") or e["extras"]["agent_state"]
                for _, e in await manager.state.events_after("noted", 0)
            ]

        start = ["awaiting_user_input", "message", "running", "message", "awaiting_user_input"]
        held = [*start, "message", "running", "message"]  # action, note and answer
        await wait_until(lambda: _equals(logged(), held), what="action and answer logged")
        proxy.cut()
        proxy.restore()
        proxy.release_replies()
        assert await send == 6
        await wait_until(lambda: len(sink.events["c1"]) == 9, what="the last note")
        assert await logged() == [*held, "awaiting_user_input"]
        assert sink.ids("c1") == list(range(1, 10))
        assert answers(sink, "c1") == [(2, "warm up"), (6, "hi")]
    finally:
        await manager.aclose()
        await proxy.aclose()


@pytest.mark.parametrize("setting", ["node", "agent"])
async def test_speculation_is_off_when_the_node_or_the_agent_says_so(
    node: Any, setting: str
) -> None:
    if setting == "node":
        manager, sink = await node(Agents(EchoAgent), speculative_dispatch=False)
    else:
        manager, sink = await node(Agents(NotSpeculative))
    await manager.join_conversation("off", "c1", {}, "alice", None)
    for i in range(3):
        await manager.send_to_event_stream("c1", message(f"m{i}"))
    await wait_until(lambda: len(sink.events["c1"]) == 6)
    assert sink.ids("c1") == [1, 2, 3, 4, 5, 6]
    assert manager.metrics.speculative_dispatches == 0


async def test_a_thinking_agent_does_not_hold_up_the_ack_or_the_user_event(node: Any) -> None:
    """The agent has not answered when the accept returns: the client gets its user event
    and the ack at once, the answer when the agent is done."""

    class Thinking(ScriptedAgent):
        def __init__(self, context: AgentContext) -> None:
            super().__init__(context, think_time=0.5)

    manager, sink = await node(Agents(Thinking))
    await manager.join_conversation("slow", "c1", {}, "alice", None)
    first = await manager.send_to_event_stream("c1", message("warm up"))
    await wait_until(lambda: len(answers(sink, "c1")) == 1)
    before = manager.metrics.speculative_dispatches
    event_id = await manager.send_to_event_stream("c1", message("think"))
    assert manager.metrics.speculative_dispatches == before + 1
    assert sink.ids("c1") == [first, first + 1, event_id]  # the ack came before the answer
    await wait_until(lambda: len(answers(sink, "c1")) == 2)
    assert answers(sink, "c1")[1] == (event_id, "think")
