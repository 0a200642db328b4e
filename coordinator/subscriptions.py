"""Interest-based pub/sub: one Redis subscription per node, refcounted per channel.

A node subscribes to a conversation's channel only while it holds a connection in that
conversation or runs its loop, so events travel only to nodes that need them. The
subscription is a connection of its own (``links.Link``, hiredis parsing the pushed
messages in ``data_received``: no call through redis-py's pub/sub layers per message or
per (un)subscribe, which cost 150 us of CPU each against 8). Its listener survives Redis
trouble: it reconnects with capped, jittered backoff (behind Sentinel, to wherever the
master is now), subscribes again to everything it held, reports the reconnect (so
callers can catch up from the durable logs), and probes the subscription through its own
node channel, published on another connection, to detect one that is connected but
silent. A listener that falls behind stops reading the socket (Redis buffers, then drops
a subscriber too far behind, and the reconnect catches it up) instead of queueing
without bound here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError

from .backoff import Backoff
from .errors import REDIS_TROUBLE, redis_glitch
from .keys import KeySchema
from .links import Endpoint, Link, LinkSlot, Locate, pack
from .slots import slot_of

log = logging.getLogger(__name__)

PROBE = b"\x00probe"
PUBSUB_NAME = "coordinator-pubsub"  # the subscription connection's CLIENT SETNAME
# Messages read and not yet handled: reading stops above HIGH and resumes below LOW.
HIGH, LOW = 2_000, 200
# Channels per SUBSCRIBE when resubscribing (a shard's SSUBSCRIBE takes one slot's).
BATCH = 500
PUSHED = frozenset(
    (b"message", b"smessage", b"subscribe", b"ssubscribe", b"unsubscribe", b"sunsubscribe")
)

Publish = Callable[[str, bytes], Awaitable[Any]]


class ChannelMoved(RedisConnectionError):
    """A shard channel awaited here was moved to another shard's subscription (as Redis
    trouble to whoever cannot follow it: the subscription is not there yet)."""


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


class _SubscriberLink(Link):
    """A subscriber's connection: pushed messages and confirmations go to ``pushed``
    (which returns True to hold the reading: the rest stays parsed-to-be in the reader,
    the socket unread, until ``release``), the handshake's replies to their calls;
    ``lost`` is told when the link fails, ``refused`` when Redis refuses a (un)subscribe
    for lack of a permission (``NOPERM``), ``moved`` when a master refuses a shard
    channel's SSUBSCRIBE because its slot is served elsewhere now (the slot's number)."""

    def __init__(
        self,
        pushed: Callable[[list[Any]], bool],
        lost: Callable[[], None],
        refused: Callable[[Exception], None],
        moved: Callable[[int], None],
    ) -> None:
        super().__init__()
        self._pushed = pushed
        self._lost = lost
        self._refused = refused
        self._moved = moved
        self.held = False

    def received(self, reply: Any) -> bool:
        if type(reply) is list and reply and reply[0] in PUSHED:
            if self._pushed(reply) and self.transport is not None:
                self.held = True
                self.transport.pause_reading()
            return self.held or self.failure is not None
        if isinstance(reply, hiredis.ReplyError) and not self.waiting:
            words = str(reply).split()
            if words[:1] == ["MOVED"] and len(words) == 3 and words[1].isdigit():
                # The node's slot map is behind a reshard: that channel alone was refused
                # (the link and its other channels are fine).
                self._moved(int(words[1]))
                return False
            # A (UN)SUBSCRIBE refused (an ACL without the channel): said, then reconnected.
            if str(reply).startswith("NOPERM"):
                # No reconnect gives a permission: who waits for a confirmation is told.
                self._refused(
                    NoPermissionError(
                        f"Redis refused a subscription: {reply} (the Redis user's ACL must "
                        "allow it, as deploy/redis-users.acl does)"
                    )
                )
            self.fail(RedisConnectionError(f"Redis refused a subscription: {reply}"))
            return True
        return super().received(reply)

    def release(self) -> None:
        """Read on: what the reader holds first, then the socket."""
        self.held = False
        self.parse()
        if not self.held and self.failure is None and self.transport is not None:
            self.transport.resume_reading()

    def fail(self, exc: Exception) -> None:
        first = self.failure is None
        super().fail(exc)
        if first:
            self._lost()


class Subscriptions:
    """One subscription connection to ``endpoint`` (``locate``: where it is now, asked on
    each connect, behind Sentinel); ``publish`` sends the probe to ``probe_channel``
    (the node's own channel, or a shard's) on another connection, through the master.

    ``sharded``: shard channels (SSUBSCRIBE, SPUBLISH), on one master of a Redis Cluster.
    ``on_trouble``: told when reconnecting fails, or when Redis drops a subscription
    unasked or refuses one (its slot moved): the owner of several shards' subscriptions
    reads the slot map again (``sharded.py``) and moves the channels (``forget``), the
    refused ones (``moved``) too.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        publish: Publish,
        probe_channel: str,
        probe_interval: float = 5.0,
        confirm_timeout: float = 5.0,
        *,
        connect_timeout: float = 5.0,
        locate: Locate | None = None,
        sharded: bool = False,
        on_trouble: Callable[[], None] | None = None,
    ) -> None:
        self._slot = LinkSlot(
            endpoint,
            connect_timeout=connect_timeout,
            locate=locate,
            factory=lambda: _SubscriberLink(
                self._pushed, self._wake_up, self._refused, self._moved
            ),
        )
        self._publish = publish
        self._sharded = sharded
        self._on_trouble = on_trouble
        self._kind = b"smessage" if sharded else b"message"
        self._confirm_kind = b"ssubscribe" if sharded else b"subscribe"
        self._subscribe_command = "SSUBSCRIBE" if sharded else "SUBSCRIBE"
        self._unsubscribe_command = "SUNSUBSCRIBE" if sharded else "UNSUBSCRIBE"
        self._listener: Listener | None = None
        self._probe_channel = probe_channel
        self._probe_interval = probe_interval
        self._confirm_timeout = confirm_timeout
        self._refs: dict[str, int] = {}
        self._confirmed: dict[str, asyncio.Future[None]] = {}  # subscriptions pending
        # SUBSCRIBEs written on this link and not confirmed yet, per channel: a channel
        # left and taken again before its first confirmation came is confirmed by its last.
        self._unconfirmed: dict[str, int] = {}
        self.moved: set[str] = set()  # channels refused with MOVED, not subscribed here
        self._inbox: collections.deque[tuple[str, bytes]] = collections.deque()
        self._wake: asyncio.Future[None] | None = None
        self._probing: asyncio.Task[None] | None = None
        # Whether the link delivered its probe since it was (re)made: until it did, a
        # failure makes the next reconnect wait longer (one refused at once would spin).
        self._proven = True
        self._last_heard = time.monotonic()
        self.healthy = False
        self._closing = False
        self.reconnects = 0
        self.messages = 0

    @property
    def channels(self) -> set[str]:
        return set(self._refs)

    @property
    def backlog(self) -> int:
        """Messages read and not yet handed to the listener."""
        return len(self._inbox)

    def _send(self, command: str, channels: list[str]) -> None:
        """Write (UN)SUBSCRIBE for ``channels`` if connected; a link that is down
        subscribes to what is still referenced once it is back (``_resubscribe``)."""
        link = self._slot.current()
        if link is None or not channels:
            return
        per = 1 if self._sharded else BATCH  # a shard channel per SSUBSCRIBE: its own slot
        link.write([pack(command, *channels[i : i + per]) for i in range(0, len(channels), per)])
        if command == self._subscribe_command:
            for channel in channels:
                self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1

    async def start(self) -> None:
        await self.add(self._probe_channel, wait=False)
        await self._slot.get()
        self._send(self._subscribe_command, [self._probe_channel])
        with contextlib.suppress(TimeoutError):
            await self.confirmed(self._probe_channel)
        self.healthy = True

    @property
    def probe_channel(self) -> str:
        """The channel this subscription's probe is published to (``PROBE``)."""
        return self._probe_channel

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
                self._send(self._subscribe_command, [channel])
        if wait:
            await self.confirmed(channel)

    async def confirmed(self, channel: str) -> None:
        """Return once Redis confirmed the subscription to ``channel`` (if pending)."""
        fut = self._confirmed.get(channel)
        if fut is not None and not fut.done():
            async with asyncio.timeout(self._confirm_timeout):
                await asyncio.shield(fut)
        elif fut is not None and (refusal := fut.exception()) is not None:
            raise refusal  # refused (``_refused``), and not confirmed since

    def _refused(self, exc: Exception) -> None:
        """Redis refused subscriptions for lack of a permission: every confirmation
        pending fails with ``exc`` at once (a start-up ends with it instead of waiting
        out the timeout), and stays failed until a later link confirms the channel."""
        for fut in self._confirmed.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: no "never retrieved" log when none waits

    def _moved(self, slot: int) -> None:
        """A master refused the SSUBSCRIBE of a channel in ``slot``: the slot moved (a
        reshard) and the owner's map did not know. Its reply was the refusal; the owner
        reads the map again and moves it."""
        for channel in self._unconfirmed:
            if slot_of(channel) == slot:
                left = self._unconfirmed.pop(channel) - 1
                if left > 0:
                    self._unconfirmed[channel] = left
                self.moved.add(channel)
                break
        if self._on_trouble is not None:
            self._on_trouble()

    async def discard(self, channel: str) -> None:
        n = self._refs.get(channel, 0)
        if n <= 1:
            self._refs.pop(channel, None)
            self._confirmed.pop(channel, None)
            self.moved.discard(channel)
            if n == 1:
                # A link that is down resubscribes only to what is still referenced;
                # until then a stray message is dropped by id.
                self._send(self._unsubscribe_command, [channel])
        else:
            self._refs[channel] = n - 1

    def _pushed(self, reply: list[Any]) -> bool:
        """A message or a confirmation, read by the link (in its ``data_received``).
        True: hold the reading, the listener is ``HIGH`` messages behind."""
        kind, channel = reply[0], reply[1]
        name = channel.decode() if isinstance(channel, bytes) else str(channel)
        if kind == self._confirm_kind:
            left = self._unconfirmed.pop(name, 1) - 1
            if left > 0:
                self._unconfirmed[name] = left
                return False
            fut = self._confirmed.pop(name, None)  # none pending: confirmed
            if fut is not None and not fut.done():
                fut.set_result(None)
            return False
        if kind == b"sunsubscribe" and name in self._refs and self._on_trouble is not None:
            self._on_trouble()  # dropped unasked: its slot moved to another shard
            return False
        # Anything arriving proves the subscription delivers: a busy node may read its own
        # probe late, behind a backlog, without the link being silent.
        self._last_heard = time.monotonic()
        if kind != self._kind or len(reply) < 3:
            return False
        data = reply[2]
        if name == self._probe_channel and data == PROBE:
            self._proven = True  # the link delivers
            return False
        if not isinstance(data, bytes):
            return False
        self.messages += 1
        self._inbox.append((name, data))
        self._wake_up()
        return len(self._inbox) >= HIGH

    def _wake_up(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def run(self, listener: Listener) -> None:
        """The listener loop, handing messages to ``listener``; runs until ``aclose``
        (or cancellation)."""
        self._listener = listener
        backoff = Backoff(base=0.05, cap=2.0)
        probe_at = time.monotonic() + self._probe_interval
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                if self._inbox:
                    channel, data = self._inbox.popleft()
                    if len(self._inbox) < LOW:
                        self._release()
                    try:
                        await listener.message(channel, data)
                    except Exception:
                        log.exception("error handling a pub/sub message; continuing")
                elif self._slot.current() is None:
                    raise self._slot.failure or RedisConnectionError("the link is lost")
                else:
                    self._wake = loop.create_future()
                    timer = loop.call_at(
                        loop.time() + max(0.0, probe_at - time.monotonic()), self._wake_up
                    )
                    try:
                        await self._wake
                    finally:
                        timer.cancel()
                        self._wake = None
                if self._proven:  # not a link that fails as soon as it is made
                    backoff.reset()
                now = time.monotonic()
                if now >= probe_at:
                    probe_at = now + self._probe_interval
                    if now - self._last_heard > 3 * self._probe_interval:
                        raise RedisConnectionError("subscription connected but silent")
                    self._send_probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Redis trouble, or an error of our own: the listener must not die.
                if self._closing:
                    return
                if not isinstance(exc, REDIS_TROUBLE) and not redis_glitch(exc):
                    log.exception("pub/sub listener failed; reconnecting")
                self.healthy = False
                delay = backoff.next()
                log.warning("pub/sub link lost (%s); reconnecting in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                if not self._closing:  # closed meanwhile: nothing to reconnect
                    await self._resubscribe()

    def _send_probe(self) -> None:
        """Publish the probe from a task of its own (a publish that waits out a
        failover holds up no message); one at a time. One that fails is a probe not
        heard: three in a row and the link is replaced."""
        if self._probing is None or self._probing.done():
            self._probing = asyncio.create_task(self._probe(), name="pubsub-probe")

    async def _probe(self) -> None:
        try:
            await self._publish(self._probe_channel, PROBE)
        except Exception as exc:
            log.debug("pub/sub probe not sent: %r", exc)

    def _release(self) -> None:
        link = self._slot.current()
        if isinstance(link, _SubscriberLink) and link.held:
            link.release()

    async def _resubscribe(self) -> None:
        self._slot.drop(RedisConnectionError("reconnecting the subscription"))
        try:
            await self._slot.get()
        except Exception as exc:  # as in run: Redis trouble
            log.warning("resubscribe failed: %r", exc)
            if self._on_trouble is not None:
                self._on_trouble()
            return
        # Subscriptions still pending are confirmed by the new link's replies.
        self._unconfirmed.clear()
        self._proven = False
        self._send(self._subscribe_command, list(self._refs))
        self._last_heard = time.monotonic()
        self.healthy = True
        self.reconnects += 1
        try:
            if self._listener is not None:
                await self._listener.reconnected()
        except Exception:
            log.exception("catch-up after resubscribe failed")

    def drop(self, why: Exception) -> None:
        """Drop the link (its server is not the master any more): the listener
        reconnects, subscribes again and catches up."""
        self._slot.drop(why)
        self._wake_up()

    def moved_away(self) -> None:
        """This shard's subscription is closed by a remap: whoever waits for a
        confirmation here is told ``ChannelMoved``, to wait where the channel is now."""
        for channel in list(self._confirmed):
            self._fail_waiter(channel)

    def _fail_waiter(self, channel: str) -> None:
        fut = self._confirmed.pop(channel, None)
        if fut is not None and not fut.done():
            fut.set_exception(ChannelMoved(channel))
            fut.exception()  # retrieved: no "never retrieved" log when none waits

    def forget(self, channel: str) -> None:
        """Drop ``channel`` without unsubscribing (Redis dropped or refused it: its slot
        moved). Whoever waits for its confirmation here is told ``ChannelMoved``, to wait
        where it is subscribed now."""
        self._refs.pop(channel, None)
        self._unconfirmed.pop(channel, None)
        self.moved.discard(channel)
        self._fail_waiter(channel)

    async def aclose(self) -> None:
        """Stop the listener: closing the connection wakes it."""
        self._closing = True
        self._slot.aclose()
        self._wake_up()
        if self._probing is not None:
            self._probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probing


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
