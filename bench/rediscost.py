"""Redis cost per operation, counted by Redis itself and by the client.

In-process nodes (managers) against a private Redis with nothing else on it, background
work silenced (long heartbeat, flush and cleanup intervals), so the counts are exact:

- ``commands``: the ``INFO commandstats`` delta (commands run inside Lua scripts count);
- ``client cmds``: commands the nodes sent (every command of a pipeline counts);
- ``round trips``: requests the nodes waited for (one per command, pipeline or script);
- ``sequential``: of those, the ones sent while no other was in flight: the round trips
  an operation waits for one after another (a same-node action's commit, sent while its
  accept is still on the way, is a round trip but not a sequential one).

The per-node split of round trips tells the owner's path apart from the accepting node's.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline, PubSub

from bench.common import QUIET_NODE, Mode, cluster_store, log_dir, private_redis, table
from coordinator import ConversationManager, ManagerConfig
from coordinator.lane import ScriptLane


class ClientCounter:
    """Counts what redis-py and the script lane send, per node (its pool and its lane)."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.trips: Counter[str] = Counter()
        self.cmds: Counter[str] = Counter()
        self.sequential: Counter[str] = Counter()
        self.in_flight = 0
        self._saved: list[tuple[type, str, Any]] = []

    def install(self) -> None:
        counter = self

        def node_of(obj: Any) -> str:
            return counter.names.get(id(obj.connection_pool), "other")

        orig_exec = aioredis.Redis.execute_command
        orig_pipe = Pipeline.execute
        orig_pubsub = PubSub.execute_command
        orig_lane = ScriptLane._call
        orig_lane_exec = ScriptLane.execute

        async def waited(node: str, call: Awaitable[Any]) -> Any:
            counter.trips[node] += 1
            if counter.in_flight == 0:
                counter.sequential[node] += 1
            counter.in_flight += 1
            try:
                return await call
            finally:
                counter.in_flight -= 1

        async def execute_command(self: Any, *args: Any, **kw: Any) -> Any:
            node = node_of(self)
            counter.cmds[node] += 1
            return await waited(node, orig_exec(self, *args, **kw))

        async def execute(self: Any, *args: Any, **kw: Any) -> Any:
            node = node_of(self)
            if not self.command_stack:
                return await orig_pipe(self, *args, **kw)
            counter.cmds[node] += len(self.command_stack) + (2 if self.is_transaction else 0)
            return await waited(node, orig_pipe(self, *args, **kw))

        async def pubsub_command(self: Any, *args: Any, **kw: Any) -> Any:
            # SUBSCRIBE/UNSUBSCRIBE: sent without waiting (the listener reads the reply).
            counter.cmds[node_of(self)] += 1
            return await orig_pubsub(self, *args, **kw)

        async def lane_call(self: Any, *args: Any) -> Any:
            # ScriptLane._call(script, keys, args, replicas, timeout_ms): EVALSHA (+ WAIT).
            node = counter.names.get(id(self), "other")
            counter.cmds[node] += 1 + (1 if args[3] else 0)
            return await waited(node, orig_lane(self, *args))

        async def lane_execute(self: Any, commands: Any, *, transaction: bool = False) -> Any:
            node = counter.names.get(id(self), "other")
            counter.cmds[node] += len(commands) + (2 if transaction else 0)
            return await waited(node, orig_lane_exec(self, commands, transaction=transaction))

        self._saved = [
            (aioredis.Redis, "execute_command", orig_exec),
            (Pipeline, "execute", orig_pipe),
            (PubSub, "execute_command", orig_pubsub),
            (ScriptLane, "_call", orig_lane),
            (ScriptLane, "execute", orig_lane_exec),
        ]
        aioredis.Redis.execute_command = execute_command  # type: ignore[method-assign]
        Pipeline.execute = execute  # type: ignore[method-assign]
        PubSub.execute_command = pubsub_command  # type: ignore[method-assign]
        ScriptLane._call = lane_call  # type: ignore[method-assign]
        ScriptLane.execute = lane_execute  # type: ignore[method-assign]

    def uninstall(self) -> None:
        for cls, name, fn in self._saved:
            setattr(cls, name, fn)


class WaitingSink:
    """Records deliveries; ``wait_for(cid, n)`` waits for n agent events on cid in all
    and, with ``notes`` (``--agent-state-events``), for the agent's state note after the
    last of them: the end of an action may be a commit of its own, which it costs."""

    def __init__(self, notes: bool) -> None:
        self.notes = notes
        self.agent_events: Counter[str] = Counter()
        self.settled: dict[str, bool] = {}  # awaiting input since the last agent event
        self._changed = asyncio.Event()

    async def deliver(self, connection_id: str, event: dict[str, Any]) -> None:
        if event.get("source") == "agent":
            self.agent_events[connection_id] += 1
            self.settled[connection_id] = False
        elif event.get("observation") == "agent_state_changed":
            state = event.get("extras", {}).get("agent_state")
            self.settled[connection_id] = state == "awaiting_user_input"
        self._changed.set()

    async def disconnect(self, connection_id: str) -> None:
        return None

    def _waiting(self, cid: str, total: int) -> bool:
        return self.agent_events[cid] < total or (self.notes and not self.settled.get(cid))

    async def wait_for(self, cid: str, total: int, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while self._waiting(cid, total):
            self._changed.clear()
            async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                await self._changed.wait()


async def commandstats(client: aioredis.Redis) -> Counter[str]:
    stats = await client.info("commandstats")
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})


class Meter:
    """Counts what each operation costs. ``nodes``: their event-store movers are waited
    for before and after each measure, so that what an operation's events cost to move
    (batched, in the background) is counted with it and not with the next one."""

    def __init__(
        self, probe: aioredis.Redis, counter: ClientCounter, nodes: list[ConversationManager]
    ) -> None:
        self.probe = probe
        self.counter = counter
        self.nodes = nodes
        self.rows: list[dict[str, Any]] = []

    async def settle(self) -> None:
        await asyncio.sleep(0.1)  # listener-side replies (subscribe acks), a mover's wait
        async with asyncio.timeout(30):
            while not all(node.node.archiver.idle for node in self.nodes):  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # (a property of each node's mover, polled)

    async def measure(
        self, name: str, n: int, op: Callable[[int], Awaitable[Any]], note: str = ""
    ) -> dict[str, Any]:
        await self.settle()
        before = await commandstats(self.probe)
        trips0, cmds0 = Counter(self.counter.trips), Counter(self.counter.cmds)
        seq0 = Counter(self.counter.sequential)
        for i in range(n):
            await op(i)
        await self.settle()
        after = await commandstats(self.probe)
        delta = after - before
        delta.pop("info", None)
        trips = self.counter.trips - trips0
        cmds = self.counter.cmds - cmds0
        seq = self.counter.sequential - seq0
        for counts in (trips, cmds, seq):
            counts.pop("other", None)
        row = {
            "operation": name,
            "n": n,
            "commands": sum(delta.values()) / n,
            "client_commands": sum(cmds.values()) / n,
            "round_trips": sum(trips.values()) / n,
            "sequential_round_trips": sum(seq.values()) / n,
            "round_trips_by_node": {k: v / n for k, v in sorted(trips.items())},
            "by_command": {k: v / n for k, v in sorted(delta.items())},
            "note": note,
        }
        self.rows.append(row)
        return row


async def run(mode: Mode) -> dict[str, Any]:
    n = mode.pick(20, 100)
    counter = ClientCounter()
    counter.install()
    try:
        with private_redis() as redis:
            probe = aioredis.Redis.from_url(redis.url)
            nodes: dict[str, ConversationManager] = {}
            sinks: dict[str, WaitingSink] = {}
            store = cluster_store(redis.url, log_dir("rediscost"))
            for name, agent, notes in (
                ("A", "workers.echo:EchoAgent", True),
                ("B", "workers.echo:EchoAgent", True),
                ("C", "workers.scripted:ScriptedAgent", True),
                ("D", "workers.echo:EchoAgent", False),
            ):
                sinks[name] = WaitingSink(notes)
                cfg = ManagerConfig(
                    redis_url=redis.url,
                    event_store=store,
                    node_id=f"cost-{name}",
                    agent=agent,
                    agent_state_events=notes,
                    max_concurrent_conversations=1000,
                    max_connections_per_user=0,
                )
                nodes[name] = ConversationManager(cfg.replace(**QUIET_NODE), sink=sinks[name])
                await nodes[name].start()
                counter.names[id(nodes[name].state.redis.connection_pool)] = name
                counter.names[id(nodes[name].state.lane)] = name
            a, b, c, d = nodes["A"], nodes["B"], nodes["C"], nodes["D"]
            m = Meter(probe, counter, list(nodes.values()))
            action = {"action": "message", "args": {"content": "hello"}}
            sent: Counter[str] = Counter()

            async def act(
                node: ConversationManager, sink: WaitingSink, cid: str, k: int = 1
            ) -> None:
                await node.send_to_event_stream(cid, action)
                sent[cid] += k
                await sink.wait_for(cid, sent[cid])

            await m.measure(
                "join: new conversation (create, admit, start loop)",
                n,
                lambda i: a.join_conversation(f"new-{i}", f"a-new-{i}", {}, f"user{i % 5}"),
            )
            await m.measure(
                "join: running conversation, loop on this node",
                n,
                lambda i: a.join_conversation(f"new-{i}", f"a-2nd-{i}", {}, f"user{i % 5}"),
            )
            await m.measure(
                "join: running conversation, loop on another node",
                n,
                lambda i: b.join_conversation(f"new-{i}", f"b-{i}", {}, f"user{i % 5}"),
                "B's pub/sub listener subscribes to the conversation",
            )
            # Clean same-node and cross-node conversations for actions (one connection each).
            await a.join_conversation("same", "same-conn", {}, "alice")
            await a.join_conversation("cross", "cross-setup", {}, "bob")
            await b.join_conversation("cross", "cross-conn", {}, "bob")
            await a.disconnect_from_session("cross-setup")
            await d.join_conversation("quiet", "quiet-conn", {}, "dora")
            await act(a, sinks["A"], "same-conn")
            await act(b, sinks["B"], "cross-conn")
            await act(d, sinks["D"], "quiet-conn")
            await m.measure(
                "action, same node: accept + agent reply",
                n,
                lambda i: act(a, sinks["A"], "same-conn"),
                "A accepts and owns",
            )
            await m.measure(
                "action, same node, --agent-state-events off",
                n,
                lambda i: act(d, sinks["D"], "quiet-conn"),
                "no state notes: one commit fewer",
            )
            await m.measure(
                "action, cross node: accept on B, loop on A",
                n,
                lambda i: act(b, sinks["B"], "cross-conn"),
                "B accepts, A owns",
            )
            for replies in (1, 5):
                sid = f"scripted-{replies}"
                await c.join_conversation(sid, sid, {"think_time": 0, "replies": replies}, "carol")
                await act(c, sinks["C"], sid, replies)
            one = await m.measure(
                "action, scripted agent with 1 reply",
                n,
                lambda i: act(c, sinks["C"], "scripted-1", 1),
            )
            five = await m.measure(
                "action, scripted agent with 5 replies",
                n,
                lambda i: act(c, sinks["C"], "scripted-5", 5),
            )
            per_event = {
                "operation": "per additional agent event (5-reply minus 1-reply, / 4)",
                "n": n,
                "commands": (five["commands"] - one["commands"]) / 4,
                "client_commands": (five["client_commands"] - one["client_commands"]) / 4,
                "round_trips": (five["round_trips"] - one["round_trips"]) / 4,
                "sequential_round_trips": (
                    five["sequential_round_trips"] - one["sequential_round_trips"]
                )
                / 4,
                "round_trips_by_node": {},
                "by_command": {
                    k: (v - one["by_command"].get(k, 0)) / 4
                    for k, v in five["by_command"].items()
                    if v != one["by_command"].get(k, 0)
                },
                "note": "each emit is one fenced commit",
            }
            m.rows.append(per_event)
            await m.measure("activity flush (all of a node's dirty loops)", 1, _flush(a))
            await m.measure("idle sweep, nothing expired", 1, lambda i: a.sweep_idle())
            await a.flush_activity()
            for i in range(10):
                runner = a.node.runners[f"new-{i}"]
                runner.touch(runner.last_active - 2 * QUIET_NODE["close_delay"])
                await a.disconnect_from_session(f"a-new-{i}")
                await a.disconnect_from_session(f"a-2nd-{i}")
                await b.disconnect_from_session(f"b-{i}")
            await a.flush_activity()
            sweep = await m.measure(
                "idle sweep, 10 expired (closes 10 loops)", 1, lambda i: a.sweep_idle()
            )
            sweep["note"] = "per closed loop: about a tenth of this"
            await m.measure(
                "heartbeat (renew + live-node refresh)",
                n,
                lambda i: _heartbeat(a),
                "per interval; the renewal (1 round trip) is sent from the lease thread",
            )
            await m.measure(
                "disconnect",
                n - 10,
                lambda i: a.disconnect_from_session(f"a-2nd-{i + 10}"),
            )
            for node in nodes.values():
                await node.aclose()
            await probe.aclose()
    finally:
        counter.uninstall()
    return report(m.rows)


def _flush(node: ConversationManager) -> Callable[[int], Awaitable[None]]:
    async def op(i: int) -> None:
        for r in node.node.runners.values():
            r.touch(r.last_active + 0.001)
        await node.flush_activity()

    return op


async def _heartbeat(node: ConversationManager) -> None:
    # The renewal goes out from the lease keeper's thread on its own connection: Redis
    # counts it, the client-side counters (asyncio clients) do not.
    await node.membership.renew_now()
    await node.directory.refresh()


def report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    t = table(
        "Redis cost per operation (INFO commandstats on a private Redis; client-side counts)",
        ["operation", "commands", "client cmds", "round trips", "sequential", "by node", "note"],
        [
            [
                r["operation"],
                r["commands"],
                r["client_commands"],
                r["round_trips"],
                r["sequential_round_trips"],
                " ".join(f"{k}:{v:g}" for k, v in r["round_trips_by_node"].items()) or "-",
                r["note"],
            ]
            for r in rows
        ],
    )
    detail = table(
        "Commands per operation, by name (scripts' inner commands included)",
        ["operation", "commands"],
        [
            [r["operation"], ", ".join(f"{k} {v:g}" for k, v in r["by_command"].items())]
            for r in rows
            if r["operation"].startswith(("action", "per additional", "idle sweep, 10"))
        ],
    )
    return {"tables": [t, detail], "json": {"rows": rows}}
