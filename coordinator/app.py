"""The socket.io ASGI app of one node, compatible with OpenHands' frontend protocol.

Connect with query parameters ``conversation_id`` (required) and ``latest_event_id``
(optional; -1 or absent replays everything) and a token in ``auth={"token": ...}`` or
the ``token`` query parameter; the agent's settings (a JSON object, used if this join
starts the loop) go in ``auth={"settings": {...}}`` or the ``settings`` query parameter.
The server emits ``oh_event``; the client emits ``oh_user_action`` and gets the ack
``{"ok": True, "id": n}`` or ``{"ok": False, "error": msg}``. Everything that is not
``/socket.io/`` goes to the REST app, which also serves the browser pages (``pages.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

import socketio

from . import codec
from .auth import AuthError, TokenVerifier, as_verifier
from .config import (
    ManagerConfig,
    check_connection_id,
    check_conversation_id,
    check_settings,
    parse_settings,
)
from .errors import EXPECTED, ConfigError, Forbidden, InvalidInput
from .manager import ConversationManager
from .metrics import NodeMetrics
from .pages import Pages
from .rest import RestApp, client_message
from .rooms import IndexedRoomsManager

log = logging.getLogger(__name__)

NAMESPACE = "/"
# Largest engine.io message a client may send; larger ones close the connection. Actions
# above the manager's max_action_bytes (64 KiB by default) get a clear error in the ack.
MAX_MESSAGE_BYTES = 1_000_000


class SocketSink:
    """The manager's EventSink: emits each event as ``oh_event`` to its connection.

    Create it first, hand it to the manager, then ``create_app`` binds its ``sio`` and
    the manager's metrics.
    """

    def __init__(self) -> None:
        self.sio: socketio.AsyncServer | None = None
        self.metrics: NodeMetrics | None = None
        # Connection -> wall-clock time its join began. Events stamped before it are a
        # replay the client asked for, not delivery lag; only later ones are observed.
        self._since: dict[str, float] = {}

    def bind(self, sio: socketio.AsyncServer, metrics: NodeMetrics) -> None:
        self.sio = sio
        self.metrics = metrics

    def joining(self, connection_id: str) -> None:
        """A connection starts joining: events stamped from now on count as lag."""
        self._since[connection_id] = time.time()

    def left(self, connection_id: str) -> None:
        self._since.pop(connection_id, None)

    async def deliver(self, connection_id: str, event: dict[str, Any]) -> None:
        sio, metrics = self.sio, self.metrics
        if sio is None or metrics is None:
            log.warning("event for %s dropped: the socket.io server is not bound", connection_id)
            return
        eio_sid = sio.manager.eio_sid_from_sid(connection_id, NAMESPACE)
        if eio_sid is None:
            return  # disconnected meanwhile; its disconnect handler cleans up
        # What ``sio.emit(..., to=connection_id)`` sends, without the task per recipient
        # it creates and awaits: one packet straight onto the connection's queue. Events
        # are JSON, so the packet skips socket.io's recursive scan for binary data (a
        # third of the delivery's time); one that is not (bytes in it) goes out binary.
        data = ["oh_event", event]
        try:
            encoded = sio.packet_class(
                socketio.packet.EVENT, namespace=NAMESPACE, data=data, binary=False
            ).encode()
        except TypeError:
            encoded = sio.packet_class(
                socketio.packet.EVENT, namespace=NAMESPACE, data=data
            ).encode()
        for part in encoded if isinstance(encoded, list) else (encoded,):
            await sio.eio.send(eio_sid, part)
        # Counting is an integer increment; the lag histogram costs ~2 us (the
        # timestamp's fromisoformat 0.7, prometheus_client's observe 1.4).
        metrics.deliveries += 1
        since = self._since.get(connection_id)
        if since is not None:
            created = codec.stamped_at(event)
            if created is not None and created >= since:
                # Across nodes this includes their clock skew; never below zero.
                metrics.delivery_lag_seconds.observe(max(0.0, time.time() - created))

    async def disconnect(self, connection_id: str) -> None:
        if self.sio is not None:
            await self.sio.disconnect(connection_id, namespace=NAMESPACE)


def new_manager(config: ManagerConfig) -> ConversationManager:
    """A manager (not started) whose sink is a fresh SocketSink, ready for ``create_app``
    (which binds the sink to the socket.io server and to ``manager.metrics``)."""
    return ConversationManager(config, sink=SocketSink())


def _first(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def parse_latest_event_id(raw: str | None) -> int | None:
    """``latest_event_id`` from the query: None (replay all) for absent or -1."""
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(
            f"latest_event_id must be an integer (-1 for everything), got {raw!r}"
        ) from None
    if value < -1:
        raise InvalidInput(f"latest_event_id must be >= -1, got {value}")
    return None if value == -1 else value


class SocketHandlers:
    """The socket.io event handlers of one node."""

    def __init__(
        self,
        sio: socketio.AsyncServer,
        manager: ConversationManager,
        tokens: TokenVerifier,
        sink: SocketSink,
        metrics: NodeMetrics,
    ) -> None:
        self.sio = sio
        self.manager = manager
        self.tokens = tokens
        self.sink = sink
        self.metrics = metrics

    def register(self) -> None:
        self.sio.on("connect", self.connect, namespace=NAMESPACE)
        self.sio.on("oh_user_action", self.oh_user_action, namespace=NAMESPACE)
        self.sio.on("disconnect", self.disconnect, namespace=NAMESPACE)

    async def connect(self, connection_id: str, environ: Mapping[str, Any], auth: Any) -> bool:
        started = time.perf_counter()
        try:
            return await self._join(connection_id, environ, auth)
        finally:
            self.metrics.join_seconds.observe(time.perf_counter() - started)

    async def _join(self, connection_id: str, environ: Mapping[str, Any], auth: Any) -> bool:
        query = parse_qs(str(environ.get("QUERY_STRING", "")), keep_blank_values=True)
        token = auth.get("token") if isinstance(auth, dict) else None
        if token is None:
            token = _first(query, "token")
        joined = False
        try:
            user = self.tokens.user(token)
            raw_conversation = _first(query, "conversation_id")
            if raw_conversation is None:
                raise InvalidInput("the conversation_id query parameter is required")
            conversation = check_conversation_id(raw_conversation)
            latest = parse_latest_event_id(_first(query, "latest_event_id"))
            if isinstance(auth, dict) and auth.get("settings") is not None:
                settings = check_settings(auth["settings"])
            else:
                settings = parse_settings(_first(query, "settings"))
            check_connection_id(connection_id)
            self.sink.joining(connection_id)
            await self.manager.join_conversation(
                conversation, connection_id, settings, user, latest
            )
            joined = True
        except Exception as exc:
            if joined:
                await self._forget(connection_id)
            self.sink.left(connection_id)
            message = self._refusal(exc)
            log.info("connection %s refused: %s", connection_id, message)
            raise socketio.exceptions.ConnectionRefusedError(message) from None
        if not self._transport_open(connection_id):
            # The client went away while we joined; no disconnect event will follow.
            await self._forget(connection_id)
            return False
        log.debug("connection %s joined %s as %s", connection_id, conversation, user)
        return True

    def _refusal(self, exc: Exception) -> str:
        if isinstance(exc, AuthError):
            return f"authentication failed: {exc}"
        if isinstance(exc, Forbidden):
            return f"forbidden: {exc}"
        if not isinstance(exc, EXPECTED):
            log.error("join failed unexpectedly", exc_info=exc)
        return client_message(exc)

    def _transport_open(self, connection_id: str) -> bool:
        eio_sid = self.sio.manager.eio_sid_from_sid(connection_id, NAMESPACE)
        socket = self.sio.eio.sockets.get(eio_sid) if eio_sid is not None else None
        return socket is not None and not socket.closed and not socket.closing

    async def _forget(self, connection_id: str) -> None:
        self.sink.left(connection_id)
        try:
            await self.manager.disconnect_from_session(connection_id)
        except EXPECTED as exc:
            log.warning("could not forget connection %s: %s", connection_id, exc)

    async def oh_user_action(self, connection_id: str, data: Any = None) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            event_id = await self.manager.send_to_event_stream(connection_id, data)
        except Exception as exc:
            if not isinstance(exc, EXPECTED):
                log.error("action from %s failed unexpectedly", connection_id, exc_info=exc)
            else:
                log.info("action from %s rejected: %s", connection_id, exc)
            ack: dict[str, Any] = {"ok": False, "error": client_message(exc)}
        else:
            self.metrics.actions += 1
            ack = {"ok": True, "id": event_id}
        self.metrics.ack_seconds.observe(time.perf_counter() - started)
        return ack

    async def disconnect(self, connection_id: str, reason: Any = None) -> None:
        await self._forget(connection_id)


def create_app(
    manager: ConversationManager,
    auth: str | TokenVerifier,
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> tuple[socketio.ASGIApp, socketio.AsyncServer]:
    """The node's ASGI app (socket.io at ``/socket.io/``, REST elsewhere) and its server.

    The manager's sink should be a ``SocketSink`` (see ``new_manager``); it is bound to
    the new socket.io server here. A manager with another sink gets a SocketSink.
    ``auth`` verifies clients' tokens; a string is the secret of HS256 tokens.
    """
    tokens = as_verifier(auth)
    sio = socketio.AsyncServer(
        client_manager=IndexedRoomsManager(),
        async_mode="asgi",
        cors_allowed_origins="*",
        max_http_buffer_size=max_message_bytes,
        # One client's events are handled in the order it sent them.
        async_handlers=False,
        logger=False,
        engineio_logger=False,
    )
    sink = manager.sink
    if not isinstance(sink, SocketSink):
        if manager.started:  # its node delivers to the sink it started with
            raise ConfigError(
                "create_app needs a manager made with a SocketSink (app.new_manager) "
                "or one not started yet"
            )
        sink = SocketSink()
        manager.sink = sink
    sink.bind(sio, manager.metrics)
    SocketHandlers(sio, manager, tokens, sink, manager.metrics).register()
    pages = Pages(manager, tokens)
    rest = RestApp(manager, tokens, manager.metrics, extra_routes=pages.routes())
    return socketio.ASGIApp(sio, other_asgi_app=rest), sio
