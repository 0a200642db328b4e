"""The script lane on Redis Cluster: one pipelined connection per shard.

The same calls as ``lane.ScriptLane`` (accept and commit, with ``WAIT`` behind them when
acknowledged writes must be replicated), each sent to the master of its keys' slot: every
script touches keys of one hash tag, so one slot. A shard's link keeps the pipelining of
the standalone lane: a commit sent behind its accept runs after it, since both go to the
same conversation's shard.

Redirections are followed as a cluster client must: ``MOVED`` sends the call again to
the master it names, which serves the slot until a map read agrees or it cannot be
reached, and re-reads the slot map (a map read from a node whose view lags, as during a
failover, does not send the calls back to the old master: a call used up its
redirections in a millisecond); ``ASK`` sends ``ASKING`` and the call back to back on
the target's link; ``TRYAGAIN``, ``CLUSTERDOWN`` and a lost or refused connection (a
master failing over) are retried with backoff for up to ``timeout`` seconds, the map
re-read each time.
Every script is safe to run again (the accept's token, the commit's dedupe), so a call
whose reply was lost is simply sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .backoff import Backoff
from .lane import LaneCalls, send_commands, send_script
from .links import Endpoint, Link, LinkSlot, pack, retrieved
from .slots import Address, SlotMap, slot_of

log = logging.getLogger(__name__)

T = TypeVar("T")

# As redis-py's cluster client: a call follows at most this many MOVED and ASK replies
# (a lost connection or TRYAGAIN is retried until the call's deadline instead: they took
# from the same 16, and a call gave up ~2 s into a 4 s failover as "too many redirections").
REDIRECTS = 16
# What a read of the slot map may meet from one node (the next is asked).
MAP_TROUBLE = (RedisConnectionError, RedisTimeoutError, OSError, ResponseError)


class ClusterLane(LaneCalls):
    """``seeds``: where to read the slot map first (any nodes of the cluster)."""

    def __init__(self, seeds: Sequence[Endpoint], *, timeout: float, connect_timeout: float):
        if not seeds:
            raise ValueError("a cluster lane needs at least one seed node")
        self._template = seeds[0]
        self._seeds = [(s.host, s.port) for s in seeds]
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._map: SlotMap | None = None
        # Slots a MOVED sent elsewhere than the map says, until a map read agrees.
        self._moved: dict[int, Address] = {}
        self._links: dict[Address, LinkSlot] = {}
        self._refreshing: asyncio.Lock | None = None
        self._closed = False

    # -- the calls (run and run_replicated: LaneCalls) ---------------------------------
    def publish(self, command: str, channel: str, message: bytes) -> None:
        """SPUBLISH without waiting for the reply, to the channel's shard if connected."""
        link = self._link_for(slot_of(channel))
        if link is not None:
            link.send(pack(command, channel, message), self._timeout).add_done_callback(retrieved)

    def _master_of(self, slot: int) -> Address | None:
        moved = self._moved.get(slot)
        if moved is not None:
            return moved
        return self._map.master_of(slot) if self._map is not None else None

    def _link_for(self, slot: int) -> Link | None:
        master = self._master_of(slot)
        holder = self._links.get(master) if master is not None else None
        return holder.current() if holder is not None else None

    async def execute(
        self, commands: Sequence[Sequence[Any]], *, transaction: bool = False
    ) -> list[Any]:
        """As ``ScriptLane.execute``: each command goes to the shard of its key (its
        second word, an EVALSHA's first key; a WAIT to the shard of the command before
        it), the shards' batches together; a transaction must stay in one slot."""
        by_slot: dict[int, list[int]] = {}
        slot = 0
        for i, command in enumerate(commands):
            if command[0] != "WAIT":  # a WAIT goes behind the command before it
                slot = slot_of(str(command[3] if command[0] == "EVALSHA" else command[1]))
            by_slot.setdefault(slot, []).append(i)
        if transaction and len(by_slot) > 1:
            raise ValueError("a transaction's keys must share one hash slot")
        replies: list[Any] = [None] * len(commands)

        async def batch(slot: int, indexes: list[int]) -> None:
            packed = [pack(*commands[i]) for i in indexes]
            got = await self._on_slot(
                slot, lambda link: send_commands(link, packed, transaction, self._timeout)
            )
            if transaction:
                replies[:] = got
                return
            for i, reply in zip(indexes, got, strict=True):
                replies[i] = reply

        await asyncio.gather(*(batch(slot, indexes) for slot, indexes in by_slot.items()))
        return replies

    async def load(self, scripts: Sequence[Any], keys: Sequence[str]) -> None:
        packed = [pack("SCRIPT", "LOAD", script) for script in scripts]
        for slot in {slot_of(key) for key in keys}:
            await self._on_slot(
                slot, lambda link: send_commands(link, packed, False, self._timeout)
            )

    async def _call(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any], replicas: int, ms: int
    ) -> tuple[Any, int]:
        command = pack("EVALSHA", script.sha, len(keys), *keys, *args)
        wait = pack("WAIT", replicas, ms) if replicas else b""
        return await self._on_slot(
            slot_of(keys[0]),
            lambda link: send_script(link, command, wait, script, self._timeout),
        )

    async def _on_slot(self, slot: int, send: Callable[[Link], Awaitable[T]]) -> T:
        """``send`` on the link of ``slot``'s master, following redirections."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        # Short steps: a shard failing over comes back at once, all calls waiting for it.
        backoff = Backoff(base=0.02, cap=0.2)
        asking: Address | None = None
        redirected = 0  # MOVED and ASK followed: a failover's waits are bounded by time
        while redirected <= REDIRECTS:
            if self._closed:
                raise RedisConnectionError("the lane is closed")
            try:
                if asking is not None:
                    link = await self._holder(asking).get()
                    link.send(pack("ASKING"), self._timeout).add_done_callback(retrieved)
                    asking = None
                else:
                    link = self._link_for(slot) or await self._connect(slot)
                return await send(link)
            except ResponseError as exc:
                kind, _, rest = str(exc).partition(" ")
                if kind == "MOVED":
                    self._moved[slot] = _address(rest.split(" ")[-1])
                    redirected += 1
                    if redirected > 2:  # nodes that disagree while a failover settles
                        await asyncio.sleep(backoff.next())
                    with contextlib.suppress(*MAP_TROUBLE):  # the call goes where MOVED said
                        await self.refresh()
                    continue
                if kind == "ASK":
                    asking = _address(rest.split(" ")[-1])
                    redirected += 1
                    continue
                if kind not in ("TRYAGAIN", "CLUSTERDOWN"):
                    raise
                failure: Exception = exc
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                failure = exc
                self._moved.pop(slot, None)  # where MOVED sent it is failing: the map decides
            # The shard is failing over or migrating: wait, read the map again, retry.
            delay = backoff.next()
            if loop.time() + delay > deadline:
                raise RedisConnectionError(f"the cluster did not serve slot {slot}: {failure}")
            await asyncio.sleep(delay)
            try:
                await self.refresh()
            except MAP_TROUBLE as exc:
                log.debug("slot map refresh failed: %s", exc)
        raise RedisConnectionError(f"slot {slot}: too many redirections")

    async def _connect(self, slot: int) -> Link:
        if self._master_of(slot) is None:
            await self.refresh()
        master = self._master_of(slot)
        if master is None:
            raise RedisConnectionError(f"no master serves slot {slot}")
        return await self._holder(master).get()

    def _holder(self, address: Address) -> LinkSlot:
        holder = self._links.get(address)
        if holder is None or holder.closed:
            endpoint = self._template.at(*address)
            holder = LinkSlot(endpoint, connect_timeout=self._connect_timeout)
            self._links[address] = holder
        return holder

    # -- the slot map ----------------------------------------------------------------
    async def refresh(self) -> SlotMap:
        """Read the slot map again (one reader at a time), from a known master, else a
        seed; drop the links to nodes that serve no slot any more."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            candidates = list(self._map.masters) if self._map is not None else []
            candidates += [s for s in self._seeds if s not in candidates]
            failure: Exception | None = None
            for address in candidates:
                try:
                    link = await self._holder(address).get()
                    reply = await link.send(pack("CLUSTER", "SLOTS"), self._timeout)
                    fresh = SlotMap.parse(reply)
                except MAP_TROUBLE as exc:
                    failure = exc
                    continue
                if not fresh.masters:
                    continue
                self._map = fresh
                self._moved = {  # until the map agrees (or the node fails: _on_slot)
                    slot: at for slot, at in self._moved.items() if fresh.master_of(slot) != at
                }
                for gone in set(self._links) - set(fresh.masters) - set(self._seeds):
                    self._links.pop(gone).aclose()
                return fresh
            raise RedisConnectionError(f"no cluster node answered CLUSTER SLOTS: {failure}")

    async def aclose(self) -> None:
        self._closed = True
        for holder in self._links.values():
            holder.aclose()
        self._links.clear()


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)
