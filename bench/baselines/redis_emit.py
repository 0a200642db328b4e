"""Plain python-socketio with ``AsyncRedisManager`` as a baseline: the handler emits back.

A client joins the room of its ``conversation_id``; ``oh_user_action`` is answered by
emitting an agent-shaped ``oh_event`` to that room (through the Redis manager, so every
node of such a cluster receives it: python-socketio's broadcast design) and an ack. No
agent loop, no durable log: the lower bound of a Redis-backed socket.io cluster.

With ``--durable`` the handler first appends the action to a Redis stream and only then
emits the reply: the least a server that makes an action durable before acting on it
pays (one more dependent Redis round trip), with nothing else of the coordinator.

Run: ``python -m bench.baselines.redis_emit --port PORT --redis-url URL --secret S
[--durable]``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import parse_qs

import redis.asyncio as aioredis
import socketio

from coordinator.auth import verify_token


class CountingRedisManager(socketio.AsyncRedisManager):  # type: ignore[misc]
    """AsyncRedisManager that counts the messages it receives from Redis pub/sub."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.messages = 0

    async def _listen(self) -> Any:
        async for message in super()._listen():
            self.messages += 1
            yield message


def create_app(
    redis_url: str, secret: str, channel: str = "bench-socketio", durable: bool = False
) -> tuple[socketio.ASGIApp, CountingRedisManager]:
    manager = CountingRedisManager(redis_url, channel=channel)
    log = aioredis.from_url(redis_url) if durable else None
    sio = socketio.AsyncServer(
        async_mode="asgi",
        client_manager=manager,
        cors_allowed_origins="*",
        async_handlers=False,
        logger=False,
    )

    rooms: dict[str, str] = {}  # connection id -> conversation

    @sio.on("connect")
    async def connect(cid: str, environ: dict[str, Any], auth: Any) -> bool:
        query = parse_qs(str(environ.get("QUERY_STRING", "")))
        try:
            verify_token((auth or {}).get("token"), secret)
        except Exception as exc:
            raise socketio.exceptions.ConnectionRefusedError(str(exc)) from None
        conversation = query.get("conversation_id", [""])[0]
        if not conversation:
            raise socketio.exceptions.ConnectionRefusedError("conversation_id is required")
        await sio.enter_room(cid, conversation)
        rooms[cid] = conversation
        return True

    @sio.on("oh_user_action")
    async def oh_user_action(cid: str, data: Any = None) -> dict[str, Any]:
        if not isinstance(data, dict):
            return {"ok": False, "error": "an action must be an object"}
        content = data.get("args", {}).get("content", "")
        if log is not None:
            await log.xadd(f"bench-log:{rooms[cid]}", {"d": json.dumps(data)}, maxlen=1000)
        await sio.emit(
            "oh_event",
            {"action": "message", "source": "agent", "args": {"content": content}},
            room=rooms[cid],
        )
        return {"ok": True}

    @sio.on("disconnect")
    async def disconnect(cid: str, reason: Any = None) -> None:
        rooms.pop(cid, None)

    return socketio.ASGIApp(sio), manager


def main() -> None:
    from bench.baselines.serve import serve

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument(
        "--durable", action="store_true", help="append each action to a Redis stream first"
    )
    args = parser.parse_args()
    app, _ = create_app(args.redis_url, args.secret, durable=args.durable)
    serve(app, args.port)


if __name__ == "__main__":
    main()
