"""Freed memory goes back to the system (``workers/heap.py``): a node's process and its
agent workers trim the C allocator's free pages periodically, so churn does not keep
raising their RSS (glibc otherwise keeps every page it was given back)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.agents import _fragment
from tests.conftest import NodeFactory
from tests.helpers import wait_until
from tests.test_agent_isolation import BAD, Watcher
from workers import heap

MIB = 1 << 20
FREED = 40  # MiB allocated in small blocks, then freed


def _rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


pytestmark = pytest.mark.skipif(not heap.trim(), reason="the C library has no malloc_trim")


async def test_a_node_gives_memory_it_freed_back(
    make_nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 MiB freed in 1 KiB blocks under a block still held (the heap's top, so glibc
    cannot give them back by shrinking it) leave the node's RSS within a few MiB of its
    peak until the node's trim gives them back. Before, they stayed."""
    monkeypatch.setattr(heap, "TRIM_EVERY", 0.2)
    await make_nodes(1)
    before = _rss(os.getpid())
    freed = _fragment(FREED)
    assert freed > before + FREED * MIB // 2  # held after the free
    await wait_until(
        lambda: _rss(os.getpid()) < freed - FREED * MIB // 2, timeout=30, what="given back"
    )


async def test_an_agent_worker_gives_memory_it_freed_back(
    make_nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same in an agent worker process: its agent frees 40 MiB of small blocks, and
    the worker's own trim gives them back. Before, they stayed."""
    monkeypatch.setattr(heap, "TRIM_EVERY", 0.2)  # passed to the workers it starts
    (node,) = await make_nodes(1, agent=BAD)
    watcher = await Watcher(node, make_nodes.sinks[node.node_id], "fragments").join()
    await watcher.say(f"fragment {FREED}")
    await wait_until(watcher.answers, timeout=20, what="answered")
    freed = int(watcher.answers()[0])
    worker = node.runner(watcher.sid).agent.worker  # type: ignore[union-attr]
    await wait_until(
        lambda: _rss(worker.pid) < freed - FREED * MIB // 2, timeout=30, what="given back"
    )


def test_a_forked_child_trims_with_a_thread_of_its_own() -> None:
    """A process forked from one that trims (an agent may fork) has no thread of its
    parent's: asked to trim, it starts its own. Before, it took its parent's for its own
    and never trimmed."""
    assert heap.keep_trimming()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child's outcome is its exit status)
        started = heap.keep_trimming()
        names = [t.name for t in threading.enumerate()]
        os._exit(0 if started and "heap-trim" in names else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
