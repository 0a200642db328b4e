"""The event store wired into the coordinator: one store per cluster, events moved off
the ack path into it, Redis kept to a window, replay through the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.eventstore import StoreMismatch
from tests.conftest import NodeFactory


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
