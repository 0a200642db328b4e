"""Node membership: the heartbeat lease and the local lease clock.

A node's conversation leases are its incarnation's heartbeat lease: renewing one key
renews them all. Renewals are sent from a thread of their own (``LeaseKeeper``) with its
own Redis connection, so a node whose event loop is busy (a join burst on a saturated
machine) keeps its lease; the event loop proves it is alive by ticking, and the keeper
stops renewing once the loop has not ticked for ``node_ttl - lease_margin`` (a loop that
is stuck is as good as dead). The node measures validity with the monotonic clock from
the moment it *sent* each successful renewal, and fences every loop ``lease_margin``
before the lease could expire in Redis; a successor can only take over after that
expiry, and the fencing epoch rejects any write the old owner still attempts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable

from .config import ManagerConfig
from .errors import NodeIdInUse
from .state import LeaseRenewer, RedisState

log = logging.getLogger(__name__)

RETRY_AFTER = 0.1  # seconds between renewal attempts while Redis does not answer


def new_incarnation(node: str) -> str:
    return f"{node}/{uuid.uuid4().hex[:12]}"


class Membership:
    """This node's registration: its incarnation, the local lease clock, the keeper.

    ``state`` should be on a connection of its own (``Backend.registration_state``).
    Parts that must stop writing the moment the lease lapses register with
    ``on_lapse``; ``lost`` is set when the incarnation must be replaced (re-register).
    """

    def __init__(self, state: RedisState, config: ManagerConfig) -> None:
        self._state = state
        self._config = config
        self._lapse_listeners: list[Callable[[str], None]] = []
        self.lost = asyncio.Event()
        self.node = config.node_id
        self.inc = ""
        self._valid_until = 0.0  # time.monotonic() at which the Redis lease may expire
        self._watchdog: asyncio.TimerHandle | None = None
        self._keeper: LeaseKeeper | None = None
        self.last_tick = time.monotonic()
        self.lapsed = True
        self.renew_failures = 0
        self.renewed_at = time.monotonic()  # the last successful renewal was sent then

    def on_lapse(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(why)`` synchronously whenever the lease lapses."""
        self._lapse_listeners.append(listener)

    @property
    def ttl_ms(self) -> int:
        return int(self._config.node_ttl * 1000)

    @property
    def heartbeat_interval(self) -> float:
        return self._config.heartbeat_interval

    @property
    def max_stall(self) -> float:
        """How long the event loop may go without ticking before renewals stop."""
        return self._config.node_ttl - self._config.lease_margin

    def lease_valid(self) -> bool:
        return not self.lapsed and time.monotonic() < self._valid_until - self._config.lease_margin

    async def register(self) -> str:
        """Register a new incarnation; returns the previous one of this node id ('' if none).

        If another incarnation of this node id still holds the lease (a restart within
        ``node_ttl``), wait for it to expire rather than run beside it.
        """
        inc = new_incarnation(self.node)
        wait = self._config.node_ttl + 2
        deadline = time.monotonic() + wait
        waiting_for = ""
        while True:
            t0 = time.monotonic()
            ok, other = await self._state.register(self.node, inc, self.ttl_ms)
            if ok:
                self.inc = inc
                self.lapsed = False
                self._arm(t0)
                return other
            if time.monotonic() > deadline:
                raise NodeIdInUse(
                    f"node id {self.node!r} is in use by {other} (another node started "
                    f"with it, still alive after {wait:.0f}s): give each node an id of its own"
                )
            if other != waiting_for:  # once per holder, not per try
                waiting_for = other
                log.warning(
                    "node id %s is still leased by %s (a run of this node that did not "
                    "stop cleanly, or another process with this node id): waiting up to "
                    "%.0fs for it to expire",
                    self.node,
                    other,
                    wait,
                )
            await asyncio.sleep(0.25)

    def start_keeper(self, renewer: LeaseRenewer) -> None:
        """Start renewing from the keeper thread (after ``register``); the keeper owns
        ``renewer`` and closes it when it stops."""
        if self._keeper is None:
            self._keeper = LeaseKeeper(self, renewer, asyncio.get_running_loop())
            self._keeper.start()

    async def renew_now(self) -> bool:
        """One renewal by the keeper, now (for tools and tests); False if Redis failed."""
        if self._keeper is None:
            raise RuntimeError("the lease keeper is not running")
        return await asyncio.to_thread(self._keeper.renew)

    def tick(self) -> None:
        """Called from the event loop: it is running (see ``max_stall``)."""
        self.last_tick = time.monotonic()

    async def tick_loop(self) -> None:
        """Tick: tells the lease keeper thread that this event loop runs. Renewals and
        their answers need nothing else from the loop, so a busy loop keeps its lease."""
        interval = min(0.25, self._config.heartbeat_interval / 2)
        while True:
            self.tick()
            await asyncio.sleep(interval)

    def _arm(self, sent_at: float) -> None:
        self.renewed_at = sent_at
        self._valid_until = sent_at + self._config.node_ttl
        if self._watchdog is not None:
            self._watchdog.cancel()
        loop = asyncio.get_running_loop()
        delay = self._valid_until - self._config.lease_margin - time.monotonic()
        self._watchdog = loop.call_later(max(0.0, delay), self._expire)

    def _expire(self) -> None:
        # The clock, not the timer, decides; a timer that fired a hair early looks again.
        if self.lapsed:
            return
        deadline = self._valid_until - self._config.lease_margin
        if time.monotonic() < deadline:
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(deadline - time.monotonic() + 0.001, self._expire)
        else:
            self._lapse("lease not renewed")

    def _lapse(self, why: str) -> None:
        if self.lapsed:
            return
        self.lapsed = True
        log.error("node %s lease lapsed (%s): fencing its loops", self.inc, why)
        for listener in self._lapse_listeners:
            listener(why)

    def lapse(self, why: str) -> None:
        """Treat the lease as lapsed now (fault injection: what a stalled event loop or a
        lost link leads to), as the lease clock would."""
        self._lapse(why)

    def check(self) -> bool:
        """Enforce the local lease clock now (a paused process may not have run its timer)."""
        if not self.lapsed and not self.lease_valid():
            self._lapse("lease clock ran out")
        return not self.lapsed

    def renewed(self, inc: str, sent_at: float, ok: bool) -> None:
        """A renewal's answer, handed to the event loop by the keeper."""
        if inc != self.inc:
            return  # a new incarnation registered meanwhile: this answer is stale
        self.renew_failures = 0
        if not ok:
            self.lost_in_redis()
        elif self.lapsed:
            self.lost.set()  # renewed too late: start a fresh incarnation all the same
        else:
            self._arm(sent_at)

    def lost_in_redis(self) -> None:
        """Redis no longer holds this incarnation's lease (a renewal refused, or a
        refresh that found it gone): its loops are fenced, and it registers afresh."""
        self._lapse("lease lost in Redis")
        self.lost.set()

    def renew_failed(self, exc: BaseException) -> None:
        self.renew_failures += 1
        if self.renew_failures % 10 == 1:  # retries come every 0.1 s: log a few
            log.warning("heartbeat failed (%r); lease valid for %.1fs", exc, self.remaining())
        self.check()

    def renewal_age(self) -> float | None:
        """Seconds since the last successful renewal was sent (None before registering)."""
        return time.monotonic() - self.renewed_at if self.inc else None

    def remaining(self) -> float:
        return max(0.0, self._valid_until - time.monotonic())

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._keeper is not None:
            self._keeper.stop()
            self._keeper = None


class LeaseKeeper(threading.Thread):
    """Renews the node's lease every ``heartbeat_interval`` from its own thread and Redis
    connection, while the event loop keeps ticking; answers go back to the loop."""

    def __init__(
        self, membership: Membership, renewer: LeaseRenewer, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(name=f"lease-{membership.node}", daemon=True)
        self._m = membership
        self._loop = loop
        self._interval = membership.heartbeat_interval
        self._renewer = renewer
        self._stopping = threading.Event()
        self._stalled = False

    def run(self) -> None:
        wait = self._interval
        try:
            while not self._stopping.wait(wait):
                # After a failure, try again soon: Redis may be back well before the
                # next interval, and the lease clock keeps running.
                wait = self._interval if self.renew() else min(RETRY_AFTER, self._interval)
        finally:
            self._renewer.close()

    def renew(self) -> bool:
        """One renewal attempt; False when Redis could not be reached."""
        m = self._m
        stalled = time.monotonic() - m.last_tick > m.max_stall
        if stalled != self._stalled:
            self._stalled = stalled
            if stalled:
                log.error(
                    "event loop of %s has not run for %.1fs: renewals stop", m.inc, m.max_stall
                )
        if stalled:
            return True
        inc, sent_at = m.inc, time.monotonic()
        try:
            ok = self._renewer.renew(m.node, inc, m.ttl_ms)
        except Exception as exc:
            # or redis-py's own error in the middle of a reconnect)
            self._call(m.renew_failed, exc)
            return False
        self._call(m.renewed, inc, sent_at, ok)
        return True

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the node is gone
            self._stopping.set()

    def stop(self) -> None:
        self._stopping.set()
