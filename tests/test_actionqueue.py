"""An owned loop's queue of actions against a real Redis: what it reads and when."""

from __future__ import annotations

import asyncio
from typing import Any

from coordinator.actionqueue import ActionQueue
from coordinator.codec import pack
from coordinator.keys import KeySchema
from coordinator.state import RedisState

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
    queue = ActionQueue("s1", state, applied=0)
    reading = asyncio.ensure_future(queue.read())
    await taken.wait()
    # Meanwhile two actions are accepted, and the second goes by (the first not yet).
    first = await state.accept("s1", "u", pack({"n": 1}), 100, 10)
    second = await state.accept("s1", "u", pack({"n": 2}), 100, 10)
    assert queue.observe(second.event_id, ACTION)
    answer.set()
    await reading
    assert queue.reread  # the snapshot predates what the gap showed: read again
    await queue.read()
    assert [n for n, _ in iter(queue.next, None)] == [first.event_id, second.event_id]
