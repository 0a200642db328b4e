"""A terminal chat client: a socket.io connection to a node, lines from stdin as messages.

Works interactively and with piped stdin: after end of input it waits (up to ``wait``
seconds) for the answer to the last acknowledged message, then disconnects. When its node
dies or drains it reconnects to another (``ChatClient``) and carries on from the last
event it printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import uuid
from typing import Any, TextIO
from urllib.parse import urlencode, urlsplit

import aiohttp
import socketio

from .errors import ConfigError
from .redact import redact

ACK_TIMEOUT = 30.0
RECONNECT_FOR = 60.0  # seconds to keep trying other nodes after the connection dropped
MAX_SENDS = 5  # tries of one message across reconnections
# Refusals no other node would answer differently: give up at once.
FINAL_REFUSALS = ("authentication failed", "forbidden", "invalid", "settings", "latest_event_id")


def check_node_url(url: str) -> str:
    """``url`` without a trailing slash if it is ``http(s)://[USERINFO@]HOST[:PORT]`` (a port
    0-65535; a node's, or a load balancer's); else ConfigError naming it without its
    password."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError unless a number 0-65535)
    except ValueError:
        raise ConfigError(f"{redact(url)!r}: its host or port cannot be read") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{redact(url)!r} is not a node's URL, e.g. http://127.0.0.1:8000")
    if parts.path.strip("/") or parts.query or parts.fragment:
        # socket.io connects to the host's /socket.io/ whatever the path, REST calls
        # would take it: half used.
        raise ConfigError(
            f"{redact(url)!r}: a node's URL is http(s)://[USER:PASSWORD@]HOST[:PORT], "
            "with no path or query"
        )
    return url.rstrip("/")


def agent_state_note(event: dict[str, Any]) -> bool:
    """Whether ``event`` is an agent's own state change (``--agent-state-events``): no
    reason, unlike the coordinator's notices; not an answer."""
    extras = event.get("extras")
    return (
        event.get("observation") == "agent_state_changed"
        and isinstance(extras, dict)
        and not extras.get("reason")
    )


def format_event(event: dict[str, Any]) -> str:
    """``[id] source: content`` for one oh_event; ``[status] CODE: message`` for a status
    update."""
    if event.get("status_update") is True:
        return f"[status] {event.get('id', '?')}: {event.get('message', '')}"
    source = event.get("source", "?")
    args = event.get("args")
    extras = event.get("extras")
    if event.get("observation") == "agent_state_changed" and isinstance(extras, dict):
        state = f"(agent {extras.get('agent_state', '?')})"
        # The agent's own change says no more than its state; a notice says why.
        content = f"{event.get('message', '')} {state}" if extras.get("reason") else state
    elif isinstance(args, dict) and isinstance(args.get("content"), str):
        content = args["content"]
    elif "observation" in event:
        content = str(event.get("content") or event.get("message") or event["observation"])
    else:
        content = str(event.get("message", ""))
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
    """One conversation from the terminal, through any of ``urls``.

    When its node goes away (killed, drained, unreachable) it connects to the next URL
    (those given first, then the live nodes' advertised URLs it learnt from
    ``GET /api/nodes``), with ``latest_event_id`` = the last id it printed, for up to
    ``reconnect_for`` seconds; events are printed once each, in order, each
    (re)connection's replay after its "connected" line. A message whose ack was lost
    with its node is sent again, with the same ``client_action_id``, so it is logged
    once.
    """

    def __init__(
        self,
        urls: str | list[str],
        conversation: str,
        token: str,
        *,
        latest_event_id: int = -1,
        settings: dict[str, Any] | None = None,
        reconnect_for: float = RECONNECT_FOR,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
    ) -> None:
        given = [urls] if isinstance(urls, str) else list(urls)
        self.urls = [u.rstrip("/") for u in given]
        self.index = 0
        self.conversation = conversation
        self.token = token
        self.settings = settings
        self.reconnect_for = reconnect_for
        self.out = out
        self.err = err
        self.last_id = latest_event_id
        self.answered_after = 0  # highest id of a non-user event seen
        self._seen = asyncio.Condition()
        self.refusal = ""
        self._held: list[dict[str, Any]] | None = None  # events held until "connected"
        self._closing = False
        self.sio = self._new_client()

    @property
    def url(self) -> str:
        return self.urls[self.index]

    def _new_client(self) -> socketio.AsyncClient:
        # handle_sigint=False: the caller owns Ctrl-C (python-socketio would disconnect
        # first). No reconnection of its own: we move to another node with our cursor.
        sio = socketio.AsyncClient(reconnection=False, handle_sigint=False)
        sio.on("oh_event", self._on_event)
        sio.on("connect_error", self._on_connect_error)
        # Each connection drops its own event: a late word from an old one is ignored.
        self.dropped = dropped = asyncio.Event()

        async def on_disconnect(reason: Any = None) -> None:
            if not self._closing:
                dropped.set()
                async with self._seen:  # a wait for an answer ends here too
                    self._seen.notify_all()

        sio.on("disconnect", on_disconnect)
        return sio

    def say(self, message: str) -> None:
        """A line for the user, without credentials (a URL's password, a token)."""
        print(redact(message), file=self.err, flush=True)

    async def _on_event(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        if self._held is not None:
            self._held.append(event)
            return
        event_id = event.get("id")
        if isinstance(event_id, int):
            if event_id <= self.last_id:
                return  # already printed (not expected: the server replays after our id)
            self.last_id = event_id
            if event.get("source") != "user" and not agent_state_note(event):
                self.answered_after = max(self.answered_after, event_id)
        print(format_event(event), file=self.out, flush=True)
        async with self._seen:
            self._seen.notify_all()

    async def _release_held(self) -> None:
        held, self._held = self._held or [], None
        for event in held:
            await self._on_event(event)

    async def _on_connect_error(self, data: Any) -> None:
        if isinstance(data, dict):
            self.refusal = str(data.get("message", data))
        else:
            self.refusal = str(data)

    async def _get(self, session: aiohttp.ClientSession, path: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            async with session.get(self.url + path, headers=headers) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, ValueError, TimeoutError):
            return {}
        return body if isinstance(body, dict) else {}

    async def describe(self) -> str:
        """Which node we are connected to and which node runs the conversation's loop;
        learns the live nodes' URLs on the way."""
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            nodes = await self._get(session, "/api/nodes")
            conv = await self._get(session, f"/api/conversations/{self.conversation}")
        for node in nodes.get("nodes", []):
            url = node.get("url") if isinstance(node, dict) else None
            try:
                learnt = check_node_url(url) if isinstance(url, str) else ""
            except ConfigError:
                continue  # not a URL to move to
            if learnt and learnt not in self.urls:
                self.urls.append(learnt)
        here = nodes.get("node_id", "?")
        owner = conv.get("owner") or ""
        where = f"node {owner}" if owner else "no node right now (it starts on the next message)"
        if owner and owner == here:
            where += " (this node)"
        return (
            f"connected to node {here} at {self.url}; conversation {self.conversation}'s "
            f"agent loop runs on {where}"
        )

    async def connect(self) -> None:
        """Connect to ``self.url`` from the last id printed; print the "connected" line,
        then what the node replayed. Raises socketio's ConnectionError."""
        self.refusal = ""
        self.sio = self._new_client()
        query = urlencode({"conversation_id": self.conversation, "latest_event_id": self.last_id})
        auth: dict[str, Any] = {"token": self.token}
        if self.settings is not None:
            auth["settings"] = self.settings
        self._held = []
        try:
            await self.sio.connect(
                f"{self.url}?{query}", auth=auth, transports=["websocket"], wait_timeout=15
            )
            self.say(await self.describe())
        except BaseException:
            await self._close_client()  # and its aiohttp session, which a retry does not reuse
            raise
        finally:
            await self._release_held()

    async def connect_any(self, within: float) -> bool:
        """Connect to the current URL or, failing that, the next ones, for up to
        ``within`` seconds (each URL at least once); False after a final refusal."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        delay, tried = 0.2, 0
        while True:
            try:
                await self.connect()
                return True
            except socketio.exceptions.ConnectionError as exc:
                why = self.refusal or str(exc) or type(exc).__name__
            tried += 1
            self.say(f"! cannot connect to {self.url}: {why}")
            if why.startswith(FINAL_REFUSALS):
                return False
            self.index = (self.index + 1) % len(self.urls)
            if tried >= len(self.urls) and loop.time() >= deadline:
                return False
            if tried >= len(self.urls):  # every URL failed once: back off between rounds
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def reconnect(self, reason: str) -> bool:
        """The connection dropped: move on to the next node (or the same URL, when it is
        the only one: a load balancer picks another node)."""
        await self._close_client()
        self.say(f"! lost the connection to {self.url} ({reason}); reconnecting")
        if len(self.urls) > 1:
            self.index = (self.index + 1) % len(self.urls)
        return await self.connect_any(self.reconnect_for)

    async def _close_client(self) -> None:
        self._closing = True
        try:
            await self.sio.disconnect()
        finally:
            self._closing = False

    async def send(self, text: str) -> int | None:
        """Send one message; returns its event id, or None after printing the error.

        Sent again (same ``client_action_id``) on the next node when the connection
        drops before the ack, so it is logged once."""
        action = {
            "action": "message",
            "args": {"content": text},
            "client_action_id": uuid.uuid4().hex,
        }
        for _ in range(MAX_SENDS):
            loop = asyncio.get_running_loop()
            acked: asyncio.Future[Any] = loop.create_future()

            def on_ack(*args: Any, acked: asyncio.Future[Any] = acked) -> None:
                if not acked.done():
                    acked.set_result(args[0] if args else None)

            dropped = asyncio.ensure_future(self.dropped.wait())
            try:
                await self.sio.emit("oh_user_action", action, callback=on_ack)
                await asyncio.wait(
                    {acked, dropped}, timeout=ACK_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
                )
            except socketio.exceptions.SocketIOError:
                pass  # not connected: the drop is being handled
            finally:
                dropped.cancel()
            if acked.done():
                return self._acknowledged(acked.result())
            if not self.dropped.is_set():
                self.say("! no acknowledgement from the server")
                return None
            if not await self.reconnect("while sending"):
                return None
        self.say("! not sent: the connection kept dropping")
        return None

    def _acknowledged(self, ack: Any) -> int | None:
        if isinstance(ack, dict) and ack.get("ok"):
            event_id = ack.get("id")
            return event_id if isinstance(event_id, int) else None
        error = ack.get("error") if isinstance(ack, dict) else ack
        self.say(f"! {error}")
        return None

    async def wait_for_answer(self, after: int, within: float) -> bool:
        """Wait until a non-user event with an id above ``after`` arrived (True), or the
        connection dropped (True: the caller reconnects and waits again)."""

        async def answered() -> None:
            async with self._seen:
                await self._seen.wait_for(
                    lambda: self.answered_after > after or self.dropped.is_set()
                )

        try:
            async with asyncio.timeout(within):
                await answered()
        except TimeoutError:
            return False
        return True

    async def run(self, stdin: TextIO, wait: float) -> int:
        if not await self.connect_any(0):
            return 1
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        _start_stdin_reader(lines, stdin)
        last_sent = 0
        try:
            while True:
                # Each message goes once the one before was answered (lines typed or
                # piped meanwhile wait their turn), so "answered after the last one
                # sent" means by its own reply, not by an earlier one's.
                if last_sent and not self.dropped.is_set():
                    if not await self.wait_for_answer(last_sent, wait):
                        self.say(f"! no answer within {wait}s")
                    if not self.dropped.is_set():
                        last_sent = 0
                getter = asyncio.ensure_future(lines.get())
                dropped = asyncio.ensure_future(self.dropped.wait())
                await asyncio.wait({getter, dropped}, return_when=asyncio.FIRST_COMPLETED)
                dropped.cancel()
                if not getter.done():
                    getter.cancel()
                    if not await self.reconnect("the server closed it"):
                        self.say(f"! no node answered within {self.reconnect_for:g}s; giving up")
                        return 1
                    continue
                line = getter.result()
                if line is None:
                    if last_sent and not await self.wait_for_answer(last_sent, wait):
                        self.say(f"! no answer within {wait}s")
                    return 0
                if line.strip():
                    event_id = await self.send(line)
                    if event_id is not None:
                        last_sent = event_id
        finally:
            await self._close_client()
