"""Agents that remember (issue #14 item 6): a loop reads its conversation's history and
saves checkpoints through its context, in the node and in worker processes; the built-in
memory agent's answers continue across an eviction, an idle close and a lost node, its
successor starting from the checkpoint and reading only what came after it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import asyncpg
import pytest

from coordinator import ConversationManager, Fenced, InvalidInput
from coordinator.eventstore import (
    DEFAULT_MAX_CHECKPOINT_BYTES,
    CheckpointTooLarge,
    FileEventStore,
)
from coordinator.memory import LoopMemory
from coordinator.state import Lease
from tests.conftest import NodeFactory
from tests.helpers import RecordingSink, wait_until
from tests.postgres import PostgresServer
from tests.processes import ProcessCluster
from tests.server_fixtures import SioClient
from workers.memory import DEFAULT_CHECKPOINT_EVERY, MemoryAgent
from workers.protocol import AgentContext

MEMORY = "workers.memory:MemoryAgent"
EVERY = DEFAULT_CHECKPOINT_EVERY  # restarts start loops with no settings: the default


def _answers(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The agent's answers, each with the id of the user message it answers (``n``)."""
    asked = [e["id"] for e in events if e["source"] == "user"]
    replies = [e["args"] for e in events if e["source"] == "agent"]
    return [{**args, "n": n} for n, args in zip(asked, replies, strict=False)]


class Talk:
    """One connection to a conversation, and the memory agent's answers on it."""

    def __init__(self, node: ConversationManager, sink: RecordingSink, sid: str, cid: str):
        self.node, self.sink, self.sid, self.cid = node, sink, sid, cid

    async def join(self) -> Talk:
        await self.node.join_conversation(self.sid, self.cid, {}, "alice")
        return self

    async def say(self, text: str) -> int:
        """Send ``text`` and wait for its answer; its action id."""
        n = await self.node.send_to_event_stream(
            self.cid, {"action": "message", "args": {"content": text}}
        )
        await wait_until(lambda: len(self.answers()) and self.answers()[-1]["n"] == n, what=text)
        return n

    def answers(self) -> list[dict[str, Any]]:
        # A connection that joined again got the history again: each event once.
        events = {e["id"]: e for e in self.sink.events[self.cid]}
        return _answers(sorted(events.values(), key=lambda e: e["id"]))


def assert_continues(answers: list[dict[str, Any]], texts: list[str]) -> None:
    """Each answer counts the messages before it and quotes the previous one."""
    assert [a["earlier"] for a in answers] == list(range(len(texts)))
    assert [a["previous"] for a in answers] == ["", *texts[:-1]]


def assert_resumed_from_checkpoint(answer: dict[str, Any], covers: int, last: int) -> None:
    """The successor started from the checkpoint covering ``covers`` and read only the
    history after it, up to the last action processed (``last``)."""
    recalled = answer["recalled"]
    assert recalled["checkpoint"] == covers
    assert recalled["read"] == list(range(covers + 1, last + 1))


async def test_history_is_read_in_pages_from_the_store_and_the_window(
    make_nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("workers.protocol.HISTORY_PAGE", 7)
    (a,) = await make_nodes(1, agent=MEMORY, agent_isolation="none", log_window_events=20)
    talk = await Talk(a, make_nodes.sinks["node1"], "paged", "c").join()
    for i in range(30):
        await talk.say(f"m{i}")
    await wait_until(lambda: len(talk.sink.events["c"]) == 60, what="60 events")
    await wait_until(lambda: _trimmed(a, "paged"), what="the window trimmed")
    runner = a.runner("paged")
    assert runner is not None and isinstance(runner.agent, MemoryAgent)
    context = runner.agent.context
    assert not context.resuming and context.checkpoint is None
    read = [e async for e in context.history()]
    assert read == talk.sink.events["c"]
    assert [e["id"] async for e in context.history(after=45)] == list(range(46, 61))
    assert [e async for e in AgentContext("x", None).history()] == []


async def _trimmed(node: ConversationManager, sid: str) -> bool:
    first = await node.state.redis.xrange(node.keys.events(sid), count=1)
    return bool(first) and int(first[0][0].split(b"-")[0]) > 1


@pytest.mark.parametrize("isolation", ["none", "process"])
async def test_answers_continue_after_an_eviction_and_restart(
    make_nodes: NodeFactory, isolation: str
) -> None:
    await _evicted_and_restarted(make_nodes, agent_isolation=isolation)


async def test_answers_continue_with_the_postgresql_store(
    make_nodes: NodeFactory, postgres_dsn: str
) -> None:
    await _evicted_and_restarted(make_nodes, event_store=postgres_dsn)


async def _evicted_and_restarted(make_nodes: NodeFactory, **config: Any) -> None:
    (a,) = await make_nodes(1, agent=MEMORY, max_concurrent_conversations=1, **config)
    talk = await Talk(a, make_nodes.sinks["node1"], "first", "c1").join()
    texts = [f"m{i}" for i in range(EVERY + 2)]
    ids = [await talk.say(t) for t in texts]
    await wait_until(lambda: _checkpoint(a, "first"), what="the checkpoint saved")
    await Talk(a, make_nodes.sinks["node1"], "second", "c2").join()  # evicts "first"
    await wait_until(lambda: "first" not in a.local_loops(), what="first evicted")
    # Its connections were closed with it (as the seed does): the client joins again,
    # which starts it again (evicting "second").
    await wait_until(lambda: "c1" not in a.local_connections(), what="c1 closed")
    await talk.join()
    texts.append("after the eviction")
    await talk.say(texts[-1])
    assert_continues(talk.answers(), texts)
    assert "recalled" not in talk.answers()[0]
    assert_resumed_from_checkpoint(talk.answers()[-1], ids[EVERY - 1], ids[-1])


async def test_answers_continue_after_an_idle_close_and_a_later_action(
    make_nodes: NodeFactory,
) -> None:
    (a,) = await make_nodes(1, agent=MEMORY, close_delay=0.3, cleanup_interval=0.1)
    sink = make_nodes.sinks["node1"]
    talk = await Talk(a, sink, "idle", "c1").join()
    texts = [f"m{i}" for i in range(EVERY + 1)]
    ids = [await talk.say(t) for t in texts]
    await wait_until(lambda: _checkpoint(a, "idle"), what="the checkpoint saved")
    await a.disconnect_from_session("c1")
    await wait_until(lambda: "idle" not in a.local_loops(), what="closed when idle")
    later = await Talk(a, sink, "idle", "c2").join()
    texts.append("later")
    await later.say(texts[-1])
    # c2 replays the whole conversation: every answer, the old ones and the new one.
    assert_continues(later.answers(), texts)
    assert_resumed_from_checkpoint(later.answers()[-1], ids[EVERY - 1], ids[-1])


async def test_answers_continue_when_the_agent_worker_is_killed(make_nodes: NodeFactory) -> None:
    (a,) = await make_nodes(1, agent=MEMORY)
    talk = await Talk(a, make_nodes.sinks["node1"], "worker", "c1").join()
    texts = [f"m{i}" for i in range(EVERY + 2)]
    ids = [await talk.say(t) for t in texts]
    await wait_until(lambda: _checkpoint(a, "worker"), what="the checkpoint saved")
    pool = a.node.agents
    assert pool is not None
    os.kill(pool.workers[0].pid, signal.SIGKILL)
    await wait_until(lambda: pool.restarts == 1, what="a fresh worker in its place")
    texts.append("after the worker")
    await talk.say(texts[-1])  # a fresh instance, resuming after the last action it had
    assert_continues(talk.answers(), texts)
    assert_resumed_from_checkpoint(talk.answers()[-1], ids[EVERY - 1], ids[-1])


async def _checkpoint(node: ConversationManager, sid: str) -> tuple[int, bytes] | None:
    assert node.node.store is not None
    return await node.node.store.load_checkpoint(sid)


async def test_a_fenced_owner_cannot_save_a_checkpoint(make_nodes: NodeFactory) -> None:
    a, b = await make_nodes(2, agent=MEMORY, agent_isolation="none")
    talk = await Talk(a, make_nodes.sinks["node1"], "fence", "c1").join()
    first = await talk.say("hello")
    runner = a.runner("fence")
    assert runner is not None and isinstance(runner.agent, MemoryAgent)
    old_context, old_lease = runner.agent.context, runner.lease
    mine = json.dumps({"earlier": 1, "previous": "hello"}).encode()
    await old_context.save_checkpoint(mine, first)
    assert await _checkpoint(a, "fence") == (first, mine)

    # The loop moves to b (a higher epoch): a's context refuses at once, and the store
    # refuses a checkpoint of the old epoch even from an owner that does not know yet.
    assert await a.close_session("fence", "alice")
    await b.maybe_start_agent_loop("fence", {}, "alice")
    successor = b.runner("fence")
    assert successor is not None and successor.lease.epoch > old_lease.epoch
    assert isinstance(successor.agent, MemoryAgent)
    assert successor.agent.context.checkpoint is not None
    assert successor.agent.context.checkpoint.covers == first
    with pytest.raises(Fenced):
        await old_context.save_checkpoint(b"late", first)
    assert a.node.store is not None
    unaware = LoopMemory(
        lease=Lease("fence", "alice", old_lease.inc, old_lease.epoch),
        history=a.node.history,
        store=a.node.store,
        archiver=a.node.archiver,
        owned=lambda: True,
    )
    with pytest.raises(Fenced):
        await unaware.save(first, b"late")
    assert await _checkpoint(a, "fence") == (first, mine)


@pytest.mark.parametrize("isolation", ["none", "process"])
async def test_an_oversize_checkpoint_is_a_clear_error(
    make_nodes: NodeFactory, isolation: str
) -> None:
    (a,) = await make_nodes(1, agent="tests.agents:BadAgent", agent_isolation=isolation)
    sink = make_nodes.sinks["node1"]
    await a.join_conversation("big", "c1", {}, "alice")
    over = DEFAULT_MAX_CHECKPOINT_BYTES + 1
    for size in (over, 10):
        await a.send_to_event_stream(
            "c1", {"action": "message", "args": {"content": f"checkpoint {size}"}}
        )
    await wait_until(lambda: len(_agent_said(sink)) == 2, what="both answered")
    too_large, saved = _agent_said(sink)
    limit = f"is {over} bytes; the limit is {DEFAULT_MAX_CHECKPOINT_BYTES}"
    assert limit in too_large and "checkpoint of 'big'" in too_large
    assert saved == "saved"
    stored = await _checkpoint(a, "big")
    assert stored is not None and stored[1] == b"x" * 10
    if isolation == "none":
        runner = a.runner("big")
        assert runner is not None
        context = runner.agent.context  # type: ignore[attr-defined]
        with pytest.raises(CheckpointTooLarge):
            await context.save_checkpoint(b"x" * over, 1)
        with pytest.raises(InvalidInput, match="after the last logged"):
            await context.save_checkpoint(b"ahead", 1000)
        with pytest.raises(InvalidInput, match="older than the saved one"):
            await context.save_checkpoint(b"behind", stored[0] - 1)
        assert await _checkpoint(a, "big") == stored


def _agent_said(sink: RecordingSink) -> list[str]:
    return [e["args"]["content"] for e in sink.events["c1"] if e["source"] == "agent"]


async def test_answers_continue_after_the_node_is_killed(
    process_cluster: ProcessCluster, private_event_store: str
) -> None:
    process_cluster.agent = MEMORY
    process_cluster.extra_args = ["--node-ttl", "3", "--heartbeat-interval", "0.5"]
    a, b = await process_cluster.async_start(2)
    token = process_cluster.token("alice")
    on_a, on_b = SioClient("on-a"), SioClient("on-b")
    store = FileEventStore(private_event_store)
    await store.open()
    try:
        await on_a.connect(a.url, "killed", token)  # the loop starts on a
        await on_b.connect(b.url, "killed", token)
        texts = [f"m{i}" for i in range(EVERY + 2)]
        ids = [await _said(on_b, t) for t in texts]

        async def saved() -> bool:
            return await store.load_checkpoint("killed") is not None

        await wait_until(saved, what="the checkpoint saved")
        a.kill()
        texts.append("after the kill")
        await _said(on_b, texts[-1], within=30)  # b takes over once a's lease expired
        assert_continues(_answers(on_b.events), texts)
        assert_resumed_from_checkpoint(_answers(on_b.events)[-1], ids[EVERY - 1], ids[-1])
    finally:
        await on_a.close()
        await on_b.close()
        await store.aclose()


async def _said(client: SioClient, text: str, within: float = 20.0) -> int:
    n = await client.say(text)

    def answered() -> bool:
        answers = _answers(client.events)
        return bool(answers) and answers[-1]["n"] == n

    await client.wait_for(answered, f"{text} answered", within)
    return n


@pytest.mark.parametrize("isolation", ["none", "process"])
async def test_a_checkpoint_the_store_cannot_take_now_leaves_the_answer_and_is_saved_later(
    make_nodes: NodeFactory,
    postgres_server: PostgresServer,
    postgres_dsn: str,
    isolation: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The event store away when the memory agent saves its checkpoint: the action it
    answered stays answered (before, the failed save made it an error observation after
    the answer), and the checkpoint is saved after the next action once the store is
    back."""
    (a,) = await make_nodes(1, agent=MEMORY, agent_isolation=isolation, event_store=postgres_dsn)
    sink = make_nodes.sinks["node1"]
    await a.join_conversation("away", "c1", {"checkpoint_every": 2}, "alice")
    talk = Talk(a, sink, "away", "c1")
    await talk.say("one")
    await asyncio.to_thread(postgres_server.stop)
    texts = ["one", "two", "three"]
    for text in texts[1:]:  # "two" is the second: its checkpoint is due
        await talk.say(text)
    await asyncio.to_thread(postgres_server.start)
    texts.append("four")
    last = await talk.say("four")
    assert_continues(talk.answers(), texts)
    errors = [e for e in sink.events["c1"] if e.get("observation") == "error"]
    assert errors == []
    await wait_until(lambda: _checkpoint_covers(a, "away", last), what="the checkpoint saved")
    if isolation == "none":  # a worker's log lines go to its own stderr
        assert any("checkpoint after event" in r.getMessage() for r in caplog.records)


async def _checkpoint_covers(node: ConversationManager, sid: str, covers: int) -> bool:
    saved = await _checkpoint(node, sid)
    return saved is not None and saved[0] == covers


async def test_a_restart_does_not_wait_on_a_store_that_hangs(
    make_nodes: NodeFactory, postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A loop that restarts a stored conversation fences its predecessors in the store
    and loads their checkpoint first: with the store's tables locked (a hung or very slow
    store), that held the start, and so its join and answers, for the store's query
    timeout (30 s; seen after a failover). It starts without the checkpoint after
    RESUME_WITHIN and reads its history instead: the memory agent's answers go on."""
    (a,) = await make_nodes(1, agent=MEMORY, event_store=postgres_dsn)
    sink = make_nodes.sinks["node1"]
    talk = await Talk(a, sink, "locked", "c1").join()
    texts = ["one", "two"]
    for text in texts:
        await talk.say(text)
    await a.close_session("locked", "alice")
    await wait_until(lambda: _stored_past(a, "locked", 4), what="its events stored")
    holder = await asyncpg.connect(postgres_dsn)
    try:
        locked = holder.transaction()
        await locked.start()
        await holder.execute(
            "LOCK TABLE coordinator.conversations, coordinator.checkpoints IN ACCESS EXCLUSIVE MODE"
        )
        talk = Talk(a, sink, "locked", "c2")
        await asyncio.wait_for(talk.join(), 15)  # the store's own query timeout is 30 s
        texts.append("three")
        await asyncio.wait_for(talk.say("three"), 15)
        assert_continues(talk.answers(), texts)
        assert "locked starts without its checkpoint: the event store did not answer" in (
            caplog.text
        )
    finally:
        await holder.close()  # the lock with it


async def _stored_past(node: ConversationManager, sid: str, n: int) -> bool:
    assert node.node.store is not None
    return await node.node.store.last_id(sid) >= n
