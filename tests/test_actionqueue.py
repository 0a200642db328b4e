"""An owned loop's queue of actions against a real Redis: what it reads and when."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from coordinator.actionqueue import ActionQueue
from coordinator.codec import pack
from coordinator.keys import KeySchema
from coordinator.state import RedisState
from tests.helpers import wait_until
from tests.server_fixtures import ServerCluster, SioClient

ACTION = {"source": "user", "action": "message", "args": {"content": "hi"}}


async def test_a_gap_seen_while_the_inbox_is_read_is_read_again(redis_client) -> None:
    """An event that goes by while the inbox is being read may be newer than what the read
    returns: the gap it shows must ask for another read, not be cleared by this one."""
    state = RedisState(redis_client, KeySchema("t"))
    await state.acquire("s1", "n1", "n1/a", "u", create=True)
    snapshot, taken, answer = state.inbox_snapshot, asyncio.Event(), asyncio.Event()

    async def slow_answer(sid: str, after: int, count: int = 500) -> Any:
        got = await snapshot(sid, after, count)  # taken in Redis now
        taken.set()
        await answer.wait()  # its answer comes back later
        return got

    state.inbox_snapshot = slow_answer  # type: ignore[method-assign]
    queue = ActionQueue("s1", state, applied=0, max_action_bytes=1024)
    reading = asyncio.ensure_future(queue.read())
    await taken.wait()
    # Meanwhile two actions are accepted, and the second goes by (the first not yet).
    first = await state.accept("s1", "u", pack({"n": 1}), 100, 10, floor=0)
    second = await state.accept("s1", "u", pack({"n": 2}), 100, 10, floor=0)
    assert queue.observe(second.event_id, ACTION)
    answer.set()
    await reading
    assert queue.reread  # the snapshot predates what the gap showed: read again
    await queue.read()
    assert [n for n, _ in iter(queue.next, None)] == [first.event_id, second.event_id]


async def test_a_loops_first_write_as_the_first_event_saves_the_start_read(redis_client) -> None:
    state = RedisState(redis_client, KeySchema("t"))
    queue = ActionQueue("s1", state, applied=0, max_action_bytes=1024)
    assert queue.reread  # a start reads the inbox
    queue.first_event()
    assert not queue.reread and queue.seen == 1 and queue.quiet is False  # woken once
    assert queue.observe(2, ACTION)  # a later action goes by as an event
    assert queue.next() == (2, ACTION)


async def test_a_gap_before_the_loops_first_write_keeps_the_start_read(redis_client) -> None:
    state = RedisState(redis_client, KeySchema("t"))
    queue = ActionQueue("s1", state, applied=0, max_action_bytes=1024)
    assert queue.observe(3, ACTION)  # 1 and 2 not seen yet
    queue.first_event()
    assert queue.reread


def answered(client: SioClient, content: str) -> Callable[[], bool]:
    return lambda: any(
        e.get("source") == "agent" and e.get("args", {}).get("content") == content
        for e in client.events
    )


async def test_a_new_conversations_loop_starts_without_reading_its_inbox(
    servers: ServerCluster,
) -> None:
    """Its start's state note is its first event, so no action can wait in its inbox; one
    created with a message (the message first, then the note) still reads it, and both
    answer their actions."""
    (a,) = await servers.start(1, agent_state_events=True)
    state = a.manager.node.state
    snapshot, reads = state.inbox_snapshot, []

    async def counted(sid: str, after: int, count: int = 500) -> Any:
        reads.append(sid)
        return await snapshot(sid, after, count)

    state.inbox_snapshot = counted  # type: ignore[method-assign]
    client = await servers.join(a, "fresh", "alice")
    await client.wait_ids(1)  # the state its start left the agent in
    await client.say("hello")
    await client.wait_for(answered(client, "hello"), "the answer")
    status, body = await servers.request(
        "POST",
        a,
        "/api/conversations",
        user="alice",
        json={"conversation_id": "asked", "initial_user_msg": "before"},
    )
    assert status == 201, body
    later = await servers.join(a, "asked", "alice")
    await later.wait_for(answered(later, "before"), "the answer")
    assert reads == ["asked"]


LARGE = 60_000  # bytes of content per action (max_action_bytes: 64 KiB, so 16 queued)


async def test_a_backlog_is_read_from_the_inbox_a_queueful_at_a_time(redis_client) -> None:
    """A restart finds 40 actions of 60 KB waiting: it queues as many as QUEUED_BYTES
    holds (it read 500 at once: the whole backlog's payloads, up to inbox_max x 64 KiB),
    the next read takes the rest, and every action is dispatched once, in order."""
    state = RedisState(redis_client, KeySchema("t"))
    await state.acquire("s1", "n1", "n1/a", "u", create=True)
    big = pack({"source": "user", "action": "message", "args": {"content": "x" * LARGE}})
    accepted = [
        (await state.accept("s1", "u", big, 100, 64 * 1024, floor=0)).event_id for _ in range(40)
    ]
    queue = ActionQueue("s1", state, applied=0, max_action_bytes=64 * 1024)
    dispatched, held = [], []
    while queue.reread:
        await queue.read()
        held.append(len(queue.pending))
        for n, _ in iter(queue.next, None):
            dispatched.append(n)
            queue.mark_applied(n)  # as its commit does
    assert dispatched == accepted
    assert held == [16, 16, 8]  # QUEUED_BYTES' worth at a time


async def test_actions_accepted_while_the_agent_is_busy_wait_in_the_inbox(make_nodes) -> None:
    """An agent busy with one action while 40 more of 60 KB are accepted: the loop queues
    what goes by up to QUEUED_BYTES (it kept every one's payload: up to inbox_max x
    64 KiB per conversation) and reads the rest from the inbox; every one is answered
    once, in order."""
    (a,) = await make_nodes(1, agent="tests.agents:BadAgent")
    await a.join_conversation("c1", "cs", {}, "bob")
    await a.send_to_event_stream("cs", {"action": "message", "args": {"content": "slow 2"}})
    runner = a.runner("c1")
    assert runner is not None
    await wait_until(lambda: runner.dispatched == 1, what="the agent busy with the first")
    queue, held = runner._queue, []
    for i in range(40):
        content = f"{i} " + "x" * LARGE
        await a.send_to_event_stream("cs", {"action": "message", "args": {"content": content}})
        held.append(len(queue.pending))
    assert max(held) <= 16, held  # QUEUED_BYTES' worth

    async def answers() -> list[str]:
        said, after, more = [], 0, True
        while more:
            page, more = await a.events_page("c1", after)
            after = page[-1]["id"]
            said += [
                str(e["args"]["content"]).split(" ")[0]
                for e in page
                if e.get("source") == "agent" and e.get("action") == "message"
            ]
        return said

    async def all_answered() -> bool:
        return len(await answers()) >= 41

    await wait_until(all_answered, timeout=30, what="every action answered")
    assert await answers() == ["slow", *map(str, range(40))]
