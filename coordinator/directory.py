"""Cluster-wide reads: which nodes are alive, which loops run where, which connections
exist, the public views of conversations the REST endpoints serve, and the cluster's
status for the browser pages (``status.py``).

Every answer covers the whole cluster and comes from Redis (a user's conversations that
left Redis, from the event store too); the one thing kept here is a
cache of live incarnations, each until the expiry of its lease as last read, so asking
whether an owner is alive costs a round trip only once its lease could have run out.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Sequence
from typing import Any

from .errors import REDIS_TROUBLE, InvalidInput
from .eventstore import EventStore, StoreUnavailable
from .inputs import shown
from .membership import Membership
from .ratelimit import LogThrottle
from .state import RedisState
from .state.loops import USER_INDEX_MAX
from .status import LOST_SHOWN, Advertisement, ConversationStatus, NodeStatus

log = logging.getLogger(__name__)
_partial = LogThrottle(log)  # a line per listing while the store is away, at most 2 a second
PARTIAL_LIST = (
    "the event store is unavailable right now: only the conversations Redis holds "
    "(running or recently active) are listed"
)

MAX_LISTED = USER_INDEX_MAX  # a list request reads the user's whole index (newest first)


def _int(value: str) -> int | None:
    return int(value) if value.lstrip("-").isdigit() else None


def _order(view: dict[str, Any]) -> tuple[int, str]:
    """Where a view stands in a list of conversations (newest first: descending)."""
    return view["created"] or 0, view["conversation_id"]


def _page_id(key: tuple[int, str]) -> str:
    """The opaque ``page_id`` of the page after the view at ``key``."""
    text = f"{key[0]}:{key[1]}".encode()
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


def _page_key(page_id: str) -> tuple[int, str]:
    """The place in a list a ``page_id`` names (the next page starts after it: any
    well-formed one is a place); InvalidInput if it is not one ``_page_id`` makes."""
    try:
        raw = base64.urlsafe_b64decode(page_id + "=" * (-len(page_id) % 4)).decode()
        created, sep, sid = raw.partition(":")
        if sep and sid and created.isdigit() and len(created) < 20:
            return int(created), sid
    except (ValueError, UnicodeDecodeError):
        pass
    raise InvalidInput(
        f"page_id {shown(page_id)} is malformed; give the next_page_id of a list's page"
    )


def describe(sid: str, meta: dict[str, str], live: set[str]) -> dict[str, Any]:
    """The public view of one conversation record; ``live`` holds live incarnations."""
    inc = meta.get("inc", "")
    running = bool(inc) and inc in live
    return {
        "conversation_id": sid,
        "state": meta.get("state", ""),
        "running": running,
        "owner": meta.get("owner", "") if running else "",
        "created": _int(meta.get("created", "")),
        "last_active": _int(meta.get("last_active", "")),
        "events": _int(meta.get("seq", "")) or 0,
    }


def describe_retired(sid: str, created: int | None = None) -> dict[str, Any]:
    """The public view of a conversation whose Redis state expired after it stopped
    (``--redis-retention``): only the event store holds it now (``created``: when the
    store first recorded it, ms)."""
    return {
        "conversation_id": sid,
        "state": "stopped",
        "running": False,
        "owner": "",
        "created": created,
        "last_active": None,
        "events": None,
    }


class Directory:
    """The cluster as seen from Redis. ``membership`` tells this node's own incarnation
    (alive while its lease is valid, without asking Redis)."""

    def __init__(self, state: RedisState, membership: Membership, store: EventStore) -> None:
        self._state = state
        self._membership = membership
        self._store = store  # lists the conversations that left Redis
        # Incarnations known alive -> until when (monotonic: their lease's expiry as last
        # read; refreshed each heartbeat, read again by ``alive`` once it passed).
        self._live: dict[str, float] = {}
        # Whether the last refresh saw a registered node without its lease (dead, or
        # lapsed and not yet back): the housekeeping then reaps at once.
        self.sees_dead = False
        # Whether it saw this node's own lease gone while its clock still counts it
        # valid (renewals stuck on a master that failed over to a stale replica).
        self.lost_self = False

    # -- liveness --------------------------------------------------------------------
    async def alive(self, inc: str) -> bool:
        """Whether ``inc`` holds its lease. Known from the last read until that lease's
        expiry; then read again, so a dead owner is seen as dead as soon as its lease
        expires, not at the next heartbeat."""
        if inc == self._membership.inc:
            return not self._membership.lapsed
        now = time.monotonic()
        if self._live.get(inc, 0.0) > now:
            return True
        left = await self._state.lease_left(inc)
        if left is None:
            self._live.pop(inc, None)
            return False
        self._live[inc] = now + left
        return True

    async def refresh(self) -> set[str]:
        """Read every node's lease again; the live incarnations."""
        registry = await self._state.registry()
        live = await self._state.live_leases(registry)
        now = time.monotonic()
        self._live = {registry[node]: now + left for node, left in live.items()}
        self.sees_dead = len(live) < len(registry)
        me = self._membership
        self.lost_self = bool(me.inc) and not me.lapsed and me.inc not in self._live
        return set(self._live)

    def live_incarnations(self) -> set[str]:
        """The live incarnations as of the last refresh (no Redis call)."""
        return set(self._live)

    async def nodes(self) -> dict[str, str]:
        """node id -> incarnation, for nodes whose lease is alive."""
        registry = await self._state.registry()
        live = await self._state.live_leases(registry)
        return {n: i for n, i in registry.items() if n in live}

    async def registered(self) -> bool:
        """Whether Redis still names this process's incarnation as its node's."""
        try:
            return await self._state.lease_left(self._membership.inc) is not None
        except REDIS_TROUBLE:
            return False

    async def redis_ok(self, limit: float = 2.0) -> tuple[bool, str]:
        """Whether Redis answers PING within ``limit`` seconds; the reason when not."""
        try:
            async with asyncio.timeout(limit):
                await self._state.ping()
        except TimeoutError:
            return False, f"redis did not answer PING within {limit}s"
        except REDIS_TROUBLE as exc:
            return False, f"redis: {exc or type(exc).__name__}"
        return True, ""

    async def redis_memory(self, limit: float = 2.0) -> tuple[int, int] | None:
        """Redis' ``(used_memory, maxmemory)`` (the fullest master's on a cluster;
        maxmemory 0: no bound); None when it does not answer within ``limit`` seconds."""
        try:
            async with asyncio.timeout(limit):
                return await self._state.memory()
        except TimeoutError:
            return None
        except REDIS_TROUBLE:
            return None

    async def redis_full(self) -> str:
        """Why Redis refuses writes now ('' when it does not, or cannot be asked): at its
        maxmemory."""
        used, most = await self.redis_memory() or (0, 0)
        if most and used >= most:
            return f"Redis is full ({used} bytes used of maxmemory {most}): writes are refused"
        return ""

    # -- the seed's cluster-wide queries ---------------------------------------------
    async def running_loops(self, user: str | None, sids: set[str] | None) -> set[str]:
        """Ids of conversations whose loop runs on a live node (of ``user``, among ``sids``)."""
        if user:
            loops = await self._state.user_loops(user)
            live = await self.refresh()
            found = {
                s for s, held in loops.items() if held.startswith("live:") and held[5:] in live
            }
        else:
            found = await self._state.owned_by(sorted(await self.refresh()))
        return found if sids is None else found & set(sids)

    async def connections(self, user: str | None, sids: set[str] | None) -> dict[str, str]:
        """connection id -> conversation id, for connections on every node."""
        if sids is not None:
            ordered = sorted(sids)
            out = await self._state.connections_of(ordered)
            if user and out:
                owners = await self._state.users_of(ordered)
                out = {cid: sid for cid, sid in out.items() if owners.get(sid) == user}
            return out
        if user:
            return await self._state.connections_of_user(user)
        return await self._state.connections_of_nodes(sorted(await self.refresh()))

    async def owner_alive(self, sid: str) -> bool:
        """Whether ``sid``'s loop runs on a live node (as far as Redis knows)."""
        inc = (await self._state.meta(sid)).get("inc", "")
        return bool(inc) and await self.alive(inc)

    # -- views for REST --------------------------------------------------------------
    async def list_conversations(
        self, user: str, limit: int = MAX_LISTED, page_id: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None, bool]:
        """A page of the user's conversations, newest first (by ``created``, then id),
        with state and owning node, and the ``page_id`` of the next page (None after
        the last): those of the user's index in Redis and those the event store holds (a
        conversation that retired with events leaves the index). Each page is cut from
        the whole list, read again, after the place of the last one's last view: one
        created meanwhile is on the first page, not the next, and none moves but one
        that retired meanwhile, whose ``created`` becomes the event store's (when its
        first events were stored, moments after). Last, whether the page is partial:
        the event store unavailable, only the conversations Redis holds are listed."""
        after = None if page_id is None else _page_key(page_id)
        indexed, stored = await asyncio.gather(
            self._state.user_conversations(user, MAX_LISTED), self._stored_list(user)
        )
        partial = stored is None
        first_stored = dict(stored or ())
        sids = list(dict.fromkeys([*indexed, *first_stored]))
        if not sids:
            return [], None, partial
        live = set((await self.nodes()).values())
        out = []
        for sid, meta in zip(sids, await self._state.records(sids), strict=True):
            # A record that expired is the user's still (the store refuses another user
            # the id, and a purge takes it out of the index); one that changed hands is
            # skipped.
            if not meta:
                out.append(describe_retired(sid, first_stored.get(sid)))
            elif meta.get("user") == user:
                out.append(describe(sid, meta, live))
        out.sort(key=_order, reverse=True)
        if after is not None:
            out = [view for view in out if _order(view) < after]
        if len(out) <= limit:
            return out, None, partial
        return out[:limit], _page_id(_order(out[limit - 1])), partial

    async def _stored_list(self, user: str) -> list[tuple[str, int]] | None:
        """``user``'s conversations the store lists; None while it is unavailable."""
        try:
            return await self._store.list_conversations(user, MAX_LISTED)
        except StoreUnavailable as exc:
            _partial.emit(logging.WARNING, "listing conversations from Redis alone: %s", exc)
            return None

    async def conversation_view(self, sid: str) -> dict[str, Any]:
        """One conversation's public view with its ``user`` ({} when unknown): from its
        record in Redis or, once that expired, from the event store."""
        meta = await self._state.meta(sid)
        if not meta:
            stored = await self._store.conversation(sid)
            if stored is None:
                return {}
            view = describe_retired(sid, stored.created or None)
            return {**view, "events": stored.last_id, "user": stored.user}
        view = describe(sid, meta, set((await self.nodes()).values()))
        view["user"] = meta.get("user", "")
        return view

    async def cluster_view_for(self, user: str) -> dict[str, Any]:
        """``cluster_view`` as one user may see it: the live nodes, and of the loops and
        connections only the user's own, read from the user's own indexes (their cost
        does not grow with the other users' loops)."""
        nodes = await self.nodes()
        names = sorted(nodes)
        node_of = {inc: node for node, inc in nodes.items()}
        loops: dict[str, list[str]] = {n: [] for n in names}
        for sid, held in (await self._state.user_loops(user)).items():
            state, _, inc = held.partition(":")
            if state == "live" and inc in node_of:
                loops[node_of[inc]].append(sid)
        conns = await self._state.connections_of_user(user)
        rows = await self._state.watchers(sorted(set(conns.values())))
        holders = {cid: inc for row in rows for cid, inc in row.items()}
        counts = dict.fromkeys(names, 0)
        for cid in conns:
            node = node_of.get(holders.get(cid, ""))
            if node is not None:
                counts[node] += 1
        return {
            "nodes": dict(sorted(nodes.items())),
            "loops": {n: sorted(sids) for n, sids in loops.items()},
            "connections": counts,
        }

    async def cluster_view(self) -> dict[str, Any]:
        """Live nodes with their incarnations, running loops and connection counts."""
        nodes = await self.nodes()
        names = sorted(nodes)
        loads = await self._state.loads([nodes[n] for n in names])
        return {
            "nodes": dict(sorted(nodes.items())),
            "loops": {n: owned for n, (owned, _) in zip(names, loads, strict=True)},
            "connections": {n: count for n, (_, count) in zip(names, loads, strict=True)},
        }

    # -- views for the browser pages (status.py) -------------------------------------
    async def advertise(self, ad: Advertisement) -> str:
        """Write this node's advertisement; the value written (to withdraw it by)."""
        value = ad.encode()
        await self._state.advertise(ad.node_id, value)
        return value

    async def withdraw(self, node: str, value: str) -> None:
        """Delete an advertisement unless a newer one replaced it."""
        await self._state.withdraw(node, value)

    async def node_urls(self) -> dict[str, str]:
        """node id -> public URL, for the live nodes that advertise one."""
        live = await self.nodes()
        raw = await self._state.advertisements()
        ads = (Advertisement.decode(node, raw.get(node, "")) for node in sorted(live))
        return {ad.node_id: ad.url for ad in ads if ad is not None}

    async def advertised_urls(self) -> set[str]:
        """Every public URL advertised, by live nodes and by lost ones not pruned yet."""
        raw = await self._state.advertisements()
        ads = (Advertisement.decode(node, value) for node, value in raw.items())
        return {ad.url for ad in ads if ad is not None}

    async def node_statuses(
        self, now: float | None = None, *, loads: bool = True
    ) -> list[NodeStatus]:
        """The live nodes, then the lost ones still shown (``status.py``), by id;
        ``loads``: with their loops and connection counts (read per node: they grow with
        the cluster, and a user's view does without them).

        An advertisement that has been silent for ``LOST_SHOWN`` is deleted here."""
        now = time.time() if now is None else now
        registry = await self._state.registry()
        raw = await self._state.advertisements()
        ads = {n: ad for n, v in raw.items() if (ad := Advertisement.decode(n, v)) is not None}
        live = await self._state.live_leases(registry)
        names = sorted(live)
        if loads:
            each = await self._state.loads([registry[n] for n in names])
        else:
            each = [([], 0)] * len(names)
        default_ttl = self._membership.ttl_ms / 1000
        rows = []
        for node, (loops, connections) in zip(names, each, strict=True):
            ad = ads.get(node)
            left = live[node]
            rows.append(
                NodeStatus(
                    node_id=node,
                    incarnation=registry[node],
                    url=ad.url if ad else "",
                    live=True,
                    lease_left=round(left, 3),
                    lease_age=round(max(0.0, (ad.node_ttl if ad else default_ttl) - left), 3),
                    loops=tuple(loops),
                    connections=connections,
                    last_seen=ad.at if ad else None,
                )
            )
        for node in sorted((set(registry) | set(raw)) - set(live)):
            ad = ads.get(node)
            if node not in registry and (ad is None or now - ad.at > LOST_SHOWN):
                await self._state.withdraw(node, raw[node])
                continue
            rows.append(
                NodeStatus(
                    node_id=node,
                    incarnation=registry.get(node, ""),
                    url=ad.url if ad else "",
                    live=False,
                    lease_left=None,
                    lease_age=None,
                    loops=(),
                    connections=0,
                    last_seen=ad.at if ad else None,
                )
            )
        return rows

    async def recent_conversations(self, user: str, limit: int) -> list[str]:
        """The user's newest conversations (the index may name some another user owns
        now or that are gone: ``conversation_statuses`` shows whose they are)."""
        return await self._state.user_conversations(user, limit)

    async def active_conversations(self, limit: int) -> list[str]:
        """Conversations whose loop runs on a live node or that a connection to a live
        node watches, at most ``limit`` of them (by id)."""
        incs = sorted(await self.refresh())
        running = await self._state.owned_by(incs)
        watched = set((await self._state.connections_of_nodes(incs)).values())
        return sorted(running | watched)[:limit]

    async def conversation_statuses(self, sids: Sequence[str]) -> list[ConversationStatus]:
        """The records of ``sids`` that exist, with inbox depth and watchers per node."""
        if not sids:
            return []
        records = await self._state.records(sids)
        inboxes = await self._state.inbox_lengths(sids)
        watchers = await self._state.watchers(sids)
        live = set((await self.nodes()).values())
        out = []
        for sid, meta, inbox, conns in zip(sids, records, inboxes, watchers, strict=True):
            if not meta:
                continue
            running = meta.get("inc", "") in live
            per_node: dict[str, int] = {}
            for inc in conns.values():
                node = inc.rsplit("/", 1)[0]
                per_node[node] = per_node.get(node, 0) + 1
            out.append(
                ConversationStatus(
                    conversation_id=sid,
                    user=meta.get("user", ""),
                    state=meta.get("state", ""),
                    running=running,
                    owner=meta.get("owner", "") if running else "",
                    epoch=_int(meta.get("epoch", "")) or 0,
                    events=_int(meta.get("seq", "")) or 0,
                    applied=_int(meta.get("applied", "")) or 0,
                    inbox=inbox,
                    connections=dict(sorted(per_node.items())),
                    created=_int(meta.get("created", "")),
                    last_active=_int(meta.get("last_active", "")),
                )
            )
        return out
