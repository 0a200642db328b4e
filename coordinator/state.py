"""The Redis state layer: typed operations over the key schema and the Lua scripts.

Nothing here keeps state of its own; every method is one or a few Redis round trips.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

from . import scripts
from .codec import Event, unpack
from .keys import KeySchema
from .lane import ScriptLane


def text(value: Any) -> str:
    """A Redis reply as str (replies are bytes; missing values are '')."""
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


def _entries(rows: Any) -> list[tuple[int, Event]]:
    """Stream entries ``(b"<id>-0", {b"d": packed})`` as ``(id, event)``."""
    return [(int(text(entry_id).split("-")[0]), unpack(fields[b"d"])) for entry_id, fields in rows]


def accept_token(client_key: str | None) -> str:
    """The token an accept is known by: the client's action id, else 96 random bits."""
    return os.urandom(12).hex() if client_key is None else f"c:{client_key}"


@dataclass(frozen=True, slots=True)
class Ownership:
    status: str  # created | ok | mine | owned | forbidden | missing
    epoch: int
    owner: str
    inc: str
    user: str
    applied: int


@dataclass(frozen=True, slots=True)
class Accepted:
    status: str  # ok | missing | forbidden | full
    event_id: int
    owner: str
    inc: str


@dataclass(frozen=True, slots=True)
class Committed:
    status: str  # ok | dup | fenced | unaccepted | missing
    first_id: int
    last_id: int
    now_ms: int


@dataclass(frozen=True, slots=True)
class Admission:
    status: str  # go | wait | evicted
    evicted: list[tuple[str, str]]  # (sid, incarnation) whose loops must stop


class RedisState:
    def __init__(
        self, redis: aioredis.Redis, keys: KeySchema, lane: ScriptLane | None = None
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.lane = lane  # carries accept and commit, the two calls of every action
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(src) for name, src in scripts.ALL.items()
        }

    async def load_scripts(self) -> None:
        """Load every script up front so the hot path never pays a NOSCRIPT round trip."""
        for script in self._scripts.values():
            await self.redis.script_load(script.script)

    async def _run(
        self, name: str, keys: Sequence[str], args: Sequence[Any], *, hot: bool = False
    ) -> Any:
        if hot and self.lane is not None:
            return await self.lane.run(self._scripts[name], keys, args)
        return await self._scripts[name](keys=list(keys), args=list(args))

    # -- ownership -------------------------------------------------------------------
    async def acquire(
        self, sid: str, node: str, inc: str, user: str, *, create: bool, dead_inc: str = ""
    ) -> Ownership:
        r = await self._run(
            "acquire",
            [self.keys.conv(sid)],
            [node, inc, user, dead_inc, "1" if create else "0"],
        )
        return Ownership(text(r[0]), int(r[1]), text(r[2]), text(r[3]), text(r[4]), int(r[5]))

    async def release(self, sid: str, inc: str, epoch: int | None, state: str) -> bool:
        r = await self._run(
            "release", [self.keys.conv(sid)], [inc, "" if epoch is None else epoch, state]
        )
        return bool(r)

    # -- events ----------------------------------------------------------------------
    async def accept(
        self,
        sid: str,
        user: str,
        packed: bytes,
        maxlen: int,
        inbox_max: int,
        publisher: str = "",
        token: str = "",
    ) -> Accepted:
        """Log and enqueue a user action. With ``publisher`` (the writer's incarnation), the
        event is published only when another node listens: the writer applies it itself.

        An accept run again with the same ``token`` (a retry after a lost reply, or the
        client's own retry: see ``accept_token``) returns the first one's event id and
        writes nothing, as long as it is among the conversation's last 64 accepts."""
        k = self.keys
        r = await self._run(
            "accept",
            [k.conv(sid), k.events(sid), k.inbox(sid), k.accepted(sid), k.conv_conns(sid)],
            [
                user,
                packed,
                maxlen,
                inbox_max,
                k.conv_channel(sid),
                token or accept_token(None),
                publisher,
            ],
            hot=True,
        )
        return Accepted(text(r[0]), int(r[1]), text(r[2]), text(r[3]))

    async def commit(
        self,
        sid: str,
        inc: str,
        epoch: int,
        packed_events: Sequence[bytes],
        *,
        maxlen: int,
        cause: int = 0,
        index: int = 0,
        state: str = "",
        publisher: str = "",
        writer: str = "",
        accepted_as: str = "",
    ) -> Committed:
        """Append events as the owner (fenced); ``publisher`` as in ``accept``.

        A retry after a lost reply is recognised (status ``dup``) by ``(cause, index)``
        for a write answering action ``cause``, else by ``(writer, index)``. With
        ``accepted_as`` (the accept token of action ``cause``, dispatched before its
        accept answered) the write goes through only if that accept logged the action
        as ``cause``: else status ``unaccepted`` and nothing is written."""
        k = self.keys
        r = await self._run(
            "commit",
            [k.conv(sid), k.events(sid), k.inbox(sid), k.conv_conns(sid), k.accepted(sid)],
            [
                inc, epoch, maxlen, k.conv_channel(sid), cause, index, state, publisher,
                writer, accepted_as, *packed_events,
            ],
            hot=True,
        )  # fmt: skip
        return Committed(text(r[0]), int(r[1]), int(r[2]), int(r[3]))

    async def events_after(
        self, sid: str, after: int, upto: int | None = None, count: int = 1000
    ) -> list[tuple[int, Event]]:
        """Logged events with ``after < id <= upto`` (oldest first)."""
        end = "+" if upto is None else f"{upto}-0"
        rows = await self.redis.xrange(
            self.keys.events(sid), min=f"({after}-0", max=end, count=count
        )
        return _entries(rows)

    async def inbox_snapshot(
        self, sid: str, after: int, count: int = 500
    ) -> tuple[int, list[tuple[int, Event]]]:
        """The conversation's last event id and its inbox after ``after``, atomically."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(self.keys.conv(sid), "seq")
            pipe.xrange(self.keys.inbox(sid), min=f"({after}-0", count=count)
            seq, rows = await pipe.execute()
        return int(seq or 0), _entries(rows)

    async def meta(self, sid: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self.keys.conv(sid))
        return {text(k): text(v) for k, v in raw.items()}

    # -- the cap ---------------------------------------------------------------------
    async def admit(
        self, user: str, sid: str, inc: str, cap: int, *, retry: bool, score_ms: int = 0
    ) -> Admission:
        k = self.keys
        r = await self._run(
            "admit",
            [k.user_claims(user), k.user_loops(user)],
            [sid, inc, cap, "retry" if retry else "new", score_ms],
        )
        pairs = [text(x) for x in r[1:]]
        return Admission(text(r[0]), list(zip(pairs[0::2], pairs[1::2], strict=True)))

    async def release_slot(self, user: str, sid: str, inc: str) -> bool:
        k = self.keys
        r = await self._run("release_slot", [k.user_claims(user), k.user_loops(user)], [sid, inc])
        return bool(r)

    async def user_loops(self, user: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self.keys.user_loops(user))
        return {text(k): text(v) for k, v in raw.items()}

    # -- membership ------------------------------------------------------------------
    async def register(self, node: str, inc: str, ttl_ms: int) -> tuple[bool, str]:
        """Take the node's lease for ``inc``.

        Returns ``(True, previous registered incarnation or '')`` or, when another
        incarnation still holds the lease, ``(False, that incarnation)``.
        """
        k = self.keys
        if not await self.redis.set(k.node_lease(node), inc, nx=True, px=ttl_ms):
            return False, text(await self.redis.get(k.node_lease(node)))
        # The lease and the registry hash in different slots: a crash between the two
        # leaves the registry naming the old incarnation, whose lease is gone (reaped).
        prev = await self._run("enroll", [k.registry(), k.retired()], [node, inc])
        return True, text(prev)

    async def unregister(self, node: str, inc: str) -> None:
        k = self.keys
        await self._run("delete_if", [k.node_lease(node)], [inc])
        await self._run("hdel_if", [k.registry()], [node, inc])

    async def retired(self) -> dict[str, str]:
        """Replaced incarnation -> node id, for those not yet released."""
        raw = await self.redis.hgetall(self.keys.retired())
        return {text(k): text(v) for k, v in raw.items()}

    async def forget_retired(self, inc: str) -> None:
        """Everything ``inc`` held has been released."""
        await self.redis.hdel(self.keys.retired(), inc)

    async def delete_if(self, key: str, value: str) -> bool:
        return bool(await self._run("delete_if", [key], [value]))

    async def attach(self, sid: str, user: str, delta: int) -> tuple[str, int]:
        r = await self._run("attach", [self.keys.conv(sid)], [delta, user])
        return text(r[0]), int(r[1])

    async def registry(self) -> dict[str, str]:
        raw = await self.redis.hgetall(self.keys.registry())
        return {text(k): text(v) for k, v in raw.items()}

    async def live_leases(self, incs: Mapping[str, str]) -> dict[str, float]:
        """Of ``incs`` (node -> incarnation), node -> seconds left on the lease, for the
        nodes whose lease that incarnation still holds. One round trip."""
        names = [node for node, inc in incs.items() if inc]
        if not names:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(self.keys.node_lease(name))
                pipe.pttl(self.keys.node_lease(name))
            rows = await pipe.execute()
        live: dict[str, float] = {}
        for i, name in enumerate(names):
            holder, ttl_ms = text(rows[2 * i]), int(rows[2 * i + 1])
            # PTTL -2: gone since the GET; -1 (never set by us): held, time unknown.
            if holder == incs[name] and ttl_ms != -2:
                live[name] = max(ttl_ms, 0) / 1000
        return live

    async def lease_left(self, inc: str) -> float | None:
        """Seconds left on ``inc``'s lease; None when it holds none (dead or replaced)."""
        node = inc.rsplit("/", 1)[0]
        return (await self.live_leases({node: inc})).get(node)

    # -- connections -----------------------------------------------------------------
    async def add_connection(self, cid: str, sid: str, user: str, inc: str) -> None:
        await self.add_connections([(cid, sid, user)], inc)

    async def add_connections(self, conns: Sequence[tuple[str, str, str]], inc: str) -> None:
        """Register ``(cid, sid, user)`` connections of ``inc``."""
        k = self.keys

        def queue(pipe: Pipeline, cid: str, sid: str, user: str) -> None:
            pipe.hset(k.conv_conns(sid), cid, inc)
            pipe.hset(k.user_conns(user), cid, sid)
            pipe.hset(k.node_conns(inc), cid, sid)

        await self._per_connection(conns, queue)

    async def remove_connection(self, cid: str, sid: str, user: str, inc: str) -> None:
        await self.remove_connections([(cid, sid, user)], inc)

    async def remove_connections(self, conns: Sequence[tuple[str, str, str]], inc: str) -> None:
        """Forget ``(cid, sid, user)`` connections of ``inc`` (idempotent)."""
        k = self.keys

        def queue(pipe: Pipeline, cid: str, sid: str, user: str) -> None:
            pipe.hdel(k.conv_conns(sid), cid)
            pipe.hdel(k.user_conns(user), cid)
            pipe.hdel(k.node_conns(inc), cid)

        await self._per_connection(conns, queue)

    async def _per_connection(
        self,
        conns: Sequence[tuple[str, str, str]],
        queue: Callable[[Pipeline, str, str, str], None],
        batch: int = 500,
    ) -> None:
        """Queue each connection's commands, one pipeline (round trip) per ``batch``."""
        for start in range(0, len(conns), batch):
            async with self.redis.pipeline(transaction=False) as pipe:
                for cid, sid, user in conns[start : start + batch]:
                    queue(pipe, cid, sid, user)
                await pipe.execute()

    async def hgetall_many(self, names: Sequence[str]) -> list[dict[str, str]]:
        if not names:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(name)
            rows = cast(list[dict[bytes, bytes]], await pipe.execute())
        return [{text(k): text(v) for k, v in row.items()} for row in rows]
