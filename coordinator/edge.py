"""The node's ASGI edge: what every request and websocket frame passes before the
socket.io server or the REST app sees it.

- Client addresses: a request from a trusted proxy is attributed to the client its
  X-Forwarded-For names (``scope["client"]`` is rewritten, so the access log shows it
  too) and counted under that address while it lasts (``ConnectionGuard``).
- Ports: with a metrics port, ``/metrics`` is served there only, and nothing else is.
- Origins: a browser origin the node does not know yet prompts it to read the origins
  its peers advertise (``http.Origins``), before the socket.io server or the REST app
  decides whether that origin may call.
- Websocket frames (``FrameGuard``): a bucket per connection bounds how many a client
  may send; a frame that is not an engine.io packet at all closes the connection with a
  reason, before engine.io (which would drop the session without cleaning up) reads it.
  The socket.io server closes a connection the same way, through the guard it finds in
  the scope (``FrameGuard.of``), and writes to it through the guard when nothing waits
  in engine.io's queue (``FrameGuard.write``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Mapping
from typing import Any
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .connlimits import ConnectionGuard, forwarded_client
from .http import Origins
from .ratelimit import LogThrottle, Rate, TokenBucket
from .serverconfig import ServerConfig
from .websocket import SOCKET_KEY, WebSocket

log = logging.getLogger(__name__)

SCOPE_KEY = "coordinator.frames"
SOCKETIO_PATH = "/socket.io/"
ENGINEIO_TYPES = frozenset("0123456")
ENGINEIO_CLOSE = "1"
ENGINEIO_MESSAGE = "4"
# Close codes (RFC 6455): done / the peer broke the protocol / our policy / too much.
NORMAL_CLOSURE = 1000
PROTOCOL_ERROR = 1002
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
TRY_AGAIN_LATER = 1013
MAX_REASON = 120  # a close frame's reason is at most 123 bytes
CLOSE_WAIT = 5.0  # seconds a close frame may wait for a client that does not read
YIELD_BYTES = 256 * 1024  # written to one client before its writer lets others run


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return ""


class Receiver:
    """The ASGI ``receive`` handed to the app, cut off from the connection once the app
    returned. engine.io's request translation defines a class per request whose method
    closes over ``receive``; a class is always in a reference cycle (its ``__mro__``), so
    that cycle held the connection (protocol, transport, socket, buffers: about 80
    objects) until a full collection. It now holds this small object."""

    __slots__ = ("kind", "receive")

    def __init__(self, receive: Receive, kind: str) -> None:
        self.receive: Receive | None = receive
        self.kind = kind  # the scope's type: what a late call is told (disconnected)

    def __call__(self) -> Awaitable[Message]:
        # Not a coroutine of its own: the app awaits the connection's receive itself (a
        # websocket waits in it for good; one frame of a coroutine less per connection).
        if self.receive is None:
            return _gone(self.kind)
        return self.receive()


async def _gone(kind: str) -> Message:
    return {"type": f"{kind}.disconnect", "code": 1006}


class FrameGuard:
    """One websocket connection's frames: counted, checked, and the way to close it. The
    app gets ``guarded_receive`` and ``counted_send`` in place of the connection's own
    (methods and slots: a few hundred bytes less per connection than closures and a
    ``__dict__``)."""

    __slots__ = (
        "_bucket",
        "_receive",
        "_send",
        "_since_yield",
        "_socket",
        "_throttle",
        "address",
        "close_code",
        "closed",
        "queued_bytes",
        "queued_messages",
        "sent_bytes",
    )

    def __init__(
        self,
        send: Send,
        receive: Receive,
        rate: Rate,
        address: str,
        throttle: LogThrottle,
        socket: WebSocket | None = None,
    ) -> None:
        self._send = send
        self._receive = receive
        self._since_yield = 0  # bytes written since the writer last let others run
        self._bucket = TokenBucket(rate, time.monotonic())
        self.address = address
        self._throttle = throttle
        self._socket = socket  # the websocket protocol under the app, when it is ours
        if socket is not None:
            socket.on_ping = self.pinged  # unlinked by ``detach`` (a reference cycle)
        self.closed: str | None = None  # the reason it was closed for
        self.close_code = 0
        # Bytes of events handed to engine.io for this client, and bytes written to it:
        # the difference waits in engine.io's queue (``GuardedServer.send_part`` counts
        # the first).
        self.queued_bytes = 0
        self.sent_bytes = 0
        # Messages handed to engine.io's queue and not yet written by its writer task.
        self.queued_messages = 0

    @property
    def backlog(self) -> int:
        """Bytes of events waiting for the client."""
        return self.queued_bytes - self.sent_bytes

    def may_write(self) -> bool:
        """A message may be written now (``write``), ahead of engine.io's writer task:
        the connection is open and has written engine.io's OPEN, no message of it waits
        in engine.io's queue or in its writer's hands (order holds), and the transport
        takes the frame without waiting."""
        return (
            self.closed is None
            and self.queued_messages == 0
            and self.sent_bytes > 0
            and self._socket is not None
            and self._socket.can_write_now()
        )

    async def write(self, part: str | bytes) -> None:
        """An engine.io MESSAGE (a socket.io packet, or a binary attachment), written now.
        A connection that is gone meanwhile drops it (its disconnect cleans up)."""
        message: Message = (
            {"type": "websocket.send", "text": ENGINEIO_MESSAGE + part}
            if isinstance(part, str)
            else {"type": "websocket.send", "bytes": part}
        )
        try:
            await self._send(message)
        except Exception as exc:  # uvicorn's ClientDisconnected, a transport gone
            log.debug("write to %s dropped (%r)", self.address, exc)

    @staticmethod
    def of(environ: Mapping[str, Any] | None) -> FrameGuard | None:
        """The guard of the websocket an engine.io environ belongs to (None: polling)."""
        scope = (environ or {}).get("asgi.scope") or {}
        guard = scope.get(SCOPE_KEY)
        return guard if isinstance(guard, FrameGuard) else None

    async def close(self, code: int, reason: str, *, log_it: bool = False) -> None:
        """Close the websocket with ``code`` and ``reason`` (once; the first one wins).
        A client that does not read within CLOSE_WAIT cannot be told: it is dropped."""
        if self.closed is not None:
            return
        self.closed, self.close_code = reason, code
        if log_it:
            self._throttle.info("closing websocket from %s: %s", self.address, reason)
        message = {"type": "websocket.close", "code": code, "reason": reason[:MAX_REASON]}
        try:
            async with asyncio.timeout(CLOSE_WAIT):
                await self._send(message)
        except TimeoutError:
            self.abort(reason)
        except Exception:  # the client is gone already (uvicorn raises then)
            pass

    def gone(self) -> bool:
        """Closed here (``close``, ``abort``), or by the client (its transport closing)."""
        return self.closed is not None or (self._socket is not None and self._socket.gone())

    def abort(self, reason: str) -> None:
        """Drop the connection at once, without a close frame (which a client that does
        not read would never get)."""
        if self.closed is None:
            self.closed, self.close_code = reason, 1006
        if self._socket is not None:
            self._socket.abort()

    def pinged(self) -> bool:
        """A websocket ping came: counted with the connection's messages; over its
        rate, the connection is dropped (a flood of pings reads none of its pongs)."""
        if self._bucket.take(time.monotonic()) <= 0:
            return True
        self._throttle.info("dropping websocket from %s: too many pings", self.address)
        self.abort("too many pings")
        return False

    def detach(self) -> None:
        if self._socket is not None:
            self._socket.on_ping = None

    async def guarded_receive(self) -> Message:
        """The connection's ``receive``, every frame counted and checked first."""
        if self.closed is None:
            message: Message = await self._receive()
            if message["type"] != "websocket.receive":
                return message
            problem = self._problem(message)
            if problem is None:
                return message
            await self.close(*problem, log_it=problem[0] != NORMAL_CLOSURE)
        return {"type": "websocket.disconnect", "code": self.close_code or 1000}

    async def counted_send(self, message: Message) -> None:
        """The connection's ``send``, the bytes of every message written counted (and the
        messages ``send_part`` queued). engine.io writes everything queued for a client
        in one go, and uvicorn does not wait while the socket takes it: every YIELD_BYTES
        the writer lets the event loop run others."""
        if message["type"] == "websocket.send":
            text = message.get("text")
            size = len(text or message.get("bytes") or b"")
            self.sent_bytes += size
            self._since_yield += size
            if self.queued_messages and (text is None or text[:1] == ENGINEIO_MESSAGE):
                self.queued_messages -= 1
        await self._send(message)
        if self._since_yield >= YIELD_BYTES:
            self._since_yield = 0
            await asyncio.sleep(0)

    def _problem(self, message: Message) -> tuple[int, str] | None:
        wait = self._bucket.take(time.monotonic())
        if wait > 0:
            rate = self._bucket.rate
            return POLICY_VIOLATION, f"too many messages (limit {rate}); slow down"
        text = message.get("text")
        if text is not None and (not text or text[0] not in ENGINEIO_TYPES):
            return PROTOCOL_ERROR, "malformed engine.io packet"
        if text is not None and text[0] == ENGINEIO_CLOSE:
            # engine.io ends the session on it but keeps reading the websocket, unanswered.
            return NORMAL_CLOSURE, "closed by the client (engine.io CLOSE)"
        return None


class Edge:
    """ASGI middleware in front of the node's app (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        config: ServerConfig,
        guard: ConnectionGuard,
        origins: Origins | None = None,
    ) -> None:
        self.app = app
        self.config = config
        self.guard = guard
        self.origins = origins
        self.metrics_port = config.metrics_port
        self.frames = config.frames_per_connection
        self.throttle = LogThrottle(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if not self._routed_here(scope):
            await _not_found(scope, receive, send)
            return
        forwarded = self._forwarded(scope)
        if forwarded:
            refusal = self.guard.admit_forwarded(forwarded)
            if refusal is not None:
                await _refuse(scope, receive, send, refusal)
                return
        elif kind == "http" and _opens_polling_session(scope):
            client = scope.get("client")
            refusal = self.guard.admit_session(str(client[0]) if client else "")
            if refusal is not None:
                await _refuse(scope, receive, send, refusal)
                return
        origin = _header(scope, b"origin")
        if origin and self.origins is not None:
            await self.origins.learn(origin, _header(scope, b"host"))
        receiver = Receiver(receive, kind)
        try:
            if kind == "websocket" and scope["path"].startswith(SOCKETIO_PATH):
                address = str((scope.get("client") or ("",))[0])
                frames = FrameGuard(
                    send, receive, self.frames, address, self.throttle, scope.get(SOCKET_KEY)
                )
                scope[SCOPE_KEY] = frames
                receiver.receive = frames.guarded_receive
                send = frames.counted_send
            await self.app(scope, receiver, send)
        finally:
            if forwarded:
                self.guard.release_forwarded(forwarded)
            # Unlinked from what outlives the request in reference cycles (below), a
            # connection is freed as it ends, not by a full collection of the cyclic GC,
            # which walks every live object: under churn, a third of a join's CPU and
            # pauses of 0.2-0.3 s (BENCHMARKS.md). The keys hold the websocket protocol,
            # which holds the scope.
            receiver.receive = None
            frames_left = scope.pop(SCOPE_KEY, None)
            if isinstance(frames_left, FrameGuard):
                frames_left.detach()
            scope.pop(SOCKET_KEY, None)

    def _routed_here(self, scope: Scope) -> bool:
        """With a metrics port, /metrics is there and only there."""
        if self.metrics_port is None:
            return True
        server = scope.get("server") or (None, None)
        on_metrics_port = server[1] == self.metrics_port
        return bool(on_metrics_port == (scope["path"] == "/metrics"))

    def _forwarded(self, scope: Scope) -> str:
        """The client a trusted proxy forwarded this for ('' when not from one); the
        scope's client becomes that address."""
        client = scope.get("client")
        peer = str(client[0]) if client else ""
        if not self.guard.is_trusted(peer):
            return ""
        address = forwarded_client(peer, _header(scope, b"x-forwarded-for"), self.guard.networks)
        if address != peer:
            scope["client"] = (address, 0)
            proto = _header(scope, b"x-forwarded-proto")
            if proto in ("http", "https", "ws", "wss"):
                websocket = scope["type"] == "websocket"
                scope["scheme"] = (
                    {"http": "ws", "https": "wss"}.get(proto, proto) if websocket else proto
                )
        return address


def _opens_polling_session(scope: Scope) -> bool:
    """An engine.io polling handshake: a GET of the socket.io path without a session."""
    if scope["method"] != "GET" or not scope["path"].startswith(SOCKETIO_PATH):
        return False
    # Read as engine.io reads it: "xsid=1" is no session (a substring test let it by).
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return "sid" not in query


async def _refuse(scope: Scope, receive: Receive, send: Send, reason: str) -> None:
    """429 with the reason (a websocket handshake too, where the server supports it)."""
    body = json.dumps({"error": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": 429, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send(
            {"type": "websocket.close", "code": TRY_AGAIN_LATER, "reason": reason[:MAX_REASON]}
        )


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.close", "code": POLICY_VIOLATION})
        return
    body = b'{"error": "no such endpoint on this port"}'
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 404, "headers": headers})
    await send({"type": "http.response.body", "body": body})
