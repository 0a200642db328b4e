"""A lean pipelined Redis connection for the action path's two scripts.

Every user action costs two script calls (accept, then the agent's commit; with
speculative dispatch the commit is sent while the accept is still on its way, runner.py).
Through redis-py each costs 140-200 us of CPU in its pool, retry and connection layers,
against ~50 us to write the command and parse the reply with hiredis (BENCHMARKS.md), and
on the same-node round trip that CPU is latency. The lane is one connection of its own:
calls write their command at once and wait for their reply, which Redis returns in order
(pipelining, so concurrent calls do not queue for a connection, and a commit sent behind
its accept runs after it); commands are encoded and replies parsed by hiredis, which
redis-py already uses.

Failure handling matches what the rest of the state layer gets from redis-py: a reply
not back within ``timeout`` or a lost connection fails every call in flight (their
replies can no longer be matched) with ``TimeoutError``/``ConnectionError``; a call is
retried twice with jittered backoff (the scripts make a retry of a lost reply harmless);
the next call reconnects. ``redis://``, ``rediss://`` (TLS, with redis-py's own SSL
settings from the URL: ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_cert_reqs``, ``ssl_check_hostname``) and ``unix://`` URLs, with a user, password
and db, are supported, so the lane carries every deployment redis-py does: a commit sent
behind its accept must travel on the same connection. Behind Sentinel the lane asks where
the master is (``locate``) on each connect, and a ``READONLY`` reply (it reached a
demoted master) sends it to look again; Redis Cluster has its own lane with a connection
per shard (``cluster_lane.py``), built from the same parts.

``run_replicated`` writes ``WAIT n timeout`` right behind the script on the same
connection, so the reply says how many replicas hold the script's writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .backoff import Backoff
from .links import Endpoint, Link, LinkSlot, lane_supported, pack, retrieved

__all__ = ["LaneCalls", "ScriptLane", "lane_supported", "send_commands", "send_script"]

T = TypeVar("T")

RETRIES = 2


class LaneCalls:
    """What every lane offers on top of its ``_call`` (a script, with ``WAIT`` behind it
    when ``replicas``): ``ScriptLane`` here, ``cluster_lane.ClusterLane`` per shard."""

    async def _call(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any], replicas: int, ms: int
    ) -> tuple[Any, int]:
        raise NotImplementedError

    async def run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA ``script`` (loading it on NOSCRIPT), retried on a lost connection."""
        result, _ = await self._call(script, keys, args, 0, 0)
        return result

    async def run_replicated(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[Any],
        replicas: int,
        timeout_ms: int,
    ) -> tuple[Any, int]:
        """As ``run``, then ``WAIT replicas timeout_ms`` on the same connection: the
        script's result and how many replicas acknowledged its writes."""
        return await self._call(script, keys, args, replicas, timeout_ms)

    async def execute(
        self, commands: Sequence[Sequence[Any]], *, transaction: bool = False
    ) -> list[Any]:
        raise NotImplementedError

    async def load(self, scripts: Sequence[Any], keys: Sequence[str]) -> None:
        """SCRIPT LOAD ``scripts`` on the master(s) serving ``keys``: where a NOSCRIPT
        came from (restarted, promoted, or new to the cluster), which redis-py's own
        view of the masters may not know yet."""
        await self.execute([("SCRIPT", "LOAD", script) for script in scripts])


class ScriptLane(LaneCalls):
    """The lane to one Redis server (standalone, or the master Sentinel names).

    ``locate`` (Sentinel): returns the master's ``(host, port)``, asked on every connect.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        connect_timeout: float,
        name: str = "coordinator-lane",
        locate: Callable[[], Awaitable[tuple[str, int]]] | None = None,
    ) -> None:
        self._timeout = timeout
        self._slot = LinkSlot(
            Endpoint.from_url(url, name), connect_timeout=connect_timeout, locate=locate
        )
        self._closed = False

    def publish(self, command: str, channel: str, message: bytes) -> None:
        """Send a (S)PUBLISH without waiting for its reply (best effort: a lost one is
        caught up from the log by whoever missed it)."""
        link = self._slot.current()
        if link is not None:
            link.send(pack(command, channel, message), self._timeout).add_done_callback(retrieved)

    async def execute(
        self, commands: Sequence[Sequence[Any]], *, transaction: bool = False
    ) -> list[Any]:
        """Send ``commands`` back to back (one round trip; MULTI/EXEC around them with
        ``transaction``) and return their raw replies, in order. Retried on a lost
        connection, like a script: only for commands that may run twice."""
        packed = [pack(*command) for command in commands]
        return await self._retrying(
            lambda link: send_commands(link, packed, transaction, self._timeout)
        )

    async def _call(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any], replicas: int, ms: int
    ) -> tuple[Any, int]:
        command = pack("EVALSHA", script.sha, len(keys), *keys, *args)
        wait = pack("WAIT", replicas, ms) if replicas else b""
        return await self._retrying(
            lambda link: send_script(link, command, wait, script, self._timeout)
        )

    async def _retrying(self, send: Callable[[Link], Awaitable[T]]) -> T:
        backoff: Backoff | None = None
        for attempt in range(RETRIES + 1):
            try:
                return await send(self._slot.current() or await self._slot.get())
            except ReadOnlyError as exc:  # a master demoted meanwhile: find the new one
                self._slot.drop(RedisConnectionError(str(exc)))
                if attempt == RETRIES or self._closed:
                    raise RedisConnectionError(f"Redis is not the master any more: {exc}") from None
            except (RedisConnectionError, RedisTimeoutError, OSError):
                if attempt == RETRIES or self._closed:
                    raise
            backoff = backoff or Backoff(base=0.05, cap=1.0)
            await asyncio.sleep(backoff.next())
        raise AssertionError("unreachable")

    def drop(self, why: Exception) -> None:
        """Fail the calls in flight with ``why`` (they are retried) and connect again."""
        self._slot.drop(why)

    async def aclose(self) -> None:
        self._closed = True
        self._slot.aclose()


async def send_commands(
    link: Link, packed: Sequence[bytes], transaction: bool, reply_within: float
) -> list[Any]:
    """Write commands back to back on ``link``; their replies (EXEC's, in a transaction)."""
    if transaction:
        packed = [pack("MULTI"), *packed, pack("EXEC")]
    futures = link.send_all(packed, reply_within)
    replies = []
    try:
        for fut in futures:
            replies.append(await fut)
    except BaseException:
        for fut in futures:  # they fail with the connection: nobody reads them
            fut.add_done_callback(retrieved)
        raise
    return list(replies[-1]) if transaction else replies


async def send_script(
    link: Link, command: bytes, wait: bytes, script: AsyncScript, reply_within: float
) -> tuple[Any, int]:
    """Write the script (and the WAIT behind it) on ``link``; load it on NOSCRIPT."""
    result, *rest = link.send_all((command, wait) if wait else (command,), reply_within)
    acked = rest[0] if rest else None
    try:
        try:
            value = await result
        except NoScriptError:  # Redis restarted (or failed over) without its script cache
            if acked is not None:
                acked.add_done_callback(retrieved)
            await link.send(pack("SCRIPT", "LOAD", script.script), reply_within)
            result = link.send(command, reply_within)
            acked = link.send(wait, reply_within) if wait else None
            value = await result
    except BaseException:
        if acked is not None:  # it fails with the script's connection: nobody reads it
            acked.add_done_callback(retrieved)
        raise
    return value, int(await acked) if acked is not None else 0
