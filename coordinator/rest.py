"""The REST, health and metrics endpoints: a small hand-written ASGI app, no framework.

Every response is JSON (``/metrics`` is Prometheus text). Errors are ``{"error": msg}``
with a status from ``status_for``; the log gets the detail, the client a clear message.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from . import metrics
from .auth import AuthError, verify_token
from .config import check_conversation_id
from .errors import (
    CapacityTimeout,
    ConnectionNotFound,
    ConversationNotFound,
    CoordinatorError,
    Forbidden,
    InboxFull,
    InvalidInput,
    NodeBusy,
    NodeDraining,
    RedisUnavailable,
)
from .manager import ConversationManager

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY = 256 * 1024
JSON_TYPE = "application/json"


class HttpError(Exception):
    """An error response: status code, message and extra headers."""

    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


def status_for(exc: BaseException) -> int:
    """The HTTP status of an error raised while serving a request."""
    if isinstance(exc, HttpError):
        return exc.status
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, ConversationNotFound | ConnectionNotFound):
        return 404
    if isinstance(exc, InboxFull):
        return 429
    if isinstance(exc, InvalidInput):
        return 400
    if isinstance(
        exc, NodeDraining | NodeBusy | RedisUnavailable | CapacityTimeout | RedisError | OSError
    ):
        return 503
    return 500


def client_message(exc: BaseException) -> str:
    """What a client is told about an error (never a stack trace)."""
    if isinstance(exc, HttpError):
        return exc.message
    if isinstance(exc, AuthError):
        return f"authentication failed: {exc}"
    if isinstance(exc, CoordinatorError):
        return str(exc)
    if isinstance(exc, RedisError | OSError):
        return "the coordinator cannot reach Redis right now; try again"
    return "internal error"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        """The body as a JSON object ({} when empty)."""
        if not self.body.strip():
            return {}
        try:
            value = json.loads(self.body)
        except ValueError as exc:
            raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise InvalidInput("the request body must be a JSON object")
        return value


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: list[tuple[str, str]] | None = None


def json_response(
    status: int, value: Any, headers: list[tuple[str, str]] | None = None
) -> Response:
    return Response(status, json.dumps(value).encode(), JSON_TYPE, headers)


Handler = Callable[[Request, dict[str, str]], Awaitable[Response]]


class RestApp:
    """ASGI app serving ``/api/...``, ``/healthz`` and ``/metrics`` for one node."""

    def __init__(
        self, manager: ConversationManager, secret: str, counters: metrics.Counters
    ) -> None:
        self.manager = manager
        self.secret = secret
        self.counters = counters
        conv = r"/api/conversations/(?P<sid>[^/]+)"
        self.routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = [
            (re.compile(r"/healthz"), {"GET": self.healthz}),
            (re.compile(r"/metrics"), {"GET": self.metrics}),
            (re.compile(r"/api/node"), {"GET": self.node}),
            (re.compile(r"/api/cluster"), {"GET": self.cluster}),
            (
                re.compile(r"/api/conversations/?"),
                {"GET": self.list_conversations, "POST": self.create_conversation},
            ),
            (re.compile(conv), {"GET": self.get_conversation, "DELETE": self.close_conversation}),
        ]

    # -- ASGI ------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            # A websocket outside /socket.io/: refuse the handshake.
            await send({"type": "websocket.close", "code": 1008})
            return
        try:
            body = await _read_body(scope, receive)
            request = Request(
                scope["method"].upper(),
                scope["path"],
                {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]},
                body,
            )
            response = await self.dispatch(request)
        except Exception as exc:
            response = self.error_response(exc, scope)
        await _send_response(send, response)

    def error_response(self, exc: Exception, scope: Scope) -> Response:
        status = status_for(exc)
        if status >= 500:
            log.warning(
                "%s %s failed: %r", scope.get("method"), scope.get("path"), exc, exc_info=exc
            )
        headers = list(exc.headers) if isinstance(exc, HttpError) else []
        if status == 401:
            headers.append(("www-authenticate", "Bearer"))
        return json_response(status, {"error": client_message(exc)}, headers)

    async def dispatch(self, request: Request) -> Response:
        for pattern, methods in self.routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            allow = ", ".join(sorted(methods))
            if request.method == "OPTIONS":
                return Response(204, b"", "text/plain", [("allow", allow)])
            handler = methods.get(request.method)
            if handler is None:
                raise HttpError(
                    405,
                    f"method {request.method} is not allowed here; use {allow}",
                    [("allow", allow)],
                )
            return await handler(request, match.groupdict())
        raise HttpError(404, f"no such endpoint: {request.path}")

    # -- helpers ---------------------------------------------------------------------
    def user(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        if not header:
            raise AuthError("missing token: send 'Authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
        return verify_token(token.strip(), self.secret)

    async def owned(self, sid: str, user: str) -> dict[str, Any]:
        check_conversation_id(sid)
        view = await self.manager.directory.conversation_view(sid)
        if not view:
            raise ConversationNotFound(sid)
        if view.pop("user") != user:
            raise Forbidden(sid)
        return view

    # -- endpoints -------------------------------------------------------------------
    async def healthz(self, request: Request, params: dict[str, str]) -> Response:
        m = self.manager
        problems = []
        redis_up, why = await m.directory.redis_ok() if m.started else (False, "")
        if not m.started:
            problems.append("the manager is not running")
        elif not redis_up:
            problems.append(why)
        lease = m.started and m.membership.lease_valid()
        registered = lease and redis_up and await m.directory.registered()
        if m.started and not registered:
            problems.append("this node's membership lease is not valid")
        if m.draining:
            problems.append("the node is draining")
        body: dict[str, Any] = {
            "status": "ok" if not problems else ("draining" if m.draining else "degraded"),
            "node_id": m.node_id,
            "redis": "ok" if redis_up else "down",
            "registered": registered,
            "draining": m.draining,
            "loops": len(m.local_loops()) if m.started else 0,
            "connections": len(m.local_connections()),
        }
        if problems:
            body["reason"] = "; ".join(problems)
        return json_response(503 if problems else 200, body)

    async def metrics(self, request: Request, params: dict[str, str]) -> Response:
        m = self.manager
        redis_up = m.started and (await m.directory.redis_ok())[0]
        lease = m.started and m.membership.lease_valid()
        samples = metrics.node_samples(
            self.counters,
            loops=len(m.local_loops()) if m.started else 0,
            connections=len(m.local_connections()),
            redis_up=redis_up,
            lease_valid=lease,
            speculated=m.metrics.speculative_dispatches,
            speculations_lost=m.metrics.speculations_lost,
        )
        return Response(200, metrics.render(m.node_id, samples).encode(), metrics.CONTENT_TYPE)

    async def node(self, request: Request, params: dict[str, str]) -> Response:
        self.user(request)
        m = self.manager
        return json_response(
            200,
            {
                "node_id": m.node_id,
                "incarnation": m.inc if m.started else "",
                "draining": m.draining,
                "loops": sorted(m.local_loops()) if m.started else [],
                "connections": len(m.local_connections()),
            },
        )

    async def cluster(self, request: Request, params: dict[str, str]) -> Response:
        self.user(request)
        return json_response(200, await self.manager.directory.cluster_view())

    async def list_conversations(self, request: Request, params: dict[str, str]) -> Response:
        user = self.user(request)
        convs = await self.manager.directory.list_conversations(user)
        return json_response(200, {"conversations": convs})

    async def get_conversation(self, request: Request, params: dict[str, str]) -> Response:
        user = self.user(request)
        return json_response(200, await self.owned(params["sid"], user))

    async def create_conversation(self, request: Request, params: dict[str, str]) -> Response:
        user = self.user(request)
        body = request.json()
        sid = body.get("conversation_id")
        sid = uuid.uuid4().hex if sid is None else check_conversation_id(sid)
        text = body.get("initial_user_msg")
        if text is not None and not isinstance(text, str):
            raise InvalidInput("initial_user_msg must be a string")
        first = None if text is None else {"action": "message", "args": {"content": text}}
        if self.manager.draining:
            raise NodeDraining(f"node {self.manager.node_id} is draining; use another node")
        existed = bool(await self.manager.conversation(sid))
        info = await self.manager.maybe_start_agent_loop(sid, {}, user, initial_user_msg=first)
        if first is not None:
            self.counters.actions_accepted += 1
        return json_response(
            200 if existed else 201,
            {"conversation_id": sid, "running": info.running, "owner": info.owner},
        )

    async def close_conversation(self, request: Request, params: dict[str, str]) -> Response:
        user = self.user(request)
        sid = check_conversation_id(params["sid"])
        closed = await self.manager.close_session(sid, user)
        return json_response(200, {"closed": closed})


async def _read_body(scope: Scope, receive: Receive) -> bytes:
    declared = dict(scope.get("headers", [])).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise HttpError(413, f"the request body is larger than {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise HttpError(413, f"the request body is larger than {MAX_BODY} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _send_response(send: Send, response: Response) -> None:
    headers = [
        (b"content-type", response.content_type.encode()),
        (b"content-length", str(len(response.body)).encode()),
        (b"access-control-allow-origin", b"*"),
        (b"access-control-allow-headers", b"authorization, content-type"),
        (b"cache-control", b"no-store"),
    ]
    headers += [(k.encode(), v.encode()) for k, v in response.headers or []]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
