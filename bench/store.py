"""The event store (issue #14): what Redis keeps, replay from the store, the action's round
trip with the store's mover on and idle, resume after failover from a checkpoint
(``python -m bench.run --only store``).

Real ``coordinator serve`` processes on a private Redis, the event store in a temporary
directory (``file://``) and, where PostgreSQL's ``initdb``/``pg_ctl`` are installed, in a
private PostgreSQL (tests/postgres.py, started with fsync off: a test server).

1. *Retention*: one node (``--close-delay 0.5 --redis-retention 2``); N conversations
   of one user get an action each, their clients leave, their loops close (after a
   warm-up round of N); measured: ``MEMORY USAGE`` of every key and
   ``used_memory_dataset`` before they were created and once they are gone from Redis.
2. *Window*: one conversation gets HISTORY events (the scripted agent, 1,000 replies of
   200 bytes per message) while a client stays connected; once the store holds them
   all, the ``MEMORY USAGE`` (exact, ``SAMPLES 0``) of its keys against its window
   (``--log-window-events``, ``--log-window-bytes``; the bytes of the events left in
   the stream, ``lbytes - tbytes`` of its record).
3. *Replay*: a new client joins that conversation with ``latest_event_id=0``, on the
   owner node and on another one; events/s until it has every id, gap-free. And the
   store alone, in-process without socket.io: an archiver moving HISTORY events to it,
   ``History`` reading them back a page at a time (what a replay reads).
4. *Round trip*: two nodes on one Redis and store, 20 conversations each, the echo
   agent; one node as shipped, the other with its mover idle (this module as its entry
   point: ``Archiver.run`` never wakes, a window larger than the run, so nothing is
   moved or trimmed). Open-loop actions alternate between the two groups, round by
   round; p50/p90/p99 of send to the agent's answer.
5. *Failover*: two nodes (``--node-ttl 3``), ``workers.memory:MemoryAgent``
   (checkpoint every 5 actions); a conversation gets HISTORY events (HISTORY / 2
   messages and their answers) with its loop on node A and a client on node B; A gets
   kill -9 and the client sends a message at once: measured kill -> the record names B
   (taken over) -> B's first answer, and what the agent read (checkpoint, not history).
6. *The mover's store call*: CONVERSATIONS conversations get a batch of two events each
   (an action and its answer, what a gathering finds at saturation), stored one call
   per conversation (``append``) or all in one (``append_many``, what the mover does),
   10 and all of them per call (after a first event each, which creates its file or
   row); this process's CPU (the store's threads included; not PostgreSQL's server) per
   conversation stored. Then the store audit's read of their last ids: one each (4 at a
   time) or all at once (``last_ids``); wall time per conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.common import (
    Mode,
    cpu_seconds,
    log_dir,
    new_secret,
    node_proc,
    percentile,
    private_redis,
    run_under,
    start_all,
    stop_all,
    table,
    url_of,
)
from bench.driver import LoadGenProcess, join_group
from bench.eio import EioClient
from coordinator.auth import issue_token

PREFIX = "coord"
SCRIPTED = "workers.scripted:ScriptedAgent"
MEMORY = "workers.memory:MemoryAgent"
REPLIES = 1000  # scripted agent events per message (the history's filler)
REPLY_SIZE = 200
WINDOW_EVENTS = 10_000
WINDOW_BYTES = 16 << 20
REPLAY_TARGET = 20_000.0  # events/s
ANSWER_TARGET = 1.0  # s from taking over to the first answer
OVERHEAD_TARGET = 2048  # bytes beyond the window's events


# -- stores ------------------------------------------------------------------------------
class Stores:
    """Event store URLs: a fresh file directory or PostgreSQL database per call."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bench-store-"))
        self.pg: Any = None
        self.pg_error = ""
        self._n = 0

    def file(self) -> str:
        self._n += 1
        return f"file://{self.root}/events-{self._n}"

    def postgres(self) -> str | None:
        if self.pg is None and not self.pg_error:
            try:
                from tests.postgres import PostgresServer

                self.pg = PostgresServer()
                self.pg.start()
            except Exception as exc:  # not installed: the file store only
                self.pg_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                self.pg = None
        if self.pg is None:
            return None
        return str(self.pg.dsn(self.pg.create_database()))

    def cleanup(self) -> None:
        if self.pg is not None:
            self.pg.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)


def store_flags(url: str, *extra: str) -> list[str]:
    return ["--event-store", url, *extra]


# -- a client that keeps every id it saw -------------------------------------------------
class Watcher:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.answers = 0  # agent events
        self.answered = asyncio.Event()
        self.first_answer: dict[str, Any] | None = None
        self.last_at = 0.0
        self.want = 0  # set ``done`` once the highest id seen reaches this
        self.done = asyncio.Event()
        self.client = EioClient(self.on_event)

    def on_event(self, name: str, data: Any) -> None:
        if name != "oh_event" or not isinstance(data, dict):
            return
        if isinstance(data.get("id"), int):
            self.ids.append(data["id"])
            if self.want and data["id"] >= self.want:
                self.last_at = time.perf_counter()
                self.done.set()
        if data.get("source") == "agent":
            self.answers += 1
            self.answered.set()
            if self.first_answer is None:
                self.first_answer = data

    async def connect(self, url: str, sid: str, token: str, **extra: Any) -> Watcher:
        query: dict[str, Any] = {"conversation_id": sid}
        auth: dict[str, Any] = {"token": token}
        if "latest" in extra:
            query["latest_event_id"] = extra["latest"]
        if "settings" in extra:
            auth["settings"] = extra["settings"]
        await self.client.connect(url, query, auth, within=60)
        return self

    async def send(self, key: str) -> None:
        ack = await self.client.call(
            "oh_user_action",
            {"action": "message", "args": {"content": key}, "client_action_id": key},
            60,
        )
        if not (isinstance(ack, dict) and ack.get("ok")):
            raise RuntimeError(f"action refused: {ack}")

    def gaps_and_duplicates(self) -> tuple[int, int, int]:
        unique = sorted(set(self.ids))
        gaps = sum(b - a - 1 for a, b in itertools.pairwise(unique) if b > a + 1)
        first_missing = (unique[0] - 1) if unique else 0
        return gaps + first_missing, len(self.ids) - len(unique), unique[-1] if unique else 0


async def wait_until(predicate: Any, within: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(step)
    return False


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    try:
        yield r
    finally:
        await r.aclose()


async def conv_keys(r: Any, sid: str) -> list[bytes]:
    return [k async for k in r.scan_iter(match=f"{PREFIX}:{{c:{sid}}}:*", count=1000)]


async def meta(r: Any, sid: str) -> dict[str, str]:
    raw = await r.hgetall(f"{PREFIX}:{{c:{sid}}}:meta")
    return {k.decode(): v.decode() for k, v in raw.items()}


# -- 1. retention ------------------------------------------------------------------------
async def keyspace(r: Any) -> dict[str, int]:
    """Every key and its exact MEMORY USAGE."""
    return {
        k.decode(): await r.memory_usage(k, samples=0) or 0 async for k in r.scan_iter(count=1000)
    }


async def stop_round(r: Any, url: str, token: str, prefix: str, n: int) -> dict[str, Any]:
    """N conversations (ids PREFIX0..) get an action each, their clients leave; returns
    their keys while running and how long until every key of theirs is gone."""
    watchers = []
    for i in range(n):
        w = await Watcher().connect(url, f"{prefix}{i}", token)
        await w.send(f"{prefix}{i}-hello")
        watchers.append(w)
    async with asyncio.timeout(30):
        await asyncio.gather(*(w.answered.wait() for w in watchers))
    running = {k: v for k, v in (await keyspace(r)).items() if f"{{c:{prefix}" in k}
    t0 = time.monotonic()
    for w in watchers:
        await w.client.close()

    async def gone() -> bool:
        return not [k async for k in r.scan_iter(match=f"{PREFIX}:{{c:{prefix}*", count=1000)]

    cleared = await wait_until(gone, 120, 0.25)
    return {"running": running, "cleared": cleared, "cleared_s": time.monotonic() - t0}


async def retention(mode: Mode, store: str, kind: str) -> dict[str, Any]:
    """A warm-up round first (the node's Redis connection pool grows to what the joins
    need: per-connection memory that is not a conversation's), then the measured one."""
    n = mode.pick(50, 200)
    retain = 2.0
    secret = new_secret()
    logs = log_dir("store-retention")
    flags = store_flags(
        store,
        "--close-delay", "0.5", "--redis-retention", str(retain),
        "--max-concurrent-conversations", str(n + 10),
    )  # fmt: skip
    token = issue_token("ru", secret)  # one user: their index grows by an entry each
    with private_redis() as redis:
        node = node_proc("rt0", redis.url, secret, logs, extra=flags)
        try:
            start_all([node])
            async with redis_client(redis.url) as r:
                await stop_round(r, url_of(node), token, "warm", n)
                await asyncio.sleep(1.0)
                before = await keyspace(r)
                info_before = await r.info()
                measured = await stop_round(r, url_of(node), token, "r", n)
                await asyncio.sleep(1.0)
                after = await keyspace(r)
                info_after = await r.info()
        finally:
            stop_all([node])
    changed = {
        k: after.get(k, 0) - before.get(k, 0)
        for k in set(before) | set(after)
        if after.get(k, 0) != before.get(k, 0)
    }
    left = {k: v for k, v in after.items() if k.startswith(f"{PREFIX}:{{c:r")}
    running = measured["running"]
    return {
        "store": kind,
        "conversations": n,
        "retention_s": retain,
        "keys_per_running": len(running) / n,
        "bytes_per_running": sum(running.values()) / n,
        "cleared": measured["cleared"],
        "cleared_after_s": measured["cleared_s"],
        "conv_keys_left": len(left),
        "conv_bytes_left": sum(left.values()),
        "keys_changed": changed,
        "other_bytes_per_conv": sum(changed.values()) / n,
        "dataset_delta_per_conv": (
            info_after["used_memory_dataset"] - info_before["used_memory_dataset"]
        )
        / n,
        "redis_clients": [info_before["connected_clients"], info_after["connected_clients"]],
        "info_delta": {
            k: info_after[k] - v
            for k, v in info_before.items()
            if k.startswith(("used_memory", "mem_", "connected_clients", "pubsub"))
            and isinstance(v, int)
            and isinstance(info_after.get(k), int)
            and info_after[k] != v
        },
    }


# -- 2. and 3. window and replay ---------------------------------------------------------
async def window_and_replay(mode: Mode, store: str, kind: str) -> dict[str, Any]:
    history = mode.pick(30_000, 100_000)
    messages = -(-history // (REPLIES + 1))
    secret = new_secret()
    logs = log_dir("store-window")
    flags = store_flags(
        store,
        "--agent", SCRIPTED,
        "--log-window-events", str(WINDOW_EVENTS),
        "--log-window-bytes", str(WINDOW_BYTES),
    )  # fmt: skip
    sid, token = "w0", issue_token("wu", secret)
    settings = {"think_time": 0, "replies": REPLIES, "reply_size": REPLY_SIZE}
    out: dict[str, Any] = {"store": kind, "messages": messages}
    with private_redis() as redis:
        nodes = [node_proc(f"wn{i}", redis.url, secret, logs, extra=flags) for i in range(2)]
        try:
            start_all(nodes)
            w = await Watcher().connect(url_of(nodes[0]), sid, token, settings=settings)
            t0 = time.perf_counter()
            for m in range(messages):
                w.done.clear()
                w.want = (m + 1) * (REPLIES + 1)
                await w.send(f"fill-{m}")
                async with asyncio.timeout(120):
                    await w.done.wait()
            out["fill_events_per_s"] = w.want / (time.perf_counter() - t0)
            async with redis_client(redis.url) as r:

                async def settled() -> bool:
                    m = await meta(r, sid)
                    xlen = await r.xlen(f"{PREFIX}:{{c:{sid}}}:events")
                    return m.get("stored") == m.get("seq") and xlen <= WINDOW_EVENTS

                out["settled"] = await wait_until(settled, 60, 0.1)
                m = await meta(r, sid)
                out["events"] = int(m["seq"])
                keys = await conv_keys(r, sid)
                usage = {}
                for k in keys:
                    name = k.decode().rsplit(":", 1)[-1]
                    if name != "ch":
                        usage[name] = await r.memory_usage(k, samples=0) or 0
                out["in_redis"] = await r.xlen(f"{PREFIX}:{{c:{sid}}}:events")
            out["window_bytes"] = int(m.get("lbytes", 0)) - int(m.get("tbytes", 0))
            out["stream_bytes"] = usage.get("events", 0)
            out["other_keys_bytes"] = sum(v for k, v in usage.items() if k != "events")
            out["usage"] = usage
            out["total_bytes"] = sum(usage.values())
            out["overhead_bytes"] = out["total_bytes"] - out["window_bytes"]
            out["within_bounds"] = (
                out["in_redis"] <= WINDOW_EVENTS and out["total_bytes"] <= WINDOW_BYTES + 2048
            )
            replays = []
            for where, node in (("owner", nodes[0]), ("other node", nodes[1])):
                c = Watcher()
                c.want = out["events"]
                cpu_node, cpu_self = cpu_seconds(node.pid), time.process_time()
                t1 = time.perf_counter()
                await c.connect(url_of(node), sid, token, latest=0)
                joined = time.perf_counter() - t1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(300):
                        await c.done.wait()
                took = (c.last_at or time.perf_counter()) - t1
                cpu_node = cpu_seconds(node.pid) - cpu_node
                cpu_self = time.process_time() - cpu_self
                gaps, dups, last = c.gaps_and_duplicates()
                await c.client.close()
                replays.append({
                    "where": where,
                    "received": len(c.ids),
                    "last_id": last,
                    "join_ms": joined * 1000,
                    "seconds": took,
                    "events_per_s": len(set(c.ids)) / took if took else 0.0,
                    "node_cpu_s": cpu_node,
                    "client_cpu_s": cpu_self,
                    "gaps": gaps,
                    "duplicates": dups,
                })  # fmt: skip
            out["replays"] = replays
            await w.client.close()
        finally:
            stop_all(nodes)
    return out


async def store_alone(mode: Mode, store: str, kind: str) -> dict[str, Any]:
    """The store without socket.io: an in-process node (no loop, no clients) logs HISTORY
    events of about 200 bytes (commits of 100), its archiver moves them to the store
    (timed), then ``History.after`` reads them back from id 0 a page at a time, as a
    replay does (timed): what replay costs before the socket.io side."""
    from coordinator import ConversationManager
    from coordinator.catchup import PAGE, REPLAY_PAGE_BYTES
    from coordinator.codec import pack
    from coordinator.config import ManagerConfig
    from coordinator.state import Lease, SizeHint

    events = mode.pick(30_000, 100_000)
    with private_redis() as redis:
        config = ManagerConfig(
            redis_url=redis.url,
            node_id="bench",
            agent_isolation="none",
            event_store=store,
            log_window_events=WINDOW_EVENTS,
        )
        manager = ConversationManager(config)
        await manager.start()
        try:
            state, sid = manager.state, "history"
            own = await state.acquire(sid, "bench", manager.inc, "bench", create=True)
            body = {"source": "agent", "observation": "x", "content": "y" * 160}
            for first in range(0, events, 100):
                batch = [pack({**body, "n": first + i}) for i in range(min(100, events - first))]
                await state.commit(sid, manager.inc, own.epoch, batch, floor=0)
            lease = Lease(sid, "bench", manager.inc, own.epoch)
            started = time.perf_counter()
            await manager.node.archiver.move(lease)
            moved = time.perf_counter() - started
            started, after, read = time.perf_counter(), 0, 0
            hint = SizeHint()  # as a replay reads: plain XRANGEs once it knows the sizes
            while True:
                rows, _ = await manager.node.history.after(
                    sid, after, PAGE, REPLAY_PAGE_BYTES, hint=hint
                )
                if not rows:
                    break
                assert rows[0][0] == after + 1, (after, rows[0][0])
                after, read = rows[-1][0], read + len(rows)
            replayed = time.perf_counter() - started
            assert read == events, (read, events)
            in_redis = await state.redis.xlen(manager.keys.events(sid))
        finally:
            await manager.aclose()
    return {
        "store": kind,
        "events": events,
        "in_redis": in_redis,
        "moved_per_s": events / moved,
        "read_per_s": events / replayed,
    }


# -- 6. the mover's store call ------------------------------------------------------------
CONVERSATIONS = 200


async def store_calls(mode: Mode, store: str, kind: str) -> dict[str, Any]:
    """CPU per conversation of ``append`` per conversation against one ``append_many``."""
    from coordinator.eventstore import Batch, open_store

    rounds = mode.pick(5, 10)
    sids = [f"calls-{n}" for n in range(CONVERSATIONS)]
    last = dict.fromkeys(sids, 1)
    out: dict[str, Any] = {"store": kind, "conversations": CONVERSATIONS, "rounds": rounds}
    st = await open_store(store)
    try:  # each conversation's first event apart: a first append creates its file, its row
        await st.append_many([Batch(sid, 1, ((1, b"e"),), "bench") for sid in sids])
        for per_call, together in itertools.product((10, CONVERSATIONS), (False, True)):
            cpu0, n = time.process_time(), 0
            for _ in range(rounds):
                for start in range(0, CONVERSATIONS, per_call):
                    batches = []
                    for sid in sids[start : start + per_call]:
                        ids = (last[sid] + 1, last[sid] + 2)
                        last[sid] += 2
                        events = tuple((i, b"e" * REPLY_SIZE) for i in ids)
                        batches.append(Batch(sid, 1, events, "bench"))
                    if together:
                        done = await st.append_many(batches)
                    else:
                        done = await asyncio.gather(
                            *(st.append(b.sid, 1, b.events, user=b.user) for b in batches)
                        )
                    assert all(getattr(r, "status", "") == "ok" for r in done), done
                    n += len(batches)
            name = f"{'append_many' if together else 'append'} {per_call}"
            out[name] = 1000 * (time.process_time() - cpu0) / n
        # The store audit's read of every conversation's last id: each apart, 4 at a
        # time (before), or all in one read (``last_ids``, what it does).
        limit = asyncio.Semaphore(4)

        async def one(sid: str) -> int:
            async with limit:
                return await st.last_id(sid)

        for name, read in (
            ("last_id each", lambda: asyncio.gather(*(one(sid) for sid in sids))),
            ("last_ids", lambda: st.last_ids(sids)),
        ):
            began = time.perf_counter()
            for _ in range(rounds):
                assert list(await read()) == [last[sid] for sid in sids]
            out[name] = 1e6 * (time.perf_counter() - began) / (rounds * CONVERSATIONS)
    finally:
        await st.aclose()
    return out


# -- 4. round trip, mover on vs idle -----------------------------------------------------
async def roundtrip(mode: Mode, store: str, kind: str) -> dict[str, Any]:
    rounds, seconds, rate = mode.pick((4, 5, 100), (6, 10, 100))
    secret = new_secret()
    logs = log_dir("store-roundtrip")
    samples: dict[str, list[float]] = {"on": [], "idle": []}
    acks: dict[str, list[float]] = {"on": [], "idle": []}
    with private_redis() as redis:
        on = node_proc("rton", redis.url, secret, logs, extra=store_flags(store))
        huge = ["--log-window-events", "1000000000", "--log-window-bytes", "64G"]
        idle = run_under(
            node_proc("rtidle", redis.url, secret, logs, extra=store_flags(store, *huge)),
            "bench.store",
            "--idle-archiver",
        )
        gen = await LoadGenProcess().start()
        try:
            start_all([on, idle])
            await join_group(gen, "on", url_of(on), secret, "on")
            await join_group(gen, "idle", url_of(idle), secret, "idle")
            for _ in range(rounds):
                for group in ("on", "idle"):
                    res = await gen.request(
                        {"cmd": "run", "group": group, "rate": rate, "duration": seconds}
                    )
                    samples[group] += res["lat_ms"]
                    acks[group] += res["ack_ms"]
            async with redis_client(redis.url) as r:
                stored = {}
                for group in ("on", "idle"):
                    m = await meta(r, f"{group}-0")
                    stored[group] = (int(m.get("stored", 0)), int(m.get("seq", 0)))
        finally:
            await gen.aclose()
            stop_all([on, idle])
    res = {"store": kind, "rounds": rounds, "seconds": seconds, "rate": rate, "stored": stored}
    for group in ("on", "idle"):
        res[group] = {
            "n": len(samples[group]),
            "p50_ms": percentile(samples[group], 50),
            "p90_ms": percentile(samples[group], 90),
            "p99_ms": percentile(samples[group], 99),
            "ack_p50_ms": percentile(acks[group], 50),
        }
    res["p50_ratio"] = res["on"]["p50_ms"] / res["idle"]["p50_ms"]
    return res


# -- 5. failover with a checkpointing agent ----------------------------------------------
async def failover(mode: Mode, store: str, kind: str) -> dict[str, Any]:
    history = mode.pick(20_000, 100_000)
    messages = history // 2
    secret = new_secret()
    logs = log_dir("store-failover")
    flags = store_flags(
        store,
        "--agent", MEMORY,
        "--node-ttl", "3", "--heartbeat-interval", "0.5", "--lease-margin", "0.75",
    )  # fmt: skip
    sid, token = "f0", issue_token("fu", secret)
    out: dict[str, Any] = {"store": kind, "messages": messages}
    with private_redis() as redis:
        a, b = (node_proc(f"fn{i}", redis.url, secret, logs, extra=flags) for i in range(2))
        try:
            start_all([a, b])
            owner_client = await Watcher().connect(url_of(a), sid, token)  # the loop on A
            w = await Watcher().connect(url_of(b), sid, token)
            await owner_client.client.close()
            t0 = time.perf_counter()
            inflight = asyncio.Semaphore(32)
            sent = 0

            async def one(i: int) -> None:
                async with inflight:
                    await w.send(f"m{i}")

            # Pipelined: acks in flight at most 32; the answers follow.
            for start in range(0, messages, 1000):
                await asyncio.gather(*(one(i) for i in range(start, min(messages, start + 1000))))
                sent = min(messages, start + 1000)

                async def caught(n: int = sent) -> bool:
                    return w.answers >= n

                if not await wait_until(caught, 120, 0.02):
                    raise RuntimeError(f"answers {w.answers} of {sent}")
            out["fill_s"] = time.perf_counter() - t0
            async with redis_client(redis.url) as r:

                async def stored_all() -> bool:
                    m = await meta(r, sid)
                    return m.get("stored") == m.get("seq")

                await wait_until(stored_all, 60, 0.1)
                before = await meta(r, sid)
                out["events"] = int(before["seq"])
                answers = w.answers
                w.first_answer = None
                w.answered.clear()
                t_kill = time.perf_counter()
                a.kill()
                await w.send("after-kill")
                t_sent = time.perf_counter()

                async def taken() -> bool:
                    m = await meta(r, sid)
                    return m.get("owner") == "fn1" and m.get("epoch") != before.get("epoch")

                took_over = await wait_until(taken, 60, 0.005)
                t_taken = time.perf_counter()
                async with asyncio.timeout(60):
                    await w.answered.wait()
                t_answer = time.perf_counter()
                await asyncio.sleep(1.0)  # answers to actions dispatched again, if any
                after = await meta(r, sid)
        finally:
            stop_all([a, b])
            with contextlib.suppress(Exception):
                await w.client.close()
    first = w.first_answer or {}
    args = first.get("args", {}) if isinstance(first, dict) else {}
    recalled = args.get("recalled") or {}
    gaps, dups, _ = w.gaps_and_duplicates()
    out.update({
        "taken_over": took_over,
        "send_after_kill_ms": (t_sent - t_kill) * 1000,
        "kill_to_taken_s": t_taken - t_kill,
        "taken_to_answer_s": t_answer - t_taken,
        "kill_to_answer_s": t_answer - t_kill,
        "checkpoint": recalled.get("checkpoint"),
        "read": len(recalled.get("read", [])),
        "earlier": args.get("earlier"),
        "answers_after_kill": w.answers - answers,
        "applied_before": before.get("applied"),
        "first_answer_args": args,
        "meta_after": after,
        "gaps": gaps,
        "duplicates": dups,
    })  # fmt: skip
    return out


# -- the benchmark -----------------------------------------------------------------------
async def run(mode: Mode) -> dict[str, Any]:
    stores = Stores()
    runs: dict[str, list[dict[str, Any]]] = {
        "retention": [],
        "window": [],
        "alone": [],
        "roundtrip": [],
        "failover": [],
        "calls": [],
    }
    try:
        pg = stores.postgres()
        kinds = [("file", stores.file)] + ([("postgresql", stores.postgres)] if pg else [])
        for kind, url in kinds:
            runs["retention"].append(await retention(mode, url(), kind))
            runs["window"].append(await window_and_replay(mode, url(), kind))
            runs["alone"].append(await store_alone(mode, url(), kind))
            runs["roundtrip"].append(await roundtrip(mode, url(), kind))
            runs["failover"].append(await failover(mode, url(), kind))
            runs["calls"].append(await store_calls(mode, url(), kind))
    finally:
        stores.cleanup()
    return {"tables": tables(mode, runs), "json": {"runs": runs, "postgres": stores.pg_error}}


def tables(mode: Mode, runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    scaled = "" if mode.full else " (quick: sizes scaled down)"
    out = []
    rt = runs["retention"]
    out.append(
        table(
            f"Redis after retention{scaled}: {rt[0]['conversations']} conversations of one "
            f"user stopped (clients gone, --close-delay 0.5, --redis-retention "
            f"{rt[0]['retention_s']:g}), after a warm-up round; MEMORY USAGE SAMPLES 0 of "
            "every key",
            [
                "store",
                "keys / running conv",
                "B / running conv",
                "gone after s",
                "{c:SID} keys left",
                "{c:SID} B left",
                "other keys' growth B / conv",
                "which",
                "used_memory_dataset growth B / conv",
            ],
            [
                [
                    r["store"],
                    r["keys_per_running"],
                    r["bytes_per_running"],
                    r["cleared_after_s"],
                    r["conv_keys_left"],
                    r["conv_bytes_left"],
                    r["other_bytes_per_conv"],
                    ", ".join(k.split(":", 1)[-1] for k in r["keys_changed"]) or "-",
                    r["dataset_delta_per_conv"],
                ]
                for r in rt
            ],
        )
    )
    wr = runs["window"]
    out.append(
        table(
            f"One running conversation's Redis memory{scaled}: {wr[0]['events']:,} events of "
            f"history (scripted agent, {REPLIES:,} replies of {REPLY_SIZE} B per message), "
            f"window {WINDOW_EVENTS:,} events / {WINDOW_BYTES >> 20} MiB; MEMORY USAGE "
            "SAMPLES 0",
            [
                "store",
                "events",
                "in Redis",
                "window's event bytes",
                "stream B",
                "other keys B",
                "total - window bytes",
                "within bounds",
            ],
            [
                [
                    r["store"],
                    r["events"],
                    r["in_redis"],
                    r["window_bytes"],
                    r["stream_bytes"],
                    r["other_keys_bytes"],
                    r["overhead_bytes"],
                    "yes" if r["within_bounds"] else "no",
                ]
                for r in wr
            ],
        )
    )
    out.append(
        table(
            f"Replay of {wr[0]['events']:,} events to one socket.io client joining with "
            f"latest_event_id=0{scaled} (target >= {REPLAY_TARGET:,.0f} events/s)",
            [
                "store",
                "node",
                "received",
                "s",
                "events/s",
                "node CPU s",
                "client CPU s",
                "gaps",
                "duplicates",
            ],
            [
                [
                    r["store"],
                    p["where"],
                    p["received"],
                    p["seconds"],
                    p["events_per_s"],
                    p["node_cpu_s"],
                    p["client_cpu_s"],
                    p["gaps"],
                    p["duplicates"],
                ]
                for r in wr
                for p in r["replays"]
            ],
        )
    )
    al = runs["alone"]
    out.append(
        table(
            f"The store alone{scaled}: an in-process node logs {al[0]['events']:,} events "
            "of about 200 B, its archiver moves them to the store, History reads them back "
            "from id 0 a page at a time (what a replay reads, without socket.io)",
            ["store", "events", "left in Redis", "moved/s", "read/s"],
            [
                [r["store"], r["events"], r["in_redis"], r["moved_per_s"], r["read_per_s"]]
                for r in al
            ],
        )
    )
    rr = runs["roundtrip"]
    out.append(
        table(
            f"Action round trip, mover on vs idle{scaled}: 20 conversations per node, "
            f"{rr[0]['rate']}/s, {rr[0]['rounds']} alternating rounds of {rr[0]['seconds']} s "
            "(idle: Archiver.run never wakes, window larger than the run)",
            ["store", "mover", "actions", "p50 ms", "p90 ms", "p99 ms", "ack p50 ms", "stored/seq"],
            [
                [
                    r["store"],
                    g,
                    r[g]["n"],
                    r[g]["p50_ms"],
                    r[g]["p90_ms"],
                    r[g]["p99_ms"],
                    r[g]["ack_p50_ms"],
                    "{}/{}".format(*r["stored"][g]),
                ]
                for r in rr
                for g in ("on", "idle")
            ]
            + [
                [r["store"], "on / idle p50", "", f"{r['p50_ratio']:.3f}", "", "", "", ""]
                for r in rr
            ],
        )
    )
    ca = runs["calls"]
    out.append(
        table(
            f"The mover's store call{scaled}: {ca[0]['conversations']} conversations, two "
            f"events of {REPLY_SIZE} B each, {ca[0]['rounds']} rounds; this process's CPU "
            "per conversation stored (ms; PostgreSQL's server not counted)",
            ["store", "per call", "append each (before)", "append_many (the mover)", "x"],
            [
                [
                    r["store"],
                    per_call,
                    r[f"append {per_call}"],
                    r[f"append_many {per_call}"],
                    r[f"append_many {per_call}"] / r[f"append {per_call}"],
                ]
                for r in ca
                for per_call in (10, r["conversations"])
            ],
        )
    )
    out.append(
        table(
            f"The store audit's reads{scaled}: the last id of {ca[0]['conversations']} "
            f"conversations, {ca[0]['rounds']} rounds; wall time per conversation (us)",
            ["store", "last_id each, 4 at a time (before)", "last_ids (the audit)", "x"],
            [
                [r["store"], r["last_id each"], r["last_ids"], r["last_ids"] / r["last_id each"]]
                for r in ca
            ],
        )
    )
    fr = runs["failover"]
    out.append(
        table(
            f"Failover of a conversation with {fr[0]['events']:,} events{scaled}: "
            f"{MEMORY} (checkpoint every 5), owner kill -9, --node-ttl 3 (target: first "
            f"answer within {ANSWER_TARGET:g} s of taking over)",
            [
                "store",
                "kill -> taken over s",
                "taken over -> first answer ms",
                "kill -> answer s",
                "resumed from checkpoint",
                "events read",
                "answer's count",
                "gaps",
                "duplicates",
            ],
            [
                [
                    r["store"],
                    r["kill_to_taken_s"],
                    r["taken_to_answer_s"] * 1000,
                    r["kill_to_answer_s"],
                    r["checkpoint"],
                    r["read"],
                    r["earlier"],
                    r["gaps"],
                    r["duplicates"],
                ]
                for r in fr
            ],
        )
    )
    return out


def _idle_archiver_main(argv: list[str]) -> int:
    """``python -m bench.store --idle-archiver ARGS``: ``coordinator ARGS`` with the
    event store's mover never waking (the round trip's baseline)."""
    from coordinator.archive import Archiver
    from coordinator.cli import main

    async def idle(self: Archiver) -> None:
        await asyncio.Event().wait()

    Archiver.run = idle  # type: ignore[method-assign]
    return main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--idle-archiver"]:
        sys.exit(_idle_archiver_main(sys.argv[2:]))
    sys.exit("run it as: python -m bench.run --only store")
