"""The REST, health and metrics endpoints of one node, routed by Starlette (the HTTP
plumbing, errors, CORS, tokens and bodies, is in http.py; the browser pages come in as
``extra_routes``).

Private by default: a caller sees their own conversations only. Another user's
conversation answers exactly like a missing one; ``/api/cluster`` and ``/api/node`` list
the caller's own loops and connections, unless the token has the admin role.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, Router
from starlette.types import Receive, Scope, Send

from . import codec
from .answers import COMMON_HEADERS, WrittenOnce, json_response
from .auth import Identity, TokenVerifier
from .config import Lifetimes
from .directory import MAX_LISTED, PARTIAL_LIST
from .errors import ConversationNotFound, Forbidden, InvalidInput, NodeDraining
from .http import (
    Cors,
    Handler,
    Origins,
    Resource,
    json_object,
    not_found,
    rated_identity,
    read_body,
)
from .inputs import (
    MAX_EVENT_ID,
    check_conversation_id,
    check_settings,
    check_user_id,
    given_once,
    parse_int,
    shown,
)
from .manager import ConversationManager
from .metrics import CONTENT_TYPE, NodeMetrics
from .quotas import Quotas
from .serverconfig import NO_LIMITS, ServerConfig

log = logging.getLogger(__name__)

DEFAULT_PAGE = 100  # events or conversations
# What a create's body may hold: a conversation's id, first message, settings, lifetimes.
CREATE_FIELDS = frozenset(
    ("conversation_id", "initial_user_msg", "settings", *(f.name for f in fields(Lifetimes)))
)
MAX_EVENTS_PAGE = 1000


def query_param(request: Request, name: str) -> str | None:
    """A query parameter given at most once (``config.given_once``; else 400)."""
    return given_once(name, request.query_params.getlist(name))


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within ``low..high``; else InvalidInput (400)."""
    raw = query_param(request, name)
    return default if raw is None else parse_int(name, raw, low, high)


class RestApp:
    """ASGI app serving ``/api/...``, ``/healthz`` and ``/metrics`` for one node.

    ``quotas`` holds the per-user rate limits (conversation creations); ``origins`` the
    browser origins allowed to read its answers (by default the node's own only)."""

    def __init__(
        self,
        manager: ConversationManager,
        tokens: TokenVerifier,
        node_metrics: NodeMetrics,
        *,
        quotas: Quotas | None = None,
        origins: Origins | None = None,
        extra_routes: Sequence[BaseRoute] = (),
    ) -> None:
        self.manager = manager
        self.tokens = tokens
        self.node_metrics = node_metrics
        self.quotas = quotas or Quotas(ServerConfig(**NO_LIMITS), lambda: manager.state)
        read_manager(node_metrics, manager)
        cors = Cors(origins or Origins())

        def resource(handlers: Mapping[str, Handler]) -> Resource:
            return Resource(handlers, cors)

        conversations = resource({"GET": self.list_conversations, "POST": self.create_conversation})
        self.router = Router(
            routes=[
                # Probes answer HEAD too (load balancers' health checks use either);
                # the server sends a HEAD answer's headers only.
                Route("/healthz", resource({"GET": self.healthz, "HEAD": self.healthz})),
                Route("/livez", resource({"GET": self.livez, "HEAD": self.livez})),
                Route("/metrics", resource({"GET": self.metrics})),
                Route("/api/node", resource({"GET": self.node})),
                Route("/api/cluster", resource({"GET": self.cluster})),
                Route("/api/conversations", conversations),
                Route("/api/conversations/", conversations),
                Route(
                    "/api/conversations/{sid}",
                    resource({"GET": self.get_conversation, "DELETE": self.close_conversation}),
                ),
                Route("/api/conversations/{sid}/events", resource({"GET": self.events})),
                Route("/api/users/{user}/revoke", resource({"POST": self.revoke_user})),
                *extra_routes,  # the browser pages and their endpoints (pages.py)
            ],
            # Both spellings of the collection are served as they are, never redirected.
            redirect_slashes=False,
            default=not_found,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.router(scope, receive, send)

    # -- helpers ---------------------------------------------------------------------
    async def identity(self, request: Request) -> Identity:
        return await rated_identity(self.tokens, self.quotas, request)

    async def user(self, request: Request) -> str:
        return (await self.identity(request)).user

    async def owned(self, sid: str, who: Identity) -> dict[str, Any]:
        """The view of conversation ``sid``, if it is ``who``'s (another user's is as
        missing), or any with its ``user`` for an admin."""
        check_conversation_id(sid)
        view = await self.manager.directory.conversation_view(sid)
        if not view or (view["user"] != who.user and not who.admin):
            raise ConversationNotFound(sid)
        if not who.admin:
            del view["user"]
        return view

    # -- endpoints -------------------------------------------------------------------
    async def livez(self, request: Request) -> Response:
        """200 whenever the node's event loop answers, whatever Redis' state: a liveness
        probe (restart the process only when it is stuck; a Redis outage restarts no
        node). ``/healthz`` is the readiness probe."""
        return json_response(200, {"status": "alive", "node_id": self.manager.node_id})

    async def healthz(self, request: Request) -> Response:
        m = self.manager
        # The node as it is now: a stop or drain may begin while this waits on Redis.
        node = m.node if m.started else None
        problems = []
        redis_up, why = await node.directory.redis_ok() if node else (False, "")
        if node is None:
            problems.append("the manager is not running")
        elif not redis_up:
            problems.append(why)
        lease = node is not None and node.membership.lease_valid()
        registered = lease and redis_up and node is not None and await node.directory.registered()
        if node is not None and not lease:
            problems.append("this node's membership lease is not valid")
        elif node is not None and redis_up and not registered:
            problems.append("this node is not in Redis' registry of live nodes")
        if redis_up and node is not None and (full := await node.directory.redis_full()):
            problems.append(full)
        if m.draining:
            problems.append("the node is draining")
        body: dict[str, Any] = {
            "status": "ok" if not problems else ("draining" if m.draining else "degraded"),
            "node_id": m.node_id,
            "redis": "ok" if redis_up else "down",
            "registered": registered,
            "draining": m.draining,
            "loops": len(m.local_loops()),
            "connections": len(m.local_connections()),
            # Not a reason to route clients elsewhere (every node shares the store), but
            # actions are refused once the events it lacks fill a conversation's window.
            "event_store": (node.archiver.trouble or "ok") if node else "",
        }
        if problems:
            body["reason"] = "; ".join(problems)
        return json_response(503 if problems else 200, body)

    async def metrics(self, request: Request) -> Response:
        m = self.manager
        # The node as it is now: a stop may begin while this waits on Redis.
        node = m.node if m.started else None
        up = node is not None and (await node.directory.redis_ok())[0]
        self.node_metrics.redis_up.set(up)
        memory = await node.directory.redis_memory() if node is not None and up else None
        self.node_metrics.show_redis_memory(memory)
        body = self.node_metrics.render()
        return Response(body, 200, COMMON_HEADERS, CONTENT_TYPE)

    async def revoke_user(self, request: Request) -> Response:
        """An admin revokes a user's tokens issued until now, on every node: they are
        refused from now on and the user's connections holding one end
        (``revocations.py``)."""
        if not (await self.identity(request)).admin:
            raise HTTPException(403, "revoking a user's tokens takes an admin token")
        user = check_user_id(request.path_params["user"])
        at = await self.manager.revoke_user(user, self.tokens.settings.max_lifetime)
        return json_response(200, {"user": user, "revoked_at": at})

    async def node(self, request: Request) -> Response:
        who = await self.identity(request)
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
        who = await self.identity(request)
        directory = self.manager.directory
        if who.admin:
            return json_response(200, await directory.cluster_view())
        return json_response(200, await directory.cluster_view_for(who.user))

    async def list_conversations(self, request: Request) -> Response:
        """A page of the caller's conversations, newest first: ``?limit=N`` (1..1000,
        default 100) and ``&page_id=`` the ``next_page_id`` of the page before (None
        after the last page); ``partial`` (why) while the event store is away and only
        the conversations Redis holds (the running and recently active) are listed."""
        user = await self.user(request)
        limit = query_int(request, "limit", DEFAULT_PAGE, 1, MAX_LISTED)
        page_id = query_param(request, "page_id")
        directory = self.manager.directory
        convs, next_page, partial = await directory.list_conversations(user, limit, page_id)
        body: dict[str, Any] = {"conversations": convs, "next_page_id": next_page}
        if partial:  # the event store away: what Redis holds, and said so
            body["partial"] = PARTIAL_LIST
        return json_response(200, body)

    async def get_conversation(self, request: Request) -> Response:
        who = await self.identity(request)
        return json_response(200, await self.owned(request.path_params["sid"], who))

    async def events(self, request: Request) -> Response:
        """A page of the conversation's events: ``?after=ID`` (default 0) and
        ``&limit=N`` (1..1000, default 100; a page holds about 4 MiB at most, at least one
        event); ``next`` is the ``after`` of the next page, ``more`` whether one may
        follow."""
        who = await self.identity(request)
        sid = check_conversation_id(request.path_params["sid"])
        after = query_int(request, "after", 0, 0, MAX_EVENT_ID)
        limit = query_int(request, "limit", DEFAULT_PAGE, 1, MAX_EVENTS_PAGE)
        user = await self.manager.user_of(sid)  # from the store once Redis let it go
        if not user or (user != who.user and not who.admin):
            raise ConversationNotFound(sid)
        events, more = await self.manager.events_page(sid, after, limit)
        last = events[-1]["id"] if events else after
        # Written an event at a time, each let go once written (answers.py).
        return json_response(200, {"events": WrittenOnce(events), "next": last, "more": more})

    async def create_conversation(self, request: Request) -> Response:
        who = await self.identity(request)
        user = who.user
        body = json_object(await read_body(request))
        unknown = sorted(set(body) - CREATE_FIELDS)
        if unknown:  # a misspelled field would be dropped without a word
            raise InvalidInput(
                f"unknown field {shown(unknown[0])} in the body; the fields are "
                + ", ".join(sorted(CREATE_FIELDS))
            )
        sid = body.get("conversation_id")
        generated = sid is None
        sid = uuid.uuid4().hex if generated else check_conversation_id(sid)
        text = body.get("initial_user_msg")
        if text is not None and not isinstance(text, str):
            raise InvalidInput("initial_user_msg must be a string")
        first = None if text is None else {"action": "message", "args": {"content": text}}
        if first is not None:  # refused before the creation is counted against the quota
            codec.user_action(first, self.manager.config.max_action_bytes)
        settings = check_settings(body.get("settings"))
        lifetimes = Lifetimes.from_body(body, self.manager.config)
        if self.manager.draining:
            raise NodeDraining(f"node {self.manager.node_id} is draining; use another node")
        if first is not None:  # an action as one over socket.io is: the user's rates
            await self.quotas.action(None, user, first)
        # Known to Redis or, retired, to the event store: not created again.
        owner = "" if generated else await self.manager.user_of(sid)
        if owner and owner != user:
            raise Forbidden(sid)
        if not owner:
            await self.quotas.creation(user)
        info = await self.manager.maybe_start_agent_loop(
            sid, settings, user, initial_user_msg=first, org=who.org, lifetimes=lifetimes
        )
        if first is not None:
            self.node_metrics.actions += 1
        return json_response(
            201 if info.created else 200,  # one of two creates at once made it
            {"conversation_id": sid, "running": info.running, "owner": info.owner},
        )

    async def close_conversation(self, request: Request) -> Response:
        who = await self.identity(request)
        user = None if who.admin else who.user  # an admin closes or purges any
        sid = check_conversation_id(request.path_params["sid"])
        purge = query_param(request, "purge")
        purge = "false" if purge is None else purge
        if purge not in ("true", "false"):
            raise InvalidInput(f"purge must be true or false, got {shown(purge)}")
        try:
            if purge == "true":
                return json_response(200, await self.manager.purge(sid, user))
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
    node_metrics.gauge_from(
        "coordinator_event_store_ok",
        "0 while this node's last move of events to the event store failed (/healthz's "
        "event_store says why; the events wait in Redis and a full window refuses actions).",
        lambda: not (m.started and m.node.archiver.trouble),
    )
