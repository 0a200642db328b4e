"""HTTP plumbing of the REST app (rest.py): errors as JSON with a status, one path's
handlers by method, CORS, request bodies read within a size limit and parsed strictly.

Every response is JSON and carries ``COMMON_HEADERS``, plus ``access-control-allow-origin``
for an Origin the node allows (``Origins``: its peers' pages and ``--cors-origins``); large
ones are written as the client reads them (``answers.py``). Errors are
``{"error": msg}`` with a status from ``status_for`` (429 with Retry-After for a limit);
the log gets the detail, the client a clear message. Each path answers OPTIONS (204) and
refuses other methods (405) itself, with an ``allow`` header naming exactly its methods:
Starlette's own method matching would also serve HEAD on every GET path and list
``allow`` in no fixed order.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketClose

from .answers import COMMON_HEADERS, json_response
from .auth import AuthError, Identity, TokenVerifier
from .errors import (
    REDIS_AWAY,
    REDIS_TROUBLE,
    CapacityTimeout,
    ConcurrencyLimitReached,
    ConnectionNotFound,
    ConversationClosed,
    ConversationNotFound,
    CoordinatorError,
    Forbidden,
    InboxFull,
    InvalidInput,
    LimitExceeded,
    NodeBusy,
    NodeDraining,
    NodeStopped,
    NotReplicated,
    RedisUnavailable,
    StoreBehind,
    redis_full,
    redis_refused,
)
from .eventstore.errors import StoreUnavailable
from .inputs import shape_problem
from .ratelimit import LogThrottle
from .redact import redact

if TYPE_CHECKING:
    from .quotas import Quotas

log = logging.getLogger("coordinator.rest")


MAX_BODY = 256 * 1024
# Nesting and size a REST body's JSON may have (a create request is two fields deep).
MAX_BODY_DEPTH = 16
MAX_BODY_ITEMS = 10_000
# Seconds between two reads of the advertised origins, prompted by an unknown one.
PEERS_REFRESH = 1.0
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
    if isinstance(exc, ConversationClosed):  # closed or being purged meanwhile
        return 409
    if isinstance(exc, InboxFull | LimitExceeded):
        return 429
    if isinstance(exc, InvalidInput):
        return 400
    if redis_refused(exc):
        return 500
    unavailable = (
        NodeDraining
        | NodeBusy
        | RedisUnavailable
        | CapacityTimeout
        | NotReplicated
        | StoreBehind
        | StoreUnavailable
    )
    if isinstance(exc, unavailable) or isinstance(exc, REDIS_TROUBLE):  # noqa: SIM101
        return 503
    return 500


def client_message(exc: BaseException) -> str:
    """What a client is told about an error (never a stack trace)."""
    if isinstance(exc, HTTPException):
        return exc.detail
    if isinstance(exc, AuthError):
        return f"authentication failed: {exc}"
    if isinstance(exc, StoreUnavailable):
        return StoreUnavailable.PUBLIC
    if isinstance(exc, NodeStopped):  # the Python API's words are not a client's
        return "this node is shutting down; try another node"
    if isinstance(exc, CoordinatorError):
        return str(exc)
    if redis_full(exc):
        return "Redis is full (at its maxmemory): nothing was written; try again later"
    if redis_refused(exc):
        return "internal error: Redis refused the coordinator's command (the server log says why)"
    if isinstance(exc, REDIS_TROUBLE):
        return REDIS_AWAY
    return "internal error"


# A 503 (Redis or the event store away) is one line, at most 2 a second: any client can
# ask for one per request while they are away, and its traceback says nothing new.
_unavailable = LogThrottle(log)


def error_response(exc: Exception, request: Request) -> Response:
    """``{"error": msg}`` for an exception; the log gets a 503 in one line, any other
    server error in full."""
    status = status_for(exc)
    why = redact(f"{type(exc).__name__}: {exc}")  # redis-py's repr names no reason
    if status == 503:
        _unavailable.emit(logging.WARNING, "%s %s: %s", request.method, request.scope["path"], why)
    elif status >= 500:
        log.error("%s %s failed: %s", request.method, request.scope["path"], why, exc_info=exc)
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
    body: dict[str, Any] = {"error": client_message(exc)}
    if isinstance(exc, ConcurrencyLimitReached):
        body = exc.details()
    if isinstance(exc, LimitExceeded) and exc.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
        body["retry_after"] = exc.retry_after
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    return json_response(status, body, headers)


Handler = Callable[[Request], Awaitable[Response]]


class Resource:
    """One path's handlers by method, as the ASGI app of a Starlette ``Route``."""

    def __init__(self, handlers: Mapping[str, Handler], cors: Cors | None = None) -> None:
        self.handlers = dict(handlers)
        self.allow = ", ".join(sorted(self.handlers))
        self.cors = cors or Cors(Origins())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response: Response
        if request.method == "OPTIONS":
            headers = {**COMMON_HEADERS, "allow": self.allow}
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


class Origins:
    """Which browser origins may call this node: the node's own (same origin), those
    configured (``--cors-origins``; ``*`` is any), and the public URLs the cluster's nodes
    advertise, so that a page one node served can move to another when its node goes
    away. ``fetch`` reads the advertised origins; they are read again (at most once a
    second) when an origin the node does not know calls, and kept once seen."""

    def __init__(
        self,
        configured: tuple[str, ...] = (),
        fetch: Callable[[], Awaitable[set[str]]] | None = None,
    ) -> None:
        self.configured = frozenset(configured)
        self.any = "*" in self.configured
        self.peers: frozenset[str] = frozenset()
        self._fetch = fetch
        self._fetched_at = -math.inf

    def allows(self, origin: str) -> bool:
        return self.any or origin in self.configured or origin in self.peers

    async def learn(self, origin: str, host: str) -> None:
        """Before serving a request from ``origin`` to ``host`` (its Host header): if the
        origin is another one the node does not know, read the peers' origins again."""
        if self._fetch is None or self.allows(origin) or origin.endswith(f"://{host}"):
            return
        now = time.monotonic()
        if now - self._fetched_at < PEERS_REFRESH:
            return
        self._fetched_at = now
        try:
            fetched = await self._fetch()
        except REDIS_TROUBLE as exc:
            log.debug("could not read the advertised origins: %r", exc)
            return
        if not fetched <= self.peers:
            self.peers = self.peers | fetched

    def for_socketio(self, origin: str | None, environ: Mapping[str, Any]) -> bool:
        """engine.io's ``cors_allowed_origins`` callable: also the same origin (the Host
        the request came to), which engine.io allows only when given no callable."""
        if origin is None or self.allows(origin):
            return True
        host = environ.get("HTTP_HOST")
        return host is not None and origin == f"{environ.get('wsgi.url_scheme', 'http')}://{host}"


def origin_of(url: str) -> str:
    """The browser origin of an http(s) URL: ``scheme://host[:port]``, lower case, the
    scheme's default port left out (as browsers send it)."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


class Cors:
    """The CORS headers of the REST answers, for the origins ``Origins`` allows (none
    but the node's own unless configured or advertised)."""

    def __init__(self, origins: Origins) -> None:
        self.origins = origins

    def add(self, request: Request, response: Response) -> None:
        if self.origins.any:
            response.headers["access-control-allow-origin"] = "*"
            return
        response.headers["vary"] = "origin"
        origin = request.headers.get("origin")
        if origin is not None and self.origins.allows(origin):
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


def bearer_identity(tokens: TokenVerifier, request: Request) -> Identity:
    """Who the request's ``Authorization: Bearer`` token speaks for (AuthError if none)."""
    headers = request.headers.getlist("authorization")
    if len(headers) > 1:  # which one counts would be the reader's guess (a proxy's too)
        raise AuthError("more than one Authorization header; send one")
    header = headers[0] if headers else ""
    if not header:
        raise AuthError("missing token: send 'Authorization: Bearer <token>'")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
    return tokens.verify(token.strip())


async def rated_identity(tokens: TokenVerifier, quotas: Quotas, request: Request) -> Identity:
    """``bearer_identity``, and a token of its user's REST request rate (LimitExceeded,
    429, over it): every authenticated request counts, reads and closes included."""
    who = bearer_identity(tokens, request)
    await quotas.request(who.user)
    return who


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
        value = json.loads(body, parse_constant=_no_constant, parse_int=_int_of_64_bits)
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


def _int_of_64_bits(digits: str) -> int:
    """A JSON integer, refused unread when it has more digits than 64 bits hold (the
    shape check refuses larger values; Python's own refusal names its own knob)."""
    if len(digits.lstrip("-")) > 20:
        raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits is out of range")
    return int(digits)
