from __future__ import annotations

from tests.helpers import wait_until


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
