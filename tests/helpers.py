"""Test helpers: a recording event sink and waiting for conditions with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from coordinator import ManagerConfig
from coordinator.subscriptions import Listener, Subscription
from coordinator.tasks import cancel_and_wait

# One agent worker process per node (agents still run in workers, the default): the
# suite starts hundreds of nodes on 2 shared cores; tests that need more ask for them.
FAST = dict(
    node_ttl=3.0,
    heartbeat_interval=0.5,
    lease_margin=0.75,
    idle_flush_interval=0.2,
    store_sweep_interval=0.5,
    agent_workers=1,
    # In-process nodes' tests count user and agent events by id. Agent state notes
    # (on by default) have their own tests (test_openhands_compat.py), and every test
    # of ``coordinator serve`` processes, the chaos suite's included, runs with them.
    agent_state_events=False,
)


def fast_config(url: str, node_id: str, **overrides: Any) -> ManagerConfig:
    values: dict[str, Any] = dict(FAST)
    values.update(overrides)
    return ManagerConfig(redis_url=url, node_id=node_id, **values)


class RecordingSink:
    """Keeps every event delivered to each connection, in delivery order; transient
    status updates (no event id) apart, in ``updates``; disconnected connections in
    ``disconnected``."""

    def __init__(self) -> None:
        self.events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.updates: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.disconnected: list[str] = []
        self._changed = asyncio.Event()

    async def deliver(self, connection_id: str, event: dict[str, Any]) -> None:
        if event.get("status_update") is True:
            self.updates[connection_id].append(event)
        else:
            self.events[connection_id].append(event)
        self._changed.set()

    async def disconnect(self, connection_id: str) -> None:
        self.disconnected.append(connection_id)
        self._changed.set()

    def told(self, connection_id: str, code: str) -> bool:
        """Whether the connection got a status update ``code``."""
        return any(u["id"] == code for u in self.updates[connection_id])

    def ids(self, connection_id: str) -> list[int]:
        return [e["id"] for e in self.events[connection_id]]


async def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,  # noqa: ASYNC109  (a deadline for polling, not cancellation)
    interval: float = 0.02,
    what: str = "",
) -> Any:
    """Poll ``predicate`` (sync or async) until truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what or predicate}")
        await asyncio.sleep(interval)


async def gather_all(aws: list[Awaitable[Any]]) -> list[Any]:
    return list(await asyncio.gather(*aws))


class Heard:
    """A subscription's listener that records what it hears, as ``(channel, data)``;
    ``reconnects=False``: a reconnect fails the test (the link must never be lost)."""

    def __init__(self, *, reconnects: bool = True) -> None:
        self.heard: list[tuple[str, bytes]] = []
        self._reconnects = reconnects

    async def message(self, channel: str, data: bytes) -> None:
        self.heard.append((channel, data))

    async def reconnected(self) -> None:
        if not self._reconnects:
            raise AssertionError("the subscription reconnected")


@contextlib.asynccontextmanager
async def listening(subs: Subscription, listener: Listener) -> AsyncIterator[None]:
    """``subs`` started with ``listener`` running; closed and its listener gone after."""
    await subs.start()
    task = asyncio.create_task(subs.run(listener))
    try:
        yield
    finally:
        await subs.aclose()
        await cancel_and_wait([task], within=5)


class InFlight:
    """Wraps a method (``ensure_running`` of a node's loops, which every join and restart
    goes through, unless told otherwise): records how many calls run at once."""

    def __init__(self, obj: Any, delay: float = 0.0, attr: str = "ensure_running") -> None:
        self.now = 0
        self.peak = 0
        self.calls = 0
        self._original = getattr(obj, attr)
        self._delay = delay
        setattr(obj, attr, self)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.now += 1
        self.calls += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(self._delay)
            return await self._original(*args, **kwargs)
        finally:
            self.now -= 1
