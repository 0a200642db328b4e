"""The seed's standalone design as a baseline: one process, in-memory dicts, no Redis.

Modelled on OpenHands' ``StandaloneConversationManager``
(``openhands/server/conversation_manager/standalone_conversation_manager.py``): it keeps
``_local_agent_loops_by_sid`` and ``_local_connection_id_to_session_id`` in dicts, a
socket.io room per conversation (``room:SID``), and ``send_to_event_stream`` hands the
action to the conversation's in-process session. A session's event stream numbers its
events, emits each to the room as ``oh_event`` and feeds user actions to an echo agent
loop (a task reading a queue), whose reply goes through the same stream. The wire
protocol is the coordinator's: ``conversation_id``/``latest_event_id`` query parameters,
a signed token in ``auth``, ``oh_user_action`` acknowledged with ``{"ok": true, "id": n}``.

Run: ``python -m bench.baselines.standalone --port PORT --secret S``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import socketio

from coordinator.auth import verify_token

ROOM_KEY = "room:{sid}"
Event = dict[str, Any]


class EventStream:
    """Numbered events of one conversation, kept in memory, fanned out to subscribers."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._subscribers: list[Callable[[Event], Any]] = []

    def subscribe(self, callback: Callable[[Event], Any]) -> None:
        self._subscribers.append(callback)

    async def add_event(self, event: Event) -> int:
        event = {**event, "id": len(self.events) + 1}
        self.events.append(event)
        for callback in self._subscribers:
            result = callback(event)
            if asyncio.iscoroutine(result):
                await result
        return int(event["id"])


class EchoAgentLoop:
    """The agent loop: a task that answers each user message with the same content."""

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())
        stream.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        if event.get("source") == "user":
            self.queue.put_nowait(event)

    async def _run(self) -> None:
        while True:
            action = await self.queue.get()
            if action.get("action") != "message":
                continue
            content = action.get("args", {}).get("content", "")
            await self.stream.add_event(
                {"action": "message", "source": "agent", "args": {"content": content}}
            )

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class Session:
    def __init__(self, sid: str, sio: socketio.AsyncServer, user_id: str | None) -> None:
        self.sid = sid
        self.sio = sio
        self.user_id = user_id
        self.event_stream = EventStream()
        self.event_stream.subscribe(self._send)
        self.agent = EchoAgentLoop(self.event_stream)

    async def _send(self, event: Event) -> None:
        await self.sio.emit("oh_event", event, to=ROOM_KEY.format(sid=self.sid))

    async def dispatch(self, data: Event) -> int:
        event = {k: v for k, v in data.items() if k not in ("id", "source")}
        event["source"] = "user"
        return await self.event_stream.add_event(event)

    async def close(self) -> None:
        await self.agent.close()


class StandaloneConversationManager:
    """The seed's per-process dicts; only what the benchmark's path touches."""

    def __init__(self, sio: socketio.AsyncServer) -> None:
        self.sio = sio
        self._local_agent_loops_by_sid: dict[str, Session] = {}
        self._local_connection_id_to_session_id: dict[str, str] = {}

    async def join_conversation(
        self, sid: str, connection_id: str, user_id: str | None, latest_event_id: int
    ) -> None:
        await self.sio.enter_room(connection_id, ROOM_KEY.format(sid=sid))
        self._local_connection_id_to_session_id[connection_id] = sid
        session = self.maybe_start_agent_loop(sid, user_id)
        for event in session.event_stream.events[max(0, latest_event_id) :]:
            await self.sio.emit("oh_event", event, to=connection_id)

    def maybe_start_agent_loop(self, sid: str, user_id: str | None) -> Session:
        session = self._local_agent_loops_by_sid.get(sid)
        if session is None:
            session = Session(sid, self.sio, user_id)
            self._local_agent_loops_by_sid[sid] = session
        return session

    async def send_to_event_stream(self, connection_id: str, data: Event) -> int:
        sid = self._local_connection_id_to_session_id.get(connection_id)
        if not sid:
            raise RuntimeError(f"no_connected_session:{connection_id}")
        session = self._local_agent_loops_by_sid.get(sid)
        if session is None:
            raise RuntimeError(f"no_connected_session:{connection_id}:{sid}")
        return await session.dispatch(data)

    async def disconnect_from_session(self, connection_id: str) -> None:
        self._local_connection_id_to_session_id.pop(connection_id, None)


def create_app(secret: str) -> socketio.ASGIApp:
    sio = socketio.AsyncServer(
        async_mode="asgi", cors_allowed_origins="*", async_handlers=False, logger=False
    )
    manager = StandaloneConversationManager(sio)

    @sio.on("connect")
    async def connect(cid: str, environ: dict[str, Any], auth: Any) -> bool:
        query = parse_qs(str(environ.get("QUERY_STRING", "")))
        try:
            user = verify_token((auth or {}).get("token"), secret)
        except Exception as exc:
            raise socketio.exceptions.ConnectionRefusedError(str(exc)) from None
        conversation = query.get("conversation_id", [""])[0]
        if not conversation:
            raise socketio.exceptions.ConnectionRefusedError("conversation_id is required")
        latest = int(query.get("latest_event_id", ["-1"])[0])
        await manager.join_conversation(conversation, cid, user, latest)
        return True

    @sio.on("oh_user_action")
    async def oh_user_action(cid: str, data: Any = None) -> dict[str, Any]:
        if not isinstance(data, dict):
            return {"ok": False, "error": "an action must be an object"}
        return {"ok": True, "id": await manager.send_to_event_stream(cid, data)}

    @sio.on("disconnect")
    async def disconnect(cid: str, reason: Any = None) -> None:
        await manager.disconnect_from_session(cid)

    return socketio.ASGIApp(sio)


def main() -> None:
    from bench.baselines.serve import serve

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    serve(create_app(args.secret), args.port)


if __name__ == "__main__":
    main()
