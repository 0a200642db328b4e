"""Behind Sentinel: every connection asks the Sentinels where the master is.

``--redis-url redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]``
(``rediss+sentinel://`` for TLS to the data nodes; ``sentinel_password`` and
``sentinel_username`` parameters when the Sentinels have credentials of their own).
redis-py's Sentinel pools find the master on connect and drop a connection that reaches
a demoted one (``READONLY``); the lane does the same (``lane.ScriptLane(locate=...)``),
and the lease keeper's client too. Each asks every Sentinel and takes the master of the
newest configuration any of them gives (``discovery``), not the first answer.

A master that stopped (paused, or cut off) past down-after and comes back after its
failover is not demoted yet: it answers as a master until the Sentinels convert it,
seconds later, and connections opened to it before it stopped wrote there, writes its
conversion then threw away (a node's new registration, acknowledged actions). One the
node still reaches while the Sentinels do not (a partition) is never demoted while it
lasts. So the node asks the Sentinels where the master is every heartbeat
(``follow_master``) and, when it moved, drops its pool's connections to the old one, in
use or not (not those on the new master: a command in flight there would be sent
again), reconnects the lane and the subscription (their calls are safe to repeat) to the
master the Sentinels name, and tells the lease keeper's pool, whose next renewal then
goes there. A pool connection begun before the failover, to the stopped master,
completes when it comes back: it is dropped once made if its pool has heard of another
master meanwhile, and any pool connection is when the pool hands it out
(``_ToTheMaster``, ``_KeeperToTheMaster``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis
import redis.connection
import redis.sentinel
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelManagedConnection
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry as SyncRetry

from ..config import ManagerConfig
from ..errors import REDIS_TROUBLE
from ..keys import KeySchema
from ..lane import ScriptLane
from ..redisurl import SentinelURL, parse_sentinel_url
from ..state import LeaseRenewer
from ..state.core import Lane
from ..subscriptions import Subscription, Subscriptions
from .base import Backend, unreachable
from .discovery import AskingAll, KeeperAskingAll, Tally, sound

log = logging.getLogger(__name__)

# A failover takes Sentinel's down-after plus an election: calls retry, with backoff,
# about that long before they fail.
RETRIES = 20


class SentinelBackend(Backend):
    mode = "sentinel"

    def __init__(self, config: ManagerConfig) -> None:
        super().__init__(config)
        self.url: SentinelURL = parse_sentinel_url(config.redis_url)
        self._sentinel = AskingAll(
            list(self.url.sentinels),
            sentinel_kwargs=self._sentinel_kwargs(),
            **self._node_kwargs(),
        )
        self._client = self._master_client(RETRIES)
        self._master: tuple[str, int] | None = None  # where the Sentinels said it was
        self._subscription: Subscriptions | None = None
        self._keeper: Any = None  # the lease keeper's client (blocking, its own thread)

    def _sentinel_kwargs(self) -> dict[str, Any]:
        cfg, u = self.config, self.url
        return {
            "username": u.sentinel_username or None,
            "password": u.sentinel_password or None,
            "socket_connect_timeout": cfg.connect_timeout,
            "socket_timeout": cfg.connect_timeout,
        }

    def _node_kwargs(self) -> dict[str, Any]:
        cfg, u = self.config, self.url
        options: dict[str, Any] = {
            "username": u.username or None,
            "password": u.password or None,
            "db": u.db,
            "socket_connect_timeout": cfg.connect_timeout,
            "socket_timeout": cfg.redis_timeout,
        }
        options.update(u.options())  # the URL's own, as a redis:// URL's override ours
        if u.tls:
            options["ssl"] = True
        return options

    def _master_client(self, retries: int) -> aioredis.Redis:
        client: aioredis.Redis = self._sentinel.master_for(
            self.url.master,
            redis_class=aioredis.Redis,
            retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), retries),
            connection_class=_ToTheMasterTLS if self.url.tls else _ToTheMaster,
        )
        self._owned.append(client)
        return client

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def check(self) -> None:
        """Raise RedisUnavailable saying what failed (no sentinel answered, none knows
        the master, the master refused the credentials...) unless the master answers.

        Once, without retries: the pool's client retries for a failover's length, and
        a Sentinel's errors (MasterNotFoundError, AuthenticationError) are
        ConnectionErrors it retries too, so a timeout around it hides every reason."""
        cfg = self.config
        # The sentinels asked at once (a connect, its handshake and the question: four
        # round trips at most), then the master: a connect, its handshake (AUTH, SELECT,
        # a name, ...) and the PING, bounded by the data nodes' timeouts (the URL may set
        # its own); generously, as each is bounded on its own: this is a backstop.
        node = self._node_kwargs()
        read = float(node.get("socket_timeout") or cfg.redis_timeout)
        connect = float(node.get("socket_connect_timeout") or cfg.connect_timeout)
        bound = cfg.connect_timeout * 4 + connect + 6 * read + 1
        try:
            async with asyncio.timeout(bound):
                host, port = await self._discover_once()
                self._master = (host, port)  # the first watch compares with this one
                master = aioredis.Redis(
                    host=host, port=port, **self._node_kwargs(), retry=Retry(NoBackoff(), 0)
                )
                try:
                    await master.ping()
                except REDIS_TROUBLE as exc:
                    why = str(exc) or type(exc).__name__
                    raise _Failed(f"master {self.url.master!r} at {host}:{port}: {why}") from None
                finally:
                    with contextlib.suppress(*REDIS_TROUBLE):
                        await master.aclose()
        except _Failed as exc:
            raise unreachable(cfg, exc) from None
        except TimeoutError:
            raise unreachable(cfg, TimeoutError(f"no answer within {bound:.0f}s")) from None

    async def _discover_once(self) -> tuple[str, int]:
        """The master's address as the Sentinels name it (``discovery.Tally``: each
        asked once, all at once); _Failed naming what each sentinel said otherwise."""

        async def ask(host: str, port: int) -> Any:
            sentinel = aioredis.Redis(
                host=host, port=port, **self._sentinel_kwargs(), retry=Retry(NoBackoff(), 0)
            )
            try:
                return await sentinel.sentinel_masters()
            except REDIS_TROUBLE as exc:
                return exc
            finally:
                with contextlib.suppress(*REDIS_TROUBLE):
                    await sentinel.aclose()

        listed = self.url.sentinels
        answers = await asyncio.gather(*(ask(host, port) for host, port in listed))
        tally = Tally(self.url.master)
        said: list[str] = []
        answered = known = False
        for (host, port), masters in zip(listed, answers, strict=True):
            if isinstance(masters, BaseException):
                said.append(f"sentinel {host}:{port}: {str(masters) or type(masters).__name__}")
                continue
            answered = True
            state = masters.get(self.url.master) if isinstance(masters, dict) else None
            if state is None:
                continue
            known = True
            tally.add(masters)
            if not sound(state):
                said.append(f"sentinel {host}:{port}: the master is down")
        if (found := tally.best()) is not None:
            return found
        if not said:
            raise _Failed(f"no sentinel knows master {self.url.master!r}")
        if not answered:
            head = "no sentinel answered: "
        elif not known:
            head = f"no sentinel knows master {self.url.master!r}; "
        else:
            head = ""
        raise _Failed(head + "; ".join(said))

    async def locate(self) -> tuple[str, int]:
        """The master's address, as the Sentinels say now."""
        host, port = await self._sentinel.discover_master(self.url.master)
        return str(host), int(port)

    async def follow_master(self) -> None:
        """Ask the Sentinels where the master is; if it moved since the last time, drop
        every connection to the old one (see the module's docstring)."""
        try:
            now = await self.locate()
        except REDIS_TROUBLE as exc:  # no master named during a failover: said elsewhere
            log.debug("master watch: %s", exc)
            return
        before, self._master = self._master, now
        if before is None or before == now:
            return
        log.warning(
            "Redis master %r moved from %s:%d to %s:%d (Sentinel): reconnecting",
            self.url.master,
            *before,
            *now,
        )
        why = RedisConnectionError(f"the master moved to {now[0]}:{now[1]}")
        if isinstance(self._lane, ScriptLane):
            self._lane.drop(why)
        if self._subscription is not None:
            self._subscription.drop(why)
        if self._keeper is not None:
            # Its connection is dropped before its next renewal (``_KeeperToTheMaster``): a
            # master this node still reaches, the Sentinels not (a partition), went on
            # taking its renewals while the lease expired on the new one.
            # (redis-py's blocking pool keeps it in its proxy, which its connections see.)
            self._keeper.connection_pool.proxy.master_address = now
        for client in self._owned:
            pool = client.connection_pool
            pool.master_address = now  # a SentinelConnectionPool
            # Only those to the old master: one on the new master may be carrying a
            # command that is not safe to send twice (a dropped connection's retry).
            # (redis-py's pool keeps them in these two; nothing public lists them.)
            connections = [
                *getattr(pool, "_available_connections", ()),
                *getattr(pool, "_in_use_connections", ()),
            ]
            stale = [c for c in connections if (c.host, c.port) == before]
            with contextlib.suppress(*REDIS_TROUBLE, OSError, TimeoutError):
                async with asyncio.timeout(self.config.connect_timeout):
                    await asyncio.gather(*(c.disconnect() for c in stale), return_exceptions=True)

    async def aclose(self) -> None:
        await super().aclose()
        with contextlib.suppress(*REDIS_TROUBLE):
            await self._sentinel.aclose()  # its questions still out, its connections

    def _make_lane(self) -> Lane | None:
        first = self.url.sentinels[0]
        return ScriptLane(
            self.url.node_url(*first),  # credentials, db and TLS; the address is located
            timeout=self.config.redis_timeout,
            connect_timeout=self.config.connect_timeout,
            locate=self.locate,
        )

    def _own_client(self) -> Any:
        return self._master_client(RETRIES)

    def subscriptions(self, keys: KeySchema, probe_interval: float) -> Subscription:
        # A subscription that fails reconnects to the master the Sentinels name then.
        url = self.url.node_url(*self.url.sentinels[0])  # credentials, db, TLS
        self._subscription = self._one_subscription(url, keys, probe_interval, self.locate)
        return self._subscription

    def lease_renewer(self, keys: KeySchema) -> LeaseRenewer:
        timeout = min(0.5, self.config.heartbeat_interval)
        u = self.url
        sentinel = KeeperAskingAll(
            list(u.sentinels),
            sentinel_kwargs={
                "username": u.sentinel_username or None,
                "password": u.sentinel_password or None,
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
            },
            **{**self._node_kwargs(), "socket_timeout": timeout, "socket_connect_timeout": timeout},
        )
        client = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
            u.master,
            retry=SyncRetry(NoBackoff(), 1),
            connection_class=_KeeperToTheMasterTLS if u.tls else _KeeperToTheMaster,
        )
        self._keeper = client
        return LeaseRenewer(client, keys)


class _Failed(Exception):
    """What the start-up check found wrong (its text: the reason)."""


class _ToTheMaster(SentinelManagedConnection):
    """A pool connection used only while it is to the master its pool last heard of.

    Once made: one begun before a failover, to a master that stopped, completes when
    that master comes back, a master still until the Sentinels convert it, and its
    commands (a read of the nodes' leases, a registration) went there. Dropped instead;
    the pool's retry asks the Sentinels again.

    And each time the pool hands it out: the pools were seen holding connections to
    the stopped master after ``follow_master``'s sweep (made during the pause, before
    the failover); one read the nodes' leases there ten seconds later, its copy
    expired, and every node lapsed."""

    async def connect(self) -> None:
        if self.is_connected and _elsewhere(self) is not None:
            await self.disconnect()
        await super().connect()  # type: ignore[no-untyped-call]

    async def connect_to(self, address: tuple[str, int]) -> None:
        await super().connect_to(address)  # type: ignore[no-untyped-call]
        if (now := _elsewhere(self)) is not None:
            await self.disconnect()
            raise RedisConnectionError(
                f"{address[0]}:{address[1]} is not the master any more ({now[0]}:{now[1]} is)"
            )


class _ToTheMasterTLS(_ToTheMaster, SSLConnection):
    pass


class _KeeperToTheMaster(redis.sentinel.SentinelManagedConnection):
    """The lease keeper's connection (blocking), dropped before a renewal when
    ``follow_master`` heard of another master than the one it reaches."""

    def connect(self) -> None:
        if self._sock is not None and _elsewhere(self) is not None:
            self.disconnect()
        super().connect()  # type: ignore[no-untyped-call]


class _KeeperToTheMasterTLS(_KeeperToTheMaster, redis.connection.SSLConnection):
    pass


def _elsewhere(conn: Any) -> tuple[str, int] | None:
    """The master ``conn``'s pool last heard of, if ``conn`` is to another server."""
    now = conn.connection_pool.master_address
    if now is not None and tuple(now) != (conn.host, conn.port):
        return (str(now[0]), int(now[1]))
    return None
