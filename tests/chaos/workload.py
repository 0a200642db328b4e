"""Clients that keep acting through faults, the way real ones would.

Each ``ChaosClient`` is one user watching one conversation. It sends actions with unique
content and records every one acknowledged with ``ok=True`` (and its id). When its
connection drops it reconnects to another live node with ``latest_event_id`` = the last id
it saw; the ids it receives over all its connections must be 1..N, gap-free.

Steady clients act every ``STEADY_INTERVAL``. A rotating user (more conversations than the
cap) acts on one conversation at a time and waits for the echo before moving on, so each
move starts a loop and evicts the least recently used one: the cap is exercised under the
faults without ever parking an acknowledged action in an evicted conversation (if an
eviction does overtake an action, the user acts again, as a real one would).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import socketio

from coordinator.codec import TOO_MANY_CONVERSATIONS, notice_code
from coordinator.tasks import cancel_and_wait
from tests.chaos.cluster import ChaosCluster
from tests.server_fixtures import SioClient

ACK_TIMEOUT = 10.0
STEADY_INTERVAL = 0.15
RECONNECT_PAUSE = 0.2
RECONNECT_WITHIN = 40.0
ECHO_WITHIN = 20.0
POLL = 0.02

CONNECT_ERRORS = (socketio.exceptions.SocketIOError, aiohttp.ClientError, OSError, TimeoutError)


@dataclass(frozen=True)
class Placement:
    """A conversation, its user, and the nodes its clients connect to (the first starts it)."""

    sid: str
    user: str
    nodes: tuple[int, ...]


# Node 0 is the victim of every fault: it owns alice-1 and alice-2 (watched from two nodes
# each) and bob-1 (watched only from node 0); bob-2 runs elsewhere.
STEADY = (
    Placement("alice-1", "alice", (0, 1)),
    Placement("alice-2", "alice", (0, 2)),
    Placement("bob-1", "bob", (0,)),
    Placement("bob-2", "bob", (1, 2)),
)
ROTATING = (
    Placement("carol-1", "carol", (0,)),
    Placement("carol-2", "carol", (1,)),
    Placement("carol-3", "carol", (2,)),
)
USERS = ["alice", "bob", "carol"]


@dataclass(frozen=True)
class Ack:
    content: str
    event_id: int
    at: float


class Session(SioClient):
    """One connection; also signals its disconnect and indexes the agent's echoes."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.down = asyncio.Event()
        self.echoes: set[str] = set()

    async def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("source") == "agent":
            args = event.get("args")
            if isinstance(args, dict):
                self.echoes.add(str(args.get("content")))
        await super()._on_event(event)

    async def _on_disconnect(self, reason: Any = None) -> None:
        self.down.set()
        await super()._on_disconnect(reason)


class ChaosClient:
    def __init__(self, cluster: ChaosCluster, placement: Placement, index: int) -> None:
        self.cluster = cluster
        self.sid = placement.sid
        self.user = placement.user
        self.home = placement.nodes[index]
        self.name = f"{placement.sid}@{index}"
        self.sessions: list[Session] = []
        self.acked: list[Ack] = []
        self.unacked: list[str] = []  # sent without an ok ack: may or may not be logged
        self.refusals: list[str] = []  # ack errors and failed connects
        self.reconnects: list[tuple[float, int, int]] = []  # (time, node, latest_event_id)
        self._node = self.home
        self._sent = 0

    def __repr__(self) -> str:
        return f"<ChaosClient {self.name} node={self._node} last={self.last_id}>"

    # -- what it received --------------------------------------------------------------
    @property
    def events(self) -> list[dict[str, Any]]:
        """Every logged event received, over all connections, in arrival order."""
        return [e for s in self.sessions for e in s.events if "id" in e]

    @property
    def ids(self) -> list[int]:
        return [int(e["id"]) for e in self.events]

    @property
    def last_id(self) -> int:
        return max(self.ids, default=0)

    @property
    def connected(self) -> bool:
        return bool(self.sessions) and self.sessions[-1].connected

    @property
    def node(self) -> int:
        return self._node

    def echoed(self, content: str) -> bool:
        return any(content in s.echoes for s in self.sessions)

    def evicted_after(self, event_id: int) -> bool:
        return any(
            e["id"] > event_id and notice_code(e) == TOO_MANY_CONVERSATIONS for e in self.events
        )

    # -- connecting --------------------------------------------------------------------
    async def connect(self) -> None:
        """The first connection, to the client's home node, replaying everything."""
        await self._connect(self.home, None)

    async def ensure_connected(self, within: float = RECONNECT_WITHIN) -> None:
        """Reconnect (to the next usable node first) with the last id seen."""
        deadline = time.monotonic() + within
        n = self.cluster.size
        while not self.connected:
            for step in range(1, n + 1):
                node = (self._node + step) % n
                if not self.cluster.usable(node):
                    continue
                latest = self.last_id
                try:
                    await self._connect(node, latest)
                except CONNECT_ERRORS as exc:
                    self.refusals.append(f"connect to node {node}: {exc!r}")
                    continue
                self.reconnects.append((time.time(), node, latest))
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: no node accepted a reconnect within {within}s; "
                    f"last refusals {self.refusals[-3:]}"
                )
            await asyncio.sleep(RECONNECT_PAUSE)

    async def _connect(self, node: int, latest: int | None) -> None:
        session = Session(f"{self.name}#{len(self.sessions)}")
        # Whatever a failed attempt received still counts as received.
        self.sessions.append(session)
        token = self.cluster.tokens[self.user]
        try:
            await session.connect(self.cluster.url(node), self.sid, token, latest)
        except CONNECT_ERRORS:
            await session.close()
            raise
        self._node = node

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()

    # -- acting ------------------------------------------------------------------------
    async def send(self) -> Ack | None:
        """Send one action with unique content; the Ack if it was acknowledged ok."""
        self._sent += 1
        content = f"{self.name}#{self._sent}"
        session = self.sessions[-1]
        action = {"action": "message", "args": {"content": content}}
        call = asyncio.ensure_future(
            session.sio.call("oh_user_action", action, timeout=ACK_TIMEOUT)
        )
        down = asyncio.ensure_future(session.down.wait())
        await asyncio.wait({call, down}, return_when=asyncio.FIRST_COMPLETED)
        down.cancel()
        if not call.done():
            call.cancel()  # the connection dropped: no ack will come
            self.unacked.append(content)
            return None
        try:
            reply = call.result()
        except (socketio.exceptions.SocketIOError, asyncio.CancelledError) as exc:
            self.unacked.append(content)
            self.refusals.append(f"action: {exc!r}")
            return None
        if isinstance(reply, dict) and reply.get("ok") is True and isinstance(reply.get("id"), int):
            ack = Ack(content, int(reply["id"]), time.time())
            self.acked.append(ack)
            return ack
        self.unacked.append(content)
        self.refusals.append(f"action: {reply!r}")
        return None


class Workload:
    """The clients of ``STEADY`` and ``ROTATING``, and the tasks that keep them acting."""

    def __init__(self, cluster: ChaosCluster) -> None:
        self.cluster = cluster
        self.steady = [ChaosClient(cluster, p, i) for p in STEADY for i in range(len(p.nodes))]
        self.rotating = [ChaosClient(cluster, p, 0) for p in ROTATING]
        self.stalls: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def clients(self) -> list[ChaosClient]:
        return [*self.steady, *self.rotating]

    @property
    def user_of(self) -> dict[str, str]:
        return {p.sid: p.user for p in (*STEADY, *ROTATING)}

    @property
    def steady_sids(self) -> list[str]:
        return [p.sid for p in STEADY]

    @property
    def sids(self) -> list[str]:
        return [p.sid for p in (*STEADY, *ROTATING)]

    async def connect(self) -> None:
        """Connect every client; the first client of a conversation starts its loop."""
        for client in self.clients:
            await client.connect()

    def start(self) -> None:
        self._tasks = [
            *(asyncio.create_task(self._steady(c), name=c.name) for c in self.steady),
            asyncio.create_task(self._rotate(self.rotating), name="rotating"),
        ]

    async def stop(self) -> None:
        """Stop acting (each client finishes its current action) and reconnect the dropped."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await asyncio.gather(*(c.ensure_connected() for c in self.clients))

    async def aclose(self) -> None:
        self._stop.set()
        stuck = await cancel_and_wait(self._tasks, within=5)
        assert not stuck, f"client tasks did not stop: {stuck}"
        for client in self.clients:
            await client.close()

    async def _steady(self, client: ChaosClient) -> None:
        while not self._stop.is_set():
            if not client.connected:
                await client.ensure_connected()
                continue
            await client.send()
            await asyncio.sleep(STEADY_INTERVAL)  # the client's pace

    async def _rotate(self, clients: list[ChaosClient]) -> None:
        i = 0
        while not self._stop.is_set():
            await self._act_until_echoed(clients[i % len(clients)])
            i += 1

    async def _act_until_echoed(self, client: ChaosClient) -> None:
        deadline = time.monotonic() + ECHO_WITHIN
        while time.monotonic() < deadline:
            if not client.connected:
                await client.ensure_connected()
            ack = await client.send()
            if ack is None:
                await asyncio.sleep(STEADY_INTERVAL)
                continue
            while time.monotonic() < deadline:
                if client.echoed(ack.content):
                    return
                if client.evicted_after(ack.event_id):
                    break  # evicted before it was answered: act again
                if not client.connected:
                    await client.ensure_connected()
                await asyncio.sleep(POLL)  # polling the client's own state, with a deadline
        self.stalls.append(f"{client.name}: no echo within {ECHO_WITHIN}s")
