"""Guarantee 13: a bad agent hurts only its own conversation.

Real bad agents (``tests.agents.BadAgent``) in real worker processes: one that holds its
event loop, one that ends its process, one that runs out of memory, one that never
answers in time, one that cannot start. Each time another conversation on the same node
keeps being answered, the node keeps its lease, the bad conversation's later actions are
answered, and every acknowledged action is answered exactly once (the one given up on
by an ``error`` observation naming it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from coordinator import AgentFailed, ConfigError, ConversationManager, agentworker
from coordinator.codec import pack
from coordinator.keys import KeySchema
from coordinator.state import RedisState
from tests.helpers import RecordingSink, wait_until
from tests.processes import REPO, child_env
from workers.channel import DISPATCH, DONE, EMIT, HELLO, OPEN, REPLY, STOP, FrameReader, frame

BAD = "tests.agents:BadAgent"
ISOLATED_ATTEMPTS = 2  # max_dispatch_attempts, the default
ISOLATED = dict(
    agent=BAD,
    agent_workers=2,
    agent_stall_timeout=1.0,
    max_concurrent_conversations=10,
)


class Watcher:
    """One connection to a conversation on ``node``, and what it got."""

    def __init__(self, node: ConversationManager, sink: RecordingSink, sid: str) -> None:
        self.node, self.sink, self.sid, self.cid = node, sink, sid, f"conn-{sid}"

    async def join(self, settings: dict[str, Any] | None = None) -> Watcher:
        await self.node.join_conversation(self.sid, self.cid, settings or {}, "alice")
        return self

    async def say(self, text: str) -> int:
        return await self.node.send_to_event_stream(
            self.cid, {"action": "message", "args": {"content": text}}
        )

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.sink.events[self.cid]

    def answers(self) -> list[str]:
        return [e["args"]["content"] for e in self.events if e["source"] == "agent"]

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("observation") == "error"]

    async def round_trip(self, text: str, within: float = 3.0) -> None:
        await self.say(text)
        await wait_until(lambda: text in self.answers(), timeout=within, what=f"{text} answered")

    def answered_once(self) -> None:
        """Every user action is answered by exactly one event, in order."""
        asked = [e["id"] for e in self.events if e["source"] == "user"]
        replies = [e for e in self.events if e["source"] != "user"]
        assert len(replies) == len(asked), self.events
        for e in replies:
            if e.get("observation") == "error":
                assert e["extras"]["action_id"] in asked


async def _isolated_node(make_nodes: Any, **overrides: Any) -> tuple[ConversationManager, Any]:
    (node,) = await make_nodes(1, **{**ISOLATED, **overrides})
    lapses: list[str] = []
    node.node.membership.on_lapse(lapses.append)
    return node, lapses


def _pool(node: ConversationManager) -> Any:
    assert node.node.agents is not None, "agents run in worker processes by default"
    return node.node.agents


async def _keep_answering_until(good: Watcher, done: Any) -> int:
    """Round trips on ``good`` until ``done()``; how many there were."""
    n = 0
    while not done():
        await good.round_trip(f"good-{n}")
        n += 1
    return n


async def test_an_agent_holding_its_loop_stalls_only_its_own_conversation(make_nodes) -> None:
    node, lapses = await _isolated_node(make_nodes)
    sink = make_nodes.sinks[node.node_id]
    bad = await Watcher(node, sink, "bad").join()
    good = await Watcher(node, sink, "good").join()
    pool = _pool(node)
    assert sorted(len(w.loops) for w in pool.workers) == [1, 1], "one loop per worker"

    blocked = await bad.say("block 8")
    queued = await bad.say("queued while blocked")  # acknowledged: it must be answered
    # Stalled twice (stall timeout 1 s each, 8 s of blocking each time), then given up:
    # the good conversation is answered all along.
    t0 = time.monotonic()
    rounds = await _keep_answering_until(good, lambda: bad.errors())
    print(f"{rounds} round trips of the other conversation in {time.monotonic() - t0:.1f} s")
    assert rounds >= 5
    (error,) = bad.errors()
    assert error["extras"] == {"action_id": blocked, "reason": "stalled"}
    assert error["source"] == "environment" and f"Action {blocked}" in error["content"]
    await wait_until(lambda: "queued while blocked" in bad.answers(), what="queued answered")
    after = await bad.say("after")
    await wait_until(lambda: "after" in bad.answers(), what="after answered")
    await good.round_trip("good-after")
    bad.answered_once()
    good.answered_once()
    assert [e["args"]["content"] for e in bad.events if e["source"] == "user"] == [
        "block 8",
        "queued while blocked",
        "after",
    ]
    assert queued == blocked + 1

    assert lapses == [] and not node.node.membership.lapsed
    assert (pool.stalls, pool.poisoned) == (2, 1)
    # The pool's worker replaced; the second stall was a probation worker's, stopped.
    await wait_until(lambda: (pool.restarts, pool.probationers) == (1, set()), what="replaced")
    # What a successor would read before dispatching it again (later actions add nothing).
    assert await node.state.attempts("bad") == {str(blocked): "2", f"{blocked}:why": "stalled"}
    assert after > queued


async def test_a_dispatch_that_was_only_sharing_the_stuck_worker_runs_again_elsewhere(
    make_nodes,
) -> None:
    """The stall reporter names the task holding the loop: the other dispatch running in
    that worker is not blamed, and it runs again at once in a healthy worker."""
    node, lapses = await _isolated_node(make_nodes, max_dispatch_attempts=1)
    sink = make_nodes.sinks[node.node_id]
    bad = await Watcher(node, sink, "bad").join()
    await Watcher(node, sink, "other").join()
    bystander = await Watcher(node, sink, "bystander").join()  # shares bad's worker
    pool = _pool(node)
    assert node.runner("bad").agent.worker is node.runner("bystander").agent.worker

    await bystander.say("slow 0.5")
    await wait_until(lambda: node.runner("bystander").agent.in_flight, what="bystander busy")
    await bad.say("block 8")
    await wait_until(lambda: bad.errors(), timeout=10, what="the blocking action given up")
    await wait_until(lambda: "slow 0.5" in bystander.answers(), what="the bystander answered")
    assert bystander.errors() == [] and bystander.answers() == ["slow 0.5"]
    assert (pool.stalls, pool.poisoned, lapses) == (1, 1, [])


async def test_an_agent_that_ends_its_process_is_given_up_after_two_tries(make_nodes) -> None:
    node, lapses = await _isolated_node(make_nodes)
    sink = make_nodes.sinks[node.node_id]
    bad = await Watcher(node, sink, "bad").join()
    good = await Watcher(node, sink, "good").join()
    pool = _pool(node)

    doomed = await bad.say("exit")
    await bad.say("next")
    rounds = await _keep_answering_until(good, lambda: bad.errors())
    assert rounds >= 1
    (error,) = bad.errors()
    assert error["extras"] == {"action_id": doomed, "reason": "worker died"}
    await wait_until(lambda: "next" in bad.answers(), what="the next action answered")
    bad.answered_once()
    assert (pool.poisoned, pool.stalls, lapses) == (1, 0, [])
    # The pool's worker replaced; the second death was a probation worker's.
    await wait_until(lambda: (pool.restarts, pool.probationers) == (1, set()), what="replaced")


@pytest.mark.parametrize("command", ["leak", "hoard"])
async def test_an_agent_out_of_memory_is_answered_with_an_error(make_nodes, command) -> None:
    """``leak``: the instance holds what it took, and lets go of it when it is dropped.
    ``hoard``: the agent fills its worker's address space and keeps it (out of its
    instance's reach) before it raises: the worker has no memory left to pack its
    answer, yet the node hears of it (a frame built at start-up, or the worker's end).
    Either way the action is given up with reason ``memory`` and the next is answered.
    Before, a hoarding agent's conversation went silent: the answer could not be packed,
    and the worker went on answering PINGs."""
    node, lapses = await _isolated_node(make_nodes, agent_memory_limit=256 << 20)
    sink = make_nodes.sinks[node.node_id]
    bad = await Watcher(node, sink, "bad").join()
    good = await Watcher(node, sink, "good").join()
    hog = await bad.say(command)
    await _keep_answering_until(good, lambda: bad.errors())
    (error,) = bad.errors()
    assert error["extras"] == {"action_id": hog, "reason": "memory"}
    await bad.round_trip("after")
    bad.answered_once()
    assert lapses == []


async def test_a_dispatch_over_its_time_limit_is_cancelled_and_answered(make_nodes) -> None:
    node, _ = await _isolated_node(make_nodes, agent_dispatch_timeout=0.3)
    sink = make_nodes.sinks[node.node_id]
    bad = await Watcher(node, sink, "bad").join()
    slow = await bad.say("slow 30")
    await wait_until(lambda: bad.errors(), what="the slow action given up")
    assert bad.errors()[0]["extras"] == {"action_id": slow, "reason": "timeout"}
    await bad.round_trip("after")
    bad.answered_once()
    assert (_pool(node).timeouts, _pool(node).restarts) == (1, 0)


async def test_a_dispatch_held_up_by_another_agent_is_not_timed_out(make_nodes) -> None:
    """Its worker's loop held by another conversation's agent (a blocking call shorter
    than the stall timeout, longer than the dispatch limit): the action that only waited
    is answered, not cancelled as one that ran too long. Before, the innocent one was
    answered "ran longer than" the limit and counted as a timeout."""
    node, lapses = await _isolated_node(
        make_nodes, agent_workers=1, agent_stall_timeout=5.0, agent_dispatch_timeout=1.5
    )
    sink = make_nodes.sinks[node.node_id]
    bad = await Watcher(node, sink, "blocks").join()
    innocent = await Watcher(node, sink, "waits").join()
    # Past the limit and past when the worker reports who holds its loop (stall / 2,
    # every stall / 8), short of the stall timeout (counted from its heartbeat).
    await bad.say("block 4")
    await asyncio.sleep(0.2)
    await innocent.round_trip("hello", within=10)
    assert innocent.errors() == []
    await wait_until(lambda: bad.errors(), timeout=10, what="the blocking action given up")
    assert bad.errors()[0]["extras"]["reason"] == "timeout"  # its own time was too long
    assert _pool(node).timeouts == 1 and lapses == []


async def test_a_worker_held_by_a_blocking_agent_is_not_counted_as_answering(
    make_nodes,
) -> None:
    """/metrics' coordinator_agent_workers counts workers up and answering: one whose loop
    an agent holds drops out of it until it answers again (before, it was counted until
    it was killed)."""
    node, lapses = await _isolated_node(make_nodes, agent_stall_timeout=5.0)
    sink = make_nodes.sinks[node.node_id]

    def answering() -> int:
        text = node.node.metrics.render().decode()
        (line,) = [x for x in text.splitlines() if x.startswith("coordinator_agent_workers{")]
        return int(float(line.rsplit(" ", 1)[1]))

    assert answering() == 2
    bad = await Watcher(node, sink, "blocks").join()
    await bad.say("block 3")
    await wait_until(lambda: answering() == 1, timeout=5, what="the held worker not counted")
    await wait_until(lambda: answering() == 2, timeout=10, what="it answers again")
    assert lapses == []


async def test_an_agent_that_cannot_start_is_a_clear_error_and_harms_nothing(make_nodes) -> None:
    node, lapses = await _isolated_node(make_nodes)
    sink = make_nodes.sinks[node.node_id]
    good = await Watcher(node, sink, "good").join()
    with pytest.raises(AgentFailed, match="RuntimeError: this agent cannot start"):
        await node.maybe_start_agent_loop("broken", {"fail_start": True}, "alice")
    assert not await node.is_agent_loop_running("broken")
    await good.round_trip("still here")
    assert (_pool(node).restarts, lapses) == (0, [])


@pytest.mark.parametrize("isolation", ["process", "none"])
async def test_an_agent_that_never_finishes_starting_is_cancelled_at_its_bound(
    make_nodes: Any, isolation: str, tmp_path: Any
) -> None:
    """``agent_start_timeout``: a start still running then is cancelled (in its worker
    too) and the join refused with an error naming the bound; nothing is left
    "starting", the conversation starts when its agent does, the others never noticed."""
    node, lapses = await _isolated_node(
        make_nodes, agent_isolation=isolation, agent_start_timeout=2.0
    )
    sink = make_nodes.sinks[node.node_id]
    good = await Watcher(node, sink, "good").join()
    ended = tmp_path / "start"
    stuck = Watcher(node, sink, "stuck")
    with pytest.raises(AgentFailed, match=r"did not start within 2s \(agent_start_timeout\)"):
        await stuck.join({"start_delay": 3600, "start_log": str(ended)})
    await wait_until(ended.exists, what="the start ended where it ran")
    assert ended.read_text() == "cancelled"
    assert not await node.is_agent_loop_running("stuck")
    assert "stuck" not in node.node.loops.starting
    await good.round_trip("still here")
    await stuck.join()
    await stuck.round_trip("started after all")
    assert lapses == []


async def test_an_action_spent_on_other_nodes_is_not_dispatched_again(make_nodes) -> None:
    """The count lives in Redis with the inbox: an action that failed its workers
    max_dispatch_attempts times before (here: as if on another node) is answered with an
    error by the next owner without being dispatched ('exit' would end a worker)."""
    node, _ = await _isolated_node(make_nodes)
    sink = make_nodes.sinks[node.node_id]
    bad = await Watcher(node, sink, "spent").join()
    await node.state.redis.hset(node.keys.attempts("spent"), mapping={"1": 2, "1:why": "stalled"})
    assert await bad.say("exit") == 1
    await wait_until(lambda: bad.errors(), what="the spent action given up")
    assert bad.errors()[0]["extras"] == {"action_id": 1, "reason": "stalled"}
    await bad.round_trip("after")
    assert _pool(node).restarts == 0


@pytest.mark.parametrize("isolation", ["process", "none"])
async def test_an_agent_raising_in_dispatch_is_visible_and_the_loop_goes_on(
    make_nodes: Any, isolation: str
) -> None:
    """The action is answered with an ``error`` observation, the agent state goes to
    ``error`` and back to awaiting input (logged), /metrics counts it."""
    node, _ = await _isolated_node(make_nodes, agent_isolation=isolation)
    bad = await Watcher(node, make_nodes.sinks[node.node_id], "raises").join()
    raised = await bad.say("raise")
    await bad.round_trip("after")
    assert bad.answers() == ["after"]
    if isolation == "process":
        assert _pool(node).restarts == 0
    (error,) = bad.errors()
    assert error["extras"] == {"action_id": raised, "reason": "agent error"}
    assert error["content"] == f"Action {raised} failed: the agent raised ValueError."
    states = [
        e["extras"]["agent_state"]
        for e in bad.events
        if e.get("observation") == "agent_state_changed"
    ]
    assert states == ["error", "awaiting_user_input"]
    assert [e["id"] for e in bad.events] == list(range(1, len(bad.events) + 1))
    assert b"coordinator_agent_errors_total" in node.metrics.render()
    assert node.metrics.agent_errors == 1


@pytest.mark.parametrize("isolation", ["process", "none"])
async def test_an_agent_class_that_cannot_be_constructed_is_refused_at_start(
    redis_url: str, isolation: str
) -> None:
    from tests.helpers import fast_config

    config = fast_config(
        redis_url, "wrong", agent="tests.agents:WrongInitAgent", agent_isolation=isolation
    )
    with pytest.raises(ConfigError, match="cannot be constructed with one argument"):
        await ConversationManager(config).start()


async def test_a_factory_given_in_code_runs_in_the_node(redis_url: str) -> None:
    from tests.helpers import fast_config
    from workers.echo import EchoAgent

    manager = ConversationManager(fast_config(redis_url, "inproc"), agent_factory=EchoAgent)
    async with manager:
        assert manager.node.agents is None
        await manager.maybe_start_agent_loop("c", {}, "alice")
        assert isinstance(manager.runner("c").agent, EchoAgent)


async def test_a_lost_speculation_replaces_the_agent_in_its_worker(
    make_nodes, redis_client
) -> None:
    """Speculative dispatch is the runner's, whatever the isolation: an action logged
    first by another node voids the prediction, the remote instance that saw ours under
    the wrong id is replaced by a fresh one, and both are answered in log order."""
    (node,) = await make_nodes(1, agent="workers.scripted:ScriptedAgent")
    sink = make_nodes.sinks[node.node_id]
    await node.join_conversation("race", "c1", {"think_time": 0}, "alice", None)
    message = {"action": "message", "args": {"content": "first"}}
    await node.send_to_event_stream("c1", message)

    def answers() -> list[tuple[int, str]]:
        return [
            (e["args"]["in_reply_to"], e["args"]["content"].rstrip(". "))
            for e in sink.events["c1"]
            if e["source"] == "agent"
        ]

    await wait_until(lambda: len(answers()) == 1)
    other = RedisState(redis_client, KeySchema(node.config.key_prefix))
    foreign = pack({"action": "message", "args": {"content": "foreign"}, "source": "user"})
    landed = await other.accept("race", "alice", foreign, 1000, 100, publisher=node.inc, floor=0)
    assert landed.event_id == 3  # logged, not published: the owner has not seen it
    ours = {"action": "message", "args": {"content": "ours"}}
    assert await node.send_to_event_stream("c1", ours) == 4
    await wait_until(lambda: len(answers()) == 3, what="three answers")
    assert answers() == [(1, "first"), (3, "foreign"), (4, "ours")]
    assert sink.ids("c1") == [1, 2, 3, 4, 5, 6]
    assert node.metrics.speculations_lost == 1
    assert _pool(node).restarts == 0


async def _an_innocent_beside_a_killer(
    make_nodes: Any, innocent_says: str
) -> tuple[ConversationManager, list[str], Watcher, Watcher]:
    """One worker: conversation "innocent" says ``innocent_says``, then "kills" ends the
    worker's process (``exit``): the innocent action is a suspect."""
    node, lapses = await _isolated_node(make_nodes, agent_workers=1, agent_stall_timeout=5.0)
    sink = make_nodes.sinks[node.node_id]
    innocent = await Watcher(node, sink, "innocent").join()
    bad = await Watcher(node, sink, "kills").join()
    await innocent.say(innocent_says)
    await asyncio.sleep(0.3)
    await bad.say("exit")
    return node, lapses, innocent, bad


async def test_a_suspect_goes_again_in_a_worker_of_its_own(make_nodes) -> None:
    """One worker; an innocent action in flight when another conversation's agent kills
    it becomes a suspect and goes again apart from the pool, in a worker process started
    for the suspects. A conversation whose agent's start kills the pool's fresh worker
    too joins meanwhile:
    the suspect's worker is not that one, so the innocent action is answered, not given
    up as poison (a crash beside it would have been its second strike)."""
    node, lapses, innocent, bad = await _an_innocent_beside_a_killer(make_nodes, "slow 2")
    sink, pool = make_nodes.sinks[node.node_id], _pool(node)
    await wait_until(lambda: pool.probationers, what="a suspect on probation")
    with contextlib.suppress(AgentFailed):
        await Watcher(node, sink, "starts-badly").join({"start_exit": True})
    await wait_until(lambda: "slow 2" in innocent.answers(), timeout=20, what="answered")
    assert innocent.errors() == []
    await wait_until(lambda: bad.errors(), timeout=20, what="the killer given up")
    assert lapses == []


async def _gathered_past_a_killer(
    pool: Any, innocents: list[Watcher], killer: Watcher, where: Any
) -> None:
    """``innocents`` each say ``gather`` (answered once all of them run at once, after a
    ``go`` mark), then ``killer`` ends their worker's process (``exit``); once the
    worker is replaced, ``go``: returns once every innocent is answered."""
    gather = f"gather {len(innocents)} {where}"
    for w in innocents:
        await w.say(gather)
    await wait_until(lambda: len(list(where.iterdir())) == len(innocents), what="all waiting")
    await killer.say("exit")
    await wait_until(lambda: pool.restarts, timeout=20, what="their worker replaced")
    (where / "go").touch()
    await wait_until(
        lambda: all(gather in w.answers() for w in innocents), timeout=30, what="answered"
    )


async def test_suspects_go_again_side_by_side(make_nodes, tmp_path) -> None:
    """Two innocent actions in flight when a third conversation's agent ends their
    worker's process are suspects, with the killer: they go again at the same time, apart
    from the pool (here they can only be answered together: each waits until both run).
    Before, suspects went again one at a time on the failed worker's successor: an
    innocent action waited behind another for as long as that one ran (here for ever).
    Afterwards all three conversations are answered from the pool again, and the
    probation workers are gone."""
    node, lapses = await _isolated_node(make_nodes, agent_workers=2, agent_stall_timeout=5.0)
    sink = make_nodes.sinks[node.node_id]
    # The least loaded worker, the first on a tie: a, b and the killer share one.
    a, _, b, _, killer = [
        await Watcher(node, sink, sid).join() for sid in ("a", "a2", "b", "b2", "killer")
    ]
    workers = {node.runner(w.sid).agent.worker for w in (a, b, killer)}  # type: ignore[union-attr]
    assert len(workers) == 1
    pool = _pool(node)
    await _gathered_past_a_killer(pool, [a, b], killer, tmp_path)
    assert a.errors() == b.errors() == []
    await wait_until(lambda: killer.errors(), timeout=20, what="the killer given up")
    await wait_until(lambda: not pool.probationers, what="the probation workers stopped")
    for w in (a, b, killer):
        await w.round_trip(f"{w.sid} again")
        assert node.runner(w.sid).agent.worker in pool.workers  # type: ignore[union-attr]
    assert lapses == []


async def test_a_killer_among_suspects_is_found_by_halving_them(make_nodes, tmp_path) -> None:
    """One worker; three innocent actions in flight when a fourth conversation's agent
    ends the process, and ends every process its action runs in again. The four go again
    together; the killer ends that worker too, and those still running split in halves,
    each in a worker of its own, until it runs alone: only that death counts against its
    action, so it is given up (two strikes) and none of the innocents is, though each ran
    beside it twice (a strike for every death would have given them up as well). The
    three innocents are answered together (each waits until all three run: one
    suspect at a time on the pool's one worker's worth of probation processes, as
    before, never answered them)."""
    node, lapses = await _isolated_node(make_nodes, agent_workers=1, agent_stall_timeout=5.0)
    sink, pool = make_nodes.sinks[node.node_id], _pool(node)
    innocents = [await Watcher(node, sink, f"innocent-{i}").join() for i in range(3)]
    killer = await Watcher(node, sink, "killer").join()
    await _gathered_past_a_killer(pool, innocents, killer, tmp_path)
    await wait_until(lambda: killer.errors(), timeout=30, what="the killer given up")
    assert [w.errors() for w in innocents] == [[], [], []]
    # Its two strikes: the pool's worker, then alone.
    assert "given up after 2 attempt(s)" in killer.errors()[0]["content"]
    for w in innocents:
        assert await node.state.attempts(w.sid) == {}  # forgotten once it went through
    await wait_until(lambda: not pool.probationers, what="the probation workers stopped")
    for w in (*innocents, killer):
        await w.round_trip(f"{w.sid} again")
    assert lapses == []


async def test_a_loop_stopped_while_its_suspect_runs_on_probation_stops_that_worker(
    make_nodes,
) -> None:
    """A suspect runs again in a probation worker; its loop is stopped meanwhile (the
    conversation closed, evicted, moved): the probation worker is stopped with it, not
    left running the dispatch, and the node's other conversations go on."""
    node, lapses, _, bad = await _an_innocent_beside_a_killer(make_nodes, "slow 60")
    pool = _pool(node)

    def on_probation() -> Any:
        for worker in pool.probationers:
            if any(agent.sid == "innocent" for agent in worker.loops.values()):
                return worker
        return None

    worker = await wait_until(on_probation, what="the innocent action on probation")
    assert await node.node.loops.stop("innocent", None)
    await wait_until(lambda: worker not in pool.probationers, what="its worker stopped")
    await wait_until(lambda: not os.path.exists(f"/proc/{worker.pid}"), what="its process gone")
    await wait_until(lambda: bad.errors(), timeout=20, what="the killer given up")
    await bad.round_trip("still here")
    assert lapses == []


async def _kill_during(node: ConversationManager, watcher: Watcher, text: str) -> int:
    """Say ``text``; once its dispatch runs, SIGKILL its worker from outside. Its id."""
    asked = await watcher.say(text)
    await wait_until(lambda: node.runner(watcher.sid).agent.in_flight, what="in flight")  # type: ignore[union-attr]
    await asyncio.sleep(0.2)
    worker = node.runner(watcher.sid).agent.worker  # type: ignore[union-attr]
    os.kill(worker.pid, signal.SIGKILL)
    return int(asked)


async def test_an_instance_back_from_probation_resumes_after_the_action_it_ran(
    make_nodes,
) -> None:
    """A suspect answered on probation; the instance then started again in the pool
    resumes after that action, not before it (its start was sent before the dispatch
    recorded the action as done: an agent keeping memory lost it)."""
    node, lapses = await _isolated_node(make_nodes, agent_workers=1, agent_stall_timeout=5.0)
    watcher = await Watcher(node, make_nodes.sinks[node.node_id], "back").join()
    await watcher.round_trip("first")
    slow = await _kill_during(node, watcher, "slow 1")
    await wait_until(lambda: "slow 1" in watcher.answers(), timeout=20, what="answered")
    await watcher.say("resumed")
    await wait_until(lambda: watcher.answers()[-1].startswith("resumed after"), what="resumed")
    assert watcher.answers()[-1] == f"resumed after {slow}"
    assert watcher.errors() == [] and lapses == []


async def test_an_action_answered_before_its_worker_died_is_not_run_again(make_nodes) -> None:
    """An action counts as processed once its first answer is committed (as a successor
    after a failover sees it): its worker dying afterwards does not run it again. Before,
    it went again on probation and was answered twice."""
    node, lapses = await _isolated_node(make_nodes, agent_workers=1, agent_stall_timeout=5.0)
    watcher = await Watcher(node, make_nodes.sinks[node.node_id], "once").join()
    await watcher.say("answer 2")
    await wait_until(lambda: "answered first" in watcher.answers(), what="answered")
    os.kill(node.runner("once").agent.worker.pid, signal.SIGKILL)  # type: ignore[union-attr]
    await wait_until(lambda: _pool(node).restarts == 1, what="its worker replaced")
    await watcher.round_trip("after")
    assert watcher.answers() == ["answered first", "after"]
    assert not _pool(node).probationers and watcher.errors() == [] and lapses == []
    watcher.answered_once()


async def test_a_probation_worker_lost_while_its_instance_starts_counts_and_goes_again(
    make_nodes,
) -> None:
    """The probation worker dies while the suspect's fresh instance starts: a failure of
    that action like any other (counted, then again), not a reason to give it up after
    one attempt of five."""
    node, lapses = await _isolated_node(
        make_nodes, agent_workers=1, agent_stall_timeout=5.0, max_dispatch_attempts=5
    )
    watcher = await Watcher(node, make_nodes.sinks[node.node_id], "restart").join(
        {"start_delay": 1.0}
    )
    asked = await _kill_during(node, watcher, "slow 1")
    pool = _pool(node)

    def starting() -> Any:
        return next((p for p in pool.probationers if p.usable and p.loops), None)

    probationer = await wait_until(starting, timeout=20, what="starting on probation")
    os.kill(probationer.pid, signal.SIGKILL)
    await wait_until(lambda: "slow 1" in watcher.answers(), timeout=30, what="answered")
    assert watcher.errors() == [] and lapses == []
    assert await node.state.attempts("restart") == {}  # forgotten once it went through
    assert asked


@pytest.mark.parametrize(
    ("innocent_says", "left_behind", "stall_timeout"),
    [("slow 3", "linger 1.5 0.8", 5.0), ("spin 1.5 0.3", "hog 1.0 8 0.5", 2.0)],
    ids=["a thread ending the process", "a thread holding the interpreter's lock"],
)
async def test_what_a_suspect_left_behind_is_not_blamed_on_another(
    make_nodes, innocent_says: str, left_behind: str, stall_timeout: float
) -> None:
    """Two suspects go again in one probation worker; one is answered and leaves, but a
    thread its agent started ends that process, or holds the interpreter's lock so that
    the loop stalls while the other's task runs (and the stall names it), while the
    other still runs there, alone. That failure is not counted against the other (whose
    second strike it would have been): it goes again alone and is answered. Before, it
    was given up as poison (a stall's named task counted as a sure cause)."""
    node, lapses = await _isolated_node(
        make_nodes, agent_workers=1, agent_stall_timeout=stall_timeout
    )
    sink = make_nodes.sinks[node.node_id]
    innocent = await Watcher(node, sink, "innocent").join()
    other = await Watcher(node, sink, "other").join()
    await innocent.say(innocent_says)
    await _kill_during(node, other, left_behind)  # both in flight: both suspects
    await wait_until(
        lambda: innocent_says in innocent.answers() and left_behind in other.answers(),
        timeout=60,
        what="both answered",
    )
    assert innocent.errors() == other.errors() == [] and _pool(node).poisoned == 0

    async def forgotten() -> bool:  # once its dispatch returned, after its answer
        return await node.state.attempts("innocent") == {}

    await wait_until(forgotten, what="its failures forgotten")
    await innocent.round_trip("after")
    assert lapses == []


async def test_a_suspect_no_probation_worker_can_start_for_is_given_up(
    make_nodes, monkeypatch
) -> None:
    """No probation worker starts (the machine cannot fork one): the suspect actions are
    answered with an error after start_timeout, not left waiting for ever; one of them
    tried to start their worker, the others were told at once (before, each tried for
    start_timeout in turn)."""
    node, lapses = await _isolated_node(
        make_nodes, agent_workers=1, agent_stall_timeout=5.0, start_timeout=2.0
    )
    sink = make_nodes.sinks[node.node_id]
    others = [await Watcher(node, sink, f"nofork-{i}").join() for i in range(2)]
    watcher = await Watcher(node, sink, "nofork").join()
    pool = _pool(node)
    spawn = pool._spawn
    trying: set[Any] = set()

    async def no_probation_fork(worker: Any) -> None:
        if worker.slot == -1:
            trying.add(asyncio.current_task())
            raise OSError(11, "Resource temporarily unavailable")
        await spawn(worker)

    monkeypatch.setattr(pool, "_spawn", no_probation_fork)
    for other in others:
        await other.say("slow 5")
    asked = await _kill_during(node, watcher, "slow 1")
    for w in (*others, watcher):
        await wait_until(w.errors, timeout=20, what="given up")
    (error,) = watcher.errors()
    assert error["extras"] == {"action_id": asked, "reason": "worker died"}
    assert len(trying) == 1
    monkeypatch.undo()
    await watcher.round_trip("after")
    assert lapses == []


async def test_a_node_closed_while_a_probation_worker_is_held_leaves_no_process(
    make_nodes,
) -> None:
    """A suspect blocks its probation worker's loop again (the stall timeout long); the
    node closes: that process is killed with the rest, not left behind (its stop was
    cancelled with the pool's tasks, and the pool no longer knew it)."""
    node, _ = await _isolated_node(make_nodes, agent_workers=1, agent_stall_timeout=30.0)
    watcher = await Watcher(node, make_nodes.sinks[node.node_id], "held").join()
    await _kill_during(node, watcher, "block 20")
    pool = _pool(node)

    def blocked() -> Any:
        return next(
            (p for p in pool.probationers if any(a.in_flight for a in p.loops.values())), None
        )

    probationer = await wait_until(blocked, timeout=20, what="blocking on probation")
    await asyncio.sleep(0.3)
    await make_nodes.aclose()
    await wait_until(
        lambda: not os.path.exists(f"/proc/{probationer.pid}"), what="the process gone"
    )


async def test_a_dispatch_cut_short_by_a_lease_lapse_is_not_held_against_the_action(
    make_nodes,
) -> None:
    """Only failures of a worker count: an action whose dispatch is interrupted again and
    again by its node's lease lapsing (a failover, a partition) is dispatched again and
    answered, not given up as poison."""
    a, b = await make_nodes(2, **ISOLATED)
    watcher = await Watcher(b, make_nodes.sinks[b.node_id], "moving").join()
    asked = await watcher.say("slow 1")
    for _ in range(ISOLATED_ATTEMPTS):  # as many interruptions as failures would take

        def owner() -> ConversationManager | None:
            for node in (a, b):
                runner = node.runner("moving")
                if runner is not None and runner.running and runner.agent.in_flight:
                    return node
            return None

        node = await wait_until(owner, what="the action dispatched")
        node.node.membership.lapse("test: lease lost mid-dispatch")
    await wait_until(lambda: "slow 1" in watcher.answers(), timeout=20, what="answered")
    assert watcher.errors() == [] and asked in [e["id"] for e in watcher.events]
    assert await a.state.attempts("moving") == {}


async def test_a_start_cut_short_by_a_lease_lapse_leaves_nothing_starting(
    make_nodes, tmp_path
) -> None:
    """The node's lease lapses while an agent starts in its worker: the start fails at
    once (its instance is closed: no answer can reach it), the worker cancels it (not
    left to finish with nothing to close what it opened), and once the node is back the
    conversation starts again. Seen as an action never answered after two lapses: the
    start waited forever, and the conversation stayed "starting", never resumed, with
    every later join waiting on it."""
    (node,) = await make_nodes(1, **ISOLATED)
    watcher = Watcher(node, make_nodes.sinks[node.node_id], "late")
    ended = tmp_path / "start"
    joining = asyncio.ensure_future(watcher.join({"start_delay": 5.0, "start_log": str(ended)}))

    def opening() -> bool:
        runner = node.runner("late")
        return runner is not None and runner.agent.in_flight

    await wait_until(opening, what="the agent starting in its worker")
    old = node.inc
    node.node.membership.lapse("test: lease lost while the agent starts")
    with pytest.raises(AgentFailed, match="closed"):
        await asyncio.wait_for(joining, 10)
    assert "late" not in node.node.loops.starting
    await wait_until(ended.exists, what="the start ended in the worker")
    assert ended.read_text() == "cancelled"
    await wait_until(lambda: node.inc != old and node.node.membership.check(), what="back")
    await asyncio.wait_for(watcher.join(), 10)
    await watcher.round_trip("after")


async def test_agent_cpus_keep_the_workers_off_the_node_loops_cpu(make_nodes) -> None:
    """``agent_cpus auto``: every worker (a fresh one too) on all CPUs but the first, the
    node's event loop on the first; the loop gets its CPUs back when the node stops."""
    allowed = frozenset(os.sched_getaffinity(0))
    if len(allowed) < 2:  # one CPU cannot be split: a clear refusal, nothing started
        with pytest.raises(ConfigError, match="auto needs two CPUs or more"):
            await make_nodes(1, **ISOLATED, agent_cpus="auto")
        return
    node, lapses = await _isolated_node(make_nodes, agent_cpus="auto")
    first = min(allowed)
    pool = _pool(node)
    assert os.sched_getaffinity(0) == {first}
    assert [os.sched_getaffinity(w.pid) for w in pool.workers] == [allowed - {first}] * 2
    sink = make_nodes.sinks[node.node_id]
    bad = await Watcher(node, sink, "bad").join()
    await bad.say("exit")  # ends its worker, then its probation worker
    await wait_until(lambda: bad.errors(), what="the action given up")
    await wait_until(lambda: pool.restarts == 1, what="the worker replaced")
    await wait_until(lambda: all(w.usable for w in pool.workers), what="the fresh workers up")
    assert [os.sched_getaffinity(w.pid) for w in pool.workers] == [allowed - {first}] * 2
    await bad.round_trip("after")
    await node.aclose()
    assert os.sched_getaffinity(0) == allowed
    assert lapses == []


THROWN = ("BaseException", "SystemExit", "KeyboardInterrupt", "GeneratorExit", "CancelledError")


@pytest.mark.parametrize("isolation", ["process", "none"])
async def test_an_agent_raising_a_base_exception_is_answered_like_any_error(
    make_nodes: Any, isolation: str
) -> None:
    """``sys.exit()``, KeyboardInterrupt, a bare BaseException, a CancelledError nobody
    cancelled: each is the agent's error, answered with an ``error`` observation naming
    its class, and the loop goes on. Before, the conversation went silent for good (in a
    worker the task died unanswered; in the node the loop crashed)."""
    node, lapses = await _isolated_node(make_nodes, agent_isolation=isolation)
    bad = await Watcher(node, make_nodes.sinks[node.node_id], "throws").join()
    thrown = {name: await bad.say(f"throw {name}") for name in THROWN}
    await bad.round_trip("after", within=10)
    assert bad.answers() == ["after"]
    assert [e["content"] for e in bad.errors()] == [
        f"Action {n} failed: the agent raised {name}." for name, n in thrown.items()
    ]
    assert node.metrics.agent_errors == len(THROWN)
    if isolation == "process":
        assert _pool(node).restarts == 0
    assert lapses == []


@pytest.mark.parametrize("isolation", ["process", "none"])
async def test_an_agent_whose_start_exits_is_refused_at_once(
    make_nodes: Any, isolation: str
) -> None:
    """A start that calls ``sys.exit()`` is refused naming it, not after the start
    timeout (the worker had never answered), and the node goes on."""
    node, lapses = await _isolated_node(
        make_nodes, agent_isolation=isolation, agent_start_timeout=30.0
    )
    sink = make_nodes.sinks[node.node_id]
    with pytest.raises(AgentFailed, match="SystemExit"):
        await Watcher(node, sink, "exits").join({"start_raises": "SystemExit"})
    assert not await node.is_agent_loop_running("exits")
    await (await Watcher(node, sink, "good").join()).round_trip("still here")
    assert lapses == []


@pytest.mark.parametrize("isolation", ["process", "none"])
async def test_an_event_with_a_key_that_is_not_text_is_refused_to_its_agent(
    make_nodes: Any, isolation: str
) -> None:
    """A tuple key inside an agent's event: ``emit`` raises InvalidInput naming it, in
    either mode, and the worker and its other instances carry on. Before, in a worker,
    the node could not read the frame and killed the worker."""
    node, lapses = await _isolated_node(make_nodes, agent_isolation=isolation)
    sink = make_nodes.sinks[node.node_id]
    bad = await Watcher(node, sink, "keys").join()
    await bad.say("emit key")
    refused = "InvalidInput: an agent event is not acceptable: a key that is not a string"
    await wait_until(lambda: any(a.startswith(refused) for a in bad.answers()), what="refused")
    await bad.round_trip("after")
    assert bad.errors() == [] and len(bad.answers()) == 2
    if isolation == "process":
        assert _pool(node).restarts == 0
    assert lapses == []


@pytest.mark.parametrize("isolation", ["process", "none"])
@pytest.mark.parametrize(
    ("kind", "refused"),
    [
        ("set", "a value of type set, which JSON does not have"),
        ("surrogate", "surrogates not allowed"),
    ],
)
async def test_an_event_with_a_value_json_does_not_have_is_refused_to_its_agent(
    make_nodes: Any, kind: str, refused: str, isolation: str
) -> None:
    """A set in an agent's event (or text UTF-8 cannot hold): ``emit`` raises
    InvalidInput naming the value's type (in a worker, where it is too), nothing
    written, and the loop carries on. Before, the agent got msgpack's TypeError (or
    UnicodeEncodeError). Bytes are carried (socket.io sends them as binary)."""
    node, lapses = await _isolated_node(make_nodes, agent_isolation=isolation)
    bad = await Watcher(node, make_nodes.sinks[node.node_id], f"values-{kind}").join()
    await bad.say(f"emit {kind}")
    await wait_until(lambda: set(bad.answers()) - {"forged"}, what="emit answered")
    (answer,) = bad.answers()
    assert answer.startswith("InvalidInput: an agent event is not acceptable: "), answer
    assert refused in answer and answer.endswith("; nothing was written"), answer
    if isolation == "process" and kind == "set":
        assert "(at content)" in answer, answer
    await bad.round_trip("after")
    assert bad.errors() == [] and len(bad.answers()) == 2
    assert lapses == []
    if isolation == "process":
        assert _pool(node).restarts == 0


async def test_bytes_in_an_agent_event_reach_its_clients(make_nodes: Any) -> None:
    """Bytes are carried in both modes alike (socket.io sends them as binary)."""
    for isolation in ("process", "none"):
        (node,) = await make_nodes(1, **{**ISOLATED, "agent_isolation": isolation})
        bad = await Watcher(node, make_nodes.sinks[node.node_id], f"bytes-{isolation}").join()
        await bad.say("emit bytes")
        await wait_until(lambda: "emitted" in bad.answers(), what="emitted")  # noqa: B023
        assert sorted(bad.answers()) == ["emitted", "forged"], bad.answers()
        assert any(e.get("args", {}).get("image_urls") == [b"\x89PNG"] for e in bad.events), (
            bad.events
        )


@pytest.mark.parametrize("isolation", ["process", "none"])
async def test_an_agent_cannot_pass_its_event_off_as_the_users(
    make_nodes: Any, isolation: str
) -> None:
    """``"source": "user"`` from an agent is refused (InvalidInput), nothing written:
    it would be shown as the user's and dispatched back to the agent as an action (an
    echo agent answering itself for ever)."""
    node, _ = await _isolated_node(make_nodes, agent_isolation=isolation)
    bad = await Watcher(node, make_nodes.sinks[node.node_id], "forger").join()
    asked = await bad.say("emit user")
    refused = "InvalidInput: an agent event is not acceptable: its source is 'user'"
    await wait_until(lambda: any(a.startswith(refused) for a in bad.answers()), what="refused")
    await bad.round_trip("after")
    assert [e["id"] for e in bad.events if e["source"] == "user"] == [asked, asked + 2]
    assert all(e["args"]["content"] != "forged" for e in bad.events if "args" in e)
    bad.answered_once()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"agent_memory_limit": 10**30}, "agent_memory_limit must be at most 128T"),
        ({"agent_memory_limit": 1 << 63}, "agent_memory_limit must be at most 128T"),
        ({"agent_stall_timeout": 1e300}, "agent_stall_timeout must be at most 86400 seconds"),
        ({"agent_workers": 100_000}, "agent_workers must be at most 1024"),
        (
            {"agent_dispatch_timeout": 1e300},
            r"agent_dispatch_timeout must be at most 86400 seconds \(0: none\), got 1e\+300",
        ),
        ({"agent_start_timeout": 86_400.5}, "agent_start_timeout must be at most 86400 seconds"),
    ],
)
def test_agent_options_have_upper_bounds(changes: dict[str, Any], message: str) -> None:
    """Past these a worker could not start (setrlimit overflows), its stall reporter
    thread died (time.sleep overflows), the node forked without end, or a bound was
    none (0 says so) that a purge could not even wait for (Redis refuses its expiry)."""
    from coordinator import ManagerConfig

    with pytest.raises(ConfigError, match=message):
        ManagerConfig(**changes)


BROKEN_MODULES = {
    "exits_on_import": ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
    "raises_on_import": ("raise RuntimeError('import boom')\n", "RuntimeError: import boom"),
}


@pytest.mark.parametrize("isolation", ["process", "none"])
@pytest.mark.parametrize("module", sorted(BROKEN_MODULES))
async def test_an_agent_module_failing_on_import_is_refused_naming_it(
    redis_url: str, isolation: str, module: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent module that raises or calls ``sys.exit`` when imported: the node refuses
    to start with the same error in both modes, naming the module and what it raised.
    Before, ``sys.exit`` in it ended the node silently (``none``), or its worker "exited
    at start" with no reason; a raise did not name the module."""
    from tests.helpers import fast_config

    source, raised = BROKEN_MODULES[module]
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))  # the workers get the node's sys.path
    config = fast_config(redis_url, "broken", agent=f"{module}:Agent", agent_isolation=isolation)
    with pytest.raises(ConfigError) as refused:
        await ConversationManager(config).start()
    assert str(refused.value) == f"agent module {module!r} failed on import: {raised}"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, waiting for its reaper, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_processes_an_agent_started_end_with_its_worker(make_nodes) -> None:
    """A worker whose agent started a program and forked itself dies: the node notices
    by the process's end (the fork holds the channel open, so no EOF comes), blames the
    action as a death, not a stall, and kills what the agent left behind. Before, the
    node noticed only at the stall timeout, and both processes outlived it."""
    node, lapses = await _isolated_node(make_nodes, max_dispatch_attempts=1)
    bad = await Watcher(node, make_nodes.sinks[node.node_id], "spawns").join()
    await bad.say("spawn")
    await wait_until(lambda: bad.answers(), what="spawn answered")
    pids = [int(p) for p in bad.answers()[0].split()]
    assert all(map(_alive, pids))
    doomed = await bad.say("exit")
    await wait_until(lambda: bad.errors(), what="the action given up")
    assert bad.errors()[0]["extras"] == {"action_id": doomed, "reason": "worker died"}
    await wait_until(lambda: not any(map(_alive, pids)), what="what the agent started ended")
    await bad.round_trip("after")
    assert (_pool(node).stalls, lapses) == (0, [])


def test_a_worker_that_ends_takes_what_its_agent_started_with_it() -> None:
    """A worker that ends on its own (here after a STOP from a "node" that then does
    nothing more) kills its process group on the way out: what its agent started (a
    program, a fork holding the channel) does not outlive it. Where there is no
    parent-death signal (not Linux), that is how they end when the node dies."""
    ours, theirs = socket.socketpair()
    reports, report_w = os.pipe()
    argv = ["--channel-fd", str(theirs.fileno()), "--report-fd", str(report_w)]
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers.process", *argv, "--agent", BAD],
        pass_fds=(theirs.fileno(), report_w),
        start_new_session=True,  # as the node starts it
        cwd=REPO,
        env=child_env(),
    )
    theirs.close()
    os.close(report_w)
    ours.settimeout(10)
    reader, pids = FrameReader(), list[int]()

    def next_frame() -> list[Any]:
        while not (got := reader.feed(ours.recv(1 << 16))):
            pass
        (message,) = got
        return message

    try:
        assert next_frame()[0] == HELLO
        ours.sendall(frame([OPEN, 1, 1, "spawns", "alice", {}, 0, None]))
        assert next_frame()[0] == DONE
        spawn = {"id": 1, "source": "user", "action": "message", "args": {"content": "spawn"}}
        ours.sendall(frame([DISPATCH, 2, 1, spawn]))
        emitted = next_frame()
        assert emitted[0] == EMIT
        pids = [int(p) for p in emitted[3]["args"]["content"].split()]
        assert all(map(_alive, pids))
        ours.sendall(frame([REPLY, emitted[1], 2]))
        assert next_frame()[0] == DONE
        ours.sendall(frame([STOP]))
        worker.wait(10)
        deadline = time.monotonic() + 5
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(map(_alive, pids)), "what the agent started outlived its worker"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        worker.wait()
        ours.close()
        os.close(reports)


async def test_a_worker_whose_escaped_child_floods_its_channel_does_not_hold_the_node(
    make_nodes, tmp_path
) -> None:
    """The worker ends, but a process its agent started in a session of its own (out of
    the worker group's reach) goes on writing on the channel. The node read what the
    worker had written before it ended until the channel was empty, which it never was:
    its loop froze (7.5 s for an 8 s flood) and its lease lapsed. It reads what was
    queued at the end, no more."""
    node, lapses = await _isolated_node(make_nodes, agent_stall_timeout=2.0)
    sink = make_nodes.sinks[node.node_id]
    pid_file = tmp_path / "flooder.pid"
    bad = await Watcher(node, sink, "bad").join({"pid_file": str(pid_file)})
    good = await Watcher(node, sink, "good").join()
    pool = _pool(node)
    await bad.say("flood 8")
    try:
        await wait_until(pid_file.exists, what="the flood under way")
        await wait_until(lambda: pool.restarts >= 1, what="the worker replaced")
        for n in range(5):
            await good.round_trip(f"good-{n}")
        assert lapses == [] and not node.node.membership.lapsed
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


async def test_forged_pongs_do_not_hide_a_stuck_worker(make_nodes) -> None:
    """A worker's loop is held while a thread of it answers every PING with a PONG of
    its own (any sequence number was taken): the watchdog still finds it stuck, within
    its stall timeout, and replaces it."""
    _, good, pool, lapses = await _bad_beside_good(make_nodes, "forge 12")
    await wait_until(lambda: pool.stalls >= 1, timeout=8, what="the worker found stuck")
    await good.round_trip("good-after")
    assert lapses == []


async def _bad_beside_good(make_nodes: Any, command: str, **overrides: Any) -> tuple[Any, ...]:
    """A node whose conversation "bad" was sent ``command``, beside "good" (no retries)."""
    node, lapses = await _isolated_node(make_nodes, max_dispatch_attempts=1, **overrides)
    sink = make_nodes.sinks[node.node_id]
    bad = await Watcher(node, sink, "bad").join()
    good = await Watcher(node, sink, "good").join()
    await bad.say(command)
    return bad, good, _pool(node), lapses


async def test_a_worker_that_reads_nothing_of_its_channel_is_killed(
    make_nodes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker whose threads flood requests for instances it does not hold while its
    loop reads nothing: each is answered (REFUSE), and the node's buffer to the worker
    grew without bound (45 MiB in 12 s) for as long as the stall timeout let it (up to
    a day). Past a bound (two of the largest frames; 4 MiB here) it is killed."""
    monkeypatch.setattr(agentworker, "UNREAD_LIMIT", 4 << 20)
    _, good, pool, lapses = await _bad_beside_good(make_nodes, "spam 12", agent_stall_timeout=60)
    await wait_until(lambda: pool.restarts >= 1, timeout=8, what="the worker killed")
    await good.round_trip("good-after")
    assert lapses == []
    said = [r for r in caplog.records if "reads nothing of its channel" in r.getMessage()]
    assert len(said) == 1, len(said)  # once, not once for each answer written after


async def test_an_event_of_more_containers_than_its_bytes_allow_is_refused_to_its_agent(
    make_nodes,
) -> None:
    """An empty map is one byte on the channel and 64 in the node's memory: an event of
    4 Mi of them took 350 MB and half a second of the node's loop to decode before it was
    refused. The worker refuses it to its agent (no more maps and arrays than
    max_agent_event_bytes), and a worker that writes one on its channel anyway is
    killed for a bad frame before it is decoded."""
    node, lapses = await _isolated_node(
        make_nodes, max_agent_event_bytes=1000, max_dispatch_attempts=1
    )
    sink = make_nodes.sinks[node.node_id]
    bad = await Watcher(node, sink, "bad").join()
    pool = _pool(node)
    await bad.say("containers 5000")
    await wait_until(lambda: len(bad.answers()) == 1, what="the refusal answered")
    (answer,) = bad.answers()
    assert answer.startswith("InvalidInput: an agent event is not acceptable: more than 1000"), (
        answer
    )
    assert pool.restarts == 0
    await bad.say("rawcontainers 5000")
    await wait_until(lambda: pool.restarts == 1, what="the worker killed for its frame")
    assert lapses == []


async def test_workers_that_die_as_they_start_are_replaced_ever_more_slowly(
    make_nodes, caplog: pytest.LogCaptureFixture
) -> None:
    """Every worker ends right after its HELLO: each was replaced at once (six Python
    starts a second, for good). A worker that fails within STEADY_AFTER of its start is
    replaced after a backoff that grows with each such failure of its slot."""
    caplog.set_level(logging.ERROR, logger="coordinator.agentpool")
    with contextlib.suppress(AgentFailed):
        await make_nodes(1, agent="tests.dying_worker:DyingAgent", agent_workers=1)
    await wait_until(
        lambda: len(_replacement_delays(caplog)) >= 3, timeout=20, what="three replacements"
    )
    delays = _replacement_delays(caplog)
    assert delays[:3] == sorted(delays[:3]) and delays[0] < delays[2], delays


def _replacement_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    found = (re.search(r"replacing it in ([\d.]+)s", r.getMessage()) for r in caplog.records)
    return [float(m[1]) for m in found if m]


async def test_a_frame_without_its_ids_is_a_bad_frame_not_a_traceback(
    make_nodes, caplog: pytest.LogCaptureFixture
) -> None:
    """A request frame from a worker without its request and instance ids raised an
    IndexError in the node's reading of the channel (asyncio's "Fatal error" with a
    traceback; and after the worker's end, the channel left open until the stall
    timeout). It is a bad frame: its worker is killed, said in a line."""
    _, good, pool, lapses = await _bad_beside_good(make_nodes, "shortframe")
    await wait_until(lambda: pool.restarts >= 1, what="the worker killed")
    await good.round_trip("good-after")
    assert "sent a bad frame" in caplog.text and "Traceback" not in caplog.text
    assert lapses == []
