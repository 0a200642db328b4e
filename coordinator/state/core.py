"""What every part of the state layer shares: the client, the key schema, the scripts."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from workers.protocol import Event

from .. import scripts
from ..codec import unpack
from ..errors import UnreplicatedRead
from ..keys import KeySchema


def text(value: Any) -> str:
    """A Redis reply as str (replies are bytes; missing values are '')."""
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


def packed(fields: Any) -> bytes:
    """A stream entry's packed event: from redis-py's ``{b"d": packed}`` or the lane's
    raw ``[b"d", packed, ...]``."""
    data: bytes = fields[b"d"] if isinstance(fields, dict) else fields[fields.index(b"d") + 1]
    return data


def entries(rows: Any) -> list[tuple[int, Event]]:
    """Stream entries ``(b"<id>-0", fields)`` as ``(id, event)``."""
    return [
        (int(text(entry_id).split("-")[0]), unpack(packed(fields))) for entry_id, fields in rows
    ]


def flat_rows(reply: Any, start: int = 1) -> list[tuple[int, bytes]]:
    """The events of a ``read_after`` reply (``start`` values first, then id, packed
    event, id, packed event, ...), packed."""
    return [(int(reply[i]), bytes(reply[i + 1])) for i in range(start, len(reply), 2)]


# A page: the conversation's last id (None without a record), its events, their bytes.
Page = tuple[int | None, list[tuple[int, Event]], int]
# A plain XRANGE reads a page when the largest event bounds its bytes to this many events.
PLAIN_LEAST = 16


class SizeHint:
    """What a reader learnt of a conversation's log from its last read: no event with an
    id up to ``upto`` is larger than ``largest`` bytes (the meta hash's ``largest``, read
    with ``seq``). A later read of those events is then a plain XRANGE whose count bounds
    its bytes: a script's read (``scripts.READ``) costs Redis about 1.5 us per entry,
    XRANGE 0.2. One per reader of one conversation (a replay)."""

    __slots__ = ("largest", "upto")

    def __init__(self) -> None:
        self.upto = 0
        self.largest: int | None = None

    def count(self, after: int, count: int, max_bytes: int) -> int:
        """How many events after ``after`` a plain XRANGE up to ``upto`` may read within
        ``max_bytes`` (0: read with the script)."""
        if self.largest is None or after >= self.upto:
            return 0
        n = min(count, max_bytes // max(self.largest, 1))
        return n if n >= PLAIN_LEAST else 0

    def learn(self, seq: Any, largest: Any) -> None:
        if seq is not None and largest is not None:  # a record older than ``largest``
            self.upto, self.largest = int(seq), int(largest)


def _fullness(info: Any) -> tuple[float, int]:
    """How full a node's INFO memory says it is (0 without maxmemory), then how much it
    uses."""
    used, most = int(info["used_memory"]), int(info["maxmemory"])
    return (used / most if most else 0.0), used


def accept_token(client_key: str | None) -> str:
    """The token an accept is known by: the client's action id, else 72 random bits
    (12 characters, never with the ``:`` of a client's)."""
    if client_key is None:
        return base64.urlsafe_b64encode(os.urandom(9)).decode()
    return f"c:{client_key}"


class Lane(Protocol):
    """A pipelined connection for the hot scripts (``lane.py``, ``cluster_lane.py``)."""

    async def run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any: ...

    async def run_replicated(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[Any],
        replicas: int,
        timeout_ms: int,
    ) -> tuple[Any, int]: ...

    def publish(self, command: str, channel: str, message: bytes) -> None: ...

    async def load(self, scripts: Sequence[Any], keys: Sequence[str]) -> None: ...

    async def execute(
        self, commands: Sequence[Sequence[Any]], *, transaction: bool = False
    ) -> list[Any]: ...

    async def aclose(self) -> None: ...


class StateCore:
    """The Redis client (a pool, or redis-py's cluster client), the key schema and the
    scripts, loaded once.

    ``lane`` carries the scripts called with ``hot=True`` (every action's accept and
    commit, a start's and a stop's, the mover's) on a pipelined connection of its own
    (``lane.py``): hiredis parses its replies, about a tenth of redis-py's CPU per call;
    everything else goes through ``redis``.
    ``sharded``: a Redis Cluster (scripts publish with SPUBLISH); ``replicas`` and
    ``replica_timeout_ms``: what an acknowledged write waits for (``writes.py``).
    """

    def __init__(
        self,
        redis: Any,
        keys: KeySchema,
        lane: Lane | None = None,
        *,
        sharded: bool = False,
        replicas: int = 0,
        replica_timeout_ms: int = 1000,
    ) -> None:
        self.redis: aioredis.Redis = redis
        self.keys = keys
        self.lane = lane
        self.sharded = sharded
        self.replicas = replicas
        self.replica_timeout_ms = replica_timeout_ms
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(src)
            for name, src in scripts.for_deployment(sharded=sharded).items()
        }

    def conversation_keys(self, sid: str) -> list[str]:
        """The keys that live and expire with a conversation's record (its attempts
        hash has a TTL of its own)."""
        k = self.keys
        return [k.conv(sid), k.events(sid), k.inbox(sid), k.accepted(sid), k.conv_conns(sid)]

    async def unlist(self, conversations: Sequence[tuple[str, str]]) -> None:
        """``(sid, user)`` of conversations that retire (RELEASE answered 2): out of their
        users' indexes, where the event store lists them from now on (one round trip)."""
        k = self.keys
        gone = [("ZREM", k.user_convs(user), sid) for sid, user in conversations if user]
        if gone:
            await self._commands(gone)

    async def load_scripts(self) -> None:
        """Load every script up front so the hot path never pays a NOSCRIPT round trip."""
        for script in self._scripts.values():
            await self.redis.script_load(script.script)

    async def _commands(
        self, commands: Sequence[Sequence[Any]], *, transaction: bool = False
    ) -> list[Any]:
        """Commands sent together (one round trip; MULTI/EXEC with ``transaction``): over
        the lane when there is one (hiredis: about a tenth of redis-py's CPU per command),
        else a redis-py pipeline. Replies may be raw (lane) or parsed (redis-py): callers
        read them with ``text``, ``int`` and ``entries``, which take both."""
        try:
            return await self._send(commands, transaction)
        except NoScriptError:  # Redis restarted (or failed over) without its script cache
            if self.lane is None:
                await self.load_scripts()
            else:  # where it was said (a master redis-py's view may lack)
                keys = [str(c[3]) for c in commands if c[0] == "EVALSHA"]
                await self.lane.load([s.script for s in self._scripts.values()], keys)
            return await self._send(commands, transaction)

    async def _send(self, commands: Sequence[Sequence[Any]], transaction: bool) -> list[Any]:
        if self.lane is not None:
            return await self.lane.execute(commands, transaction=transaction)
        async with self.redis.pipeline(transaction=transaction) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute())

    def _page(
        self, sid: str, after: int, count: int, max_bytes: int, hint: SizeHint | None
    ) -> tuple[list[tuple[Any, ...]], Callable[[list[Any]], Page]]:
        """The commands that read a page of ``sid``'s log after ``after`` (at most
        ``count`` events, and none after those whose bytes reach ``max_bytes``), for
        ``_commands``, and what reads the page from their replies (and tells ``hint``
        what they learnt): a plain XRANGE where ``hint`` bounds its bytes, else
        ``scripts.READ``."""
        k = self.keys
        if hint is not None and (n := hint.count(after, count, max_bytes)):
            upto = hint.upto

            def plain(replies: list[Any]) -> Page:
                (seq, largest), rows = replies
                hint.learn(seq, largest)
                events = entries(rows)
                size = sum(len(packed(fields)) for _, fields in rows)
                return None if seq is None else int(seq), events, size

            return [
                ("HMGET", k.conv(sid), "seq", "largest"),
                ("XRANGE", k.events(sid), f"({after}-0", f"{upto}-0", "COUNT", n),
            ], plain

        def scripted(replies: list[Any]) -> Page:
            (reply,) = replies
            if hint is not None:
                hint.learn(reply[0], reply[1])
            rows = flat_rows(reply, 2)
            events = [(i, unpack(data)) for i, data in rows]
            seq = None if reply[0] is None else int(reply[0])
            return seq, events, sum(len(data) for _, data in rows)

        sha = self._scripts["read"].sha
        return [("EVALSHA", sha, 2, k.conv(sid), k.events(sid), after, count, max_bytes)], scripted

    def _barrier(self, sid: str) -> list[tuple[Any, ...]]:
        """With ``replicas``: what follows a read of ``sid``'s log in the same round trip
        so that its reply says whether replicas hold what was read. A read alone does not
        move a connection's replication offset (``WAIT`` would count replicas that lack
        the newest events); a PUBLISH, which Redis replicates, does."""
        if not self.replicas:
            return []
        publish = "SPUBLISH" if self.sharded else "PUBLISH"
        return [
            (publish, self.keys.conv_barrier(sid), b""),
            ("WAIT", self.replicas, self.replica_timeout_ms),
        ]

    def _check_barrier(self, sid: str, replies: list[Any]) -> list[Any]:
        """The read's replies without the barrier's; UnreplicatedRead if fewer replicas than
        ``replicas`` hold what was read: a failover could still undo it, and no client
        may be shown it (the reader tries again)."""
        if not self.replicas:
            return replies
        acked = int(replies[-1])
        if acked < self.replicas:
            raise UnreplicatedRead(
                f"the log of {sid!r} was read but only {acked} of {self.replicas} "
                f"replica(s) held it within {self.replica_timeout_ms} ms"
            )
        return replies[:-2]

    async def ping(self) -> None:
        """PING; on a Redis Cluster, every master (one without its master made a third of
        the conversations fail while a single node's PING said all was well)."""
        if isinstance(self.redis, RedisCluster):
            await self.redis.ping(target_nodes=RedisCluster.PRIMARIES)
        else:
            await self.redis.ping()

    async def memory(self) -> tuple[int, int]:
        """Redis's ``(used_memory, maxmemory)`` in bytes (maxmemory 0: no bound); on a
        Redis Cluster, the fullest master's."""
        if isinstance(self.redis, RedisCluster):  # one answer per master
            infos = await self.redis.info("memory", target_nodes=RedisCluster.PRIMARIES)
            # (a cluster of one master answers with that master's INFO itself)
            info = infos if "used_memory" in infos else max(infos.values(), key=_fullness)
        else:
            info = await self.redis.info("memory")
        return int(info["used_memory"]), int(info["maxmemory"])

    async def take_lock(self, key: str, me: str, ttl_ms: int) -> bool:
        """Whether ``me`` took the cluster-wide lock ``key`` (none held it), for ``ttl_ms``
        at most (its holder may die): the reaper's, the store audit's."""
        return bool(await self.redis.set(key, me, nx=True, px=ttl_ms))

    async def keep_lock(self, key: str, me: str, ttl_ms: int) -> bool:
        """Hold ``key`` ``ttl_ms`` more if ``me`` still does (False: it expired, or Redis
        lost it in a failover, and another may hold it now)."""
        return bool(await self._run("renew", [key], [me, ttl_ms]))

    async def drop_lock(self, key: str, me: str) -> None:
        """Let go of ``key`` if ``me`` still holds it."""
        await self._run("delete_if", [key], [me])

    async def _run(
        self, name: str, keys: Sequence[str], args: Sequence[Any], *, hot: bool = False
    ) -> Any:
        if hot and self.lane is not None:
            return await self.lane.run(self._scripts[name], keys, args)
        return await self._scripts[name](keys=list(keys), args=list(args))

    async def claim(
        self, key: str, fields: Mapping[str, str | int], replacing: str = ""
    ) -> list[str]:
        """Record a cluster fact (hash ``key``: ``fields``, the first naming it) unless
        one is recorded, or, with ``replacing``, in place of the one whose first field
        holds that; the fields' values as recorded after the call (scripts/claims.py)."""
        pairs = [item for pair in fields.items() for item in pair]
        return [text(value) for value in await self._run("claim", [key], [replacing, *pairs])]

    async def _hgetall_many(self, names: Sequence[str]) -> list[dict[str, str]]:
        """Several hashes in one round trip, decoded."""
        if not names:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(name)
            rows: list[dict[bytes, bytes]] = await pipe.execute()
        return [{text(k): text(v) for k, v in row.items()} for row in rows]
