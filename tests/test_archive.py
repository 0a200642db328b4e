"""The event store wired into the coordinator: one store per cluster, events moved off
the ack path into it, Redis kept to a window, replay through the store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from coordinator import ConversationManager
from coordinator.codec import unpack, with_id
from coordinator.errors import StoreBehind
from coordinator.eventstore import EventStore, StoreMismatch
from tests.conftest import NodeFactory
from tests.helpers import wait_until


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


async def send(node: ConversationManager, cid: str, content: str) -> None:
    """Send one message, again while the event store lags (a client's retry)."""
    action = {"action": "message", "args": {"content": content}}
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            await node.send_to_event_stream(cid, action)
            return
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
