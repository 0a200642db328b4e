"""A python-socketio client that records a conversation's events, for end-to-end tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import socketio


class RecordingClient:
    """One websocket-only socket.io connection to one conversation.

    ``events`` keeps every ``oh_event`` in arrival order.
    """

    def __init__(self, name: str = "client") -> None:
        self.name = name
        self.events: list[dict[str, Any]] = []
        self.disconnect_reasons: list[str] = []
        self.sio = socketio.AsyncClient(reconnection=False)
        self._changed = asyncio.Condition()
        self.sio.on("oh_event", self._on_event)
        self.sio.on("disconnect", self._on_disconnect)

    async def _on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        async with self._changed:
            self._changed.notify_all()

    async def _on_disconnect(self, reason: Any = None) -> None:
        self.disconnect_reasons.append(str(reason))
        async with self._changed:
            self._changed.notify_all()

    async def connect(
        self,
        url: str,
        conversation_id: str,
        token: str,
        latest_event_id: int | None = None,
        wait_s: float = 15.0,
    ) -> RecordingClient:
        query: dict[str, str | int] = {"conversation_id": conversation_id}
        if latest_event_id is not None:
            query["latest_event_id"] = latest_event_id
        await self.sio.connect(
            f"{url}?{urlencode(query)}",
            transports=["websocket"],
            auth={"token": token},
            wait_timeout=wait_s,
        )
        return self

    async def send(self, content: str, wait_s: float = 15.0) -> int:
        """Send a message action; return the event id of its acknowledgement."""
        ack = await self.sio.call(
            "oh_user_action", {"action": "message", "args": {"content": content}}, timeout=wait_s
        )
        if not (isinstance(ack, dict) and ack.get("ok") is True and isinstance(ack.get("id"), int)):
            raise AssertionError(f"{self.name}: action {content!r} not accepted: ack {ack!r}")
        return int(ack["id"])

    async def wait_for(
        self, predicate: Callable[[], bool], what: str, within: float = 20.0
    ) -> None:
        deadline = time.monotonic() + within

        def done() -> bool:
            return predicate() or not self.sio.connected

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(done), deadline - time.monotonic())
            except TimeoutError:
                raise AssertionError(
                    f"{self.name}: timed out after {within}s waiting for {what}; "
                    f"ids seen: {self.ids}"
                ) from None
        if not predicate():
            raise AssertionError(
                f"{self.name}: disconnected ({self.disconnect_reasons}) waiting for {what}"
            )

    async def wait_echoed(self, contents: list[str], within: float = 20.0) -> None:
        """Wait until the agent has answered every message in ``contents``."""
        wanted = set(contents)
        await self.wait_for(lambda: wanted <= self.agent_contents(), "echoes", within)

    def agent_contents(self) -> set[str]:
        return {
            e["args"]["content"]
            for e in self.events
            if e.get("source") == "agent" and e.get("action") == "message"
        }

    @property
    def ids(self) -> list[int]:
        return [e["id"] for e in self.events]

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


def brief(event: dict[str, Any]) -> dict[str, Any]:
    """The fields the JS client's summary keeps of an event."""
    args = event.get("args")
    return {
        "id": event.get("id"),
        "source": event.get("source"),
        "action": event["action"] if event.get("action") is not None else event.get("observation"),
        "content": args.get("content") if isinstance(args, dict) else None,
    }


def assert_gap_free(ids: list[int], first: int | None = None, what: str = "events") -> None:
    """Ids go up by one (from ``first`` when given), no gap, no duplicate."""
    assert ids, f"{what}: no events"
    start = ids[0] if first is None else first
    assert ids == list(range(start, start + len(ids))), f"{what}: ids not gap-free: {ids}"
