"""Single activation and the exact cluster-wide cap, with in-process nodes on real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time

from coordinator.codec import TOO_MANY_CONVERSATIONS, notice_code
from coordinator.errors import ConversationClosed
from tests.helpers import wait_until


async def test_single_activation_3_nodes_x_20_concurrent_starts_100_times(make_nodes) -> None:
    nodes = await make_nodes(3, max_concurrent_conversations=1000)
    for round_ in range(100):
        sid = f"single-{round_}"
        calls = [
            node.maybe_start_agent_loop(sid, {}, f"user{round_}")
            for _ in range(20)
            for node in nodes
        ]
        infos = await asyncio.gather(*calls)
        runners = [node for node in nodes if sid in node.local_loops()]
        assert len(runners) == 1, f"round {round_}: loop runs on {len(runners)} nodes"
        owner = runners[0].node_id
        assert {i.owner for i in infos} == {owner}
        assert all(i.running for i in infos)
    total = sum(len(n.local_loops()) for n in nodes)
    assert total == 100
    print("single activation: 100 rounds x 60 concurrent starts, 1 loop each round")
    assert len(await nodes[0].get_running_agent_loops()) == 100


async def test_cap_is_exact_across_nodes_and_evicts_least_recently_updated(make_nodes) -> None:
    cap = 3
    nodes = await make_nodes(3, max_concurrent_conversations=cap)
    samples: list[int] = []
    stop = asyncio.Event()

    async def observe() -> None:
        while not stop.is_set():
            samples.append(sum(len(n.local_loops()) for n in nodes))
            await asyncio.sleep(0)

    observer = asyncio.create_task(observe())
    sids = [f"capped-{i}" for i in range(30)]
    joins = await asyncio.gather(
        *(
            nodes[i % 3].join_conversation(sid, f"conn-{i}", {}, "alice")
            for i, sid in enumerate(sids)
        ),
        return_exceptions=True,
    )
    # A join whose conversation was evicted while it joined is told why and refused.
    assert all(not isinstance(j, BaseException) or isinstance(j, ConversationClosed) for j in joins)
    await wait_until(
        lambda: sum(len(n.local_loops()) for n in nodes) == cap, what="cap loops running"
    )
    stop.set()
    await observer
    assert len(samples) > 20
    assert max(samples) <= cap, f"observed {max(samples)} loops at once"
    print(f"cap {cap}: {len(samples)} observer samples, at most {max(samples)} loops at once")

    running = set().union(*(n.local_loops() for n in nodes))
    assert len(running) == cap
    # The survivors are the most recently updated: the top of the user's claims.
    claims = await nodes[0].state.redis.zrevrange(nodes[0].keys.user_claims("alice"), 0, -1)
    assert {c.decode() for c in claims} == running
    # Every other conversation's subscriber was told why it stopped.
    for i, sid in enumerate(sids):
        sink = make_nodes.sinks[nodes[i % 3].node_id]
        if sid in running:
            assert not sink.told(f"conn-{i}", TOO_MANY_CONVERSATIONS)
        else:
            await wait_until(
                lambda sink=sink, i=i: sink.told(f"conn-{i}", TOO_MANY_CONVERSATIONS),
                what=f"status update for {sid}",
            )
    for node in nodes:
        assert await node.get_running_agent_loops("alice") == running

    # Seed semantics: the least recently *updated* goes first. Touch the oldest
    # survivor, then start one more: the middle one is evicted instead. (Activity
    # reaches the claims in batches; flush them so the order read here is current.)
    for node in nodes:
        await node.flush_activity()
    scored = await nodes[0].state.redis.zrange(
        nodes[0].keys.user_claims("alice"), 0, -1, withscores=True
    )
    ordered = [c.decode() for c, _ in scored]
    oldest, _middle, newest = ordered
    # A start's claim ranks above every other (its score one above the top's), so a burst
    # of starts leaves the top scores a few ms ahead of the clock: a touch counts as more
    # recent once the clock has passed them (before, a touch within those ms was not,
    # and the oldest was evicted: 2 runs in 10).
    top = max(score for _, score in scored)
    await wait_until(lambda: time.time() * 1000 > top + 1, what="the clock past the claims")
    holder = next(i for i, s in enumerate(sids) if s == oldest)
    node = nodes[holder % 3]
    await node.send_to_event_stream(f"conn-{holder}", {"action": "message", "args": {}})
    owner = next(n for n in nodes if oldest in n.local_loops())
    await wait_until(lambda: owner.runner(oldest).dispatched >= 1, what="action dispatched")
    for node in nodes:
        await node.flush_activity()
    await nodes[1].maybe_start_agent_loop("capped-new", {}, "alice")
    await wait_until(
        lambda: set().union(*(n.local_loops() for n in nodes)) == {oldest, newest, "capped-new"},
        what=f"middle conversation evicted ({oldest=}, {_middle=}, {newest=})",
    )


async def test_cap_holds_when_one_node_starts_many_at_once(make_nodes) -> None:
    (node,) = await make_nodes(1, max_concurrent_conversations=2)
    peak = 0
    done = asyncio.Event()

    async def observe() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, len(node.local_loops()))
            await asyncio.sleep(0)

    task = asyncio.create_task(observe())
    await asyncio.gather(*(node.maybe_start_agent_loop(f"one-{i}", {}, "bob") for i in range(12)))
    done.set()
    await task
    assert peak <= 2
    assert len(node.local_loops()) == 2
    with contextlib.suppress(Exception):
        await node.close_session("one-0", "bob")


async def test_an_evicted_loop_answers_what_it_acknowledged_before_it_stops(make_nodes) -> None:
    a, b = await make_nodes(
        2, max_concurrent_conversations=1, agent="workers.scripted:ScriptedAgent"
    )
    await a.join_conversation("busy", "ca", {"think_time": 0.2}, "kim")
    acked = [
        await a.send_to_event_stream("ca", {"action": "message", "args": {"content": f"m{i}"}})
        for i in range(4)
    ]
    peak = 0
    done = asyncio.Event()

    async def observe() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, len(a.local_loops()) + len(b.local_loops()))
            await asyncio.sleep(0)

    task = asyncio.create_task(observe())
    await b.maybe_start_agent_loop("newer", {}, "kim")  # evicts "busy"
    done.set()
    await task
    assert peak <= 1
    assert b.local_loops() == {"newer"} and a.local_loops() == set()
    events = make_nodes.sinks["node1"].events["ca"]
    await wait_until(
        lambda: any(notice_code(e) == TOO_MANY_CONVERSATIONS for e in events), what="status"
    )
    answered = [e["args"]["in_reply_to"] for e in events if e.get("source") == "agent"]
    assert answered == acked  # every acknowledged action answered, in order, once
    statuses = [i for i, e in enumerate(events) if notice_code(e) == TOO_MANY_CONVERSATIONS]
    last_reply = max(i for i, e in enumerate(events) if e.get("source") == "agent")
    assert statuses and statuses[0] > last_reply  # told why only after the work was done


async def test_an_evicted_loop_that_cannot_finish_its_backlog_hands_it_to_a_restart(
    make_nodes,
) -> None:
    """The eviction waits for the backlog only so long (half of start_timeout); the
    actions still waiting are restarted (on the evicting loop's cap slot's terms) and
    answered, each once, in order."""
    a, b = await make_nodes(
        2, max_concurrent_conversations=1, agent="workers.scripted:ScriptedAgent", start_timeout=1.0
    )
    await a.join_conversation("slow", "ca", {"think_time": 0.4}, "lee")
    acked = [
        await a.send_to_event_stream("ca", {"action": "message", "args": {"content": f"m{i}"}})
        for i in range(5)
    ]
    await b.maybe_start_agent_loop("newer", {}, "lee")  # evicts "slow" mid-backlog
    sink = make_nodes.sinks["node1"]
    assert "ca" in sink.disconnected  # the seed's eviction: its clients are let go
    assert len(sink.events["ca"]) < 2 * len(acked)  # before every answer was given

    async def answered() -> list[int]:
        logged = await a.events("slow", 0, 1000)
        return [e["args"]["in_reply_to"] for e in logged if e.get("source") == "agent"]

    async def all_answered() -> bool:
        return len(await answered()) >= len(acked)

    await wait_until(all_answered, timeout=20, what="every acknowledged action answered")
    assert await answered() == acked  # each once, in order
    assert len(a.local_loops()) + len(b.local_loops()) <= 1
