"""Interest-based pub/sub: one Redis subscription per node, refcounted per channel.

A node subscribes to a conversation's channel only while it holds a connection in that
conversation or runs its loop, so events travel only to nodes that need them. The
listener survives Redis trouble: it reconnects with capped, jittered backoff, subscribes
again to everything it held, reports the reconnect (so callers can catch up from the
durable logs), and probes the subscription through its own node channel to detect one
that is connected but silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from .backoff import Backoff
from .errors import REDIS_TROUBLE, redis_glitch
from .keys import KeySchema
from .state import text

log = logging.getLogger(__name__)

PROBE = b"\x00probe"


class Listener(Protocol):
    """What the subscription hands its messages to (``node.Router``)."""

    async def message(self, channel: str, data: bytes) -> None: ...

    async def reconnected(self) -> None:
        """Messages may have been lost: read what was missed from the durable logs."""


class Subscription(Protocol):
    """A node's subscription: ``Subscriptions`` (one connection) or, on Redis Cluster,
    ``sharded.ShardedSubscriptions`` (one per shard)."""

    @property
    def messages(self) -> int: ...

    @property
    def channels(self) -> set[str]: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def reconnects(self) -> int: ...

    async def start(self) -> None: ...

    async def add(self, channel: str, *, wait: bool = True) -> None: ...

    async def discard(self, channel: str) -> None: ...

    async def run(self, listener: Listener) -> None: ...

    async def aclose(self) -> None: ...


class Subscriptions:
    """One subscription connection: ``redis`` is a client of its own (not the pool);
    ``probe_channel`` (the node's own channel, or a shard's) carries the probe.

    ``sharded``: shard channels (SSUBSCRIBE, SPUBLISH), on one master of a Redis Cluster.
    ``on_trouble``: told when reconnecting fails, or when Redis drops a subscription
    unasked (its slot moved): the owner of several shards' subscriptions reads the slot
    map again (``sharded.py``).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        probe_channel: str,
        probe_interval: float = 5.0,
        confirm_timeout: float = 5.0,
        *,
        sharded: bool = False,
        on_trouble: Callable[[], None] | None = None,
    ) -> None:
        self._redis = redis
        self._sharded = sharded
        self._on_trouble = on_trouble
        self._kind = "smessage" if sharded else "message"
        self._confirm_kind = "ssubscribe" if sharded else "subscribe"
        self._listener: Listener | None = None
        self._probe_channel = probe_channel
        self._probe_interval = probe_interval
        self._confirm_timeout = confirm_timeout
        self._pubsub: PubSub = redis.pubsub(ignore_subscribe_messages=False)
        self._refs: dict[str, int] = {}
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._last_heard = time.monotonic()
        self.healthy = False
        self._closing = False
        self.reconnects = 0
        self.messages = 0

    @property
    def channels(self) -> set[str]:
        return set(self._refs)

    async def _subscribe(self, *channels: str) -> None:
        if self._sharded:
            await self._pubsub.ssubscribe(*channels)
        else:
            await self._pubsub.subscribe(*channels)

    async def _unsubscribe(self, channel: str) -> None:
        if self._sharded:
            await self._pubsub.sunsubscribe(channel)
        else:
            await self._pubsub.unsubscribe(channel)

    async def _probe(self) -> None:
        if self._sharded:
            await self._redis.spublish(self._probe_channel, PROBE)
        else:
            await self._redis.publish(self._probe_channel, PROBE)

    async def start(self) -> None:
        await self.add(self._probe_channel, wait=False)
        await self._subscribe(self._probe_channel)
        # Read the confirmation ourselves before the listener runs.
        deadline = time.monotonic() + self._confirm_timeout
        while time.monotonic() < deadline:
            msg = await self._pubsub.get_message(timeout=0.5)
            if msg and msg["type"] == self._confirm_kind:
                break
        self._confirmed[self._probe_channel].set_result(None)
        self.healthy = True

    async def add(self, channel: str, *, wait: bool = True) -> None:
        """Take one reference on ``channel``; subscribe on the first one.

        With ``wait`` the call returns once Redis confirmed the subscription, so that a
        read of the durable log made afterwards cannot miss an event published between.
        """
        n = self._refs.get(channel, 0)
        self._refs[channel] = n + 1
        if n == 0:
            self._confirmed[channel] = asyncio.get_running_loop().create_future()
            if channel != self._probe_channel:
                try:
                    await self._subscribe(channel)
                except Exception as exc:
                    # Redis unreachable, or redis-py's connection in the middle of a
                    # reconnect (AttributeError/RuntimeError): the listener resubscribes
                    # everything still referenced once the link is back.
                    log.warning("subscribe to %s deferred: %r", channel, exc)
        if wait:
            await self.confirmed(channel)

    async def confirmed(self, channel: str) -> None:
        """Return once Redis confirmed the subscription to ``channel`` (if pending)."""
        fut = self._confirmed.get(channel)
        if fut is not None and not fut.done():
            async with asyncio.timeout(self._confirm_timeout):
                await asyncio.shield(fut)

    async def discard(self, channel: str) -> None:
        n = self._refs.get(channel, 0)
        if n <= 1:
            self._refs.pop(channel, None)
            self._confirmed.pop(channel, None)
            if n == 1:
                # On failure (as in ``add``), a reconnect subscribes only to what is
                # still referenced; until then a stray message is dropped by id.
                try:
                    await self._unsubscribe(channel)
                except Exception as exc:
                    log.debug("unsubscribe from %s deferred: %r", channel, exc)
        else:
            self._refs[channel] = n - 1

    async def run(self, listener: Listener) -> None:
        """The listener loop, handing messages to ``listener``; runs until ``aclose``
        (or cancellation)."""
        self._listener = listener
        backoff = Backoff(base=0.05, cap=2.0)
        probe_at = time.monotonic() + self._probe_interval
        while not self._closing:
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
                if msg is not None:
                    try:
                        await self._handle(msg)
                    except Exception:
                        log.exception("error handling a pub/sub message; continuing")
                backoff.reset()
                now = time.monotonic()
                if now >= probe_at:
                    probe_at = now + self._probe_interval
                    if now - self._last_heard > 3 * self._probe_interval:
                        raise ConnectionError("subscription connected but silent")
                    await self._probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Redis trouble, or redis-py's own errors in the middle of a reconnect
                # (RuntimeError: no connection after a failed resubscribe; AttributeError:
                # a connection whose writer is gone): the listener must not die.
                if self._closing:
                    return
                if not isinstance(exc, REDIS_TROUBLE) and not redis_glitch(exc):
                    log.exception("pub/sub listener failed; reconnecting")
                self.healthy = False
                delay = backoff.next()
                log.warning("pub/sub link lost (%s); reconnecting in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                await self._resubscribe()

    async def _resubscribe(self) -> None:
        with contextlib.suppress(*REDIS_TROUBLE):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=False)
        try:
            await self._subscribe(*self._refs)
        except Exception as exc:  # as in run: Redis trouble or a redis-py glitch
            log.warning("resubscribe failed: %r", exc)
            if self._on_trouble is not None:
                self._on_trouble()
            return
        self._last_heard = time.monotonic()
        self.healthy = True
        self.reconnects += 1
        for fut in self._confirmed.values():
            if not fut.done():
                fut.set_result(None)
        try:
            if self._listener is not None:
                await self._listener.reconnected()
        except Exception:
            log.exception("catch-up after resubscribe failed")

    async def _handle(self, msg: dict[str, object]) -> None:
        kind = msg["type"]
        channel = msg["channel"]
        name = text(channel)
        if kind == self._confirm_kind:
            fut = self._confirmed.get(name)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if kind == "sunsubscribe" and name in self._refs and self._on_trouble is not None:
            self._on_trouble()  # dropped unasked: its slot moved to another shard
            return
        # Anything arriving proves the subscription delivers: a busy node may read its own
        # probe late, behind a backlog, without the link being silent.
        self._last_heard = time.monotonic()
        if kind != self._kind:
            return
        data = msg["data"]
        if not isinstance(data, bytes):
            return
        if name == self._probe_channel and data == PROBE:
            return
        self.messages += 1
        if self._listener is not None:
            await self._listener.message(name, data)

    def forget(self, channel: str) -> None:
        """Drop ``channel`` without unsubscribing (Redis dropped it: its slot moved)."""
        self._refs.pop(channel, None)
        self._confirmed.pop(channel, None)

    async def aclose(self) -> None:
        """Stop the listener: its pending read fails once the connection is closed."""
        self._closing = True
        with contextlib.suppress(*REDIS_TROUBLE):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]


class Interest:
    """A conversation's channel is subscribed while anything here needs it: a loop or a
    connection each take one reference (``watch``) and give it back (``unwatch``)."""

    def __init__(self, subscriptions: Subscription, keys: KeySchema) -> None:
        self._subscriptions = subscriptions
        self._keys = keys

    async def watch(self, sid: str) -> None:
        """Subscribed (confirmed by Redis) when this returns."""
        await self._subscriptions.add(self._keys.conv_channel(sid))

    async def unwatch(self, sid: str) -> None:
        """Never raises (see ``Subscriptions.discard``)."""
        await self._subscriptions.discard(self._keys.conv_channel(sid))
