"""Nodes of two layouts of the data in Redis never run side by side (coordinator/layout.py),
against real Redis: a node of another layout than the recorded one is refused while a node
of that one runs, takes over once none does, and one that raced past the check steps down.
Another release's node is this release's code with ``layout.LAYOUT`` changed."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from coordinator import layout
from coordinator.keys import KeySchema
from coordinator.layout import LayoutMismatch
from coordinator.membership import Membership
from tests.helpers import wait_until


async def test_a_node_of_another_layout_is_refused_while_one_of_the_recorded_runs(
    make_nodes: Any, monkeypatch: pytest.MonkeyPatch, redis_client: Any
) -> None:
    (a,) = await make_nodes(1)
    assert await redis_client.hget(a.keys.layout(), "layout") == b"1"
    monkeypatch.setattr(layout, "LAYOUT", 2)
    with pytest.raises(LayoutMismatch) as refused:
        await make_nodes(1)
    text = str(refused.value)
    assert "Redis holds this cluster's data in layout 1 (recorded by node node1" in text
    assert "nodes of it are running (node1)" in text and "reads and writes layout 2" in text
    assert "drain the nodes of the other" in text
    # Nothing of the refused node: not registered, the record unchanged.
    assert set(await a.state.registry()) == {"node1"}
    assert await redis_client.hget(a.keys.layout(), "layout") == b"1"
    assert await a.is_agent_loop_running("nothing") is False  # the running one unharmed


async def test_a_new_layout_takes_over_once_no_node_of_the_old_runs(
    make_nodes: Any,
    monkeypatch: pytest.MonkeyPatch,
    redis_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The upgrade: every node of the old release drained, the first of the new one
    records its layout; then a node of the old release is refused in its turn."""
    caplog.set_level(logging.WARNING, logger="coordinator.layout")
    (old,) = await make_nodes(1)
    await old.drain()
    monkeypatch.setattr(layout, "LAYOUT", 2)
    (new,) = await make_nodes(1)
    recorded = await redis_client.hmget(new.keys.layout(), "layout", "node")
    assert recorded == [b"2", b"node2"]
    assert any("is the cluster's now" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(layout, "LAYOUT", 1)  # a node of the old release, late
    with pytest.raises(LayoutMismatch, match=r"layout 2 \(recorded by node node2"):
        await make_nodes(1)


async def test_a_node_whose_layout_was_replaced_while_it_started_steps_down(
    make_nodes: Any, monkeypatch: pytest.MonkeyPatch, redis_client: Any
) -> None:
    """Two starts racing: a node of another layout took the cluster over between this
    node's check and its registration (no node was running then): this one leaves."""
    register = Membership.register

    async def overtaken(membership: Membership) -> str:
        previous = await register(membership)
        await redis_client.hset(
            membership._state.keys.layout(),
            mapping={"layout": "2", "node": "newer", "release": "9.9"},
        )
        return previous

    monkeypatch.setattr(Membership, "register", overtaken)
    with pytest.raises(LayoutMismatch, match=r"layout 2 \(recorded by node newer, release 9.9"):
        await make_nodes(1)

    async def gone() -> bool:
        return await redis_client.hget(KeySchema().registry(), "node1") is None

    await wait_until(gone, what="the node unregistered")
