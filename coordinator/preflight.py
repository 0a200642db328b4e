"""``coordinator serve --check``: what a node needs to start, checked without starting it.

With the same flags and environment as the ``serve`` it checks, for a deploy pipeline or
an operator before a rollout: the token settings, the event store (it opens), Redis (its
deployment and its state, version, memory policy; the node's scripts load, its
subscription is allowed), then the cluster's data is in the node's layout, the event
store is the one the cluster's nodes record and the node id is not held by a live node;
the agent class (it imports) and the ports the node listens on (free). Nothing is written
to Redis and no port is held; opening the event store creates its directory or tables
when missing, as a start would. One line per check (``skip`` for those a failed one
leaves nothing to check with); exit 0 when none failed, 1 otherwise. Flags the node
would refuse are refused first, as ``serve`` does (exit 2).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TextIO

from workers.loader import AgentLoadError, load_agent

from . import layout
from .archive import store_mismatch
from .auth import TokenVerifier, short_secret
from .backends.base import Backend, eviction_problem, replica_shortage
from .backends.detect import open_backend
from .config import ManagerConfig
from .errors import EXPECTED
from .eventstore.factory import shown_url, store_from_url
from .keys import KeySchema
from .redact import redact
from .redisurl import database_of
from .state import RedisState

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
# What a check may meet: the coordinator's errors, Redis' (away, or refusing), no answer.
TROUBLE: tuple[type[Exception], ...] = (*EXPECTED, TimeoutError)
STORE_TROUBLE: tuple[type[Exception], ...] = (*TROUBLE, OSError)
# What reading INFO of a server that is no Redis data server (a Sentinel's port) can raise.
UNREADABLE: tuple[type[Exception], ...] = (
    *TROUBLE,
    KeyError,
    TypeError,
    ValueError,
    AttributeError,
)
# The checks that need Redis, in order (skipped when it cannot be reached).
NEEDS_REDIS = ("eviction", "memory", "scripts", "subscribe", "layout", "node id")


@dataclass(frozen=True)
class Finding:
    status: str  # OK, WARN, FAIL or SKIP
    what: str
    detail: str


class _Findings(list[Finding]):
    def add(self, status: str, what: str, detail: str) -> None:
        self.append(Finding(status, what, redact(detail)))

    def skip(self, names: tuple[str, ...], why: str) -> None:
        for name in names:
            self.add(SKIP, name, why)


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def check(
    config: ManagerConfig,
    tokens: TokenVerifier,
    ports: list[tuple[str, str, int]],
    redis_given: bool = True,
) -> list[Finding]:
    """Every check's finding, in order. ``ports``: ``(name, host, port)`` the node would
    listen on. ``redis_given``: False when ``serve`` would start a private embedded
    Redis (no --redis-url): nothing of Redis to check then."""
    found = _Findings()
    settings = tokens.settings
    source = "a secret" if settings.algorithm == "HS256" else "a public key"
    if short_secret(settings):
        found.add(WARN, "tokens", f"{settings.algorithm}: the secret is shorter than 32 bytes")
    else:
        found.add(OK, "tokens", f"{settings.algorithm}, verified with {source}")
    identity = await _store_opens(config, found)
    if redis_given:
        await _redis(config, found, identity)
    else:
        found.add(
            WARN,
            "redis",
            "no --redis-url: the node would start a private embedded Redis (fine for "
            "trying it out; the nodes of a cluster share one Redis URL)",
        )
    if identity is not None and not any(f.what == "event store" for f in found):
        shown = shown_url(config.event_store or None)
        found.add(OK, "event store", f"{shown} opens (not compared with the cluster's)")
    _agent(config, found)
    taken: set[int] = set()
    for name, host, port in ports:
        _port(name, host, port, taken, found)
    return found


async def _store_opens(config: ManagerConfig, found: _Findings) -> str | None:
    """Open the event store (its URL was checked with the flags); its identity, or None
    when it cannot be opened."""
    shown = shown_url(config.event_store or None)
    store = store_from_url(config.event_store or None)
    try:
        await store.open()
        return store.identity()
    except STORE_TROUBLE as exc:
        why = _why(exc)
        named = shown in why or "event store" in why  # the store's errors name it
        found.add(FAIL, "event store", why if named else f"{shown}: {why}")
        return None
    finally:
        await store.aclose()


async def _redis(config: ManagerConfig, found: _Findings, identity: str | None) -> None:
    try:
        backend = await open_backend(config)
    except TROUBLE as exc:
        found.add(FAIL, "redis", _why(exc))
        found.skip(NEEDS_REDIS, "Redis not reached")
        return
    try:
        await _with_redis(config, backend, found, identity)
    finally:
        await backend.aclose()


async def _with_redis(
    config: ManagerConfig, backend: Backend, found: _Findings, identity: str | None
) -> None:
    limit = config.connect_timeout + 1
    try:
        await backend.check()
        info = await _within(limit, backend.client.info("server"))
        state = await _cluster_state(backend, limit)
    except TROUBLE as exc:
        found.add(FAIL, "redis", _why(exc) if str(exc) else f"no answer within {limit:g}s")
        found.skip(NEEDS_REDIS, "Redis not reached")
        return
    if state not in ("", "ok"):
        found.add(FAIL, "redis", f"{backend.describe()}: cluster_state is {state}")
        found.skip(NEEDS_REDIS, "the cluster is not serving")
        return
    found.add(OK, "redis", f"{backend.describe()}, Redis {_version(info)}")
    await _eviction(backend, limit, found)
    if config.ack_replicas:
        await _replicas(backend, config.ack_replicas, limit, found)
    keys = KeySchema(config.key_prefix, database_of(config.redis_url))
    rstate = backend.state(keys)
    await _memory(rstate, limit, found)
    try:
        await rstate.load_scripts()
        found.add(OK, "scripts", "loaded (SCRIPT LOAD)")
    except TROUBLE as exc:
        found.add(FAIL, "scripts", f"{type(exc).__name__}: {_why(exc)}")
    await _subscribe(config, backend, keys, found)
    try:
        recorded = await rstate.recorded_store()
        registry = await rstate.registry()
        live = await rstate.live_leases(registry)
        cluster_layout = await layout.recorded(rstate)
    except TROUBLE as exc:
        found.add(FAIL, "node id", f"the node registry cannot be read: {type(exc).__name__}: {exc}")
        return
    node = config.node_id
    _layout(rstate, cluster_layout, sorted(n for n in live if n != node), found)
    if node in live:
        found.add(
            WARN,
            "node id",
            f"{node!r} is held by a live node ({registry[node]}): a node started with it "
            f"waits up to node_ttl + 2 s ({config.node_ttl + 2:g}s) for that lease to end, "
            "then refuses to start",
        )
    else:
        found.add(OK, "node id", f"{node!r} is free")
    if identity is not None:
        _store_recorded(config, rstate, identity, recorded, found)


async def _within(limit: float, call: Awaitable[Any]) -> Any:
    async with asyncio.timeout(limit):
        return await call


async def _cluster_state(backend: Backend, limit: float) -> str:
    """A Redis Cluster's ``cluster_state`` ('ok' when it serves every slot); '' for
    another deployment."""
    if backend.mode != "cluster":
        return ""
    info = await _within(limit, backend.client.cluster_info())
    return str(info.get("cluster_state", "?")) if isinstance(info, dict) else "?"


async def _replicas(backend: Backend, wanted: int, limit: float, found: _Findings) -> None:
    """--ack-replicas N with a master that has fewer replicas: every action and every
    replay of its conversations is refused, after the replicas' wait (a join took 23 s
    to be refused as "Redis cannot be reached"), until one is attached."""
    try:
        counts = await _within(limit, backend.replica_counts())
    except UNREADABLE as exc:
        found.add(WARN, "replicas", f"not readable ({_why(exc)})")
        return
    short = {where: n for where, n in sorted(counts.items()) if n < wanted}
    for where, n in short.items():
        found.add(FAIL, "replicas", replica_shortage(where, n, wanted))
    if not short:
        found.add(
            OK,
            "replicas",
            f"{min(counts.values(), default=0)} or more per master (--ack-replicas {wanted})",
        )


async def _memory(state: RedisState, limit: float, found: _Findings) -> None:
    """Redis at its maxmemory refuses every write: a node cannot even register (it
    passed the check, then failed to start saying to check --redis-url)."""
    try:
        used, most = await _within(limit, state.memory())
    except UNREADABLE as exc:
        # INFO without used_memory: not a Redis data server (a Sentinel's port?).
        found.add(WARN, "memory", f"not readable ({_why(exc)})")
        return
    if most and used >= most:
        found.add(
            FAIL,
            "memory",
            f"Redis is full ({used} bytes used of maxmemory {most}): it refuses every "
            "write, a node's registration included; raise maxmemory or free memory",
        )
    elif most:
        found.add(OK, "memory", f"{used * 100 // most}% of maxmemory ({used} of {most} bytes)")
    else:
        found.add(OK, "memory", f"{used} bytes used, no maxmemory")


async def _eviction(backend: Backend, limit: float, found: _Findings) -> None:
    try:
        policies = await _within(limit, backend.memory_policies())
    except TROUBLE as exc:
        found.add(
            WARN,
            "eviction",
            f"maxmemory-policy not readable ({_why(exc)}): make sure it is noeviction",
        )
        return
    lines: list[tuple[str, str]] = []
    for where, (maxmemory, policy) in sorted(policies.items()):
        if not policy:  # INFO without it: not a Redis data server (a Sentinel's port?)
            lines.append(
                (
                    WARN,
                    f"Redis at {where} reports no maxmemory-policy (a Sentinel? reach a "
                    "Sentinel-managed master with a redis+sentinel:// URL)",
                )
            )
            continue
        problem = eviction_problem(where, maxmemory, policy)
        if problem is not None:
            lines.append((FAIL if problem[0] else WARN, problem[1]))
    for status, detail in lines:
        found.add(status, "eviction", detail)
    if not lines:
        found.add(OK, "eviction", "maxmemory-policy noeviction")


async def _subscribe(
    config: ManagerConfig, backend: Backend, keys: KeySchema, found: _Findings
) -> None:
    """Subscribe to this node's command channel, as a start does, and leave."""
    subscriptions = backend.subscriptions(keys, probe_interval=max(1.0, config.heartbeat_interval))
    try:
        async with asyncio.timeout(config.connect_timeout + 1):
            await subscriptions.start()
            await subscriptions.add(keys.node_channel(config.node_id))
        found.add(OK, "subscribe", "allowed (the node's channels)")
    except TROUBLE as exc:
        found.add(FAIL, "subscribe", _why(exc) if str(exc) else "not confirmed in time")
    finally:
        await subscriptions.aclose()


def _layout(
    state: RedisState, recorded: dict[str, str] | None, others: list[str], found: _Findings
) -> None:
    """Whether a start would find the cluster's data in this node's layout (layout.py)."""
    ours = str(layout.LAYOUT)
    if recorded is None:
        found.add(OK, "layout", f"{ours} (no node has recorded the cluster's yet)")
    elif recorded["layout"] == ours:
        found.add(OK, "layout", f"{ours} (the cluster's)")
    elif others:
        found.add(FAIL, "layout", str(layout.mismatch(recorded, others, state)))
    else:
        found.add(
            WARN,
            "layout",
            f"Redis holds layout {recorded['layout']} (release {recorded['release']}) and "
            f"no node of it runs: a start would make this node's layout {ours} the "
            "cluster's (an upgrade; see the release's notes for its data)",
        )


def _store_recorded(
    config: ManagerConfig,
    state: RedisState,
    identity: str,
    recorded: tuple[str, str, str] | None,
    found: _Findings,
) -> None:
    shown = shown_url(config.event_store or None)
    if recorded is None:
        found.add(OK, "event store", f"{shown} (no node has recorded the cluster's store yet)")
    elif recorded[0] == identity:
        found.add(OK, "event store", f"{shown} (the cluster's)")
    else:
        found.add(
            FAIL, "event store", str(store_mismatch(state, config, shown, identity, recorded))
        )


def _agent(config: ManagerConfig, found: _Findings) -> None:
    try:
        load_agent(config.agent)
    except AgentLoadError as exc:
        found.add(FAIL, "agent", str(exc))
        return
    where = (
        f"in {config.agent_workers} worker process(es)"
        if config.agent_isolation == "process"
        else "in the node's process"
    )
    found.add(OK, "agent", f"{config.agent} imports; it would run {where}")


def _port(name: str, host: str, port: int, taken: set[int], found: _Findings) -> None:
    if port == 0:
        found.add(OK, name, "0: any free port")
        return
    if port in taken:
        found.add(FAIL, name, f"{port} is also another of the node's ports")
        return
    taken.add(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        found.add(FAIL, name, f"{host}: {exc}")
        return
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            why = "in use" if exc.errno == errno.EADDRINUSE else str(exc)
            found.add(FAIL, name, f"{host}:{port}: {why}")
            return
    found.add(OK, name, f"{host}:{port} is free")


def _version(info: object) -> str:
    if isinstance(info, dict) and "redis_version" in info:
        return str(info["redis_version"])
    if isinstance(info, dict):  # a cluster: one entry per node
        versions = {str(v.get("redis_version")) for v in info.values() if isinstance(v, dict)}
        return ", ".join(sorted(versions)) or "?"
    return "?"


def report(findings: list[Finding], out: TextIO) -> int:
    """Print the findings; the exit code (1 if any failed)."""
    width = max(len(f.what) for f in findings)
    for f in findings:
        print(f"{f.status:<4}  {f.what:<{width}}  {f.detail}", file=out)
    failed = sum(f.status == FAIL for f in findings)
    warned = sum(f.status == WARN for f in findings)
    if failed:
        print(f"check failed: {failed} problem(s), {warned} warning(s)", file=out)
        return 1
    print(f"check passed ({warned} warning(s))", file=out)
    return 0
