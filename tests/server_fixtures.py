"""In-process coordinator nodes as real uvicorn servers, and socket.io / REST clients.

``ServerCluster`` starts ``NodeServer``s on free ports (port 0, bound before serving)
against the test Redis; ``SioClient`` records what a python-socketio connection receives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp
import socketio

from coordinator.auth import issue_token
from coordinator.server import NodeServer
from coordinator.serverconfig import NO_LIMITS, ServerConfig
from tests.helpers import fast_config

SECRET = "test-secret-不"
UNLIMITED = ServerConfig(**NO_LIMITS)


class SioClient:
    """One websocket socket.io connection; ``events`` in arrival order, transient
    status updates (no event id) apart in ``updates``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[dict[str, Any]] = []
        self.updates: list[dict[str, Any]] = []
        self.refusal: Any = None
        self.disconnects: list[str] = []
        self.sio = socketio.AsyncClient(reconnection=False)
        self._changed = asyncio.Condition()
        self.sio.on("oh_event", self._on_event)
        self.sio.on("connect_error", self._on_connect_error)
        self.sio.on("disconnect", self._on_disconnect)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("status_update") is True:
            self.updates.append(event)
        else:
            self.events.append(event)
        await self._notify()

    async def _on_connect_error(self, data: Any) -> None:
        self.refusal = data

    async def _on_disconnect(self, reason: Any = None) -> None:
        self.disconnects.append(str(reason))
        await self._notify()

    @property
    def ids(self) -> list[int]:
        return [e["id"] for e in self.events]

    @property
    def connected(self) -> bool:
        return bool(self.sio.connected)

    async def connect(
        self,
        url: str,
        conversation: str | None,
        token: str | None,
        latest_event_id: int | str | None = None,
        *,
        token_in_query: bool = False,
    ) -> None:
        query: dict[str, Any] = {}
        if conversation is not None:
            query["conversation_id"] = conversation
        if latest_event_id is not None:
            query["latest_event_id"] = latest_event_id
        auth = None
        if token is not None and token_in_query:
            query["token"] = token
        elif token is not None:
            auth = {"token": token}
        await self.sio.connect(
            f"{url}?{urlencode(query)}", auth=auth, transports=["websocket"], wait_timeout=10
        )

    async def refused(self, *args: Any, **kwargs: Any) -> str:
        """Connect expecting a refusal; returns the server's message. The client must be
        done within 15 s: a session ending badly holds it up to 30 s (``end_session``)."""
        attempt = asyncio.ensure_future(self.connect(*args, **kwargs))
        if not (await asyncio.wait({attempt}, timeout=15))[0]:
            attempt.cancel()
            raise AssertionError(f"{self.name}: the refused client was held up")
        try:
            attempt.result()
        except socketio.exceptions.ConnectionError:
            pass
        else:
            await self.sio.disconnect()
            raise AssertionError(f"{self.name}: connection was accepted")
        assert isinstance(self.refusal, dict), self.refusal
        return str(self.refusal["message"])

    async def act(self, data: Any) -> dict[str, Any]:
        ack = await self.sio.call("oh_user_action", data, timeout=15)
        assert isinstance(ack, dict), ack
        return ack

    async def say(self, content: str) -> int:
        ack = await self.act({"action": "message", "args": {"content": content}})
        assert ack.get("ok") is True and isinstance(ack.get("id"), int), ack
        return int(ack["id"])

    async def wait_for(
        self, predicate: Callable[[], bool], what: str, within: float = 20.0
    ) -> None:
        deadline = time.monotonic() + within
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: predicate() or not self.connected),
                    deadline - time.monotonic(),
                )
            except TimeoutError:
                raise AssertionError(
                    f"{self.name}: not {what} within {within}s; ids {self.ids[-20:]}"
                ) from None
        assert predicate(), f"{self.name}: disconnected ({self.disconnects}) waiting for {what}"

    async def wait_ids(self, last: int, within: float = 20.0) -> None:
        await self.wait_for(
            lambda: bool(self.events) and self.ids[-1] >= last, f"id {last}", within
        )

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


class ServerCluster:
    """Nodes serving HTTP in this process, a REST helper and cleanup of everything made."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.nodes: list[NodeServer] = []
        self.clients: list[SioClient] = []
        self._http: aiohttp.ClientSession | None = None

    async def start(
        self, n: int = 1, *, server_config: ServerConfig | None = None, **overrides: Any
    ) -> list[NodeServer]:
        """``n`` nodes; ``server_config`` defaults to no rate or connection limits (the
        tests that flood a node on purpose would meet them), ``overrides`` change the
        ManagerConfig."""
        made = []
        for _ in range(n):
            node_id = f"n{len(self.nodes) + 1}"
            node = NodeServer(
                fast_config(self.redis_url, node_id, **overrides),
                SECRET,
                port=0,
                server_config=server_config or UNLIMITED,
            )
            await node.start()
            self.nodes.append(node)
            made.append(node)
        return made

    def token(self, user: str, ttl: float = 3600) -> str:
        return issue_token(user, SECRET, ttl)

    def client(self, name: str = "client") -> SioClient:
        client = SioClient(name)
        self.clients.append(client)
        return client

    async def join(
        self, node: NodeServer, conversation: str, user: str, latest_event_id: int | None = None
    ) -> SioClient:
        client = self.client(f"{user}@{node.node_id}")
        await client.connect(node.url, conversation, self.token(user), latest_event_id)
        return client

    async def request(
        self,
        method: str,
        node: NodeServer,
        path: str,
        *,
        user: str | None = None,
        token: str | None = None,
        json: Any = None,
        data: bytes | None = None,
    ) -> tuple[int, Any]:
        """(status, parsed JSON or text) of one REST call."""
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        headers = {}
        if user is not None:
            token = self.token(user)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self._http.request(
            method, node.url + path, headers=headers, json=json, data=data
        ) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def aclose(self) -> None:
        for client in self.clients:
            await client.close()
        if self._http is not None:
            await self._http.close()
        for node in reversed(self.nodes):
            await node.aclose()
