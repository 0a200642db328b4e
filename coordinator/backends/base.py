"""What every kind of deployment gives a node: its Redis connections, from one config.

A node talks to Redis over five kinds of connection, each for a reason:

- the shared pool (``redis-py``; on Redis Cluster its cluster client), that callers wait
  on instead of failing;
- the script lane (``lane.py``, ``cluster_lane.py``): a pipelined connection for the two
  scripts of every action, accept and commit, so a commit sent behind its accept runs
  after it;
- the registration client: a connection of its own for (re-)registering the node, so a
  pool exhausted by a burst of joins cannot hold up a node whose lease lapsed;
- the subscription (``subscriptions.py``, ``sharded.py``), apart from the pool;
- the lease keeper's blocking client, used from the keeper's thread (``membership.py``).

Each deployment (``standalone.py``, ``cluster.py``, ``sentinel.py``) builds them from the
URL (user, password, database, TLS parameters) and the timeouts in ``ManagerConfig``;
``detect.py`` picks the deployment. Nothing else in the package makes a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from ..config import ManagerConfig
from ..errors import REDIS_TROUBLE, ConfigError, RedisRefused, RedisUnavailable, redis_refused
from ..keys import KeySchema
from ..links import Endpoint, Locate
from ..redact import redact_url
from ..redisurl import seed_urls, shown_address
from ..state import LeaseRenewer, RedisState
from ..state.core import Lane
from ..subscriptions import PUBSUB_NAME, Subscription, Subscriptions

log = logging.getLogger(__name__)
# INFO not answered, or not allowed (an ACL without +info): the eviction check only warns.
T = TypeVar("T")
UNREADABLE: tuple[type[Exception], ...] = (*REDIS_TROUBLE, TimeoutError, ResponseError)


def unreachable(config: ManagerConfig, exc: BaseException, node: str = "") -> RedisUnavailable:
    """RedisUnavailable naming the deployment (never its password; ``node``: which of
    the nodes it lists) and what ``exc`` said; RedisRefused when Redis answered,
    refusing the login or the command for what it is (``errors.redis_refused``: the ACL
    user lacks a permission), which no retry mends."""
    reason = trouble(exc)
    where = redact_url(config.redis_url) + (f" (node {shown_address(node)})" if node else "")
    if isinstance(exc, AuthenticationError):
        return RedisRefused(
            where,
            f"the login ({reason}): a password is required, or the user or password in "
            "the Redis URL is wrong",
        )
    if redis_refused(exc):
        advice = (
            "; give its user the commands deploy/redis-users.acl lists"
            if isinstance(exc, NoPermissionError)
            else ""
        )
        return RedisRefused(where, f"the node's command ({type(exc).__name__}: {reason}){advice}")
    return RedisUnavailable(where, reason)


def trouble(exc: BaseException) -> str:
    """What ``exc`` said, without a password."""
    return redact_url(str(exc)) if str(exc) else type(exc).__name__


async def ask_nodes(config: ManagerConfig, command: str, *args: Any) -> list[tuple[str, Any]]:
    """Each node ``config.redis_url`` lists (no cluster client, no Sentinel; several: a
    cluster's seeds), asked ``command`` at once, each within the connect timeout: (its
    URL, its reply or what it raised), in the order listed. One that does not answer
    holds up none of the others."""

    async def ask(url: str) -> Any:
        client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=config.connect_timeout,
            socket_timeout=config.connect_timeout,
        )
        try:
            async with asyncio.timeout(config.connect_timeout + 1):
                return await client.execute_command(command, *args)  # type: ignore[no-untyped-call]
        except REDIS_TROUBLE as exc:
            return exc
        finally:
            await client.aclose()

    seeds = seed_urls(config.redis_url)
    return list(zip(seeds, await asyncio.gather(*(ask(url) for url in seeds)), strict=True))


def pick(
    config: ManagerConfig, answers: list[tuple[str, Any]], unwanted: Callable[[Any], str]
) -> tuple[Any, list[str]]:
    """Of ``ask_nodes``' answers, the first reply, in order, that is not ``unwanted``
    (which says why one is, '' for one that will do), and how each node before it was
    passed over; RedisUnavailable naming each one's trouble when none will do (one node:
    its reply, or its own error); RedisRefused, naming the node, when one refused the
    login or a permission (no other will do differently)."""
    passed: list[str] = []
    for url, reply in answers:
        if isinstance(reply, Exception):
            failure = unreachable(config, reply, url if len(answers) > 1 else "")
            if len(answers) == 1 or (
                isinstance(failure, RedisRefused) and not _not_that_node(reply)
            ):
                raise failure
            passed.append(f"{shown_address(url)}: {trouble(reply)}")
        elif not (why := unwanted(reply)):
            return reply, passed
        else:
            passed.append(f"{shown_address(url)}: {why}")
    if len(answers) == 1:
        return answers[0][1], passed
    silent = all(isinstance(reply, Exception) for _, reply in answers)
    verdict = "none of its nodes answered" if silent else "none of its nodes will do"
    raise RedisUnavailable(redact_url(config.redis_url), f"{verdict} ({'; '.join(passed)})")


def _not_that_node(exc: BaseException) -> bool:
    """A node refusing the command for what it is (not the login, not a permission):
    another node listed may answer it."""
    return isinstance(exc, ResponseError) and not isinstance(
        exc, AuthenticationError | NoPermissionError
    )


class Backend(ABC):
    """The connections of one node to one Redis deployment."""

    mode: ClassVar[str]
    sharded: ClassVar[bool] = False  # channels are shard channels (SPUBLISH, SSUBSCRIBE)

    def __init__(self, config: ManagerConfig) -> None:
        self.config = config
        self._owned: list[Any] = []  # async clients to close
        self._lane: Lane | None = None

    @property
    @abstractmethod
    def client(self) -> Any:
        """The shared client (a pool) the state layer uses."""

    def describe(self) -> str:
        """The deployment, for logs and errors (no password)."""
        return f"{self.mode} Redis at {redact_url(self.config.redis_url)}"

    async def check(self) -> None:
        """Raise RedisUnavailable (naming the deployment, never its password) unless
        Redis answers within the connect timeout."""
        try:
            async with asyncio.timeout(self.config.connect_timeout + 1):
                await self.client.ping()
        except REDIS_TROUBLE as exc:
            raise unreachable(self.config, exc) from None

    async def memory_policies(self) -> dict[str, tuple[int, str]]:
        """Each server the node writes to, by address: its ``maxmemory`` (bytes, 0: none)
        and ``maxmemory-policy``."""
        info = await self.client.info("memory")
        return {redact_url(self.config.redis_url): memory_policy(info)}

    async def replica_counts(self) -> dict[str, int]:
        """Each server the node writes to, by address: its connected replicas."""
        info = await self.client.info("replication")
        return {redact_url(self.config.redis_url): int(info.get("connected_slaves", 0) or 0)}

    async def check_settings(self) -> None:
        """Raise ConfigError if a server the node writes to evicts keys at its maxmemory:
        every key is coordination state (a lease, a record, a log), so an evicted one
        would be lost without a word. Only warn when it has no maxmemory yet, when a
        master has fewer replicas than ``--ack-replicas`` (its writes are refused after
        ``--ack-timeout`` until it has them; they may be on their way), or when INFO is
        not allowed. Each read on its own: one that fails does not skip the other."""
        policies = await self._read_or_warn(
            self.memory_policies, "maxmemory-policy", "make sure it is noeviction"
        )
        for where, (maxmemory, policy) in sorted((policies or {}).items()):
            found = eviction_problem(where, maxmemory, policy)
            if found is not None and found[0]:
                raise ConfigError(found[1])
            if found is not None:
                log.warning("%s", found[1])
        wanted = self.config.ack_replicas
        if wanted:
            replicas = await self._read_or_warn(
                self.replica_counts, "replicas", f"--ack-replicas {wanted} needs that many"
            )
            for where, n in sorted((replicas or {}).items()):
                if n < wanted:
                    log.warning("%s", replica_shortage(where, n, wanted))

    async def _read_or_warn(
        self, read: Callable[[], Awaitable[dict[str, T]]], what: str, advice: str
    ) -> dict[str, T] | None:
        """``read()`` within the connect timeout; None, said in a warning, if it fails."""
        try:
            async with asyncio.timeout(self.config.connect_timeout + 1):
                return await read()
        except UNREADABLE as exc:
            why = redact_url(str(exc)) or type(exc).__name__
            log.warning("could not read Redis' %s (%s): %s", what, why, advice)
            return None

    async def follow_master(self) -> None:
        """Behind Sentinel: notice a master that moved and drop the connections to the
        old one (``sentinel.py``); nothing elsewhere (a cluster client follows MOVED)."""
        return None

    def lane(self) -> Lane | None:
        """The script lane (made on first use); None sends accept and commit through
        the pool."""
        if self._lane is None:
            self._lane = self._make_lane()
        return self._lane

    @abstractmethod
    def _make_lane(self) -> Lane | None: ...

    def state(self, keys: KeySchema) -> RedisState:
        """The state layer on the shared client, with the lane for accept and commit."""
        cfg = self.config
        return RedisState(
            self.client,
            keys,
            self.lane(),
            sharded=self.sharded,
            replicas=cfg.ack_replicas,
            replica_timeout_ms=int(cfg.ack_timeout * 1000),
        )

    def registration_state(self, keys: KeySchema) -> RedisState:
        """The state layer on a connection of its own, for (re-)registering."""
        return RedisState(self._own_client(), keys, sharded=self.sharded)

    @abstractmethod
    def _own_client(self) -> Any:
        """A client apart from the pool (closed with the backend)."""

    @abstractmethod
    def subscriptions(self, keys: KeySchema, probe_interval: float) -> Subscription:
        """This node's subscription (its node channel is its probe)."""

    def _one_subscription(
        self, url: str, keys: KeySchema, probe_interval: float, locate: Locate | None = None
    ) -> Subscriptions:
        """The node's subscription on a connection of its own to ``url`` (``locate``:
        where the master is now, behind Sentinel), its probe published through the pool."""
        return Subscriptions(
            Endpoint.from_url(url, PUBSUB_NAME),
            self.client.publish,
            keys.node_channel(self.config.node_id),
            probe_interval,
            connect_timeout=self.config.connect_timeout,
            locate=locate,
        )

    @abstractmethod
    def lease_renewer(self, keys: KeySchema) -> LeaseRenewer:
        """The lease keeper thread's blocking client (closed by the keeper)."""

    async def aclose(self) -> None:
        if self._lane is not None:
            await self._lane.aclose()
            self._lane = None
        clients, self._owned = self._owned, []
        for client in clients:
            with contextlib.suppress(*REDIS_TROUBLE):
                await client.aclose()


def eviction_problem(where: str, maxmemory: int, policy: str) -> tuple[bool, str] | None:
    """What a server's memory settings mean for the nodes: None when it keeps every key;
    ``(True, why)`` when it evicts keys at its maxmemory (a node refuses to start);
    ``(False, why)`` when it would, once given a maxmemory (a warning)."""
    if policy in ("noeviction", ""):
        return None
    if maxmemory:
        return True, (
            f"Redis at {where} evicts keys when it reaches its maxmemory "
            f"({maxmemory} bytes, maxmemory-policy {policy}): a lease, record or "
            "log it evicted would be lost without a word. Set maxmemory-policy "
            "noeviction (redis.conf, CONFIG SET, or the managed service's "
            "parameters); at its bound Redis then refuses writes, which the nodes "
            "report"
        )
    return False, (
        f"Redis at {where} has maxmemory-policy {policy}: with a maxmemory set it would "
        "evict the nodes' keys; set noeviction"
    )


def replica_shortage(where: str, replicas: int, wanted: int) -> str:
    """What a master with fewer replicas than ``--ack-replicas`` means for the nodes."""
    return (
        f"Redis at {where} has {replicas} replica(s); --ack-replicas {wanted} refuses every "
        "write of its conversations (each after --ack-timeout) until it has that many"
    )


def memory_policy(info: Any) -> tuple[int, str]:
    """(maxmemory, maxmemory-policy) from an ``INFO memory`` reply."""
    return int(info.get("maxmemory", 0) or 0), str(info.get("maxmemory_policy", ""))
