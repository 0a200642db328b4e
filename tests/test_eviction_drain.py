"""An evicted loop's drain (its acknowledged actions answered before it stops), with a
start waiting for it: one drain at a time per conversation, reading no payloads it does
not need. In-process nodes on real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coordinator.actionqueue import ActionQueue
from coordinator.codec import TOO_MANY_CONVERSATIONS, pack
from coordinator.keys import KeySchema
from coordinator.state import RedisState
from tests.helpers import InFlight, wait_until

SCRIPTED = "workers.scripted:ScriptedAgent"
LARGE = 60_000  # bytes of content per queued action (max_action_bytes: 64 KiB)


def _bytes(reply: Any) -> int:
    """The payload bytes of a Redis reply (raw or parsed)."""
    if isinstance(reply, bytes | str):
        return len(reply)
    if isinstance(reply, list | tuple):
        return sum(_bytes(part) for part in reply)
    if isinstance(reply, dict):
        return sum(_bytes(k) + _bytes(v) for k, v in reply.items())
    return 0


@pytest.mark.parametrize("starter", ["owner", "other node"])
async def test_a_waiting_start_drains_a_stuck_loop_once_without_reading_its_inbox(
    make_nodes, starter: str
) -> None:
    """A user at the cap (2) whose older loop is stuck on its first action with 20 more
    of 60 KB queued starts one more. The start waits for the eviction, which gives the
    backlog half of start_timeout, and nudges the owner once a second meanwhile. Each
    nudge used to start another drain beside the first, and each drain read the whole
    inbox's payloads (up to inbox_max x 64 KiB in one reply) again after every answer:
    now later nudges join the one drain, which reads only the newest waiting action.
    The start is on the loop's node, or on another (its nudges are commands: the
    eviction tells it when the slot is free)."""
    a, b = await make_nodes(2, max_concurrent_conversations=2, agent=SCRIPTED, start_timeout=6.0)
    starting = a if starter == "owner" else b
    await a.join_conversation("stuck", "cs", {"think_time": 3600}, "bob")
    say = {"action": "message", "args": {"content": "first"}}
    acked = [await a.send_to_event_stream("cs", say)]
    big = {"action": "message", "args": {"content": "x" * LARGE}}
    acked += [await a.send_to_event_stream("cs", big) for _ in range(20)]
    runner = a.runner("stuck")
    assert runner is not None
    await wait_until(lambda: runner.dispatched == 1, what="the agent stuck on the first")
    await a.join_conversation("other0", "c0", {}, "bob")

    drains = InFlight(runner, attr="finish_backlog")
    nudges = InFlight(starting.node.loops.admission, attr="_evict")
    state, inbox, reads = a.state, a.keys.inbox("stuck"), []
    commands = state._commands

    async def recorded(batch: Any, **kwargs: Any) -> Any:
        replies = await commands(batch, **kwargs)
        if any(len(c) > 1 and c[1] == inbox and c[0] in ("XRANGE", "XREVRANGE") for c in batch):
            reads.append(_bytes(replies))
        return replies

    state._commands = recorded  # type: ignore[method-assign]
    info = await starting.maybe_start_agent_loop("other1", {}, "bob")  # evicts "stuck"

    # (its backlog's restart may since have evicted "other0" in turn)
    assert info.running and "other1" in a.local_loops() | b.local_loops()
    assert nudges.calls >= 2, "the start should have nudged the eviction again meanwhile"
    assert drains.calls == 1 and drains.peak == 1, (drains.calls, drains.peak)
    assert reads, "the drain read the inbox"
    assert max(reads) < 2 * LARGE, reads  # one action's payload at most, not the inbox
    sink = make_nodes.sinks["node1"]
    assert sink.told("cs", TOO_MANY_CONVERSATIONS)
    assert "cs" in sink.disconnected

    # The backlog it could not finish goes to a restart (the default agent's settings:
    # it answers): every acknowledged action is answered, once, in order.
    async def answered() -> list[int]:
        logged = await a.events("stuck", 0, 1000)
        return [e["args"]["in_reply_to"] for e in logged if e.get("source") == "agent"]

    async def all_answered() -> bool:
        return len(await answered()) >= len(acked)

    await wait_until(all_answered, timeout=20, what="every acknowledged action answered")
    assert await answered() == acked


async def test_a_drain_has_the_loop_read_what_its_queue_has_not_seen(redis_client) -> None:
    """The drain reads only the newest waiting id; actions after what the queue has seen
    (their events never went by: a lost message) are still answered before the loop
    stops: the drain asks the loop to read the inbox, and waits until they are applied."""
    state = RedisState(redis_client, KeySchema("t"))
    await state.acquire("s1", "n1", "n1/a", "u", create=True)
    first = await state.accept("s1", "u", pack({"n": 1}), 100, 10, floor=0)
    queue = ActionQueue("s1", state, applied=0, max_action_bytes=1024)
    await queue.read()  # the start's read
    assert queue.seen == first.event_id
    unseen = [
        (await state.accept("s1", "u", pack({"n": i}), 100, 10, floor=0)).event_id for i in (2, 3)
    ]
    draining = asyncio.ensure_future(queue.drain(lambda: True, within=5.0))
    await wait_until(lambda: queue.reread, what="the drain asks for a read")
    await queue.read()  # what the loop does when woken
    dispatched = [n for n, _ in iter(queue.next, None)]
    assert dispatched == [first.event_id, *unseen]
    assert not draining.done()  # nothing applied yet
    for n in dispatched:  # as each one's commit marks it
        queue.mark_applied(n)
    assert await draining is True
