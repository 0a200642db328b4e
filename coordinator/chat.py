"""A terminal chat client: one socket.io connection to a node, lines from stdin as messages.

Works interactively and with piped stdin: after end of input it waits (up to ``wait``
seconds) for the answer to the last acknowledged message, then disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
from typing import Any, TextIO
from urllib.parse import urlencode

import aiohttp
import socketio

ACK_TIMEOUT = 30.0


def format_event(event: dict[str, Any]) -> str:
    """``[id] source: content`` for one oh_event."""
    source = event.get("source", "?")
    args = event.get("args")
    if event.get("status_update") or ("message" in event and not isinstance(args, dict)):
        content = str(event.get("message", ""))
        if event.get("agent_state"):
            content += f" (agent {event['agent_state']})"
    elif isinstance(args, dict) and "content" in args:
        content = str(args["content"])
    else:
        rest = {k: v for k, v in event.items() if k not in ("id", "source", "timestamp")}
        content = json.dumps(rest, default=str)
    return f"[{event.get('id', '?')}] {source}: {content}"


def _start_stdin_reader(queue: asyncio.Queue[str | None], stdin: TextIO) -> None:
    """Feed stdin lines into ``queue`` from a daemon thread (None marks end of input)."""
    loop = asyncio.get_running_loop()

    def pump() -> None:
        try:
            for line in stdin:
                loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\r\n"))
        except (OSError, ValueError):
            pass
        finally:
            # The loop may already be closed when the user quit first.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, name="stdin", daemon=True).start()


class ChatClient:
    def __init__(
        self,
        url: str,
        conversation: str,
        token: str,
        *,
        latest_event_id: int = -1,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
    ) -> None:
        self.url = url.rstrip("/")
        self.conversation = conversation
        self.token = token
        self.latest_event_id = latest_event_id
        self.out = out
        self.err = err
        self.last_id = latest_event_id
        self.answered_after = 0  # highest id of a non-user event seen
        self._seen = asyncio.Condition()
        self.refusal = ""
        self.dropped = asyncio.Event()
        # handle_sigint=False: the caller owns Ctrl-C (python-socketio would disconnect first).
        self.sio = socketio.AsyncClient(reconnection=False, handle_sigint=False)
        self.sio.on("oh_event", self._on_event)
        self.sio.on("connect_error", self._on_connect_error)
        self.sio.on("disconnect", self._on_disconnect)
        self._closing = False

    async def _on_event(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        print(format_event(event), file=self.out, flush=True)
        event_id = event.get("id")
        if isinstance(event_id, int):
            self.last_id = max(self.last_id, event_id)
            if event.get("source") != "user":
                self.answered_after = max(self.answered_after, event_id)
        async with self._seen:
            self._seen.notify_all()

    async def _on_connect_error(self, data: Any) -> None:
        if isinstance(data, dict):
            self.refusal = str(data.get("message", data))
        else:
            self.refusal = str(data)

    async def _on_disconnect(self, reason: Any = None) -> None:
        if not self._closing:
            self.dropped.set()

    async def _get(self, session: aiohttp.ClientSession, path: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            async with session.get(self.url + path, headers=headers) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, ValueError, TimeoutError):
            return {}
        return body if isinstance(body, dict) else {}

    async def describe(self) -> str:
        """Which node we are connected to and which node runs the conversation's loop."""
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            node = await self._get(session, "/api/node")
            conv = await self._get(session, f"/api/conversations/{self.conversation}")
        here = node.get("node_id", "?")
        owner = conv.get("owner") or ""
        where = f"node {owner}" if owner else "no node right now (it starts on the next message)"
        if owner and owner == here:
            where += " (this node)"
        return (
            f"connected to node {here} at {self.url}; conversation {self.conversation}'s "
            f"agent loop runs on {where}"
        )

    async def connect(self) -> None:
        query = urlencode(
            {"conversation_id": self.conversation, "latest_event_id": self.latest_event_id}
        )
        await self.sio.connect(
            f"{self.url}?{query}",
            auth={"token": self.token},
            transports=["websocket"],
            wait_timeout=15,
        )

    async def send(self, text: str) -> int | None:
        """Send one message; returns its event id, or None after printing the error."""
        try:
            ack = await self.sio.call(
                "oh_user_action",
                {"action": "message", "args": {"content": text}},
                timeout=ACK_TIMEOUT,
            )
        except socketio.exceptions.TimeoutError:
            print("! no acknowledgement from the server", file=self.err, flush=True)
            return None
        if isinstance(ack, dict) and ack.get("ok"):
            event_id = ack.get("id")
            return event_id if isinstance(event_id, int) else None
        error = ack.get("error") if isinstance(ack, dict) else ack
        print(f"! {error}", file=self.err, flush=True)
        return None

    async def wait_for_answer(self, after: int, within: float) -> bool:
        """Wait until a non-user event with an id above ``after`` arrived."""

        async def answered() -> None:
            async with self._seen:
                await self._seen.wait_for(lambda: self.answered_after > after)

        try:
            async with asyncio.timeout(within):
                await answered()
        except TimeoutError:
            return False
        return True

    async def run(self, stdin: TextIO, wait: float) -> int:
        try:
            await self.connect()
        except socketio.exceptions.ConnectionError as exc:
            why = self.refusal or str(exc)
            print(f"error: cannot connect to {self.url}: {why}", file=self.err, flush=True)
            return 1
        print(await self.describe(), file=self.err, flush=True)
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        _start_stdin_reader(lines, stdin)
        last_sent = 0
        code = 0
        dropped = asyncio.ensure_future(self.dropped.wait())
        try:
            while True:
                getter = asyncio.ensure_future(lines.get())
                await asyncio.wait({getter, dropped}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    print("! the server closed the connection", file=self.err, flush=True)
                    code = 1
                    break
                line = getter.result()
                if line is None:
                    if last_sent and not await self.wait_for_answer(last_sent, wait):
                        print(f"! no answer within {wait}s", file=self.err, flush=True)
                    break
                if line.strip():
                    event_id = await self.send(line)
                    if event_id is not None:
                        last_sent = event_id
        finally:
            dropped.cancel()
            self._closing = True
            await self.sio.disconnect()
        return code
