"""The REST, health and metrics endpoints of one node, routed by Starlette.

Every response is JSON (``/metrics`` is Prometheus text) and carries ``COMMON_HEADERS``,
plus ``access-control-allow-origin`` for an Origin the node allows (``--cors-origins``;
none by default). Errors are ``{"error": msg}`` with a status from ``status_for`` (429
with Retry-After for a limit); the log gets the detail, the client a clear message.

Private by default: a caller sees their own conversations only. Another user's
conversation answers exactly like a missing one; ``/api/cluster`` and ``/api/node`` list
the caller's own loops and connections, unless the token has the admin role.

Each path answers OPTIONS (204) and refuses other methods (405) itself, with an
``allow`` header naming exactly its methods: Starlette's own method matching would also
serve HEAD on every GET path and list ``allow`` in no fixed order.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Any

from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketClose

from .auth import AuthError, Identity, TokenVerifier
from .codec import shape_problem
from .config import check_conversation_id
from .errors import (
    CapacityTimeout,
    ConnectionNotFound,
    ConversationNotFound,
    CoordinatorError,
    Forbidden,
    InboxFull,
    InvalidInput,
    LimitExceeded,
    NodeBusy,
    NodeDraining,
    RedisUnavailable,
)
from .manager import ConversationManager
from .metrics import CONTENT_TYPE, NodeMetrics
from .quotas import Quotas
from .serverconfig import NO_LIMITS, ServerConfig

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
COMMON_HEADERS = {
    "access-control-allow-headers": "authorization, content-type",
    "cache-control": "no-store",
}
# Nesting and size a REST body's JSON may have (a create request is two fields deep).
MAX_BODY_DEPTH = 16
MAX_BODY_ITEMS = 10_000
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
    if isinstance(exc, InboxFull | LimitExceeded):
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
    if isinstance(exc, HTTPException):
        return exc.detail
    if isinstance(exc, AuthError):
        return f"authentication failed: {exc}"
    if isinstance(exc, CoordinatorError):
        return str(exc)
    if isinstance(exc, RedisError | OSError):
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
    body: dict[str, Any] = {"error": client_message(exc)}
    if isinstance(exc, LimitExceeded) and exc.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
        body["retry_after"] = exc.retry_after
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    return json_response(status, body, headers)


Handler = Callable[[Request], Awaitable[Response]]


class Resource:
    """One path's handlers by method, as the ASGI app of a Starlette ``Route``."""

    def __init__(self, handlers: Mapping[str, Handler], cors: Cors) -> None:
        self.handlers = dict(handlers)
        self.allow = ", ".join(sorted(self.handlers))
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response: Response
        if request.method == "OPTIONS":
            headers = {**COMMON_HEADERS, "allow": self.allow}
            if self.cors.origins:
                headers["access-control-allow-methods"] = self.allow
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
        self.cors.add(request, response)
        await response(scope, receive, send)


class Cors:
    """Which browser origins may read the node's answers (none unless configured)."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.origins = frozenset(origins)

    def add(self, request: Request, response: Response) -> None:
        if not self.origins:
            return
        if "*" in self.origins:
            response.headers["access-control-allow-origin"] = "*"
            return
        response.headers["vary"] = "origin"
        origin = request.headers.get("origin")
        if origin in self.origins:
            response.headers["access-control-allow-origin"] = origin


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
    """A request body as a JSON object ({} when empty): strict JSON (no NaN or
    Infinity), nested at most MAX_BODY_DEPTH levels."""
    if not body.strip():
        return {}
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidInput(
            f"the request body is nested too deeply (more than {MAX_BODY_DEPTH} levels)"
        ) from None
    except ValueError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
    problem = shape_problem(value, MAX_BODY_DEPTH, MAX_BODY_ITEMS)
    if problem is not None:
        raise InvalidInput(f"the request body is not acceptable: {problem}")
    if not isinstance(value, dict):
        raise InvalidInput("the request body must be a JSON object")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class RestApp:
    """ASGI app serving ``/api/...``, ``/healthz`` and ``/metrics`` for one node.

    ``quotas`` holds the per-user rate limits (conversation creations); ``cors_origins``
    the browser origins allowed to read its answers (none: no CORS headers)."""

    def __init__(
        self,
        manager: ConversationManager,
        tokens: TokenVerifier,
        node_metrics: NodeMetrics,
        *,
        quotas: Quotas | None = None,
        cors_origins: tuple[str, ...] = (),
    ) -> None:
        self.manager = manager
        self.tokens = tokens
        self.node_metrics = node_metrics
        self.quotas = quotas or Quotas(ServerConfig(**NO_LIMITS), lambda: manager.state)
        read_manager(node_metrics, manager)
        cors = Cors(cors_origins)

        def resource(handlers: Mapping[str, Handler]) -> Resource:
            return Resource(handlers, cors)

        conversations = resource({"GET": self.list_conversations, "POST": self.create_conversation})
        self.router = Router(
            routes=[
                Route("/healthz", resource({"GET": self.healthz})),
                Route("/metrics", resource({"GET": self.metrics})),
                Route("/api/node", resource({"GET": self.node})),
                Route("/api/cluster", resource({"GET": self.cluster})),
                Route("/api/conversations", conversations),
                Route("/api/conversations/", conversations),
                Route(
                    "/api/conversations/{sid}",
                    resource({"GET": self.get_conversation, "DELETE": self.close_conversation}),
                ),
            ],
            # Both spellings of the collection are served as they are, never redirected.
            redirect_slashes=False,
            default=not_found,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.router(scope, receive, send)

    # -- helpers ---------------------------------------------------------------------
    def identity(self, request: Request) -> Identity:
        header = request.headers.get("authorization", "")
        if not header:
            raise AuthError("missing token: send 'Authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
        return self.tokens.verify(token.strip())

    def user(self, request: Request) -> str:
        return self.identity(request).user

    async def owned(self, sid: str, user: str) -> dict[str, Any]:
        """The view of ``user``'s conversation ``sid``; another user's is as missing."""
        check_conversation_id(sid)
        view = await self.manager.directory.conversation_view(sid)
        if not view or view.pop("user") != user:
            raise ConversationNotFound(sid)
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
        who = self.identity(request)
        m = self.manager
        loops = sorted(m.local_loops()) if m.started else []
        connections = list(m.node.connections) if m.started else []
        if not who.admin:
            loops = [sid for sid in loops if (r := m.runner(sid)) and r.lease.user == who.user]
            connections = [c for c in connections if c.user == who.user]
        return json_response(
            200,
            {
                "node_id": m.node_id,
                "incarnation": m.inc if m.started else "",
                "draining": m.draining,
                "loops": loops,
                "connections": len(connections),
            },
        )

    async def cluster(self, request: Request) -> Response:
        who = self.identity(request)
        directory = self.manager.directory
        if who.admin:
            return json_response(200, await directory.cluster_view())
        return json_response(200, await directory.cluster_view_for(who.user))

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
        if self.manager.draining:
            raise NodeDraining(f"node {self.manager.node_id} is draining; use another node")
        record = await self.manager.conversation(sid)
        if record and record.get("user") != user:
            raise Forbidden(sid)
        if not record:
            await self.quotas.creation(user)
        existed = bool(record)
        info = await self.manager.maybe_start_agent_loop(sid, {}, user, initial_user_msg=first)
        if first is not None:
            self.node_metrics.actions_accepted.inc()
        return json_response(
            200 if existed else 201,
            {"conversation_id": sid, "running": info.running, "owner": info.owner},
        )

    async def close_conversation(self, request: Request) -> Response:
        user = self.user(request)
        sid = check_conversation_id(request.path_params["sid"])
        try:
            closed = await self.manager.close_session(sid, user)
        except Forbidden:
            raise ConversationNotFound(sid) from None
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
