"""Taking ownership of a conversation for a start (``loops.py`` starts the loop), and
giving it back when the start fails.

``acquire`` bumps the fencing epoch of a conversation that is unowned or whose owner is
dead, and tells the caller about a live owner instead. A conversation missing from Redis
is new, or gone from Redis (its retention expired, or Redis lost it) but in the event
store: it is created again continuing the store's ids and epochs, never reusing an id the
store holds; a new one counts against its user's quota of stored conversations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from workers.protocol import Event

from . import codec
from .config import Lifetimes, ManagerConfig
from .delivery import Floor
from .directory import Directory
from .errors import (
    REDIS_TROUBLE,
    ConversationPurging,
    Forbidden,
    LimitExceeded,
    NodeDraining,
    beyond_last_event,
)
from .eventstore import EventStore
from .membership import Membership
from .state import Lease, Ownership, RedisState
from .subscriptions import Interest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConversationInfo:
    sid: str
    user: str
    owner: str  # node id of the loop's owner ('' when not running)
    running: bool
    local: bool
    created: bool = False  # this very call created the conversation


@dataclass
class Intake:
    """Whether this node takes new loops and connections (not while it drains)."""

    node_id: str
    draining: bool = False

    def check(self) -> None:
        if self.draining:
            raise NodeDraining(f"node {self.node_id} is draining; connect to another node")


class Owners:
    """Ownership for this node's starts (see the module docstring)."""

    def __init__(
        self,
        *,
        state: RedisState,
        config: ManagerConfig,
        intake: Intake,
        membership: Membership,
        directory: Directory,
        store: EventStore,
        interest: Interest,
        busy: Callable[[str], bool],
        floor: Floor,
    ) -> None:
        self._state = state
        self._floor = floor  # Delivery.floor: what this node knows was logged
        self._interest = interest
        self._busy = busy  # a start or a loop of the conversation is on this node
        self._abandoned: list[Lease] = []  # starts that failed after taking ownership
        self._config = config
        self._intake = intake
        self._membership = membership
        self._directory = directory
        self._store = store

    async def acquire(
        self, sid: str, user: str, lifetimes: Lifetimes, latest: int | None = None
    ) -> Ownership | ConversationInfo:
        """Own ``sid`` (replacing a dead owner), or the info of the live owner holding it;
        a conversation created here records ``lifetimes``. ``latest``: the last event id
        a joining client saw; past the conversation's last event it is neither created
        nor taken (InvalidInput)."""
        membership = self._membership
        dead = ""
        stored: tuple[int, int, int, int] | None = None  # the store's (last id, fence,
        # bytes, created)
        while True:
            own = await self._state.acquire(
                sid,
                self._config.node_id,
                membership.inc,
                user,
                create=stored is not None and not self._intake.draining,
                dead_inc=dead,
                stored=stored or (0, 0, 0, 0),
                close_delay=lifetimes.close_delay,
                max_running_time=lifetimes.max_running_time,
                latest=latest,
            )
            if own.status == "forbidden":
                raise Forbidden(sid)
            if own.status == "purging":
                raise ConversationPurging(sid)
            if own.status == "ahead":
                raise beyond_last_event(latest or 0, own.applied, sid)
            if own.status == "missing" and stored is None:
                # Not in Redis: new, or gone from Redis (expired, lost) but in the store,
                # whose ids and epochs it continues (never an id the store holds again).
                stored = await self._stored(sid, user)
                continue
            if own.status == "missing":
                self._intake.check()  # a conversation is created only while not draining
                raise NodeDraining(f"node {self._config.node_id} is draining")
            if own.status != "owned":
                return own
            # The live-node cache holds an owner alive only until its lease's expiry as
            # last read, so it never keeps a dead owner past the moment its loop could
            # be taken over; it saves the read when a second client joins.
            if await self._directory.alive(own.inc):
                return ConversationInfo(sid, own.user, own.owner, True, False)
            dead = own.inc

    async def _stored(self, sid: str, user: str) -> tuple[int, int, int, int]:
        """The event store's ``(last id, fence epoch, bytes, created ms)`` of ``sid``
        (zeros when it holds none); Forbidden when
        it is another user's, LimitExceeded when it is new and ``user`` has
        ``max_conversations_per_user`` stored."""
        quota = self._config.max_conversations_per_user
        found = await self._store.lookup(sid, user, quota=quota)
        known = found.known
        if known is None:
            if quota and user and found.count >= quota:
                raise LimitExceeded(
                    "conversations per user",
                    f"user {user!r} has {found.count} conversations stored (the limit is "
                    f"{quota}); delete one for good (DELETE /api/conversations/ID?purge=true) "
                    "first",
                )
            return 0, 0, 0, 0
        if user and known.user != user:
            raise Forbidden(sid)
        if known.last_id:
            log.info("conversation %s comes back from the event store at %d", sid, known.last_id)
        return known.last_id, known.epoch, known.size, known.created

    async def give_up(self, lease: Lease, status: Event | None, *, watched: bool = True) -> bool:
        """Undo a start that never ran: tell the clients why, drop claim and ownership;
        ``watched``: the start still holds its reference on the conversation's channel.

        If Redis fails meanwhile, the lease is kept and given up on a later heartbeat, so
        a conversation is never left owned by a live node that runs no loop for it.
        """
        try:
            if status is not None:
                await self._state.commit(
                    lease.sid,
                    lease.inc,
                    lease.epoch,
                    [codec.pack(status)],
                    floor=self._floor(lease.sid),
                )
            await self._state.release_loop(lease, "stopped")
        except REDIS_TROUBLE as exc:
            log.warning("giving up %s deferred: %s", lease.sid, exc)
            self.abandon(lease)
            return False
        finally:
            if watched:  # given back exactly once, even when the release is retried
                await self._interest.unwatch(lease.sid)
        return True

    def abandon(self, lease: Lease) -> None:
        """``lease``'s loop is gone but Redis could not be told: it is given up on a later
        heartbeat (``retry_abandoned``), and its actions then restarted if any wait."""
        if lease not in self._abandoned:
            self._abandoned.append(lease)

    async def retry_abandoned(self) -> list[tuple[str, str]]:
        """Give up (again) what failed starts left owned; ``(sid, user)`` of those given
        up, which still need a loop if their inbox holds actions."""
        done = []
        for lease in list(self._abandoned):
            if self._busy(lease.sid):
                # A start under way here: a later one (its epoch fences this release), or
                # the failed one itself, still unwinding; then dropping the lease left the
                # conversation owned by this live node, running no loop, for good.
                continue
            if await self.give_up(lease, None, watched=False):
                self._abandoned.remove(lease)
                done.append((lease.sid, lease.user))
        return done
