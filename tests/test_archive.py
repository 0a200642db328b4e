"""The event store wired into the coordinator: one store per cluster, events moved off
the ack path into it, Redis kept to a window, replay through the store."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import random
import weakref
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from coordinator import ConversationManager, storeaudit
from coordinator.auth import issue_token
from coordinator.codec import EVENTS_LOST, evicted_event, notice_code, pack, unpack, with_id
from coordinator.config import NOTE_ROOM
from coordinator.directory import PARTIAL_LIST, describe_retired
from coordinator.errors import Forbidden, InboxFull, InvalidInput, LimitExceeded, StoreBehind
from coordinator.eventstore import Batch, EventStore, StoreError, StoreMismatch, StoreUnavailable
from coordinator.recovery import reap_incarnation
from coordinator.state import Lease
from coordinator.state.loops import USER_INDEX_MAX
from tests.conftest import NodeFactory
from tests.helpers import wait_until
from tests.postgres import PostgresServer
from tests.server_fixtures import SECRET, ServerCluster, SioClient


async def test_a_node_records_and_reports_its_store(
    make_nodes: NodeFactory, private_event_store: str
) -> None:
    (a,) = await make_nodes(1)
    assert a.node.store_url == f"file://{private_event_store}"
    assert (Path(private_event_store) / "store-id").is_file()
    (b,) = await make_nodes(1, event_store=f"file://{private_event_store}")
    assert b.node.store is not None and a.node.store is not None
    assert b.node.store.identity() == a.node.store.identity()


async def test_a_node_with_another_store_is_refused(
    make_nodes: NodeFactory, tmp_path: Path, private_event_store: str
) -> None:
    await make_nodes(1)
    with pytest.raises(StoreMismatch) as refused:
        await make_nodes(1, event_store=f"file://{tmp_path}/elsewhere")
    message = str(refused.value)
    assert "is not the cluster's" in message
    assert f"--event-store file://{private_event_store}" in message
    assert f"file://{tmp_path}/elsewhere" in message


async def test_redis_coming_back_empty_still_refuses_a_node_with_another_store(
    make_nodes: NodeFactory, tmp_path: Path, redis_client: Any
) -> None:
    """Redis lost everything (a restart without persistence, FLUSHALL): the running
    node records its store again when it registers again, so a node started afterwards
    with another store is still refused. Before, the record was gone for good and the
    new node made its own store the cluster's (replays then missed the first's
    history, and ids were given again)."""
    (a,) = await make_nodes(1)
    inc = a.node.inc
    await redis_client.flushall()
    await wait_until(lambda: a.node.inc != inc, timeout=15, what="the node registered again")
    await wait_until(
        lambda: redis_client.exists(a.keys.event_store()), what="the store recorded again"
    )
    assert await redis_client.hget(a.keys.layout(), "layout") == b"1"  # and the layout
    with pytest.raises(StoreMismatch, match="is not the cluster's"):
        await make_nodes(1, event_store=f"file://{tmp_path}/elsewhere")


async def send(node: ConversationManager, cid: str, content: str) -> int:
    """Send one message, again while the event store lags (a client's retry); its id."""
    action = {"action": "message", "args": {"content": content}}
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            return await node.send_to_event_stream(cid, action)
        except StoreBehind:
            assert asyncio.get_running_loop().time() < deadline, "the store stayed behind"
            await asyncio.sleep(0.01)


async def stored_mark(node: ConversationManager, sid: str) -> int:
    return int(await node.state.redis.hget(node.keys.conv(sid), "stored") or 0)


async def wait_stored(node: ConversationManager, sid: str, last: int) -> None:
    async def done() -> bool:
        return await stored_mark(node, sid) >= last

    await wait_until(done, timeout=30, what=f"the store holds {sid} up to {last}")


async def all_stored(store: EventStore, sid: str) -> list[tuple[int, bytes]]:
    rows: list[tuple[int, bytes]] = []
    while batch := await store.read(sid, rows[-1][0] if rows else 0, 1000):
        rows += batch
    return rows


async def test_the_owner_moves_events_to_the_store_and_redis_keeps_the_window(
    make_nodes: NodeFactory,
) -> None:
    (a,) = await make_nodes(1, log_window_events=20)
    await a.join_conversation("moved", "c", {}, "alice")
    for i in range(60):
        await send(a, "c", str(i))
    sink = make_nodes.sinks["node1"]
    await wait_until(lambda: len(sink.events["c"]) >= 120, what="120 events")
    await wait_stored(a, "moved", 120)
    assert a.node.store is not None
    stored = await all_stored(a.node.store, "moved")
    assert [i for i, _ in stored] == list(range(1, 121))
    assert [with_id(i, unpack(d)) for i, d in stored] == sink.events["c"]
    log = await a.state.redis.xrange(a.keys.events("moved"))
    assert [int(i.split(b"-")[0]) for i, _ in log] == list(range(101, 121))


async def test_a_loops_state_notes_alone_wait_for_its_first_action_or_its_stop(
    make_nodes: NodeFactory,
) -> None:
    (a,) = await make_nodes(1, agent_state_events=True)
    store = a.node.store
    assert store is not None
    sink = make_nodes.sinks["node1"]
    await a.join_conversation("quiet", "c", {}, "alice")
    await wait_until(lambda: sink.events["c"], what="the start's state note")
    # A join writes nothing to the store: its note waits in Redis.
    await wait_until(lambda: a.node.archiver.idle, what="the mover idle")
    assert [e["observation"] for e in sink.events["c"]] == ["agent_state_changed"]
    assert await store.conversation("quiet") is None
    # Its first action takes it along.
    n = await send(a, "c", "one")
    await wait_until(lambda: len(sink.events["c"]) >= n + 2, what="the answer")
    await wait_stored(a, "quiet", n + 1)
    assert [i for i, _ in await all_stored(store, "quiet")][: n + 1] == list(range(1, n + 2))
    # A conversation that only started: its stop stores its notes before it retires.
    await a.join_conversation("brief", "c2", {}, "alice")
    await wait_until(lambda: sink.events["c2"], what="the start's state note")
    await a.disconnect_from_session("c2")
    assert await a.close_session("brief", "alice")
    last = int((await a.conversation("brief"))["seq"])
    assert [i for i, _ in await all_stored(store, "brief")] == list(range(1, last + 1))
    assert await stored_mark(a, "brief") == last


async def test_a_new_conversations_join_asks_the_store_once_and_reads_nothing(
    make_nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    (a,) = await make_nodes(1)
    store = a.node.store
    assert store is not None
    asked: list[str] = []
    for name in ("lookup", "conversation", "read", "count_conversations"):
        real = getattr(store, name)

        async def spy(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            asked.append(_name)
            return await _real(*args, **kw)

        monkeypatch.setattr(store, name, spy)
    await a.join_conversation("fresh", "c", {}, "alice")
    # One trip to learn it is new (and its user's count); its empty log is not read from
    # the store below it (nothing is there: the record says it has logged nothing).
    assert asked == ["lookup"]
    await send(a, "c", "one")
    await a.join_conversation("fresh", "c2", {}, "alice")
    assert asked == ["lookup"]


async def test_a_window_at_its_smallest_takes_the_largest_action_after_a_start_note(
    make_nodes: NodeFactory,
) -> None:
    """The smallest window a node accepts (2 events; the largest action's bytes and a
    start note's) takes a first action of the largest size beside the state note the
    loop's start logged. Before, a window of 1 event, or of the largest action's bytes,
    refused that action as "behind" for good: the note waits for it in the window."""
    size = 4096
    a, b = await make_nodes(
        2,
        log_window_events=2,
        agent_state_events=True,
        max_action_bytes=size,
        log_window_bytes=size + NOTE_ROOM,
    )
    for node, sid in ((a, "by-count"), (b, "by-bytes")):
        await node.join_conversation(sid, f"c-{sid}", {}, "alice")
        for text in ("y" * (size - 310), "x"):  # the largest a client may send first
            await send(node, f"c-{sid}", text)


async def test_the_window_is_bounded_in_bytes(make_nodes: NodeFactory) -> None:
    (a,) = await make_nodes(1, max_action_bytes=2048, log_window_bytes=8192)
    await a.join_conversation("bytes", "c", {}, "alice")
    for i in range(40):
        await send(a, "c", f"{i:04}" + "x" * 600)
    await wait_until(lambda: len(make_nodes.sinks["node1"].events["c"]) >= 80, what="80")
    await wait_stored(a, "bytes", 80)
    log = await a.state.redis.xrange(a.keys.events("bytes"))
    size = sum(len(fields[b"d"]) for _, fields in log)
    assert 0 < size <= 8192 and int(log[-1][0].split(b"-")[0]) == 80
    meta = await a.conversation("bytes")
    assert int(meta["lbytes"]) - int(meta["tbytes"]) == size


async def say(client: SioClient, content: str) -> int:
    """Send a message over socket.io, again while the event store lags."""
    for _ in range(3000):
        ack = await client.act({"action": "message", "args": {"content": content}})
        if ack.get("ok"):
            return int(ack["id"])
        assert "the event store is behind" in ack["error"], ack
        await asyncio.sleep(0.01)
    raise AssertionError("the event store stayed behind")


async def test_replay_from_any_id_goes_through_the_store_then_the_window_then_live(
    servers: ServerCluster,
) -> None:
    a, b = await servers.start(2, log_window_events=20)
    writer = await servers.join(a, "replay", "alice")
    for i in range(60):
        await say(writer, str(i))
    await writer.wait_ids(120)
    await wait_stored(a.manager, "replay", 120)
    assert await a.manager.state.redis.xlen(a.manager.keys.events("replay")) == 20
    # From 0 and from the middle of the store, on the node that does not run the loop.
    readers = [await servers.join(b, "replay", "alice", latest_event_id=n) for n in (0, 50, 110)]
    for reader, start in zip(readers, (0, 50, 110), strict=True):
        await reader.wait_ids(120)
        assert reader.ids == list(range(start + 1, 121))
        assert reader.events == writer.events[start:]
    await say(writer, "live")
    for reader, start in zip(readers, (0, 50, 110), strict=True):
        await reader.wait_ids(122)
        assert reader.ids == list(range(start + 1, 123))


async def test_rest_pages_through_the_history(servers: ServerCluster) -> None:
    a, b = await servers.start(2, log_window_events=10)
    writer = await servers.join(a, "paged", "alice")
    for i in range(30):
        await say(writer, str(i))
    await writer.wait_ids(60)
    await wait_stored(a.manager, "paged", 60)
    got: list[dict[str, object]] = []
    after = 0
    while True:
        status, body = await servers.request(
            "GET", b, f"/api/conversations/paged/events?after={after}&limit=25", user="alice"
        )
        assert status == 200, body
        got += body["events"]
        after = body["next"]
        if not body["more"]:
            break
    assert [e["id"] for e in got] == list(range(1, 61))
    assert got == writer.events
    status, body = await servers.request(
        "GET", b, "/api/conversations/paged/events", user="mallory"
    )
    assert status == 404 and body["error"] == "no such conversation: 'paged'"
    admin = issue_token("ops", SECRET, claims={"role": "admin"})
    status, body = await servers.request(
        "GET", a, "/api/conversations/paged/events?after=55", token=admin
    )
    assert status == 200 and [e["id"] for e in body["events"]] == [56, 57, 58, 59, 60]
    for query in ("after=-1", "limit=0", "limit=1001", "after=x"):
        status, body = await servers.request(
            "GET", a, f"/api/conversations/paged/events?{query}", user="alice"
        )
        assert status == 400, (query, body)


async def test_a_page_of_large_events_is_bounded_in_bytes(servers: ServerCluster) -> None:
    """A page asked for a thousand events of 600 KB each holds about 4 MiB of them, says
    more follow, and paging on gives every one once (before: every event asked for,
    600 MB in one answer, and many times that in the node's memory meanwhile)."""
    (a,) = await servers.start(1, agent="workers.scripted:ScriptedAgent", log_window_events=10)
    settings = {"reply_size": 600_000, "replies": 4, "think_time": 0}
    body = {"conversation_id": "big", "settings": settings}
    status, _ = await servers.request("POST", a, "/api/conversations", user="alice", json=body)
    assert status == 201
    writer = await servers.join(a, "big", "alice")
    for i in range(5):
        await say(writer, str(i))
    await writer.wait_ids(25)
    got: list[int] = []
    after, pages = 0, 0
    while True:
        status, body = await servers.request(
            "GET", a, f"/api/conversations/big/events?after={after}&limit=1000", user="alice"
        )
        assert status == 200, status
        assert len(json.dumps(body)) < 6 << 20  # the bound, and an event past it
        got += [e["id"] for e in body["events"]]
        after, pages = body["next"], pages + 1
        if not body["more"]:
            break
    assert got == list(range(1, 26)) and pages >= 3


async def test_a_hole_in_the_store_is_an_error_not_skipped(
    servers: ServerCluster, postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    """Events the store recorded holding but lacks (rows deleted, a file removed, an older
    backup) are an error naming the first one missing, in REST and in a join's replay;
    before, a page skipped them silently (ids 196-199 then 300)."""
    (a,) = await servers.start(1, log_window_events=10, event_store=postgres_dsn)
    writer = await servers.join(a, "holed", "alice")
    for i in range(20):
        await say(writer, str(i))
    await writer.wait_ids(40)
    await wait_stored(a.manager, "holed", 40)
    database = postgres_dsn.rsplit("/", 1)[1]
    root, port = str(postgres_server.root), postgres_server.port
    conn = await asyncpg.connect(host=root, port=port, user="postgres", database=database)
    try:
        await conn.execute(
            "DELETE FROM coordinator.events"
            " WHERE conversation_id = 'holed' AND id BETWEEN 10 AND 14"
        )
    finally:
        await conn.close()
    status, body = await servers.request(
        "GET", a, "/api/conversations/holed/events?after=5&limit=20", user="alice"
    )
    assert status == 500 and "lacks event 10 of conversation 'holed'" in body["error"], body
    status, body = await servers.request(
        "GET", a, "/api/conversations/holed/events?after=14&limit=20", user="alice"
    )
    assert status == 200 and [e["id"] for e in body["events"]] == list(range(15, 35))
    reader = servers.client()
    why = await reader.refused(a.url, "holed", servers.token("alice"), latest_event_id=0)
    assert "lacks event 10 of conversation 'holed'" in why, why


async def test_the_list_while_the_store_is_away_is_what_redis_holds_and_says_so(
    servers: ServerCluster, postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    """The event store away, a user's list of conversations is the ones Redis holds (the
    running and recently active), flagged ``partial`` with why: before, a 503, and a
    client's home page showed nothing to go back to. Once the store is back, whole."""
    (a,) = await servers.start(1, event_store=postgres_dsn)
    writer = await servers.join(a, "listed", "alice")
    await say(writer, "hi")
    await writer.wait_ids(2)
    await wait_stored(a.manager, "listed", 2)
    await asyncio.to_thread(postgres_server.stop)
    status, body = await servers.request("GET", a, "/api/conversations", user="alice")
    assert status == 200, body
    assert [c["conversation_id"] for c in body["conversations"]] == ["listed"]
    assert body["partial"] == PARTIAL_LIST
    await asyncio.to_thread(postgres_server.start)

    async def whole() -> bool:
        status, body = await servers.request("GET", a, "/api/conversations", user="alice")
        return status == 200 and "partial" not in body

    await wait_until(whole, timeout=20, what="listed whole again")


async def test_requests_while_the_store_is_away_log_a_line_each_at_most_2_a_second(
    servers: ServerCluster,
    postgres_server: PostgresServer,
    postgres_dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 503 (the store away) is one line in the log, throttled: any client may ask for
    one per request meanwhile. Before, each logged its whole traceback. Clients are told
    the store is away, not where it runs (its host, port, role and database were in
    every 503 and refused join)."""
    (a,) = await servers.start(1, log_window_events=10, event_store=postgres_dsn, join_wait=1.0)
    writer = await servers.join(a, "away", "alice")
    for i in range(10):
        await say(writer, str(i))
    await wait_stored(a.manager, "away", 20)
    await asyncio.to_thread(postgres_server.stop)
    caplog.set_level(logging.WARNING, logger="coordinator.rest")
    for _ in range(40):
        status, body = await servers.request(
            "GET", a, "/api/conversations/away/events?after=0", user="alice"
        )
        assert (status, body["error"]) == (503, StoreUnavailable.PUBLIC), body
    why = await servers.client().refused(a.url, "away", servers.token("alice"), latest_event_id=0)
    assert why == f"cannot read the log of 'away': {StoreUnavailable.PUBLIC}", why
    lines = [r for r in caplog.records if r.name == "coordinator.rest"]
    assert 1 <= len(lines) <= 25 and not any(r.exc_info for r in lines)
    assert "GET /api/conversations/away/events: StoreUnavailable" in lines[0].getMessage()
    assert postgres_server.password not in caplog.text


async def redis_log(node: ConversationManager, sid: str) -> list[tuple[int, bytes]]:
    rows = await node.state.redis.xrange(node.keys.events(sid))
    return [(int(i.split(b"-")[0]), fields[b"d"]) for i, fields in rows]


async def test_postgres_store_holds_more_than_the_window_and_replays_it(
    servers: ServerCluster, postgres_dsn: str
) -> None:
    a, b = await servers.start(2, log_window_events=20, event_store=postgres_dsn)
    assert a.event_store.startswith("postgresql://coord:***@")
    writer = await servers.join(a, "pg", "alice")
    for i in range(50):
        await say(writer, str(i))
    await writer.wait_ids(100)
    await wait_stored(a.manager, "pg", 100)
    assert await a.manager.state.redis.xlen(a.manager.keys.events("pg")) == 20
    reader = await servers.join(b, "pg", "alice", latest_event_id=0)
    await reader.wait_ids(100)
    assert reader.ids == list(range(1, 101)) and reader.events == writer.events


async def test_store_down_then_back_refuses_clearly_loses_nothing_and_catches_up(
    make_nodes: NodeFactory, postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    (a,) = await make_nodes(1, log_window_events=20, event_store=postgres_dsn)
    await a.join_conversation("down", "c", {}, "alice")
    await send(a, "c", "before")
    await wait_stored(a, "down", 2)
    await asyncio.to_thread(postgres_server.stop)
    acked: list[int] = []
    refusal = ""
    for i in range(30):  # the window has room for about 10 actions and their answers
        try:
            accepted = await a.send_to_event_stream(
                "c", {"action": "message", "args": {"content": f"down {i}"}}
            )
        except StoreBehind as exc:
            refusal = str(exc)
            break
        acked.append(accepted)
    assert acked and refusal, "the window never filled"
    assert "the event store is behind" in refusal and "not acknowledged" in refusal
    # Refused again and again while the store is away: none of them dispatched before
    # its accept answered (each refuted speculation replaced the agent and logged a line).
    lost = a.node.metrics.speculations_lost
    for i in range(5):
        await asyncio.sleep(0.2)  # the loop idle again: it could take the next at once
        with pytest.raises(StoreBehind):
            await a.send_to_event_stream("c", {"action": "message", "args": {"content": f"{i}"}})
    assert a.node.metrics.speculations_lost == lost
    assert await stored_mark(a, "down") == 2
    await wait_until(  # what /healthz shows
        lambda: "is unavailable" in a.node.archiver.trouble, what="the store's trouble known"
    )
    await asyncio.to_thread(postgres_server.start)
    await wait_stored(a, "down", max(acked) + 1)
    await wait_until(lambda: a.node.archiver.trouble == "", what="the store's trouble gone")
    after = await send(a, "c", "after")
    await wait_stored(a, "down", after + 1)  # and its answer
    assert a.node.store is not None
    stored = await all_stored(a.node.store, "down")
    assert [i for i, _ in stored] == list(range(1, len(stored) + 1))
    by_id = dict(stored)
    for i, event_id in enumerate(acked):  # every acknowledged action, as sent
        assert unpack(by_id[event_id])["args"]["content"] == f"down {i}"


class FailsFor:
    """The node's real store, except that ``sids``' batches fail (a disk error in their
    files, say) while the set is not empty: the others' go through in the same call."""

    def __init__(self, store: EventStore, *sids: str) -> None:
        self.store, self.sids = store, set(sids)
        self.failed = 0

    async def append_many(self, batches: list[Batch]) -> list[object]:
        passed = [b for b in batches if b.sid not in self.sids]
        done = iter(await self.store.append_many(passed))
        self.failed += len(batches) - len(passed)
        return [
            next(done) if b.sid not in self.sids else StoreError(f"{b.sid}: disk error")
            for b in batches
        ]


async def test_one_conversation_the_store_refuses_holds_back_no_other(
    make_nodes: NodeFactory,
) -> None:
    """The mover stores every conversation of a gathering in one call: one whose
    batch fails waits in Redis (the node reports the trouble) while the others are
    stored; once its batch goes through, it is stored too, whole and in order."""
    (a,) = await make_nodes(1)
    for sid in ("bad", "good1", "good2"):
        await a.join_conversation(sid, f"c-{sid}", {}, "alice")
    store = a.node.store
    assert store is not None
    faulty = FailsFor(store, "bad")
    a.node.archiver._store = faulty  # type: ignore[assignment]
    for i in range(5):
        for sid in ("bad", "good1", "good2"):
            await send(a, f"c-{sid}", f"{sid} {i}")
    for sid in ("good1", "good2"):
        await wait_stored(a, sid, 10)  # five actions and their answers
    await wait_until(lambda: faulty.failed >= 2, what="the bad batch tried again")
    assert await stored_mark(a, "bad") == 0
    assert "bad: disk error" in a.node.archiver.trouble
    faulty.sids.clear()
    await wait_stored(a, "bad", 10)
    await wait_until(lambda: a.node.archiver.trouble == "", what="the trouble gone")
    for sid in ("bad", "good1", "good2"):
        assert await all_stored(store, sid) == await redis_log(a, sid)  # whole, in order


class HalfThenHang:
    """The node's real store, except that an append of several events writes the first
    half and then never returns: the owner dies halfway through a batch."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.hung = asyncio.Event()

    async def append_many(self, batches: list[Batch]) -> object:
        if all(len(b.events) < 2 for b in batches):
            return await self.store.append_many(batches)
        halves = [replace(b, events=b.events[: max(1, len(b.events) // 2)]) for b in batches]
        await self.store.append_many(halves)
        self.hung.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_owner_killed_halfway_through_a_batch_leaves_no_gap_or_duplicate(
    make_nodes: NodeFactory,
) -> None:
    a, b = await make_nodes(2)
    await a.join_conversation("killed", "ca", {}, "alice")
    store = a.node.store
    assert store is not None
    faulty = HalfThenHang(store)
    a.node.archiver._store = faulty  # type: ignore[assignment]
    for i in range(10):
        await send(a, "ca", str(i))
    await wait_until(faulty.hung.is_set, what="a batch half written")
    await a.node.halt()  # killed: no more writes, no lease renewal
    a.node.archiver._store = store  # type: ignore[assignment]
    epoch = int((await a.conversation("killed"))["epoch"])
    written = await all_stored(store, "killed")
    assert written and [i for i, _ in written] == list(range(1, len(written) + 1))

    # Another node takes over on the next action, and moves what the store lacks.
    async def a_dead() -> bool:
        return not await b.node.directory.alive(a.inc)

    await wait_until(a_dead, timeout=10, what="a's lease expired")
    await b.join_conversation("killed", "cb", {}, "alice")
    await send(b, "cb", "after")
    await wait_until(lambda: "killed" in b.local_loops(), timeout=10, what="b owns it")
    seq = int((await b.conversation("killed"))["seq"])
    await wait_stored(b, "killed", seq)
    stored = await all_stored(store, "killed")
    assert stored == await redis_log(b, "killed")  # the whole log, once each, in order
    # The dead owner's late batch (the rest of the one it was writing) is refused.
    late = await store.append("killed", epoch, stored[len(written) :], user="alice")
    assert late.status == "fenced"
    assert await all_stored(store, "killed") == stored


@pytest.mark.parametrize("stored_first", [True, False], ids=["stored", "unstored"])
async def test_ids_redis_lost_are_stored_as_a_notice_keeping_the_store_contiguous(
    make_nodes: NodeFactory, stored_first: bool
) -> None:
    """Whether the store had the events before the lost ids (the gap starts the mover's
    next batch) or not yet (the gap is inside it: a store that is slow, or a second
    failover soon after the first)."""
    (a,) = await make_nodes(1)
    store = a.node.store
    assert store is not None
    await a.join_conversation("rewound", "c", {}, "alice")
    if not stored_first:
        a.node.archiver._store = Hanging()  # type: ignore[assignment]
        a.node.archiver.append_timeout = 1.0
    await send(a, "c", "first")
    if stored_first:
        await wait_stored(a, "rewound", 2)
    else:

        async def answered() -> bool:
            return int((await a.conversation("rewound"))["seq"]) >= 2

        await wait_until(answered, what="the answer logged")
    # Redis lost ids 3..6 in a failover (scripts.REWIND): the log goes on at 7.
    notice_id, _ = await a.state.rewind("rewound", 6, 2)
    assert notice_id == 7
    a.node.archiver._store = store  # type: ignore[assignment]
    after = await send(a, "c", "second")
    await wait_stored(a, "rewound", after + 1)
    stored = await all_stored(store, "rewound")
    assert [i for i, _ in stored] == list(range(1, after + 2))
    lost = [unpack(d) for i, d in stored if 3 <= i <= 6]
    # The loss told once (a replay showed the notice for each lost id), the other ids
    # kept by OpenHands' null observation, which its client does not show.
    assert notice_code(lost[0]) == EVENTS_LOST and "Events 3 to 6 were lost" in lost[0]["message"]
    assert [e["observation"] for e in lost[1:]] == ["null"] * 3, lost
    assert unpack(stored[after - 1][1])["args"]["content"] == "second"


async def conversation_keys(node: ConversationManager, sid: str) -> list[str]:
    k = node.keys
    return [k.conv(sid), k.events(sid), k.inbox(sid), k.accepted(sid), k.conv_conns(sid)]


async def test_a_conversation_gone_from_redis_comes_back_from_the_store(
    make_nodes: NodeFactory,
) -> None:
    a, b = await make_nodes(2, log_window_events=4)
    await a.join_conversation("back", "ca", {}, "alice")
    for i in range(5):
        await send(a, "ca", str(i))
    await wait_until(lambda: len(make_nodes.sinks["node1"].events["ca"]) >= 10, what="10")
    before = make_nodes.sinks["node1"].events["ca"]
    await a.disconnect_from_session("ca")
    assert await a.close_session("back", "alice")
    meta = await a.conversation("back")
    last, fence = int(meta["seq"]), int(meta["epoch"])  # the loop's 10 and its stop
    await wait_stored(a, "back", last)
    # Its Redis state goes (expired, or Redis lost it); the store keeps it.
    await a.state.redis.delete(*await conversation_keys(a, "back"))
    with pytest.raises(Forbidden):
        await b.join_conversation("back", "cm", {}, "mallory")
    await b.join_conversation("back", "cb", {}, "alice", latest_event_id=0)
    sink = make_nodes.sinks["node2"]
    await wait_until(lambda: len(sink.events["cb"]) >= last, what="the history replayed")
    assert sink.events["cb"][:10] == before[:10]
    meta = await b.conversation("back")
    assert int(meta["epoch"]) > fence and meta["user"] == "alice"
    again = await send(b, "cb", "again")
    assert again == last + 1  # ids go on after the store's, never reused
    await wait_stored(b, "back", again + 1)
    assert b.node.store is not None
    stored = await all_stored(b.node.store, "back")
    assert [i for i, _ in stored] == list(range(1, again + 2))
    assert [with_id(i, unpack(d)) for i, d in stored] == sink.events["cb"][: again + 1]


async def test_a_stopped_conversation_leaves_redis_after_the_retention_and_comes_back(
    make_nodes: NodeFactory,
) -> None:
    a, b = await make_nodes(2, redis_retention=1.0)
    redis = a.state.redis
    keys = a.state.conversation_keys("kept")
    await a.join_conversation("kept", "ca", {}, "alice")
    await send(a, "ca", "one")
    await wait_until(lambda: len(make_nodes.sinks["node1"].events["ca"]) >= 2, what="answer")
    await a.disconnect_from_session("ca")
    assert await a.close_session("kept", "alice")
    assert 0 < await redis.pttl(keys[0]) <= 1000  # retiring
    # Started again within the retention: it stays.
    await a.join_conversation("kept", "ca2", {}, "alice")
    # (-2: no inbox key while no action waits)
    assert [await redis.pttl(key) for key in keys[:4]] == [-1, -1, -2, -1]
    await a.disconnect_from_session("ca2")
    assert await a.close_session("kept", "alice")
    last = int((await a.conversation("kept"))["seq"])

    async def gone() -> bool:
        return await redis.exists(*keys) == 0

    await wait_until(gone, timeout=5, what="its Redis state expired")
    assert await a.conversation("kept") == {}
    assert await a.user_of("kept") == "alice"  # the store still knows it
    # Nothing of it stays in Redis, its user's index included: the store lists it.
    assert await redis.zscore(a.state.keys.user_convs("alice"), "kept") is None
    listed, _, _ = await a.directory.list_conversations("alice")
    assert listed == [describe_retired("kept", listed[0]["created"])]
    assert listed[0]["state"] == "stopped" and listed[0]["created"] > 0
    # Asked for alone it says as much, with its last id.
    view = await a.directory.conversation_view("kept")
    assert view == {**listed[0], "events": last, "user": "alice"}
    await a.join_conversation("fresh", "cf", {}, "alice")  # newer, and in Redis
    listed, _, _ = await a.directory.list_conversations("alice")
    assert [(c["conversation_id"], c["state"]) for c in listed] == [
        ("fresh", "loading"),
        ("kept", "stopped"),
    ]
    # Pages across the two sources: Redis' index, then the store's.
    first, page_id, _ = await a.directory.list_conversations("alice", 1)
    second, after_last, _ = await a.directory.list_conversations("alice", 1, page_id)
    assert (first, second, after_last) == (listed[:1], listed[1:], None)
    await a.disconnect_from_session("cf")
    assert [e["id"] for e in await b.events("kept", 0, 100)] == list(range(1, last + 1))
    await b.join_conversation("kept", "cb", {}, "alice", latest_event_id=0)
    sink = make_nodes.sinks["node2"]
    await wait_until(lambda: len(sink.events["cb"]) >= last, what="the history replayed")
    assert await send(b, "cb", "two") == last + 1
    # Back in Redis it keeps its creation time (the store's), so the list keeps its
    # place: it was made new at each return, jumping to the top of the list.
    back = await b.directory.conversation_view("kept")
    assert back["created"] == listed[1]["created"]
    listed, _, _ = await b.directory.list_conversations("alice")
    assert [c["conversation_id"] for c in listed] == ["fresh", "kept"]


async def test_a_conversation_without_events_leaves_its_users_index_when_it_retires(
    make_nodes: NodeFactory,
) -> None:
    """With no start notes (``agent_state_events`` off) a conversation joined and left
    without an action, then closed idle, logs nothing: it retired from Redis, but its
    user's index kept its id for good (RELEASE said so only of one with events), a key
    per such user that never went. Now it leaves the index when it retires; and one
    taken back during its retention is indexed again (it was only when created)."""
    (a,) = await make_nodes(
        1, redis_retention=1.0, close_delay=0.3, cleanup_interval=0.1, agent_state_events=False
    )
    redis, index = a.state.redis, a.state.keys.user_convs("ann")
    await a.join_conversation("quiet", "c1", {}, "ann")
    assert await redis.zscore(index, "quiet") is not None
    await a.disconnect_from_session("c1")
    await wait_until(lambda: not a.local_loops(), what="closed idle")
    assert int((await a.conversation("quiet"))["seq"]) == 0

    async def out_of_the_index() -> bool:  # (the release follows the loop's stop)
        return await redis.zscore(index, "quiet") is None

    await wait_until(out_of_the_index, what="out of its user's index")
    await a.join_conversation("quiet", "c2", {}, "ann")  # taken back: indexed again
    assert await redis.zscore(index, "quiet") is not None
    await a.disconnect_from_session("c2")
    await wait_until(lambda: not a.local_loops(), what="closed idle again")

    async def gone() -> bool:
        return await redis.exists(*a.state.conversation_keys("quiet"), index) == 0

    await wait_until(gone, timeout=5, what="its Redis state and the user's index gone")


async def test_a_move_that_meets_a_purge_is_no_store_trouble(
    make_nodes: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A purge empties the store before it deletes the Redis state: a move of the
    conversation meanwhile (its loop's last, a sweep's) found the store holding less
    than Redis recorded and said so at ERROR, 'was the store replaced or restored from
    an older backup?', and the node reported store trouble until its next move (a probe
    saw it 2-3 times per 10,000 users). A gap on a conversation being purged is now
    what it is: nothing to store. (Not being purged, it is a store that lost events: they
    are stored again from the log.)"""
    (a,) = await make_nodes(1)
    state, archiver = a.state, a.node.archiver
    own = await state.acquire("doomed", "elsewhere", "elsewhere/1", "dan", create=True)
    lease = Lease("doomed", "dan", "elsewhere/1", own.epoch)
    for n in range(3):
        await state.commit("doomed", lease.inc, lease.epoch, [pack({"n": n})], floor=0)
    assert await archiver.move_all([lease]) == [3]
    await state.commit("doomed", lease.inc, lease.epoch, [pack({"n": 3})], floor=0)
    await state.mark_purging("doomed", 30)
    assert a.node.store is not None
    await a.node.store.purge("doomed")
    caplog.clear()
    (moved,) = await archiver.move_all([lease])
    assert moved == 3, moved  # nothing stored, nothing wrong
    assert "restored from an older backup" not in caplog.text
    # Not purging: the same gap is a store that lost what it held, filled again from Redis.
    await state.unmark_purging("doomed")
    (moved,) = await archiver.move_all([lease])
    assert moved == 4 and "lost doomed's events 1-3" in caplog.text
    assert [i for i, _ in await all_stored(a.node.store, "doomed")] == [1, 2, 3, 4]


async def test_a_stopped_loop_is_not_kept_alive_by_the_event_store_mover(
    make_nodes: NodeFactory,
) -> None:
    """The mover's loop kept the last runner whose events it moved (a comprehension's
    walrus bound it in the loop's own frame) until its next move: a stopped loop, its
    agent and its memory stayed alive on a quiet node. Now a stopped loop is garbage
    once it stops."""
    (a,) = await make_nodes(1)
    await a.join_conversation("gone", "c1", {}, "bob")
    await send(a, "c1", "hi")
    await wait_until(lambda: len(make_nodes.sinks["node1"].events["c1"]) >= 2, what="answer")
    await wait_until(lambda: not a.node.archiver._pending, what="its events moved")
    await asyncio.sleep(0.3)  # the mover's round over: it waits for the next one
    runner = a.runner("gone")
    assert runner is not None
    ref = weakref.ref(runner)
    del runner
    await a.disconnect_from_session("c1")
    assert await a.close_session("gone", "bob")
    await asyncio.sleep(0.3)  # the mover's round, had it one to make
    gc.collect()
    assert ref() is None, gc.get_referrers(ref())


async def test_delete_with_purge_removes_a_conversation_everywhere(
    servers: ServerCluster,
) -> None:
    a, b = await servers.start(2, log_window_events=4)
    writer = await servers.join(a, "doomed", "alice")
    for i in range(5):
        await say(writer, str(i))
    await writer.wait_ids(10)
    await wait_stored(a.manager, "doomed", 10)
    req = servers.request
    status, body = await req("DELETE", b, "/api/conversations/doomed?purge=maybe", user="alice")
    assert status == 400 and "purge must be true or false" in body["error"]
    status, body = await req("DELETE", b, "/api/conversations/doomed?purge=true", user="mallory")
    assert status == 404
    await writer.close()
    status, body = await req("DELETE", b, "/api/conversations/doomed?purge=true", user="alice")
    assert status == 200, body
    purged = body["purged"]
    assert body["closed"] is True and purged["redis_keys"] >= 3
    assert purged["stored_events"] >= 10 and purged["stored_bytes"] > 0
    state = a.manager.state
    assert await state.redis.exists(*state.conversation_keys("doomed")) == 0
    assert a.manager.node.store is not None
    assert await a.manager.node.store.conversation("doomed") is None
    status, body = await req("GET", a, "/api/conversations/doomed/events", user="alice")
    assert status == 404
    status, body = await req("GET", a, "/api/conversations", user="alice")
    assert [c for c in body["conversations"] if c["conversation_id"] == "doomed"] == []
    status, body = await req("DELETE", a, "/api/conversations/doomed?purge=true", user="alice")
    assert status == 404


@pytest.mark.parametrize("how", ["closed", "owner killed"])
async def test_events_a_gone_owner_could_not_store_are_stored_by_a_sweep(
    make_nodes: NodeFactory, postgres_server: PostgresServer, postgres_dsn: str, how: str
) -> None:
    """A loop that stops, or a node that dies, while the store is unreachable leaves
    acknowledged events in Redis only, and no owner to move them: once the store is back
    a node's sweep stores them, with no client and no action, and the conversation then
    leaves Redis after the retention. (Before, nothing moved them until the conversation
    ran again: Redis lost with them lost acknowledged actions, and they never expired.)"""
    a, b = await make_nodes(2, log_window_events=20, event_store=postgres_dsn)
    await a.join_conversation("orphan", "c", {}, "alice")
    first = await send(a, "c", "stored")
    await wait_stored(a, "orphan", first + 1)
    await asyncio.to_thread(postgres_server.stop)
    acked = [await send(a, "c", f"unstored {i}") for i in range(3)]
    await wait_until(lambda: _applied(a, "orphan", acked[-1]), what="every action answered")
    await a.disconnect_from_session("c")
    if how == "closed":
        await a.close_session("orphan", "alice")
    else:
        await a.node.halt()
    await wait_until(lambda: _unowned(b, "orphan"), timeout=15, what="orphan without an owner")
    await asyncio.to_thread(postgres_server.start)
    await wait_stored(b, "orphan", acked[-1])
    assert b.node.store is not None
    by_id = dict(await all_stored(b.node.store, "orphan"))
    for i, event_id in enumerate(acked):
        assert unpack(by_id[event_id])["args"]["content"] == f"unstored {i}"
    state = b.state
    await wait_until(lambda: _zcard(b), what="the sweep's list emptied")
    ttl = await state.redis.pttl(state.keys.conv("orphan"))
    assert 0 < ttl <= 3_600_000  # retiring: gone from Redis after the retention


async def test_a_swept_conversation_running_again_is_its_owners_to_store(
    make_nodes: NodeFactory, postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    """A conversation noted for the sweep that runs again (its client rejoined on
    another node) leaves the sweep's list at its new owner's sweep, the store still away:
    the owner's mover stores it once the store is back. Before, such entries stayed at
    the head of the list while their conversation ran, and a sweep reads the oldest
    hundred only."""
    a, b = await make_nodes(2, log_window_events=20, event_store=postgres_dsn)
    await a.join_conversation("again", "c", {}, "alice")
    first = await send(a, "c", "stored")
    await wait_stored(a, "again", first + 1)
    await asyncio.to_thread(postgres_server.stop)
    acked = await send(a, "c", "unstored")
    await wait_until(lambda: _applied(a, "again", acked), what="answered")
    await a.node.halt()
    await wait_until(lambda: _unowned(b, "again"), timeout=15, what="released")
    await b.join_conversation("again", "c2", {}, "alice")  # it runs on b now
    await wait_until(lambda: _zcard(b), what="the entry left to its owner")
    await asyncio.to_thread(postgres_server.start)
    await wait_stored(b, "again", acked + 1)


async def _applied(node: ConversationManager, sid: str, action: int) -> bool:
    return int((await node.conversation(sid)).get("applied") or 0) >= action


async def _unowned(node: ConversationManager, sid: str) -> bool:
    return (await node.conversation(sid)).get("inc") == ""


async def _zcard(node: ConversationManager) -> bool:
    return await node.state.redis.zcard(node.keys.unstored()) == 0


async def test_a_purge_the_store_fails_leaves_the_conversation_whole(
    make_nodes: NodeFactory, postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    """The store is purged first: when it fails, Redis still holds the conversation and
    the events the store lacked, which it takes once back; a purge again removes all.
    (Redis went first: the acknowledged events the store lacked were gone, and their
    ids given to the next ones.)"""
    (a,) = await make_nodes(1, log_window_events=20, event_store=postgres_dsn)
    await a.join_conversation("kept", "c", {}, "alice")
    first = await send(a, "c", "stored")
    await wait_stored(a, "kept", first + 1)
    await asyncio.to_thread(postgres_server.stop)
    unstored = await send(a, "c", "not stored yet")
    with pytest.raises(StoreUnavailable):
        await a.purge("kept", "alice")
    await asyncio.to_thread(postgres_server.start)
    assert await a.conversation("kept")
    await wait_stored(a, "kept", unstored + 1)  # its loop stopped: the sweep moves them
    assert a.node.store is not None
    by_id = dict(await all_stored(a.node.store, "kept"))
    assert unpack(by_id[unstored])["args"]["content"] == "not stored yet"
    purged = await a.purge("kept", "alice")
    assert purged["purged"]["stored_events"] >= unstored + 1
    assert await a.conversation("kept") == {}
    assert await a.node.store.conversation("kept") is None


async def test_a_purge_redis_fails_after_the_store_is_not_undone_by_a_move(
    make_nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store emptied, then Redis' part of the purge fails: the conversation stays
    held as being purged (for good with a retention of 0), so the check of every
    conversation against the store (a loss seen elsewhere) and the sweep do not take the
    store's emptiness for a loss and store it again; nor after a purge again that fails
    before reaching the store; a purge again that goes through finishes it."""
    (a,) = await make_nodes(1, redis_retention=0)
    await a.join_conversation("doomed", "c", {}, "alice")
    last = await send(a, "c", "hello")
    await wait_stored(a, "doomed", last + 1)
    store = a.node.store
    assert store is not None

    async def redis_fails(*_: Any) -> int:
        raise RedisConnectionError("Redis went away")

    async def store_fails(*_: Any) -> Any:
        raise StoreUnavailable("the store", "down")

    async def not_stored_again() -> None:
        assert await a.state.purging(["doomed"]) == {"doomed"}
        assert await a.state.redis.pttl(a.keys.purging("doomed")) == -1  # for good
        await a.node.archiver.audit.check()
        await a.node.archiver.sweep()
        assert await store.conversation("doomed") is None

    monkeypatch.setattr(a.state, "purge", redis_fails)
    with pytest.raises(RedisConnectionError):
        await a.purge("doomed", "alice")
    await not_stored_again()
    monkeypatch.setattr(store, "purge", store_fails)
    with pytest.raises(StoreUnavailable):
        await a.purge("doomed", "alice")
    await not_stored_again()
    monkeypatch.undo()
    assert (await a.purge("doomed", "alice"))["purged"]["redis_keys"] > 0
    assert await a.state.purging(["doomed"]) == set()


async def test_a_purge_and_a_create_of_one_conversation_at_once_leave_one_or_the_other(
    servers: ServerCluster,
) -> None:
    """A create racing a purge of the same id: either it comes before (and the purge
    removes it too: nothing left anywhere) or after (refused while the purge runs, or a
    fresh conversation holding its message). Never a create answered 404, a message
    acknowledged into a conversation left half there, or a ghost listed from the store."""
    (a,) = await servers.start(1)
    req = servers.request
    outcomes: Counter[str] = Counter()
    for i in range(20):
        sid = f"race{i}"
        status, _ = await req(
            "POST", a, "/api/conversations", user="alice",
            json={"conversation_id": sid, "initial_user_msg": "first"},
        )  # fmt: skip
        assert status == 201
        await asyncio.sleep(0.2)

        async def create(sid: str = sid) -> tuple[int, Any]:
            await asyncio.sleep(random.random() * 0.01)
            return await req(
                "POST", a, "/api/conversations", user="alice",
                json={"conversation_id": sid, "initial_user_msg": "second"},
            )  # fmt: skip

        purged, created = await asyncio.gather(
            req("DELETE", a, f"/api/conversations/{sid}?purge=true", user="alice"), create()
        )
        assert purged[0] == 200, purged
        assert created[0] in (200, 201, 409), created
        await asyncio.sleep(0.5)  # a loop the create started has written what it will
        status, view = await req("GET", a, f"/api/conversations/{sid}", user="alice")
        _, listing = await req("GET", a, "/api/conversations", user="alice")
        listed = [c for c in listing["conversations"] if c["conversation_id"] == sid]
        if status == 404:  # the purge came last: nothing of it anywhere
            outcomes["purged"] += 1
            assert listed == [], listed
            assert a.manager.node.store is not None
            assert await a.manager.node.store.conversation(sid) is None
            state = a.manager.state
            assert await state.redis.exists(*state.conversation_keys(sid)) == 0
        else:  # the create came last: a fresh conversation with its message
            outcomes["created" if created[0] != 409 else "refused"] += 1
            assert created[0] in (200, 201), (created, view)
            assert view["created"] is not None and listed, (view, listed)
            events = await a.manager.events(sid)
            said = [e["args"]["content"] for e in events if e.get("source") == "user"]
            assert said == ["second"], events
    assert sum(outcomes.values()) == 20, outcomes

    # While a purge holds a conversation, nobody takes it: a create or a join is refused.
    await a.manager.state.mark_purging("held", 30)
    status, body = await req(
        "POST", a, "/api/conversations", user="alice", json={"conversation_id": "held"}
    )
    assert (status, body) == (
        409,
        {"error": "conversation 'held' is being purged; try again once it is gone"},
    )
    why = await servers.client().refused(a.url, "held", servers.token("alice"))
    assert why == "conversation 'held' is being purged; try again once it is gone"
    await a.manager.state.unmark_purging("held")
    status, _ = await req(
        "POST", a, "/api/conversations", user="alice", json={"conversation_id": "held"}
    )
    assert status == 201


async def test_a_retired_conversation_is_closed_and_posted_as_one_that_exists(
    servers: ServerCluster,
) -> None:
    """Gone from Redis after the retention, kept by the store: a DELETE says nothing ran
    (it was a 404 while GET said 200), a POST of its id is no creation (it was a 201 and
    took one of the user's creations), another user still gets 404."""
    (a,) = await servers.start(1, redis_retention=0.5)
    req = servers.request
    body = {"conversation_id": "old", "initial_user_msg": "hi"}
    status, _ = await req("POST", a, "/api/conversations", user="alice", json=body)
    assert status == 201
    await wait_until(lambda: _answered(a.manager, "old"), timeout=10, what="the answer")
    assert await req("DELETE", a, "/api/conversations/old", user="alice") == (
        200,
        {"closed": True},
    )
    state = a.manager.state

    async def retired() -> bool:
        return await state.redis.exists(*state.conversation_keys("old")) == 0

    await wait_until(retired, timeout=10, what="its Redis state expired")
    status, view = await req("GET", a, "/api/conversations/old", user="alice")
    assert status == 200 and view["state"] == "stopped"
    assert await req("DELETE", a, "/api/conversations/old", user="alice") == (
        200,
        {"closed": False},
    )
    status, _ = await req("DELETE", a, "/api/conversations/old", user="mallory")
    assert status == 404
    status, created = await req(
        "POST", a, "/api/conversations", user="alice", json={"conversation_id": "old"}
    )
    assert status == 200 and created["running"] is True, created
    assert [e["id"] for e in await a.manager.events("old")][:3] == [1, 2, 3]


async def _answered(node: ConversationManager, sid: str) -> bool:
    return any(e.get("source") == "agent" for e in await node.events(sid))


async def test_quotas_refuse_clearly_and_change_nothing(make_nodes: NodeFactory) -> None:
    (a,) = await make_nodes(
        1,
        max_conversations_per_user=2,
        max_action_bytes=1024,
        log_window_bytes=4096,
        max_conversation_bytes=3000,
    )
    for n in (1, 2):
        await a.join_conversation(f"q{n}", f"c{n}", {}, "alice")
        await send(a, f"c{n}", "hello")
        await wait_stored(a, f"q{n}", 2)
    with pytest.raises(LimitExceeded) as refused:
        await a.join_conversation("q3", "c3", {}, "alice")
    assert refused.value.limit == "conversations per user"
    assert "has 2 conversations stored (the limit is 2)" in str(refused.value)
    assert await a.conversation("q3") == {}
    await a.join_conversation("q3", "c3", {}, "bob")  # another user's quota
    # Bytes of one conversation: refused before it would pass the limit, nothing logged.
    sent = 0
    with pytest.raises(LimitExceeded) as over:
        for sent in range(20):
            await send(a, "c1", f"{sent:03}" + "x" * 600)
    assert over.value.limit == "bytes per conversation"
    assert "would pass the limit of 3000 bytes" in str(over.value)
    logged = [unpack(d).get("args", {}).get("content", "") for _, d in await redis_log(a, "q1")]
    assert f"{sent - 1:03}" + "x" * 600 in logged
    assert f"{sent:03}" + "x" * 600 not in logged  # the refused one


async def test_a_flood_of_big_actions_keeps_redis_within_the_window(
    make_nodes: NodeFactory,
) -> None:
    window, inbox = 1 << 20, 8
    (a,) = await make_nodes(1, log_window_bytes=window, inbox_max=inbox)
    await a.join_conversation("flood", "c", {}, "mallory")
    redis, events = a.state.redis, a.keys.events("flood")
    big = "x" * 60_000
    acked: list[int] = []
    largest = 0
    stop = asyncio.get_running_loop().time() + 3
    while asyncio.get_running_loop().time() < stop:
        try:
            acked.append(
                await a.send_to_event_stream("c", {"action": "message", "args": {"content": big}})
            )
        except (StoreBehind, InboxFull):
            await asyncio.sleep(0.005)
        if len(acked) % 5 == 0:
            rows = await redis.xrange(events)
            largest = max(largest, sum(len(f[b"d"]) for _, f in rows))
    assert len(acked) > 20
    # Each time the mover marks what the store holds, the stored events are trimmed until
    # the log holds at most the window, or only what is not stored (U). Until the next
    # mark, accepts are refused once the unstored bytes would pass the window, so they add
    # at most the window less U; the agent's answers are never refused, but they answer
    # actions acknowledged and not yet answered: at most the inbox's bound, each answer as
    # big as its action (an echo). So at most two windows and twice the inbox's answers
    # (U itself is at most a window and the inbox's answers). With the default inbox
    # (1,000) an agent that lags behind the mover lets more answers wait: 4.2 MB was seen.
    assert largest <= 2 * window + 2 * (inbox + 1) * 61_000, largest

    async def settled() -> bool:  # every action answered, and all of it stored
        meta = await a.conversation("flood")
        return int(meta["applied"]) >= max(acked) and meta["stored"] == meta["seq"]

    await wait_until(settled, timeout=30, what="the flood answered and stored")
    assert a.node.store is not None
    stored = dict(await all_stored(a.node.store, "flood"))
    assert sorted(stored) == list(range(1, len(stored) + 1)) and set(acked) <= set(stored)
    rows = await redis.xrange(events)
    assert sum(len(f[b"d"]) for _, f in rows) <= window


async def test_an_agent_event_over_the_limit_is_refused_to_the_agent(
    make_nodes: NodeFactory,
) -> None:
    (a,) = await make_nodes(1, max_agent_event_bytes=4096, agent_isolation="none")
    await a.join_conversation("loud", "c", {}, "alice")
    runner = a.runner("loud")
    assert runner is not None
    seq = (await a.conversation("loud"))["seq"]
    with pytest.raises(LimitExceeded) as refused:
        await runner.emit({"observation": "run", "content": "y" * 5000})
    assert refused.value.limit == "agent event bytes"
    assert "over the limit of 4096 bytes" in str(refused.value)
    assert (await a.conversation("loud"))["seq"] == seq  # nothing written
    # What clients could not read (NaN is no JSON: OpenHands' web client fails on it, and
    # REST's page of the conversation did), nor msgpack carry, is refused to the agent.
    for bad, why in [
        ({"observation": "run", "extras": {"exit_code": math.nan}}, "NaN or Infinity"),
        ({"observation": "run", "extras": {"pid": 2**64}}, "beyond 64 bits"),
        ({"observation": "run", "extras": json.loads("[" * 70 + "]" * 70)}, "too deeply"),
    ]:
        with pytest.raises(InvalidInput, match=why):
            await runner.emit(bad)
    assert (await a.conversation("loud"))["seq"] == seq
    assert await runner.emit({"observation": "run", "content": "y" * 1000}) == int(seq) + 1


async def test_redis_at_its_maxmemory_refuses_actions_clearly(
    servers: ServerCluster, redis_client: Any
) -> None:
    (a,) = await servers.start(1)
    client = await servers.join(a, "full", "alice")
    before = await client.say("before")
    policy = await redis_client.config_get("maxmemory-policy")
    await redis_client.config_set("maxmemory-policy", "noeviction")
    await redis_client.config_set("maxmemory", 1)
    try:
        ack = await client.act({"action": "message", "args": {"content": "refused"}})
        status, health = await servers.request("GET", a, "/healthz")
    finally:
        await redis_client.config_set("maxmemory", 0)
        await redis_client.config_set("maxmemory-policy", policy["maxmemory-policy"])
    assert ack == {
        "ok": False,
        "error": "Redis is full (at its maxmemory): nothing was written; try again later",
    }
    assert status == 503 and health["status"] == "degraded"
    assert "Redis is full" in health["reason"]
    after = await client.say("after")
    assert after > before
    logged = [e.get("args", {}).get("content") for e in await a.manager.events("full")]
    assert "before" in logged and "after" in logged and "refused" not in logged


async def test_a_conversation_redis_lost_under_its_client_comes_back_from_the_store(
    make_nodes: NodeFactory, redis_client: Any
) -> None:
    (a,) = await make_nodes(1)
    sink = make_nodes.sinks["node1"]
    await a.join_conversation("lost", "c", {}, "alice")
    for i in range(2):
        await send(a, "c", str(i))
    await wait_until(lambda: len(sink.events["c"]) >= 4, what="4 events")
    await wait_stored(a, "lost", 4)
    # The next two events reach the client but not the store; then Redis comes back empty.
    store = a.node.store
    assert store is not None
    a.node.archiver._store = Hanging()  # type: ignore[assignment]
    a.node.archiver.append_timeout = 1.0
    await send(a, "c", "unstored")
    await wait_until(lambda: len(sink.events["c"]) >= 6, what="6 events")
    inc = a.inc
    await redis_client.flushall()
    a.node.archiver._store = store  # type: ignore[assignment]
    await wait_until(lambda: a.inc != inc, timeout=10, what="the node registered again")
    after = await send(a, "c", "after")
    await wait_until(lambda: sink.events["c"][-1]["id"] >= after + 1, what="answered")
    ids = [e["id"] for e in sink.events["c"]]
    assert ids == sorted(set(ids)) and ids[:6] == [1, 2, 3, 4, 5, 6]  # none reused
    notice = next(e for e in sink.events["c"] if notice_code(e) == EVENTS_LOST)
    assert "Events 5 to 6 were lost" in notice["message"] and notice["id"] == 7 and after == 8
    await wait_stored(a, "lost", after + 1)
    stored = await all_stored(store, "lost")
    assert [i for i, _ in stored] == list(range(1, after + 2))


async def test_a_start_note_redis_lost_before_the_store_had_it_is_told_and_never_reused(
    make_nodes: NodeFactory, redis_client: Any
) -> None:
    (a,) = await make_nodes(1, agent_state_events=True)
    sink = make_nodes.sinks["node1"]
    await a.join_conversation("noted", "c", {}, "alice")
    await wait_until(lambda: sink.events["c"], what="the start's state note")
    assert [e["id"] for e in sink.events["c"]] == [1]  # waiting in Redis, not stored
    inc = a.inc
    await redis_client.flushall()
    await wait_until(lambda: a.inc != inc, timeout=10, what="the node registered again")
    after = await send(a, "c", "after")
    await wait_until(lambda: sink.events["c"][-1]["id"] > after, what="answered")
    ids = [e["id"] for e in sink.events["c"]]
    assert ids == sorted(set(ids)) and after > 1  # id 1 is not given again
    notice = next(e for e in sink.events["c"] if notice_code(e) == EVENTS_LOST)
    assert (notice["extras"]["first"], notice["extras"]["last"]) == (1, 1)


async def _system_notice(a: ConversationManager, writer: str) -> None:
    """The node writes a notice of its own for "reaped" as ``writer`` does."""
    loops = a.node.loops
    if writer == "reaper":
        released = await reap_incarnation(
            a.state, a.inc, keep_connections=True, floor=a.node.delivery.floor, retention_ms=0
        )
        assert released == [("reaped", "alice")]
    elif writer == "give_up":  # a start given up (or evicted before it ran)
        runner = a.runner("reaped")
        assert runner is not None
        assert await loops.owners.give_up(runner.lease, evicted_event(), watched=False)
    elif writer == "release_dead":  # the owner seen dead by a command sent to it
        await loops.release_dead("reaped", "alice", a.inc)
    else:  # close_session of a conversation no live node runs
        await loops.close_unserved("reaped", "alice", a.inc)


@pytest.mark.parametrize("writer", ["reaper", "give_up", "release_dead", "close_unserved"])
async def test_a_system_notice_after_redis_lost_events_takes_no_id_a_client_saw(
    make_nodes: NodeFactory, redis_client: Any, writer: str
) -> None:
    """Redis loses events 3-4 (a failover) that a connection on the node was sent, and the
    node then writes a notice of its own (a reaper's loop lost, a start given up, a dead
    owner's release, a close of an unserved conversation): it carries what the node knows
    was logged, so the ids go on after 4, with the loss told first; it never takes id 3,
    which the client saw. Seen in CI before: a start given up wrote its status at the
    first id Redis had free."""
    (a,) = await make_nodes(1)
    sink = make_nodes.sinks["node1"]
    a.node.archiver._store = Hanging()  # type: ignore[assignment]  # nothing stored
    a.node.archiver.append_timeout = 1.0
    await a.join_conversation("reaped", "c", {}, "alice")
    for i in range(2):
        await send(a, "c", str(i))
    await wait_until(lambda: len(sink.events["c"]) == 4, what="4 events")
    meta, events = a.keys.conv("reaped"), a.keys.events("reaped")
    kept = await redis_client.xrange(events, max="2-0")  # Redis lost events 3 and 4
    await redis_client.delete(events)
    for entry, fields in kept:
        await redis_client.xadd(events, fields, id=entry)
    await redis_client.hset(meta, "seq", 2)
    await _system_notice(a, writer)
    rows = await redis_client.xrange(events)
    ids = [int(entry.split(b"-")[0]) for entry, _ in rows]
    assert ids == [1, 2, 5, 6], ids
    notice = unpack(rows[2][1][b"d"])
    assert notice_code(notice) == EVENTS_LOST and "Events 3 to 4 were lost" in notice["message"]


class Hanging:
    """A store whose appends never return (unreachable, without an error)."""

    async def append_many(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()


async def test_a_users_conversation_index_stays_bounded(make_nodes: NodeFactory) -> None:
    (a,) = await make_nodes(1)
    for n in range(USER_INDEX_MAX + 5):
        await a.state.record_start(
            Lease(f"many-{n}", "prolific", a.inc, 1), created=True, idle_for=60.0
        )
    index = a.keys.user_convs("prolific")
    assert await a.state.redis.zcard(index) == USER_INDEX_MAX


async def test_a_conversation_of_no_user_is_moved_to_the_store(make_nodes) -> None:
    """The seed's ``user_id=None`` (a single-user deployment): its events reach the
    store as any other's. Before, the store refused them (an invalid user), the mover
    logged an error and retried it for good, and its backoff held back the node's other
    conversations too."""
    (a,) = await make_nodes(1)
    await a.join_conversation("anon", "c1", {}, None)
    await a.send_to_event_stream("c1", {"action": "message", "args": {"content": "hi"}})
    sink = make_nodes.sinks["node1"]
    await wait_until(lambda: len(sink.events["c1"]) >= 2, what="the answer")
    await wait_stored(a, "anon", 2)
    stored = await a.node.store.conversation("anon")
    assert stored is not None and stored.user == ""
    assert a.node.archiver.trouble == ""
    # It is a conversation like the others: closed and purged (it was "not found").
    await a.disconnect_from_session("c1")
    assert await a.close_session("anon") is True
    purged = await a.purge("anon")
    assert purged["purged"]["stored_events"] >= 2, purged
    assert await a.node.store.conversation("anon") is None


async def test_a_conversation_the_store_refuses_holds_back_no_other(
    make_nodes, caplog: pytest.LogCaptureFixture
) -> None:
    """One conversation the store refuses for good (here: stored for another user
    meanwhile) is retried on its own backoff: the others' events are stored meanwhile
    and the node's store trouble stays said, once. Before, the mover slept the failing
    one's backoff (up to 5 s) before moving anyone's, and each other conversation's
    success logged 'storing events again' between its errors."""
    caplog.set_level(logging.WARNING, logger="coordinator.archive")
    (a,) = await make_nodes(1)
    sink = make_nodes.sinks["node1"]
    await a.join_conversation("taken", "ct", {}, "alice")
    await a.node.store.append("taken", 1, [], user="bob")  # before its first move
    await a.send_to_event_stream("ct", {"action": "message", "args": {"content": "hi"}})
    await wait_until(lambda: a.node.archiver.trouble, what="the store refusing 'taken'")
    await a.join_conversation("other", "co", {}, "carol")
    for i in range(3):
        await a.send_to_event_stream("co", {"action": "message", "args": {"content": f"{i}"}})
        await wait_until(lambda i=i: len(sink.events["co"]) >= 2 * (i + 1), what="answered")
        await wait_stored(a, "other", 2 * (i + 1))
    assert "another user" in a.node.archiver.trouble
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if "storing events again" in line], lines
    assert len([line for line in lines if "cannot store taken's events" in line]) == 1
    # Its actions do not each ask the store again: it is tried at its backoff.
    store, tried = a.node.store, []
    append_many = store.append_many

    async def counted(batches: Any) -> Any:
        tried.extend(b.sid for b in batches)
        return await append_many(batches)

    store.append_many = counted  # type: ignore[method-assign]
    for i in range(20):
        await a.send_to_event_stream("ct", {"action": "message", "args": {"content": f"{i}"}})
        await asyncio.sleep(0.05)
    assert 1 <= tried.count("taken") <= 6, tried.count("taken")  # 1 s of 0.1 s doubling


async def test_actions_of_a_conversation_redis_lost_are_not_a_log_line_each(
    make_nodes: NodeFactory, redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis came back empty while a client sends: the conversation is restored from the
    store, and the node says so in a few lines, not one per action (a probe: 8 lines in
    1.4 s from one client; a node with thousands of watched conversations writes a line
    per action of each)."""
    caplog.set_level(logging.WARNING, logger="coordinator.restarts")
    (a,) = await make_nodes(1)
    await a.join_conversation("lost", "c1", {}, "alice")
    assert await send(a, "c1", "before") == 1
    await wait_stored(a, "lost", 2)
    await redis_client.flushall()
    sent = await asyncio.gather(
        *(send(a, "c1", f"after {i}") for i in range(30)), return_exceptions=True
    )
    assert all(isinstance(event_id, int) for event_id in sent), sent
    said = [r for r in caplog.records if "is gone from Redis" in r.getMessage()]
    assert 1 <= len(said) <= 11, len(said)


@pytest.fixture
async def postgres_pair() -> Any:
    """A private primary and its streaming replica, both running; gone afterwards."""
    primary = await asyncio.to_thread(PostgresServer)
    replica = None
    try:
        await asyncio.to_thread(primary.start)
        database = await asyncio.to_thread(primary.create_database)
        replica = await asyncio.to_thread(PostgresServer, primary)
        await asyncio.to_thread(replica.start)
        yield primary, replica, database
    finally:
        for server in (primary, replica):
            if server is not None:
                await asyncio.to_thread(server.cleanup)


async def _replayed(primary: PostgresServer, replica: PostgresServer) -> bool:
    """The replica has replayed everything the primary wrote so far."""
    written = await primary.execute("SELECT pg_current_wal_lsn()::text")
    return bool(await replica.execute(f"SELECT pg_last_wal_replay_lsn() >= '{written}'::pg_lsn"))


async def _joined_on_a_pair(
    make_nodes: NodeFactory, postgres_pair: Any, sids: dict[str, str], n: int, **config: Any
) -> tuple[Any, Any, dict[str, int]]:
    """A node whose store URL lists a primary and its replica (``target_session_attrs``),
    clients joined to ``sids`` (cid -> conversation), ``n`` messages answered on each
    and on the replica: the node, its sink and each client's last id."""
    primary, replica, database = postgres_pair
    role = f"coord:{primary.password}"
    dsn = (
        f"postgresql://{role}@127.0.0.1:{primary.port},127.0.0.1:{replica.port}/{database}"
        "?target_session_attrs=read-write"
    )
    (a,) = await make_nodes(1, event_store=dsn, **config)
    sink = make_nodes.sinks[a.node_id]
    for cid, sid in sids.items():
        await a.join_conversation(sid, cid, {}, "alice")
    held = {
        cid: await _sent_and_stored(a, sink, cid, sid, "before", n) for cid, sid in sids.items()
    }
    await wait_until(lambda: _replayed(primary, replica), what="the replica caught up")
    return a, sink, held


async def _sent_and_stored(node: Any, sink: Any, cid: str, sid: str, prefix: str, n: int) -> int:
    """Send ``n`` messages on ``cid``; its last id once the agent answered them all and
    the store has them."""
    for i in range(n):
        await send(node, cid, f"{prefix} {i}")

    def answers() -> int:
        return sum(
            e["source"] == "agent" and e["args"]["content"].startswith(prefix)
            for e in sink.events[cid]
        )

    await wait_until(lambda: answers() == n, timeout=30, what=f"{prefix} answered")
    last = max(sink.ids(cid))
    await wait_stored(node, sid, last)
    return last


async def _stop_receiving(replica: PostgresServer) -> None:
    """The replica lags for good, as an asynchronous one may: what the primary stores
    from now on it never gets."""
    await replica.execute("ALTER SYSTEM SET primary_conninfo = ''")
    await replica.execute("SELECT pg_reload_conf()")
    await wait_until(
        lambda: replica.execute("SELECT count(*) = 0 FROM pg_stat_wal_receiver"),
        what="the replica's receiver gone",
    )


@pytest.mark.parametrize("window", [0, 10])
async def test_a_postgres_failover_that_lost_the_latest_writes_is_filled_again_from_redis(
    make_nodes: NodeFactory, postgres_pair: Any, caplog: pytest.LogCaptureFixture, window: int
) -> None:
    """The store's URL lists a primary and its replica (``target_session_attrs=
    read-write``). The replica stops receiving (it lags, as an asynchronous one does),
    the node stores more of two conversations, then the primary is lost and the replica
    promoted: the store now holds both only up to where the replica stopped. The next
    move of the one still in use finds the store holding less than it acknowledged, says
    so, and stores the rest again from the Redis log; the other, quiet since, is found by
    the check of every conversation that follows, and stored again too. Each store ends
    equal to what its client saw, nothing lost. With a log window of 10 events, the log
    had trimmed the oldest of those: they are stored as one notice of lost events, the
    ids contiguous, the rest as seen. Before, the conversation in use was never stored
    again ('was the store replaced or restored from an older backup?'), and the quiet
    one's store copy, short of what its client saw, was all that stayed once Redis let
    it go (its ids then given again)."""
    primary, replica, database = postgres_pair
    sids = {"c1": "kept", "c2": "quiet"}
    config = {"log_window_events": window} if window else {}
    a, sink, held = await _joined_on_a_pair(make_nodes, postgres_pair, sids, 10, **config)
    for cid, sid in sids.items():
        on_replica = await replica.execute(
            f"SELECT last_id FROM coordinator.conversations WHERE conversation_id = '{sid}'",
            database,
        )
        assert on_replica == held[cid]
    await _stop_receiving(replica)
    final = {
        cid: await _sent_and_stored(a, sink, cid, sid, "lost by the store", 10)
        for cid, sid in sids.items()
    }
    kept_from = {cid: (await redis_log(a, sid))[0][0] for cid, sid in sids.items()}
    assert all((kept_from[cid] > held[cid] + 1) == bool(window) for cid in sids)
    await asyncio.to_thread(primary.stop, "immediate")
    await asyncio.to_thread(replica.promote)
    caplog.set_level(logging.ERROR, logger="coordinator.archive")
    final["c1"] = await _sent_and_stored(
        a, sink, "c1", "kept", "after", 3
    )  # "quiet" says nothing more
    store = a.node.store
    assert store is not None

    async def quiet_stored_again() -> bool:
        return await store.last_id("quiet") == final["c2"]

    await wait_until(quiet_stored_again, timeout=30, what="the quiet one stored again")
    await wait_stored(a, "quiet", final["c2"])
    for cid, sid in sids.items():
        stored = await all_stored(store, sid)
        assert [i for i, _ in stored] == list(range(1, final[cid] + 1))
        seen = {e["id"]: e for e in sink.events[cid]}
        assert len(seen) == final[cid]
        lost = range(held[cid] + 1, kept_from[cid])
        assert all(with_id(i, unpack(data)) == seen[i] for i, data in stored if i not in lost)
        if window:  # trimmed from the log before the store lost them
            notice, *nothing = [unpack(data) for i, data in stored if i in lost]
            assert notice_code(notice) == EVENTS_LOST
            assert f"Events {lost[0]} to {lost[-1]} were lost" in notice["message"]
            assert all(e.get("observation") == "null" for e in nothing)
        assert f"lost {sid}'s events {held[cid] + 1}-" in caplog.text
    assert primary.password not in caplog.text
    assert a.node.archiver.audit.rewinds == 2


async def test_a_postgres_failover_that_lost_only_a_quiet_conversations_writes_is_found(
    make_nodes: NodeFactory, postgres_pair: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """As above, but only the quiet conversation was written to after the replica
    stopped receiving: the one in use after the failover lost nothing, so no move shows
    the loss. The store's pool reconnecting to another server does: every conversation
    is checked, and the quiet one is stored again. Before, nothing found it; once Redis
    let it go, the store's shorter copy would have been all there was."""
    primary, replica, _ = postgres_pair
    sids = {"c1": "busy", "c2": "quiet"}
    a, sink, held = await _joined_on_a_pair(make_nodes, postgres_pair, sids, 5)
    await _stop_receiving(replica)
    final = dict(held)
    final["c2"] = await _sent_and_stored(a, sink, "c2", "quiet", "lost by the store", 5)
    await asyncio.to_thread(primary.stop, "immediate")
    await asyncio.to_thread(replica.promote)
    caplog.set_level(logging.INFO, logger="coordinator.storeaudit")
    final["c1"] = await _sent_and_stored(a, sink, "c1", "busy", "after", 3)
    store = a.node.store
    assert store is not None

    async def quiet_stored_again() -> bool:
        return await store.last_id("quiet") == final["c2"]

    await wait_until(quiet_stored_again, timeout=30, what="the quiet one stored again")
    for cid, sid in sids.items():
        stored = await all_stored(store, sid)
        seen = {e["id"]: e for e in sink.events[cid]}
        assert [with_id(i, unpack(data)) for i, data in stored] == [
            seen[i] for i in range(1, final[cid] + 1)
        ]
    assert "reconnected to another server" in caplog.text
    assert f"lost quiet's events {held['c2'] + 1}-{final['c2']}" in caplog.text
    assert "lost busy's" not in caplog.text
    assert a.node.archiver.audit.rewinds == 1


async def test_a_node_started_after_a_postgres_failover_finds_what_the_store_lost(
    make_nodes: NodeFactory, postgres_pair: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """As above, but the node that stored the lost writes is gone before the failover
    and the next node's first connection reaches the promoted standby: it saw no
    server change of its own. The cluster records the server its nodes last reached
    (Redis), and the new node, finding another, checks every conversation. Before,
    nothing found the quiet conversation's loss."""
    primary, replica, _ = postgres_pair
    a, sink, held = await _joined_on_a_pair(make_nodes, postgres_pair, {"c": "quiet"}, 5)
    keys = a.state.keys
    await wait_until(
        lambda: a.state.redis.hget(keys.store_audits(), "server"), what="the server recorded"
    )
    await _stop_receiving(replica)
    final = await _sent_and_stored(a, sink, "c", "quiet", "lost by the store", 5)
    await a.aclose()
    await asyncio.to_thread(primary.stop, "immediate")
    await asyncio.to_thread(replica.promote)
    caplog.set_level(logging.INFO, logger="coordinator.storeaudit")
    dsn = a.config.event_store
    (b,) = await make_nodes(1, event_store=dsn)
    store = b.node.store
    assert store is not None

    async def stored_again() -> bool:
        return await store.last_id("quiet") == final

    await wait_until(stored_again, timeout=30, what="the quiet one stored again")
    seen = {e["id"]: e for e in sink.events["c"]}
    stored = await all_stored(store, "quiet")
    assert [with_id(i, unpack(data)) for i, data in stored] == [
        seen[i] for i in range(1, final + 1)
    ]
    assert store.server_changes == 0  # nothing this node saw itself
    assert "another server than the cluster's nodes last reached" in caplog.text
    assert f"lost quiet's events {held['c'] + 1}-{final}" in caplog.text
    assert b.node.archiver.audit.rewinds == 1


async def test_a_conversation_its_mover_stored_again_is_not_rewound_again_by_the_check(
    make_nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check reads a conversation's mark and finds the store short of it; before it
    rewinds, the conversation's own mover (which found the loss too) rewinds the mark
    and stores the rest again, so the mark is back where the check read it. The check
    looks at the store again and leaves it: before, it rewound it a second time, and
    said the same loss twice."""
    (a,) = await make_nodes(1)
    await a.join_conversation("again", "c", {}, "alice")
    last = await send(a, "c", "hello")
    await wait_stored(a, "again", last + 1)
    store = a.node.store
    assert store is not None
    real, real_batch = store.last_id, store.last_ids
    reads: list[str] = []

    async def short_at_first(sids: list[str]) -> list[int]:  # the pass's batched read
        held = await real_batch(sids)
        reads.extend(sid for sid in sids if sid == "again")
        return [h - 2 if sid == "again" else h for sid, h in zip(sids, held, strict=True)]

    async def read_again(sid: str) -> int:  # stored again since: the check's second look
        reads.append(sid)
        return await real(sid)

    monkeypatch.setattr(store, "last_ids", short_at_first)
    monkeypatch.setattr(store, "last_id", read_again)
    assert await a.node.archiver.audit.check() == 0
    assert reads == ["again", "again"]
    assert int((await a.state.meta("again"))["stored"]) == await real("again")
    assert a.node.archiver.audit.rewinds == 0


@pytest.mark.parametrize("other", ["checked", "died"])
async def test_a_check_left_to_another_node_is_done_only_by_one_that_began_after(
    make_nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch, other: str
) -> None:
    """A node owed a check finds another node checking (its lock held): the check is
    left to that node only if one that began after it was owed ends. Before, it was
    left to the holder whatever happened: a node that died in the middle of it (its
    lock expiring ten minutes later) left nothing checked."""
    monkeypatch.setattr(storeaudit, "AUDIT_EVERY", 0.0)
    (a,) = await make_nodes(1)
    audit, state, store = a.node.archiver.audit, a.state, a.node.store
    assert store is not None
    checks: list[str] = []

    async def counted() -> int:
        checks.append("checked")
        return 0

    monkeypatch.setattr(audit, "check", counted)
    lock = state.keys.store_audit()
    assert await state.take_lock(lock, "other", 60_000)
    monkeypatch.setattr(store, "server_changes", store.server_changes + 1, raising=False)
    await a.node.archiver.sweep()
    await asyncio.sleep(1.0)  # refused, owed: the node's sweeps (every 0.5 s) try again
    assert checks == []
    if other == "checked":  # the other node's next check, begun after, ends
        await state.audit_done(await state.audit_began())
    await state.drop_lock(lock, "other")
    await asyncio.sleep(2.0)
    assert checks == ([] if other == "checked" else ["checked"])


async def test_a_check_that_outlasts_its_lock_keeps_it(
    make_nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check of every conversation that takes longer than its lock lasts holds the
    lock to its end, so no other node begins one beside it. Before, the lock expired
    ``AUDIT_LOCK_MS`` after the check began."""
    monkeypatch.setattr(storeaudit, "AUDIT_EVERY", 0.0)
    monkeypatch.setattr(storeaudit, "AUDIT_LOCK_MS", 600)
    (a,) = await make_nodes(1)
    checks = _counted_checks([a], monkeypatch, 2.0)
    state, store = a.state, a.node.store
    assert store is not None
    lock = state.keys.store_audit()
    monkeypatch.setattr(store, "server_changes", store.server_changes + 1, raising=False)
    await a.node.archiver.sweep()
    await wait_until(lambda: checks, timeout=10, what="the check")
    for _ in range(3):  # 1.5 s into a check of 2: three lock lifetimes
        await asyncio.sleep(0.5)
        assert await state.redis.get(lock) in (a.node_id, a.node_id.encode())
        assert not await state.take_lock(lock, "other", 60_000)

    async def let_go() -> bool:
        return await state.redis.get(lock) is None

    await wait_until(let_go, timeout=10, what="the lock let go at the check's end")


async def test_a_check_of_every_conversation_that_gave_up_is_started_again(
    make_nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check a failover starts fails every try (the store still away): it is owed,
    and the next store sweep starts it again, rather than nothing checking until the
    store fails over once more."""
    monkeypatch.setattr(storeaudit, "AUDIT_TRIES", 1)
    monkeypatch.setattr(storeaudit, "AUDIT_EVERY", 0.0)
    (a,) = await make_nodes(1)
    audit = a.node.archiver.audit
    store = a.node.store
    assert store is not None
    checks: list[str] = []
    check = audit.check

    async def away_once() -> int:
        checks.append("tried")
        if len(checks) == 1:
            raise StoreUnavailable("the store", "still away")
        return await check()

    monkeypatch.setattr(audit, "check", away_once)
    monkeypatch.setattr(store, "server_changes", store.server_changes + 1, raising=False)
    await a.node.archiver.sweep()
    # Given up after its one try and a backoff; the node's sweeps (every 0.5 s) go on.
    await wait_until(lambda: checks == ["tried", "tried"], timeout=10, what="the check again")
    await asyncio.sleep(2.0)  # done: not again
    assert checks == ["tried", "tried"]


async def test_a_server_change_the_cluster_recorded_stays_owed_until_a_check_ends(
    make_nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node that found another store server than the cluster recorded stops before
    its check: the check stays owed in Redis, and another node does it, once; then no
    node owes it. Before, it was owed in that node's memory only, and the record already
    named the new server: nothing checked."""
    monkeypatch.setattr(storeaudit, "AUDIT_EVERY", 0.0)
    a, b = await make_nodes(2)
    checks: dict[str, int] = {}
    for node in (a, b):
        audit = node.node.archiver.audit
        check = audit.check

        async def counted(check: Any = check, name: str = node.node_id) -> int:
            checks[name] = checks.get(name, 0) + 1
            return await check()

        monkeypatch.setattr(audit, "check", counted)
    state = a.state
    await state.redis.hset(state.keys.store_audits(), "server", "the server before")
    stores = [a.node.store, b.node.store]
    assert stores[0] is not None and stores[1] is not None
    monkeypatch.setattr(stores[0], "server", "the server now", raising=False)
    monkeypatch.setattr(a.node.archiver.audit, "_start", lambda: None)  # stops first
    await a.node.archiver.sweep()
    await a.aclose()
    assert checks == {}
    monkeypatch.setattr(stores[1], "server", "the server now", raising=False)
    await wait_until(lambda: checks == {b.node_id: 1}, timeout=10, what="b's check")
    await asyncio.sleep(1.5)  # b's sweeps (every 0.5 s) go on: nothing owed now
    assert checks == {b.node_id: 1}


def _counted_checks(nodes: list[Any], monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[str]:
    """The nodes' checks of every conversation, by node id as each begins; each takes
    ``seconds`` more (the nodes sweep every 0.5 s meanwhile)."""
    checks: list[str] = []
    for node in nodes:
        audit = node.node.archiver.audit
        check = audit.check

        async def counted(check: Any = check, name: str = node.node_id) -> int:
            checks.append(name)
            await asyncio.sleep(seconds)
            return await check()

        monkeypatch.setattr(audit, "check", counted)
    return checks


@pytest.mark.parametrize("reconnected", [False, True])
async def test_a_server_change_every_node_sees_is_checked_once(
    make_nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch, reconnected: bool
) -> None:
    """Three nodes all reach another store server than the cluster recorded (each
    having seen its pool reconnect there, or started after it) before any check
    begins (the lock held elsewhere meanwhile); one checks, the others find the lock
    taken, then the check done. Before, one of them checked again after it (its own
    mark was "a check beginning after mine")."""
    monkeypatch.setattr(storeaudit, "AUDIT_EVERY", 0.0)
    nodes = await make_nodes(3)
    checks = _counted_checks(nodes, monkeypatch, 1.0)
    state = nodes[0].state
    lock = state.keys.store_audit()
    assert await state.take_lock(lock, "other", 60_000)
    await state.redis.hset(state.keys.store_audits(), "server", "the server before")
    for node in nodes:
        store = node.node.store
        monkeypatch.setattr(store, "server", "the server now", raising=False)
        if reconnected:
            monkeypatch.setattr(store, "server_changes", store.server_changes + 1, raising=False)
    await asyncio.sleep(1.5)  # every node's sweeps told Redis
    await state.drop_lock(lock, "other")
    await wait_until(lambda: checks, timeout=10, what="a check")
    await asyncio.sleep(3.0)
    assert len(checks) == 1, checks


async def test_a_node_that_reconnects_while_a_check_runs_owes_one_after_it(
    make_nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node a finds the store on another server and checks; meanwhile b's connections
    move there too (its writes the old server took after a's check passed them may be
    lost): a check that begins after b's move runs, once. Before, b took the running
    check for one that covered it."""
    monkeypatch.setattr(storeaudit, "AUDIT_EVERY", 0.0)
    a, b = await make_nodes(2)
    checks = _counted_checks([a, b], monkeypatch, 1.5)
    state = a.state
    await state.redis.hset(state.keys.store_audits(), "server", "the server before")
    monkeypatch.setattr(a.node.store, "server", "the server now", raising=False)
    await wait_until(lambda: checks, timeout=10, what="a's check")
    store = b.node.store
    monkeypatch.setattr(store, "server", "the server now", raising=False)
    monkeypatch.setattr(store, "server_changes", store.server_changes + 1, raising=False)
    await wait_until(lambda: len(checks) == 2, timeout=15, what="a check after b's move")
    await asyncio.sleep(2.5)
    assert len(checks) == 2, checks


@pytest.mark.parametrize("held", [0, 3, 14, 17, 19])
async def test_a_rewind_keeps_the_logs_byte_counts_true(make_nodes: NodeFactory, held: int) -> None:
    """``REWIND_STORED`` at any point (into what the log trimmed, just after, its middle,
    near its end) leaves the record's byte counts telling the truth: the log holds
    ``lbytes - tbytes``, ``lbytes - sbytes`` wait for the store (``ACCEPT``'s "behind"
    reads them); the events are then stored again, all of them."""
    (a,) = await make_nodes(1, log_window_events=5)
    state, archiver = a.state, a.node.archiver
    own = await state.acquire("bytes", "elsewhere", "elsewhere/1", "dan", create=True)
    lease = Lease("bytes", "dan", "elsewhere/1", own.epoch)
    for n in range(20):
        await state.commit("bytes", lease.inc, lease.epoch, [pack({"n": "x" * n * 7})], floor=0)

    async def counts_true() -> None:
        meta, log = await state.meta("bytes"), await redis_log(a, "bytes")
        stored = int(meta["stored"])
        lbytes, sbytes, tbytes = (int(meta[k]) for k in ("lbytes", "sbytes", "tbytes"))
        assert lbytes - tbytes == sum(len(d) for _, d in log)
        assert sbytes == tbytes + sum(len(d) for i, d in log if i <= stored)

    assert await archiver.move_all([lease]) == [20]
    assert (await redis_log(a, "bytes"))[0][0] == 16  # 1-15 trimmed
    await counts_true()
    await state.rewind_stored("bytes", held, 19, 1, 1 << 20)  # a mark seen before it moved
    assert int((await state.meta("bytes"))["stored"]) == 20  # nothing changed
    await state.rewind_stored("bytes", held, 20, 1, 1 << 20)
    assert int((await state.meta("bytes"))["stored"]) == held
    await counts_true()
    assert await archiver.move_all([lease]) == [20]
    await counts_true()
    assert a.node.store is not None
    assert [i for i, _ in await all_stored(a.node.store, "bytes")] == list(range(1, 21))
