from __future__ import annotations

from typing import Any

import pytest

from coordinator.manager import ConversationManager
from tests.helpers import RecordingSink, fast_config, wait_until


async def test_join_send_echo_across_nodes(make_nodes) -> None:
    a, b = await make_nodes(2)
    info = await a.join_conversation("conv1", "c1", {}, "alice")
    assert info.running and info.local
    await b.join_conversation("conv1", "c2", {}, "alice")
    eid = await b.send_to_event_stream("c2", {"action": "message", "args": {"content": "hi"}})
    assert eid == 1
    sa, sb = make_nodes.sinks["node1"], make_nodes.sinks["node2"]
    await wait_until(lambda: len(sa.events["c1"]) >= 2 and len(sb.events["c2"]) >= 2)
    assert sa.ids("c1") == [1, 2] == sb.ids("c2")
    assert sa.events["c1"][1]["source"] == "agent"
    assert sa.events["c1"][1]["args"]["content"] == "hi"


class FailingSink(RecordingSink):
    """An embedder's sink with a bug: it records the event, then raises."""

    async def deliver(self, connection_id: str, event: dict[str, Any]) -> None:
        await super().deliver(connection_id, event)
        raise RuntimeError("the embedder's bug")


async def test_a_sink_that_raises_is_logged_with_its_traceback_a_few_times_not_per_event(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each delivery that raised logged a traceback: every event of every connection,
    for as long as the bug lived. Now a few, then one every few seconds (with a count of
    those left out); the connections go on being delivered to."""
    sink = FailingSink()
    node = ConversationManager(fast_config(redis_url, "embedded"), sink=sink)
    await node.start()
    try:
        await node.join_conversation("buggy", "c1", {}, "alice")
        await node.join_conversation("buggy", "c2", {}, "alice")
        for i in range(20):
            await node.send_to_event_stream("c1", {"action": "message", "args": {"content": i}})
        await wait_until(lambda: len(sink.events["c1"]) >= 40 and len(sink.events["c2"]) >= 40)
    finally:
        await node.aclose()
    failed = [r for r in caplog.records if r.getMessage().startswith("delivery to")]
    assert 1 <= len(failed) <= 8, len(failed)  # 80 deliveries raised
    assert all(r.exc_info is not None for r in failed)
