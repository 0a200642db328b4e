"""Sharded pub/sub on Redis Cluster: one subscription per shard, each with its own probe.

A conversation's channel carries its hash tag, so ``SPUBLISH`` (from the accept and
commit scripts) reaches only the shard that holds the conversation, and a node
subscribes (``SSUBSCRIBE``) on that shard's master. Each shard's subscription is a
``Subscriptions`` of its own: its own connection, listener task and silent-link probe (a
channel whose tag falls in that shard's slots), so a slow or failing shard holds up no
other. The channels' refcounts are kept here, the shard subscriptions hold each channel
once.

When a shard's subscription cannot reconnect (its master failed over), or Redis drops one
of its channels unasked or refuses one with ``MOVED`` (the slot moved; this node's map
had not seen it), the slot map is read again: shards whose
master changed, or whose probe's slot moved, get a new subscription, channels whose
slot moved follow it, and the listener is told to catch every connection up from the
logs, gap-free.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .errors import REDIS_TROUBLE
from .links import Endpoint
from .slots import Address, SlotMap, slot_of, tag_in
from .subscriptions import ChannelMoved, Listener, Publish, Subscriptions
from .tasks import TaskSet

log = logging.getLogger(__name__)

ReadMap = Callable[[], Awaitable[SlotMap]]
# Times a waiter follows its channel from shard to shard before it gives up (each move is
# a remap: a reshard in progress), and how soon a map read that lags a MOVED is read again.
MOVES = 5
LAGGING_MAP_RETRY = 0.5
Connect = Callable[[Address], Endpoint]


class ShardedSubscriptions:
    """The node's subscriptions on a Redis Cluster; the same interface as
    ``Subscriptions``. ``read_map`` reads the slot map; ``connect`` says how to reach a
    master; ``publish`` sends a probe (SPUBLISH, to its channel's shard);
    ``probe_stem`` names this node's probe channels."""

    def __init__(
        self,
        *,
        read_map: ReadMap,
        connect: Connect,
        publish: Publish,
        probe_stem: str,
        prefix: str,
        probe_interval: float,
        confirm_timeout: float = 5.0,
    ) -> None:
        self._read_map = read_map
        self._connect = connect
        self._publish = publish
        self._probe_stem = probe_stem
        self._prefix = prefix
        self._probe_interval = probe_interval
        self._confirm_timeout = confirm_timeout
        self._map: SlotMap | None = None
        self._shards: dict[Address, Subscriptions] = {}
        self._refs: dict[str, int] = {}
        self._listener: Listener | None = None
        self._tasks = TaskSet(log)
        self._trouble = asyncio.Event()
        self._remapping = asyncio.Lock()
        self._retired_messages = 0
        self._retired_reconnects = 0
        self.remaps = 0

    # -- the Subscriptions interface -------------------------------------------------
    @property
    def channels(self) -> set[str]:
        return set(self._refs)

    @property
    def healthy(self) -> bool:
        return bool(self._shards) and all(s.healthy for s in self._shards.values())

    @property
    def messages(self) -> int:
        return self._retired_messages + sum(s.messages for s in self._shards.values())

    @property
    def reconnects(self) -> int:
        live = sum(s.reconnects for s in self._shards.values())
        return self._retired_reconnects + live + self.remaps

    async def start(self) -> None:
        self._map = await self._read_map()
        for master in self._map.masters:
            await self._open_shard(master)

    async def add(self, channel: str, *, wait: bool = True) -> None:
        n = self._refs.get(channel, 0)
        self._refs[channel] = n + 1
        shard = self._shard_of(channel)
        if shard is None:
            self._trouble.set()  # no master serves it now: placed after the next remap
            return
        try:
            if n == 0:
                await shard.add(channel, wait=wait)  # the shard holds each channel once
            elif wait:
                await shard.confirmed(channel)
        except ChannelMoved:
            await self._follow(channel)

    async def _follow(self, channel: str) -> None:
        """A remap moved ``channel`` (or closed its shard) while it was being confirmed:
        once the remap is over, confirmed where it is now (again, should it move again)."""
        for _ in range(MOVES):
            async with self._remapping:  # the channel placed on its new shard
                pass
            now = self._shard_of(channel)
            if now is None:
                return  # no master serves it now: placed after the next remap
            try:
                return await now.confirmed(channel)
            except ChannelMoved:
                continue
        raise ChannelMoved(channel)

    async def discard(self, channel: str) -> None:
        n = self._refs.get(channel, 0)
        if n > 1:
            self._refs[channel] = n - 1
            return
        self._refs.pop(channel, None)
        shard = self._shard_of(channel)
        if n == 1 and shard is not None:
            await shard.discard(channel)

    async def run(self, listener: Listener) -> None:
        """Run every shard's listener; remap whenever one of them is in trouble."""
        self._listener = listener
        for master, shard in self._shards.items():
            self._tasks.spawn(shard.run(listener), f"pubsub:{master[0]}:{master[1]}")
        while True:
            await self._trouble.wait()
            await asyncio.sleep(0.1)  # let the trouble of one failover arrive together
            self._trouble.clear()
            try:
                await self._remap()
            except REDIS_TROUBLE as exc:
                log.warning("slot map read failed (%s); trying again", exc)
                await asyncio.sleep(0.5)
                self._trouble.set()

    async def aclose(self) -> None:
        await self._tasks.aclose()
        for shard in self._shards.values():
            await shard.aclose()
        self._shards.clear()

    @property
    def probe_channels(self) -> dict[Address, str]:
        """Each shard's master -> the channel its probe goes to (in that master's slots)."""
        return {master: shard.probe_channel for master, shard in self._shards.items()}

    # -- shards ----------------------------------------------------------------------
    def _shard_of(self, channel: str) -> Subscriptions | None:
        master = self._map.master_of(slot_of(channel)) if self._map is not None else None
        return self._shards.get(master) if master is not None else None

    async def _open_shard(self, master: Address) -> Subscriptions:
        assert self._map is not None
        tag = tag_in(self._map.slots_of(master), f"p:{self._probe_stem}")
        shard = Subscriptions(
            self._connect(master),
            self._publish,
            f"{self._prefix}:{tag}:probe",
            self._probe_interval,
            self._confirm_timeout,
            sharded=True,
            on_trouble=self._trouble.set,
        )
        self._shards[master] = shard
        await shard.start()
        return shard

    async def _close_shard(self, master: Address) -> None:
        shard = self._shards.pop(master)
        shard.moved_away()  # its waiters follow their channels to their new shards
        self._retired_messages += shard.messages
        self._retired_reconnects += shard.reconnects
        await shard.aclose()

    async def _remap(self) -> None:
        """Read the slot map; give each channel the shard that serves it now."""
        async with self._remapping:
            await self._remap_now()

    async def _remap_now(self) -> None:
        fresh = await self._read_map()
        old = self._map
        self._map = fresh
        # A shard whose probe's slot moved to another master (a reshard) is opened again
        # with a probe in its slots: its link resubscribing the old probe would get
        # MOVED, for as long as the node runs.
        gone = [
            m
            for m, shard in self._shards.items()
            if m not in fresh.masters or fresh.master_of(slot_of(shard.probe_channel)) != m
        ]
        for master in gone:
            await self._close_shard(master)
        changed = bool(gone) or any(m not in self._shards for m in fresh.masters)
        for master in fresh.masters:
            if master not in self._shards:
                shard = await self._open_shard(master)
                if self._listener is not None:
                    self._tasks.spawn(shard.run(self._listener), f"pubsub:{master}")
        lagging = False
        for channel in self._refs:
            before = old.master_of(slot_of(channel)) if old is not None else None
            now = fresh.master_of(slot_of(channel))
            if now is None:
                continue
            target = self._shards[now]
            if before == now and channel in target.moved:
                # Refused with MOVED where the map still says it is: the map was read
                # from a node whose view lags. Read it again shortly; its waiter waits.
                lagging = True
                continue
            if before != now and before in self._shards:
                self._shards[before].forget(channel)
            if channel not in target.channels:
                await target.add(channel, wait=False)
                changed = True
        self.remaps += 1
        if lagging:
            asyncio.get_running_loop().call_later(LAGGING_MAP_RETRY, self._trouble.set)
        if changed:
            log.warning("pub/sub remapped to %d shard(s); catching up", len(fresh.masters))
            if self._listener is not None:
                await self._listener.reconnected()
