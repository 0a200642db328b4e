"""python-socketio's server, holding clients to the protocol before any handler runs.

- Every packet is checked (``packets.problem``) before python-socketio acts on it. A
  malformed one is answered: an event that asked for an ack gets ``{"ok": false,
  "error": ...}``, anything else closes the connection with the reason. It is logged
  once per connection, and those lines are rate-limited node-wide.
- An engine.io session must complete a socket.io CONNECT within ``handshake_timeout``
  (a join in progress gets more time; joins are bounded), and may try at most
  ``MAX_CONNECTS`` times.
- A binary event's attachments are bounded in number (``packets``) and in total size.
- A connection whose client does not read is dropped once ``max_queued_events`` or
  ``max_queued_bytes`` wait for it (``backlogged``): its client reconnects with
  ``latest_event_id`` and misses nothing.

- A message for a client is written to its websocket at once when nothing of it waits
  in engine.io's queue (``send_part``), not a few loop iterations later by engine.io's
  writer task.

This overrides python-socketio's ``_handle_eio_connect``, ``_handle_eio_message``,
``_handle_eio_disconnect``, ``_send_packet``, ``_send_eio_packet`` and
``_engineio_server_class`` (5.x;
``tests/test_guards.py`` drives every branch through a real server), and engine.io's
``start_background_task``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import Counter
from typing import Any

import engineio
import socketio
from engineio.async_drivers import asgi
from socketio import packet as sio_packet

from . import packets
from .asgienviron import translate_request
from .edge import NORMAL_CLOSURE, POLICY_VIOLATION, PROTOCOL_ERROR, FrameGuard
from .ratelimit import LogThrottle
from .serverconfig import ServerConfig
from .tasks import TaskSet

log = logging.getLogger(__name__)

NAMESPACE = packets.NAMESPACE
MAX_CONNECTS = 3  # CONNECT packets one engine.io session may send
GRACE = 1.0  # seconds an ended session's websocket stays for its last packets to go out
# Packets one polling POST may carry. A client sends what it has queued in one body,
# which maxPayload bounds already; python-engineio refused more than 16 whole (answering
# 200: a burst of a client's messages was lost without a word). Each packet then meets
# the connection's limits as a websocket message does.
engineio.payload.Payload.max_decode_packets = 1024
# What decoding a client's packet can raise (json.JSONDecodeError is a ValueError).
DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError)


class EndingWebSocket(asgi.WebSocket):  # type: ignore[misc]
    """engine.io's ASGI websocket, telling its session that the client closed by
    returning None (engine.io's "connection closed") instead of raising OSError.

    The exception was kept by the task that read the socket, its traceback held the
    session handler's frame, and that frame held the task: a reference cycle through the
    whole connection (its websocket, transport, socket, session: about 125 objects), so
    no closed connection was freed until a full collection of the cyclic GC found it.
    Under churn those collections walked every live connection again and again (0.7 s
    of each 1,000 joins' CPU, pauses of 0.2-0.3 s: BENCHMARKS.md).

    It reads the ASGI receive itself rather than through engine.io's ``wait``: one
    coroutine less for every frame, and for every connection, which waits in it."""

    async def wait(self) -> Any:
        try:
            event = await self.asgi_receive()
        except OSError:  # not kept: caught here, it is freed here
            return None
        if event["type"] != "websocket.receive":
            return None  # the client went away
        data = event.get("bytes")
        return data if data is not None else event.get("text")


class PingTrackingServer(engineio.AsyncServer):  # type: ignore[misc]
    """engine.io's server, keeping each session's ping task so it can end with the
    session: engine.io lets it sleep out its ping interval (25 s) after the session
    closed, holding the session's objects that long. Under a flood of short connections
    tens of thousands of them piled up, and each full collection of the cyclic GC walked
    them all: 30-75 ms during which no client was served (docs/failures.md). Its
    websocket is ``EndingWebSocket``, its request environ ``asgienviron``'s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ping_tasks: dict[str, asyncio.Task[Any]] = {}
        # Made once, not per ping task (one is always pending for every session): the
        # callback, and a context of its own instead of a copy of the current one.
        self._forget = self._forget_ping
        self._forget_context = contextvars.Context()
        drivers: dict[str, Any] = getattr(self, "_async")  # noqa: B009 (engine.io's, untyped)
        self._async = {
            **drivers,
            "websocket": EndingWebSocket,
            "translate_request": translate_request,
        }

    def start_background_task(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        task = super().start_background_task(target, *args, **kwargs)
        session = getattr(target, "__self__", None)
        if getattr(target, "__name__", "") == "_send_ping" and session is not None:
            task.set_name(session.sid)  # what ``_forget_ping`` finds it by
            self.ping_tasks[session.sid] = task
            task.add_done_callback(self._forget, context=self._forget_context)
        return task

    def _forget_ping(self, task: asyncio.Task[Any]) -> None:
        sid = task.get_name()
        if self.ping_tasks.get(sid) is task:
            del self.ping_tasks[sid]

    async def disconnect(self, sid: str | None = None) -> None:
        """engine.io's, except that a polling session's close does not wait for its
        client to fetch the CLOSE packet: one that never polls again (a POST over
        maxPayload ends its session that way) held the request's task until the node
        stopped, a task per such POST."""
        socket = self.sockets.get(sid) if sid is not None else None
        if socket is None or socket.upgraded:
            await super().disconnect(sid)
            return
        await socket.close(wait=False, reason=self.reason.SERVER_DISCONNECT)
        self.sockets.pop(sid, None)

    def session_ended(self, sid: str) -> None:
        task = self.ping_tasks.pop(sid, None)
        if task is not None:
            task.cancel()


class GuardedServer(socketio.AsyncServer):  # type: ignore[misc]
    """socketio.AsyncServer with the checks in the module docstring."""

    def __init__(
        self, *, config: ServerConfig, max_message_bytes: int, tasks: TaskSet, **kwargs: Any
    ) -> None:
        super().__init__(max_http_buffer_size=max_message_bytes, **kwargs)
        self.handshake_timeout = config.handshake_timeout
        self.max_queued_events = config.max_queued_events
        self.max_queued_bytes = config.max_queued_bytes
        self.max_message_bytes = max_message_bytes
        self.tasks = tasks
        self._deadlines: dict[str, asyncio.TimerHandle] = {}
        self._connects: Counter[str] = Counter()
        self._attached: dict[str, int] = {}  # eio sid -> attachment bytes received so far
        self._reported: set[str] = set()  # eio sids whose malformed packet was logged
        self._throttle = LogThrottle(log)
        self.malformed = 0
        self.written_at_once = 0  # messages written without engine.io's queue (send_part)

    # -- the handshake deadline ------------------------------------------------------
    async def _handle_eio_connect(self, eio_sid: str, environ: dict[str, Any]) -> Any:
        result = await super()._handle_eio_connect(eio_sid, environ)
        self._arm(eio_sid)
        return result

    def _arm(self, eio_sid: str) -> None:
        loop = asyncio.get_running_loop()
        self._deadlines[eio_sid] = loop.call_later(self.handshake_timeout, self._expired, eio_sid)

    def _expired(self, eio_sid: str) -> None:
        self._deadlines.pop(eio_sid, None)
        if eio_sid not in self.environ:
            return  # gone already
        sid = self.manager.sid_from_eio_sid(eio_sid, NAMESPACE)
        if sid is not None and self.manager.is_connected(sid, NAMESPACE):
            return
        if sid is not None and self.manager.is_pre_connected(sid, NAMESPACE):
            self._arm(eio_sid)  # its join is still running: joins end by themselves
            return
        reason = f"no socket.io CONNECT within {self.handshake_timeout:g}s"
        self.tasks.spawn(self.close_connection(eio_sid, POLICY_VIOLATION, reason), "handshake")

    def _engineio_server_class(self) -> type[PingTrackingServer]:
        return PingTrackingServer

    async def _handle_eio_disconnect(self, eio_sid: str, reason: Any = None) -> None:
        self.eio.session_ended(eio_sid)
        timer = self._deadlines.pop(eio_sid, None)
        if timer is not None:
            timer.cancel()
        frames = FrameGuard.of(self.environ.get(eio_sid))
        if frames is not None and frames.closed is None:
            # engine.io ended the session (its CLOSE is queued, or the client sent one)
            # but reads the websocket until the client closes it: close it, once what
            # is queued had time to go out.
            asyncio.get_running_loop().call_later(GRACE, self._close_later, frames)
        self._connects.pop(eio_sid, None)
        self._attached.pop(eio_sid, None)
        self._reported.discard(eio_sid)
        await super()._handle_eio_disconnect(eio_sid, reason)

    # -- closing a connection --------------------------------------------------------
    async def close_connection(
        self, eio_sid: str, code: int, reason: str, *, log_it: bool = True, now: bool = False
    ) -> None:
        """Close a client's connection saying why: a websocket close frame's reason (a
        polling session has no way to carry one and is just closed). ``now``: drop it at
        once without telling it (a client that does not read would never hear it)."""
        if log_it:
            self._throttle.info("closing connection %s: %s", eio_sid, reason)
        frames = FrameGuard.of(self.environ.get(eio_sid))
        if frames is not None:
            if now:
                frames.abort(reason)
            else:
                await frames.close(code, reason)
            return
        socket = self.eio.sockets.get(eio_sid)
        if socket is not None and not socket.closed:
            # Not engine.io's disconnect(): it waits for the client to poll its CLOSE.
            await socket.close(wait=False, abort=True, reason=self.reason.SERVER_DISCONNECT)
            self.eio.sockets.pop(eio_sid, None)  # else kept until its service task's round

    def _close_later(self, frames: FrameGuard) -> None:
        if frames.closed is None:
            self.tasks.spawn(frames.close(NORMAL_CLOSURE, "session closed"), "close")

    async def end_session(self, eio_sid: str) -> None:
        """End an engine.io session refused for a limit, ``GRACE`` after the refusal
        unless its client closed it first. The wait is for the clients that close on a
        refusal, as python-socketio's does: a server CLOSE crossing the client's own
        leaves python-engineio's client waiting out its write loop's 30 s timeout."""
        await asyncio.sleep(GRACE)
        socket = self.eio.sockets.get(eio_sid)
        if socket is not None and not socket.closed:
            await socket.close(wait=False, abort=False, reason=self.reason.SERVER_DISCONNECT)

    def gone(self, eio_sid: str) -> bool:
        """The client's connection is closed or closing (by the client, or dropped here),
        though engine.io may not have noticed yet: it reads a websocket's frames, its
        disconnect among them, only between the packets it handles (a join handled
        inline holds it up)."""
        frames = FrameGuard.of(self.environ.get(eio_sid))
        if frames is not None:
            return frames.gone()
        socket = self.eio.sockets.get(eio_sid)
        return socket is None or bool(socket.closed)

    def backlogged(self, eio_sid: str, *, half: bool = False) -> str | None:
        """Why this client has too much waiting for it (more than ``max_queued_events``
        or ``max_queued_bytes``, each 0 for no limit; ``half``: half as much), or None.
        A polling session's bytes are counted in engine.io's queue (a few entries: each
        poll takes all of them); they were not counted at all, and a session that never
        polled held up to ``max_queued_events`` of the largest events (9 MB each in a
        probe)."""
        socket = self.eio.sockets.get(eio_sid)
        if socket is None or socket.closed:
            return None
        events, size = self.max_queued_events, self.max_queued_bytes
        if half:
            events, size = events // 2, size // 2
        if self.max_queued_events and socket.queue.qsize() > events:
            return f"over {events} events waiting"
        if self.max_queued_bytes:
            frames = FrameGuard.of(self.environ.get(eio_sid))
            waiting = frames.backlog if frames is not None else _queued_bytes(socket)
            if waiting > size:
                return f"over {size} bytes waiting"
        return None

    async def _send_packet(self, eio_sid: str, pkt: Any) -> None:
        """python-socketio's (acks, CONNECT), through ``send_part``."""
        encoded = pkt.encode()
        for part in encoded if isinstance(encoded, list) else (encoded,):
            await self.send_part(eio_sid, part)

    async def _send_eio_packet(self, eio_sid: str, eio_pkt: Any) -> None:
        """python-socketio's (``emit`` to a room), its messages through ``send_part``."""
        if eio_pkt.packet_type == engineio.packet.MESSAGE:
            await self.send_part(eio_sid, eio_pkt.data)
        else:
            await super()._send_eio_packet(eio_sid, eio_pkt)

    async def send_part(self, eio_sid: str, part: str | bytes) -> None:
        """One engine.io MESSAGE for a client: a socket.io packet or a binary attachment.

        engine.io queues it for the connection's writer task, which writes it a few loop
        iterations later, after whatever else is ready: an action's ack waited there for
        the agent's commit to go to Redis (0.4-0.6 ms, BENCHMARKS.md). On a websocket
        whose guard says nothing of it waits (``FrameGuard.may_write``) it is written at
        once instead; otherwise queued, counted in bytes and messages (``backlogged``),
        and the writer's order is kept: no message is written ahead of a queued one. A
        session that began on long-polling and upgraded has no guard in its environ (the
        polling request's): its messages are always queued."""
        socket = self.eio.sockets.get(eio_sid)
        frames = FrameGuard.of(self.environ.get(eio_sid))
        if (
            frames is not None
            and socket is not None
            and socket.upgraded
            and not socket.closed
            and socket.queue.empty()
            and frames.may_write()
        ):
            if await socket.check_ping_timeout():  # else engine.io closes it, as on send
                await frames.write(part)
                self.written_at_once += 1
            return
        await self.eio.send(eio_sid, part)
        if frames is not None:
            frames.queued_bytes += len(part) + 1  # engine.io's "4" prefix
            frames.queued_messages += 1

    # -- packets ---------------------------------------------------------------------
    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        pending = self._binary_packet.get(eio_sid)
        if pending is not None:
            await self._attachment(eio_sid, pending, data)
            return
        try:
            if not isinstance(data, str):
                raise ValueError("a binary message nobody announced")
            pkt = self.packet_class(encoded_packet=data)
        except DECODE_ERRORS:
            await self._malformed(eio_sid, None, "not a socket.io packet")
            return
        kind = pkt.packet_type
        if kind == sio_packet.CONNECT:
            self._connects[eio_sid] += 1
            if self._connects[eio_sid] > MAX_CONNECTS:
                reason = f"more than {MAX_CONNECTS} CONNECT attempts"
                await self.close_connection(eio_sid, POLICY_VIOLATION, reason)
                return
        problem = packets.problem(pkt)
        if problem is not None:
            await self._malformed(eio_sid, pkt, problem)
            return
        if kind == sio_packet.CONNECT:
            await self._handle_connect(eio_sid, pkt.namespace, pkt.data)
        elif kind == sio_packet.DISCONNECT:
            await self._handle_disconnect(eio_sid, pkt.namespace, self.reason.CLIENT_DISCONNECT)
        elif kind in (sio_packet.ACK, sio_packet.BINARY_ACK):
            return  # the server never asks a client for an ack: nothing waits for it
        elif not self._joined(eio_sid):
            await self._malformed(eio_sid, pkt, "an event before a successful CONNECT")
        elif kind == sio_packet.EVENT:
            await self._handle_event(eio_sid, pkt.namespace, pkt.id, pkt.data)
        else:  # BINARY_EVENT: its attachments follow
            self._binary_packet[eio_sid] = pkt
            self._attached[eio_sid] = 0

    async def _attachment(self, eio_sid: str, pkt: Any, data: Any) -> None:
        size = self._attached.get(eio_sid, 0) + (len(data) if isinstance(data, bytes) else 0)
        self._attached[eio_sid] = size
        why = ""
        if not isinstance(data, bytes):
            why = "a binary attachment was expected"
        elif size > self.max_message_bytes:
            why = f"attachments larger than {self.max_message_bytes} bytes"
        else:
            try:
                complete = pkt.add_attachment(data)
            except DECODE_ERRORS:  # the library's own words name its internals
                why = "placeholders that do not match the packet's attachments"
        if why:
            del self._binary_packet[eio_sid]
            self._attached.pop(eio_sid, None)
            await self._malformed(eio_sid, pkt, why)
            return
        if complete:
            del self._binary_packet[eio_sid]
            self._attached.pop(eio_sid, None)
            await self._handle_event(eio_sid, pkt.namespace, pkt.id, pkt.data)

    def _joined(self, eio_sid: str) -> bool:
        sid = self.manager.sid_from_eio_sid(eio_sid, NAMESPACE)
        return sid is not None and bool(self.manager.is_connected(sid, NAMESPACE))

    async def _malformed(self, eio_sid: str, pkt: Any, problem: str) -> None:
        """Answer a malformed packet: a CONNECT with a refusal (CONNECT_ERROR, as any
        refused join: a client shows it, where a closed connection would have it
        reconnect with the same packet), an event with an error ack if it asked for one on
        a joined connection, else a close with the reason. Logged once per connection."""
        self.malformed += 1
        if eio_sid not in self._reported:
            self._reported.add(eio_sid)
            frames = FrameGuard.of(self.environ.get(eio_sid))
            address = frames.address if frames is not None else "?"
            self._throttle.info("malformed packet from %s (%s): %s", eio_sid, address, problem)
        reason = f"malformed packet: {problem}"
        kind = None if pkt is None or pkt.namespace not in (None, NAMESPACE) else pkt.packet_type
        if kind == sio_packet.CONNECT and not self._joined(eio_sid):
            refusal = self.packet_class(
                sio_packet.CONNECT_ERROR, namespace=NAMESPACE, data={"message": reason}
            )
            await self._send_packet(eio_sid, refusal)
            return
        wants_ack = kind in (sio_packet.EVENT, sio_packet.BINARY_EVENT) and pkt.id is not None
        if wants_ack and self._joined(eio_sid):
            ack = {"ok": False, "error": reason}
            await self._send_packet(
                eio_sid,
                self.packet_class(sio_packet.ACK, namespace=NAMESPACE, id=pkt.id, data=[ack]),
            )
            return
        await self.close_connection(eio_sid, PROTOCOL_ERROR, reason, log_it=False)


def _queued_bytes(socket: Any) -> int:
    """Bytes of the messages in an engine.io session's queue (a polling one's)."""
    return sum(
        len(p.data)
        for p in socket.queue._queue  # asyncio.Queue's deque
        if p is not None and isinstance(p.data, str | bytes)
    )
