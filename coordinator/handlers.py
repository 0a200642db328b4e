"""The socket.io event handlers of one node: connect (authenticate and join), actions,
unknown events, disconnect.

Every way a handler can end leaves nothing behind: a join that fails, is refused or is
cancelled is undone before the client hears about it; a connection whose client left
while it joined is forgotten; a disconnect forgets the connection here and in Redis (or
defers the Redis part until Redis answers). Every client event is answered: an ack with
``{"ok": true, "id": n}`` or ``{"ok": false, "error": ...}`` (plus ``retry_after`` when a
rate limit refused it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import socketio

from . import codec
from .auth import AuthError, TokenVerifier
from .errors import (
    EXPECTED,
    REDIS_TROUBLE,
    CapacityTimeout,
    ConcurrencyLimitReached,
    ConnectionNotFound,
    ConversationClosed,
    Forbidden,
    InvalidInput,
    LimitExceeded,
    NodeBusy,
    NodeDraining,
    NodeStopped,
    redis_refused,
    unexpected,
)
from .http import client_message
from .inputs import (
    MAX_EVENT_ID,
    check_connection_id,
    check_conversation_id,
    check_settings,
    given_once,
    parse_int,
    parse_settings,
)
from .joined import Joined
from .manager import ConversationManager
from .metrics import NodeMetrics
from .quotas import Quotas
from .ratelimit import LogThrottle
from .sioserver import GuardedServer

if TYPE_CHECKING:
    from .app import SocketSink

log = logging.getLogger(__name__)

NAMESPACE = "/"
ACTION_EVENT = "oh_user_action"


def _once(query: Mapping[str, list[str]], name: str) -> str | None:
    return given_once(name, query.get(name, ()))


def parse_latest_event_id(raw: str | None) -> int | None:
    """``latest_event_id`` from the query: None (replay all) for absent or -1."""
    if raw is None or raw == "":
        return None
    value = parse_int("latest_event_id (-1 for everything)", raw, -1, MAX_EVENT_ID)
    return None if value == -1 else value


# Why a join was refused, for ``coordinator_joins_refused_total``: the first class that
# matches names it (anything else: "error", which is also logged).
REFUSAL_REASONS: tuple[tuple[type[Exception] | tuple[type[Exception], ...], str], ...] = (
    (NodeBusy, "busy"),
    (NodeDraining, "draining"),
    (AuthError, "auth"),
    (Forbidden, "forbidden"),
    ((LimitExceeded, CapacityTimeout), "limit"),
    (InvalidInput, "invalid"),
    (ConversationClosed, "closed"),
    (REDIS_TROUBLE, "redis"),  # after the others: a CapacityTimeout is an OSError too
)


def refusal_reason(exc: Exception) -> str:
    if redis_refused(exc):
        return "error"  # not Redis away: see errors.redis_refused
    for kinds, reason in REFUSAL_REASONS:
        if isinstance(exc, kinds):
            return reason
    return "error"


def refusal_ack(exc: BaseException) -> dict[str, Any]:
    """The ack of an action that was not accepted."""
    ack: dict[str, Any] = {"ok": False, "error": client_message(exc)}
    if isinstance(exc, ConcurrencyLimitReached):  # as the REST 429 body
        ack.update(exc.details())
    if isinstance(exc, LimitExceeded) and exc.retry_after is not None:
        ack["retry_after"] = exc.retry_after
    return ack


class SocketHandlers:
    """The socket.io event handlers of one node."""

    def __init__(
        self,
        sio: GuardedServer,
        manager: ConversationManager,
        tokens: TokenVerifier,
        sink: SocketSink,
        metrics: NodeMetrics,
        quotas: Quotas,
    ) -> None:
        self.sio = sio
        self.manager = manager
        self.tokens = tokens
        self.sink = sink
        self.metrics = metrics
        self.quotas = quotas
        self._joined = Joined(self._expired, sio.tasks)
        self.expired = 0  # connections ended as their token expired
        self.revoked_ends = 0  # ... as their user's tokens were revoked
        manager.revocations.on_revoked = self._revoked
        self._refusals = LogThrottle(log)  # a flood of refused joins is not a flood of lines
        self.refused: Counter[str] = Counter()  # joins refused, by reason
        metrics.counters_from(
            "coordinator_joins_refused",
            "Joins (socket.io connects) refused, by reason: busy (max_concurrent_joins "
            "taken for longer than join_wait), draining (the node stops or lost its lease), "
            "auth, forbidden, limit, invalid, closed, redis (away), error (a bug, or Redis "
            "refusing the command itself).",
            "reason",
            lambda: dict(self.refused),
        )
        metrics.counter_from(
            "coordinator_tokens_expired",
            "socket.io connections ended because their token expired (its exp passed).",
            lambda: self.expired,
        )
        metrics.counter_from(
            "coordinator_tokens_revoked",
            "socket.io connections ended because their user's tokens were revoked.",
            lambda: self.revoked_ends,
        )

    def register(self) -> None:
        self.sio.on("connect", self.connect, namespace=NAMESPACE)
        self.sio.on(ACTION_EVENT, self.oh_user_action, namespace=NAMESPACE)
        self.sio.on("*", self.unknown_event, namespace=NAMESPACE)
        self.sio.on("disconnect", self.disconnect, namespace=NAMESPACE)

    async def connect(self, connection_id: str, environ: Mapping[str, Any], auth: Any) -> bool:
        started = time.perf_counter()
        try:
            return await self._join(connection_id, environ, auth)
        finally:
            self.metrics.join_seconds.observe(time.perf_counter() - started)

    async def _join(self, connection_id: str, environ: Mapping[str, Any], auth: Any) -> bool:
        query = parse_qs(str(environ.get("QUERY_STRING", "")), keep_blank_values=True)
        joined = False
        user = ""
        try:
            token = auth.get("token") if isinstance(auth, dict) else None
            if token is None:
                token = _once(query, "token")
            who = self.tokens.verify(token)
            user = who.user
            raw_conversation = _once(query, "conversation_id")
            if raw_conversation is None:
                raise InvalidInput("the conversation_id query parameter is required")
            conversation = check_conversation_id(raw_conversation)
            latest = parse_latest_event_id(_once(query, "latest_event_id"))
            if isinstance(auth, dict) and auth.get("settings") is not None:
                settings = check_settings(auth["settings"])
            else:
                settings = parse_settings(_once(query, "settings"))
            check_connection_id(connection_id)
            await self.quotas.join(user)
            self.sink.joining(connection_id)
            await self.manager.join_conversation(
                conversation, connection_id, settings, user, latest, who.org
            )
            joined = True
        except asyncio.CancelledError:
            # python-socketio takes a cancelled connect handler for a success: undo the
            # join and refuse instead (the node is stopping; the client reconnects).
            await self._forget(connection_id, True)
            self.refused["draining"] += 1
            raise socketio.exceptions.ConnectionRefusedError(
                "the node is shutting down; reconnect"
            ) from None
        except Exception as exc:
            await self._forget(connection_id, joined)
            self.refused[refusal_reason(exc)] += 1
            message = self._refusal(exc)
            # Whom to block, if it comes to that: the address, and the user once known.
            address = str(((environ.get("asgi.scope") or {}).get("client") or ("?",))[0])
            self._refusals.info(
                "connection %s from %s%s refused: %s",
                connection_id,
                address,
                f" (user {user!r})" if user else "",
                message,
            )
            if isinstance(exc, LimitExceeded):
                # Nothing to try again on this session: it ends after the refusal.
                eio_sid = self.sio.manager.eio_sid_from_sid(connection_id, NAMESPACE)
                if eio_sid is not None:
                    self.sio.tasks.spawn(self.sio.end_session(eio_sid), "refused")
            if isinstance(exc, ConcurrencyLimitReached):
                raise socketio.exceptions.ConnectionRefusedError(message, exc.details()) from None
            if isinstance(exc, LimitExceeded) and exc.retry_after is not None:
                raise socketio.exceptions.ConnectionRefusedError(
                    message, {"retry_after": exc.retry_after}
                ) from None
            raise socketio.exceptions.ConnectionRefusedError(message) from None
        if not self._transport_open(connection_id):
            # The client went away while we joined; no disconnect event will follow.
            await self._forget(connection_id, True)
            return False
        self._joined.add(connection_id, who)
        if self.manager.revocations.revoked(who):  # while it joined: ended as the others
            self.sio.tasks.spawn(self._end_revoked([connection_id]), "revoked token")
        self.quotas.opened(connection_id)
        log.debug("connection %s joined %s as %s", connection_id, conversation, user)
        return True

    def _refusal(self, exc: Exception) -> str:
        if isinstance(exc, AuthError):
            return f"authentication failed: {exc}"
        if isinstance(exc, Forbidden):
            return f"forbidden: {exc}"
        if unexpected(exc):
            log.error("join failed unexpectedly", exc_info=exc)
        return client_message(exc)

    def _transport_open(self, connection_id: str) -> bool:
        eio_sid = self.sio.manager.eio_sid_from_sid(connection_id, NAMESPACE)
        socket = self.sio.eio.sockets.get(eio_sid) if eio_sid is not None else None
        return socket is not None and not socket.closed and not socket.closing

    async def _forget(self, connection_id: str, joined: bool = True) -> None:
        self.sink.left(connection_id)
        self.quotas.closed(connection_id)
        self._joined.pop(connection_id)
        if not joined or not self.manager.started:
            return  # a node that stopped forgot its connections itself
        try:
            await self.manager.disconnect_from_session(connection_id)
        except EXPECTED as exc:
            log.warning("could not forget connection %s: %s", connection_id, exc)

    async def oh_user_action(self, connection_id: str, *args: Any) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            if len(args) != 1:
                raise InvalidInput(f"{ACTION_EVENT} takes one argument, the action")
            who = self._joined.get(connection_id)
            if who is not None and who.expires <= time.time():  # it ends in joined.SCAN_EVERY
                raise AuthError("token expired; reconnect with a fresh token")
            if who is not None and self.manager.revocations.revoked(who):  # it ends soon
                raise AuthError("token revoked; sign in again")
            try:
                user = who.user if who is not None else None
                await self.quotas.action(connection_id, user, args[0])
                event_id = await self.manager.send_to_event_stream(connection_id, args[0])
            except (ConnectionNotFound, NodeStopped) as exc:
                if isinstance(exc, ConnectionNotFound) and not self.manager.draining:
                    raise
                # Forgotten by the drain's farewell, its disconnect on the way, or the
                # node stopped (a drain that ran out of time ends with its clients still
                # connected): the client is to send it again where it reconnects.
                raise NodeDraining(
                    f"node {self.manager.node_id} is shutting down; reconnect and send it again"
                ) from None
        except Exception as exc:
            if unexpected(exc):
                log.error("action from %s failed unexpectedly", connection_id, exc_info=exc)
            else:
                log.debug("action from %s rejected: %s", connection_id, exc)
            ack = refusal_ack(exc)
        else:
            self.metrics.actions += 1
            ack = {"ok": True, "id": event_id}
        self.metrics.ack_seconds.observe(time.perf_counter() - started)
        return ack

    async def unknown_event(self, event: str, connection_id: str, *args: Any) -> dict[str, Any]:
        """Any other event: answered (a client waiting for its ack is not left hanging),
        and counted against the connection's rate like an action."""
        try:
            await self.quotas.action(connection_id, self._joined.user(connection_id))
        except LimitExceeded as exc:
            return refusal_ack(exc)
        return {"ok": False, "error": f"unknown event {event[:64]!r}; send {ACTION_EVENT}"}

    async def disconnect(self, connection_id: str, reason: Any = None) -> None:
        await self._forget(connection_id)

    async def _expired(self, connections: list[str]) -> None:
        """Tell these connections their token expired, and disconnect them."""
        message = "Your token expired; reconnect with a fresh one to continue."
        self.expired += await self._end(connections, codec.TOKEN_EXPIRED, message)

    def _revoked(self, users: set[str]) -> None:
        """Some users' tokens were revoked: end their connections holding one."""
        revoked = self.manager.revocations.revoked
        ending = [cid for cid, who in self._joined.items() if who.user in users and revoked(who)]
        if ending:
            self.sio.tasks.spawn(self._end_revoked(ending), "revoked tokens")

    async def _end_revoked(self, connections: list[str]) -> None:
        message = "Your token was revoked; sign in again to continue."
        self.revoked_ends += await self._end(connections, codec.TOKEN_REVOKED, message)

    async def _end(self, connections: list[str], code: str, message: str) -> int:
        """Tell these connections ``message`` (status update ``code``) and disconnect
        them; how many were still joined."""
        update = codec.status_update(code, message)
        ended = 0
        for connection_id in connections:
            if self._joined.get(connection_id) is None:
                continue  # it left meanwhile
            ended += 1
            with contextlib.suppress(Exception):
                await self.sink.deliver(connection_id, update)
            with contextlib.suppress(Exception):
                await self.sink.disconnect(connection_id)  # its disconnect handler forgets it
        return ended
