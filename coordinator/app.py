"""The socket.io ASGI app of one node, compatible with OpenHands' frontend protocol.

Connect with query parameters ``conversation_id`` (required) and ``latest_event_id``
(optional; -1 or absent replays everything) and a token in ``auth={"token": ...}`` or
the ``token`` query parameter; the agent's settings (a JSON object, used if this join
starts the loop) go in ``auth={"settings": {...}}`` or the ``settings`` query parameter.
The server emits ``oh_event``; the client emits ``oh_user_action`` and gets the ack
``{"ok": True, "id": n}`` or ``{"ok": False, "error": msg}`` (with ``retry_after`` when
a rate limit refused it). Everything that is not ``/socket.io/`` goes to the REST app,
which also serves the browser pages (``pages.py``). In front of both, the ``Edge``
(edge.py) attributes requests to clients and guards websocket frames; the socket.io
server (sioserver.py) checks every packet; the handlers are in handlers.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import socketio
from starlette.types import ASGIApp

from . import codec, redact
from .auth import TokenVerifier, as_verifier
from .config import ManagerConfig
from .connlimits import ConnectionGuard
from .edge import POLICY_VIOLATION, Edge
from .errors import ConfigError
from .handlers import NAMESPACE, SocketHandlers
from .http import Origins
from .manager import ConversationManager
from .metrics import NodeMetrics
from .pages import Pages
from .quotas import Quotas
from .ratelimit import LogThrottle
from .rest import RestApp
from .rooms import IndexedRoomsManager
from .serverconfig import ServerConfig
from .sioserver import GuardedServer
from .tasks import TaskSet

log = logging.getLogger(__name__)

STALLED = 10.0  # seconds a replay waits for a client to take half its backlog before dropping it


class SocketSink:
    """The manager's EventSink: emits each event as ``oh_event`` to its connection.

    Create it first, hand it to the manager, then ``create_app`` binds its ``sio`` and
    the manager's metrics.
    """

    def __init__(self) -> None:
        self.sio: GuardedServer | None = None
        self.metrics: NodeMetrics | None = None
        # Connection -> wall-clock time its join began. Events stamped before it are a
        # replay the client asked for, not delivery lag; only later ones are observed.
        self._since: dict[str, float] = {}
        self._encoded: tuple[object, Any] = (None, None)  # the last event and its packet

    def bind(self, sio: GuardedServer, metrics: NodeMetrics) -> None:
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
        backlog = sio.backlogged(eio_sid)
        if backlog is not None:
            # A client that does not read: drop it rather than queue without bound. It
            # reconnects with latest_event_id and gets everything from the log.
            reason = f"{backlog}; reconnect to catch up"
            await sio.close_connection(eio_sid, POLICY_VIOLATION, reason, now=True)
            return
        # What ``sio.emit(..., to=connection_id)`` sends, without the task per recipient
        # it creates and awaits: one packet straight to the connection (``send_part``). Events
        # are JSON, so the packet skips socket.io's recursive scan for binary data (a
        # third of the delivery's time); one that is not (bytes in it) goes out binary.
        # An event going to several connections in turn is the same object each time
        # (catchup.py): encoded once (a 60 KB event to 31 connections cost 30-40 ms).
        if event is self._encoded[0]:
            encoded = self._encoded[1]
        else:
            data = ["oh_event", event]
            try:
                encoded = sio.packet_class(
                    socketio.packet.EVENT, namespace=NAMESPACE, data=data, binary=False
                ).encode()
            except TypeError:
                encoded = sio.packet_class(
                    socketio.packet.EVENT, namespace=NAMESPACE, data=data
                ).encode()
            self._encoded = (event, encoded)
        for part in encoded if isinstance(encoded, list) else (encoded,):
            await sio.send_part(eio_sid, part)
        # Counting is an integer increment; the lag histogram costs ~2 us (the
        # timestamp's fromisoformat 0.7, prometheus_client's observe 1.4).
        metrics.deliveries += 1
        since = self._since.get(connection_id)
        if since is not None:
            created = codec.stamped_at(event)
            if created is not None and created >= since:
                # Across nodes this includes their clock skew; never below zero.
                metrics.delivery_lag_seconds.observe(max(0.0, time.time() - created))

    async def room(self, connection_id: str) -> bool:
        """Return once the connection has room for more events (a replay waits for a
        client that reads slowly): True; False when it is gone (its client closed it, or
        it took less than half its backlog in STALLED seconds and was dropped here: it
        reconnects and replays from where it is)."""
        sio = self.sio
        if sio is None:
            return True
        eio_sid = sio.manager.eio_sid_from_sid(connection_id, NAMESPACE)
        if eio_sid is None or sio.gone(eio_sid):
            return False
        if not sio.backlogged(eio_sid, half=True):
            return True
        deadline = time.monotonic() + STALLED
        # engine.io's queue has no event for "drained below": poll it while we wait.
        while sio.backlogged(eio_sid, half=True):
            if sio.gone(eio_sid):
                return False
            if time.monotonic() > deadline:
                reason = f"read too slowly for {STALLED:g}s; reconnect to catch up"
                await sio.close_connection(eio_sid, POLICY_VIOLATION, reason, now=True)
                return False
            await asyncio.sleep(0.05)
        return True

    async def disconnect(self, connection_id: str) -> None:
        if self.sio is not None:
            await self.sio.disconnect(connection_id, namespace=NAMESPACE)


def new_manager(config: ManagerConfig) -> ConversationManager:
    """A manager (not started) whose sink is a fresh SocketSink, ready for ``create_app``
    (which binds the sink to the socket.io server and to ``manager.metrics``)."""
    return ConversationManager(config, sink=SocketSink())


def create_app(
    manager: ConversationManager,
    auth: str | TokenVerifier,
    *,
    config: ServerConfig | None = None,
    tasks: TaskSet | None = None,
    guard: ConnectionGuard | None = None,
    origins: Origins | None = None,
) -> tuple[ASGIApp, GuardedServer]:
    """The node's ASGI app (socket.io at ``/socket.io/``, REST elsewhere, behind the
    ``Edge``) and its socket.io server.

    The manager's sink should be a ``SocketSink`` (see ``new_manager``); it is bound to
    the new socket.io server here. A manager with another sink gets a SocketSink.
    ``auth`` verifies clients' tokens; a string is the secret of HS256 tokens. ``config``
    sets the limits clients are held to (``ServerConfig()`` by default); ``tasks`` owns
    the background work the socket.io server starts (closing connections that never
    joined); the caller stops it (``NodeServer`` does). ``guard`` counts the node's
    connections (the one its HTTP protocols use; a fresh one by default); ``origins``
    the browser origins it serves (by default its own and ``config.cors_origins``).
    """
    config = config or ServerConfig()
    origins = origins or Origins(config.cors_origins)
    tokens = as_verifier(auth)
    tokens.revoked = manager.revocations.revoked  # every entry point refuses those
    sio = GuardedServer(
        config=config,
        max_message_bytes=config.message_bytes(manager.config.max_action_bytes),
        tasks=TaskSet(log) if tasks is None else tasks,  # an empty one is falsy
        client_manager=IndexedRoomsManager(),
        async_mode="asgi",
        # None: same origin only (the Origin header must name this host), for browsers.
        cors_allowed_origins=origins.for_socketio,
        transports=["polling", "websocket"] if config.allow_polling else ["websocket"],
        # One client's events are handled in the order it sent them.
        async_handlers=False,
        logger=_quiet_logger("coordinator.socketio"),
        engineio_logger=_quiet_logger("coordinator.engineio"),
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
    quotas = Quotas(config, lambda: manager.state)
    SocketHandlers(sio, manager, tokens, sink, manager.metrics, quotas).register()
    pages = Pages(manager, tokens, quotas, origins)
    rest = RestApp(
        manager,
        tokens,
        manager.metrics,
        quotas=quotas,
        origins=origins,
        extra_routes=pages.routes(),
    )
    guard = ConnectionGuard(config) if guard is None else guard  # an empty one is falsy
    read_edge(manager.metrics, guard, sio, quotas)
    app = Edge(socketio.ASGIApp(sio, other_asgi_app=rest), config, guard, origins)
    return app, sio


def _quiet_logger(name: str) -> logging.Logger:
    """A logger for python-socketio/engine.io: warnings and errors only (their INFO
    lines quote every packet), through the application's handlers, with no secrets, at
    most 2 lines a second (``_Throttled``)."""
    logger = logging.getLogger(name)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    redact.install((name,))
    if not any(isinstance(f, _Throttled) for f in logger.filters):
        logger.addFilter(_Throttled(logger))
    return logger


class _Throttled(logging.Filter):
    """At most 2 records a second (20 at once), the rest counted into the next one:
    what a client sends decides how often these libraries log (a polling POST they
    cannot decode wrote an ERROR traceback each, a megabyte of log a second)."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self._throttle = LogThrottle(logger)

    def filter(self, record: logging.LogRecord) -> bool:
        said = self._throttle.allow()
        if said:
            record.msg = f"{record.msg}{said}"
        return said is not None


def read_edge(
    metrics: NodeMetrics, guard: ConnectionGuard, sio: GuardedServer, quotas: Quotas
) -> None:
    """The edge's metrics, read at each scrape."""
    metrics.gauge_from(
        "coordinator_open_connections", "TCP connections this node holds open.", lambda: len(guard)
    )
    metrics.counter_from(
        "coordinator_connections_refused_total",
        "Connections refused over the node's or an address's limit.",
        lambda: sum(guard.refused.values()),
    )
    metrics.counter_from(
        "coordinator_malformed_packets_total",
        "socket.io packets refused as malformed.",
        lambda: sio.malformed,
    )
    metrics.counter_from(
        "coordinator_rate_limited_total",
        "Client requests refused by a rate limit or quota.",
        lambda: sum(quotas.refused.values()),
    )
