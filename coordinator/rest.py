"""The REST, health and metrics endpoints of one node, routed by Starlette.

Every response is JSON (``/metrics`` is Prometheus text) and carries ``COMMON_HEADERS``.
Errors are ``{"error": msg}`` with a status from ``status_for``; the log gets the detail,
the client a clear message. Each path answers OPTIONS (204) and refuses other methods
(405) itself, with an ``allow`` header naming exactly its methods: Starlette's own method
matching would also serve HEAD on every GET path and list ``allow`` in no fixed order.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, Router
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketClose

from .auth import AuthError, Identity, TokenVerifier
from .config import check_conversation_id, check_settings
from .errors import (
    REDIS_TROUBLE,
    CapacityTimeout,
    ConnectionNotFound,
    ConversationNotFound,
    CoordinatorError,
    Forbidden,
    InboxFull,
    InvalidInput,
    NodeBusy,
    NodeDraining,
    NotReplicated,
    RedisUnavailable,
)
from .manager import ConversationManager
from .metrics import CONTENT_TYPE, NodeMetrics

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
COMMON_HEADERS = {
    "access-control-allow-origin": "*",
    "access-control-allow-headers": "authorization, content-type",
    "cache-control": "no-store",
}
# A websocket handshake outside /socket.io/ is refused with "policy violation".
WS_POLICY_VIOLATION = 1008


def status_for(exc: BaseException) -> int:
    """The HTTP status of an error raised while serving a request."""
    if isinstance(exc, HTTPException):
        return exc.status_code
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
    unavailable = NodeDraining | NodeBusy | RedisUnavailable | CapacityTimeout | NotReplicated
    if isinstance(exc, unavailable) or isinstance(exc, REDIS_TROUBLE):  # noqa: SIM101
        return 503
    return 500


def client_message(exc: BaseException) -> str:
    """What a client is told about an error (never a stack trace)."""
    if isinstance(exc, HTTPException):
        return exc.detail
    if isinstance(exc, AuthError):
        return f"authentication failed: {exc}"
    if isinstance(exc, CoordinatorError):
        return str(exc)
    if isinstance(exc, REDIS_TROUBLE):
        return "the coordinator cannot reach Redis right now; try again"
    return "internal error"


def json_response(
    status: int, value: Any, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(value, status, {**COMMON_HEADERS, **(headers or {})})


def error_response(exc: Exception, request: Request) -> JSONResponse:
    """``{"error": msg}`` for an exception; the log gets server errors in full."""
    status = status_for(exc)
    if status >= 500:
        log.warning("%s %s failed: %r", request.method, request.scope["path"], exc, exc_info=exc)
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    return json_response(status, {"error": client_message(exc)}, headers)


Handler = Callable[[Request], Awaitable[Response]]


class Resource:
    """One path's handlers by method, as the ASGI app of a Starlette ``Route``."""

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self.handlers = dict(handlers)
        self.allow = ", ".join(sorted(self.handlers))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response: Response
        if request.method == "OPTIONS":
            headers = {**COMMON_HEADERS, "allow": self.allow}
            response = Response(status_code=204, headers=headers, media_type="text/plain")
        else:
            try:
                handler = self.handlers.get(request.method)
                if handler is None:
                    raise HTTPException(
                        405,
                        f"method {request.method} is not allowed here; use {self.allow}",
                        {"allow": self.allow},
                    )
                response = await handler(request)
            except Exception as exc:
                response = error_response(exc, request)
        await response(scope, receive, send)


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """What the router does with a path no route matches.

    Paths are read from ``scope["path"]``, as the router matches them, never from
    ``request.url``, which Starlette before 1.0.1 rebuilt from the Host header."""
    if scope["type"] == "websocket":
        await WebSocketClose(WS_POLICY_VIOLATION)(scope, receive, send)
        return
    request = Request(scope, receive)
    error = HTTPException(404, f"no such endpoint: {scope['path']}")
    await error_response(error, request)(scope, receive, send)


async def read_body(request: Request) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``MAX_BODY``."""
    too_large = HTTPException(413, f"the request body is larger than {MAX_BODY} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async with aclosing(request.stream()) as stream:
            async for chunk in stream:
                size += len(chunk)
                if size > MAX_BODY:
                    raise too_large
                chunks.append(chunk)
    except ClientDisconnect:
        raise HTTPException(400, "the client went away before its request body arrived") from None
    return b"".join(chunks)


def json_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object ({} when empty)."""
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInput("the request body must be a JSON object")
    return value


def bearer_identity(tokens: TokenVerifier, request: Request) -> Identity:
    """Who the request's ``Authorization: Bearer`` token speaks for (AuthError if none)."""
    header = request.headers.get("authorization", "")
    if not header:
        raise AuthError("missing token: send 'Authorization: Bearer <token>'")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
    return tokens.verify(token.strip())


class RestApp:
    """ASGI app serving ``/api/...``, ``/healthz`` and ``/metrics`` for one node."""

    def __init__(
        self,
        manager: ConversationManager,
        tokens: TokenVerifier,
        node_metrics: NodeMetrics,
        extra_routes: Sequence[BaseRoute] = (),
    ) -> None:
        self.manager = manager
        self.tokens = tokens
        self.node_metrics = node_metrics
        read_manager(node_metrics, manager)
        conversations = Resource({"GET": self.list_conversations, "POST": self.create_conversation})
        self.router = Router(
            routes=[
                Route("/healthz", Resource({"GET": self.healthz})),
                Route("/metrics", Resource({"GET": self.metrics})),
                Route("/api/node", Resource({"GET": self.node})),
                Route("/api/cluster", Resource({"GET": self.cluster})),
                Route("/api/conversations", conversations),
                Route("/api/conversations/", conversations),
                Route(
                    "/api/conversations/{sid}",
                    Resource({"GET": self.get_conversation, "DELETE": self.close_conversation}),
                ),
                *extra_routes,  # the browser pages and their endpoints (pages.py)
            ],
            # Both spellings of the collection are served as they are, never redirected.
            redirect_slashes=False,
            default=not_found,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.router(scope, receive, send)

    # -- helpers ---------------------------------------------------------------------
    def user(self, request: Request) -> str:
        return bearer_identity(self.tokens, request).user

    async def owned(self, sid: str, user: str) -> dict[str, Any]:
        check_conversation_id(sid)
        view = await self.manager.directory.conversation_view(sid)
        if not view:
            raise ConversationNotFound(sid)
        if view.pop("user") != user:
            raise Forbidden(sid)
        return view

    # -- endpoints -------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
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

    async def metrics(self, request: Request) -> Response:
        m = self.manager
        self.node_metrics.redis_up.set(m.started and (await m.directory.redis_ok())[0])
        body = self.node_metrics.render()
        return Response(body, 200, COMMON_HEADERS, CONTENT_TYPE)

    async def node(self, request: Request) -> Response:
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

    async def cluster(self, request: Request) -> Response:
        self.user(request)
        return json_response(200, await self.manager.directory.cluster_view())

    async def list_conversations(self, request: Request) -> Response:
        user = self.user(request)
        convs = await self.manager.directory.list_conversations(user)
        return json_response(200, {"conversations": convs})

    async def get_conversation(self, request: Request) -> Response:
        user = self.user(request)
        return json_response(200, await self.owned(request.path_params["sid"], user))

    async def create_conversation(self, request: Request) -> Response:
        user = self.user(request)
        body = json_object(await read_body(request))
        sid = body.get("conversation_id")
        sid = uuid.uuid4().hex if sid is None else check_conversation_id(sid)
        text = body.get("initial_user_msg")
        if text is not None and not isinstance(text, str):
            raise InvalidInput("initial_user_msg must be a string")
        first = None if text is None else {"action": "message", "args": {"content": text}}
        settings = check_settings(body.get("settings"))
        if self.manager.draining:
            raise NodeDraining(f"node {self.manager.node_id} is draining; use another node")
        existed = bool(await self.manager.conversation(sid))
        info = await self.manager.maybe_start_agent_loop(
            sid, settings, user, initial_user_msg=first
        )
        if first is not None:
            self.node_metrics.actions += 1
        return json_response(
            200 if existed else 201,
            {"conversation_id": sid, "running": info.running, "owner": info.owner},
        )

    async def close_conversation(self, request: Request) -> Response:
        user = self.user(request)
        sid = check_conversation_id(request.path_params["sid"])
        closed = await self.manager.close_session(sid, user)
        return json_response(200, {"closed": closed})


def read_manager(node_metrics: NodeMetrics, manager: ConversationManager) -> None:
    """The metrics ``/metrics`` reads from the manager at each scrape."""
    m = manager
    node_metrics.gauge_from(
        "coordinator_local_loops",
        "Agent loops running on this node.",
        lambda: len(m.local_loops()) if m.started else 0,
    )
    node_metrics.gauge_from(
        "coordinator_local_connections",
        "Socket.io connections joined on this node.",
        lambda: len(m.local_connections()),
    )
    node_metrics.gauge_from(
        "coordinator_lease_valid",
        "1 while this node's membership lease is valid.",
        lambda: m.started and m.membership.lease_valid(),
    )
