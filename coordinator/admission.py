"""Admission against the per-user cap on running loops, cluster-wide.

A start holds one of its user's slots (the ADMIT script, which evicts the user's least
recently updated loops when the cap is full) before its loop runs. While no slot is free
it waits for one, woken at once when a loop of that user stops (here, or on a node that
says so), else polling with a growing delay, up to ``start_timeout``. The owners of the
loops an admission evicted are told to stop them, at most once a second per loop.

With ``cap_policy`` "reject" a start that finds the cap full is refused instead
(``ConcurrencyLimitReached``), nothing evicted. A user with an organisation (the token's
``org`` claim, recorded with the user's cap) then also takes one of the organisation's
``max_concurrent_conversations_per_org`` places (ORG_ADMIT), always rejecting when they
are taken. Places are not given back when loops stop (that would need every release
path, reapers included, to know the organisation): a full organisation first drops the
places whose loop no longer holds its user's slot (ORG_PRUNE, checked against the
holder, so a place taken again meanwhile stays). A place is taken only while its user's
slot is held, so the organisation's running loops never exceed its cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable

from .config import ManagerConfig
from .errors import CapacityTimeout, ConcurrencyLimitReached, too_many_connections
from .state import Lease, RedisState
from .state.loops import org_holder

# evict(sid, user, owner incarnation): have that owner stop the loop and free its slot.
Evict = Callable[[str, str, str], Awaitable[None]]


class Admission:
    def __init__(self, state: RedisState, config: ManagerConfig, evict: Evict) -> None:
        self._state = state
        self._config = config
        self._evict = evict
        # Per user with a start under way here: its waiters' wake-up (``slot_freed``)
        # and how many starts; both forgotten when the last one ends.
        self._slot_events: dict[str, asyncio.Event] = {}
        self._admitting: Counter[str] = Counter()
        self._nudged: dict[tuple[str, str], float] = {}

    async def admit(self, lease: Lease, org: str = "", joining: bool = False) -> bool:
        """Hold one of the user's cap slots (and of their organisation's: ``org``, else
        the one recorded for the user); False when evicted before starting;
        ConcurrencyLimitReached when refused. ``joining``: a connection's join asked for
        the start; at the user's connection cap it is refused before any eviction
        (LimitExceeded), as its registration would be."""
        user = lease.user
        self._admitting[user] += 1
        try:
            return await self._admit(lease, org, joining)
        finally:
            self._admitting[user] -= 1
            if not self._admitting[user]:  # none of the user's starts waits any more
                del self._admitting[user]
                self._slot_events.pop(user, None)

    async def _admit(self, lease: Lease, org: str, joining: bool) -> bool:
        cfg = self._config
        cap = cfg.max_concurrent_conversations
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.start_timeout
        # Before the first ADMIT: a slot freed while it runs wakes the wait below.
        event = self._slot_events.setdefault(lease.user, asyncio.Event())
        adm = await self._state.admit(
            lease.user,
            lease.sid,
            lease.inc,
            cap,
            retry=False,
            score_ms=int(time.time() * 1000),
            reject=cfg.cap_policy == "reject",
            # Recorded for the organisation's cap only (restarts carry no token).
            org=org if cfg.max_concurrent_conversations_per_org else "",
            connections=cfg.max_connections_per_user if joining else 0,
        )
        if adm.status == "rejected":
            raise ConcurrencyLimitReached("user", lease.user, cap, adm.claims)
        if adm.status == "connections":
            raise too_many_connections(lease.user, cfg.max_connections_per_user)
        delay = 0.02
        while True:
            if adm.evicted:
                await self._nudge(lease.user, adm.evicted)
            if adm.status == "go":
                if adm.org and cfg.max_concurrent_conversations_per_org:
                    await self._org_place(lease, adm.org)
                return True
            if adm.status == "evicted":
                return False
            remaining = deadline - loop.time()
            if remaining <= 0:
                await self._state.release_slot(lease.user, lease.sid, lease.inc)
                raise CapacityTimeout(
                    f"waited {self._config.start_timeout}s for a slot of user {lease.user!r}"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, remaining)):
                    await event.wait()
            delay = min(delay * 2, 0.25)
            event = self._slot_events.setdefault(lease.user, asyncio.Event())
            adm = await self._state.admit(lease.user, lease.sid, lease.inc, cap, retry=True)

    async def _org_place(self, lease: Lease, org: str) -> None:
        """Take one of ``org``'s places (the user's slot is held; the caller gives it
        back if this raises)."""
        cap = self._config.max_concurrent_conversations_per_org
        holder = org_holder(lease)
        place = await self._state.org_admit(org, lease.sid, holder, cap)
        if not place.held and await self._state.org_prune(org, place.entries):
            place = await self._state.org_admit(org, lease.sid, holder, cap)
        if not place.held:
            raise ConcurrencyLimitReached("organisation", org, cap, place.taken)

    def slot_freed(self, user: str) -> None:
        """A loop of ``user`` stopped: wake the starts waiting for one of their slots."""
        event = self._slot_events.pop(user, None)
        if event is not None:
            event.set()

    async def _nudge(self, user: str, evicted: Iterable[tuple[str, str]]) -> None:
        """Ask the owners of evicted loops to stop them (again, at most once a second)."""
        now = time.monotonic()
        for sid, inc in evicted:
            if now - self._nudged.get((sid, inc), 0.0) < 1.0:
                continue
            self._nudged[(sid, inc)] = now
            await self._evict(sid, user, inc)
        if len(self._nudged) > 10_000:
            self._nudged = {k: v for k, v in self._nudged.items() if now - v < 5.0}
