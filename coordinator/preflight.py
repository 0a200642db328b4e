"""``coordinator serve --check``: what a node needs to start, checked without starting it.

With the same flags and environment as the ``serve`` it checks, for a deploy pipeline or
an operator before a rollout: the token settings (read when the flags are), Redis (its
deployment, version, memory policy, the node's scripts), the event store (it opens, and
it is the one the cluster's nodes record), the node id (not held by a live node), the
agent class (it imports) and the listening port (free). Nothing is written to Redis and
no port is held; opening the event store creates its directory or tables when missing,
as a start would. One line per check; exit 0 when none failed, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TextIO

from workers.loader import AgentLoadError, load_agent

from .archive import store_mismatch
from .auth import TokenVerifier
from .backends.base import Backend, eviction_problem
from .backends.detect import open_backend
from .config import ManagerConfig
from .errors import EXPECTED, CoordinatorError
from .eventstore.factory import shown_url, store_from_url
from .keys import KeySchema
from .redact import redact
from .redisurl import database_of, redact_url
from .state import RedisState

OK, WARN, FAIL = "ok", "warn", "FAIL"
# What a check may meet: the coordinator's errors, Redis' (away, or refusing), no answer.
TROUBLE: tuple[type[Exception], ...] = (*EXPECTED, TimeoutError)


@dataclass(frozen=True)
class Finding:
    status: str  # OK, WARN or FAIL
    what: str
    detail: str


class _Findings(list[Finding]):
    def add(self, status: str, what: str, detail: str) -> None:
        self.append(Finding(status, what, redact(detail)))


async def check(
    config: ManagerConfig, tokens: TokenVerifier, host: str, port: int, redis_given: bool = True
) -> list[Finding]:
    """Every check's finding, in order. ``redis_given``: False when ``serve`` would start
    a private embedded Redis (no --redis-url): nothing of Redis to check then."""
    found = _Findings()
    settings = tokens.settings
    source = "a secret" if settings.algorithm == "HS256" else "a public key"
    found.add(OK, "tokens", f"{settings.algorithm}, verified with {source}")
    if redis_given:
        await _redis(config, found)
    else:
        found.add(
            WARN,
            "redis",
            "no --redis-url: the node would start a private embedded Redis (fine for "
            "trying it out; the nodes of a cluster share one Redis URL)",
        )
    _agent(config, found)
    _port(host, port, found)
    return found


async def _redis(config: ManagerConfig, found: _Findings) -> None:
    where = redact_url(config.redis_url)
    try:
        backend = await open_backend(config)
    except TROUBLE as exc:
        found.add(FAIL, "redis", str(exc))
        return
    try:
        await _with_redis(config, backend, found, where)
    finally:
        await backend.aclose()


async def _with_redis(
    config: ManagerConfig, backend: Backend, found: _Findings, where: str
) -> None:
    limit = config.connect_timeout + 1

    async def within(call: Callable[[], Awaitable[object]]) -> object:
        async with asyncio.timeout(limit):
            return await call()

    try:
        await backend.check()
        info = await within(lambda: backend.client.info("server"))
    except TROUBLE as exc:
        found.add(FAIL, "redis", str(exc) or f"{where}: no answer within {limit:g}s")
        return
    found.add(OK, "redis", f"{backend.describe()}, Redis {_version(info)}")
    try:
        policies = await within(backend.memory_policies)
    except TROUBLE as exc:
        found.add(
            WARN, "eviction", f"maxmemory-policy not readable ({exc}): make sure it is noeviction"
        )
    else:
        assert isinstance(policies, dict)
        problems = [eviction_problem(w, m, p) for w, (m, p) in sorted(policies.items())]
        for problem in problems:
            if problem is not None:
                found.add(FAIL if problem[0] else WARN, "eviction", problem[1])
        if not any(problems):
            found.add(OK, "eviction", "maxmemory-policy noeviction")
    keys = KeySchema(config.key_prefix, database_of(config.redis_url))
    state = backend.state(keys)
    try:
        await state.load_scripts()
        found.add(OK, "scripts", "loaded (SCRIPT LOAD allowed, scripts accepted)")
        recorded = await state.recorded_store()
        registry = await state.registry()
        live = await state.live_leases(registry)
    except TROUBLE as exc:
        found.add(FAIL, "scripts", f"{type(exc).__name__}: {exc}")
        return
    node = config.node_id
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
    await _store(config, state, recorded, found)


async def _store(
    config: ManagerConfig,
    state: RedisState,
    recorded: tuple[str, str, str] | None,
    found: _Findings,
) -> None:
    shown = shown_url(config.event_store or None)
    try:
        store = store_from_url(config.event_store or None)
        await store.open()
    except (CoordinatorError, OSError) as exc:
        found.add(FAIL, "event store", f"{shown}: {exc}")
        return
    try:
        identity = store.identity()
    finally:
        await store.aclose()
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


def _port(host: str, port: int, found: _Findings) -> None:
    if port == 0:
        found.add(OK, "port", "0: any free port")
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        found.add(FAIL, "port", f"{host}: {exc}")
        return
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            why = "in use" if exc.errno == errno.EADDRINUSE else str(exc)
            found.add(FAIL, "port", f"{host}:{port}: {why}")
            return
    found.add(OK, "port", f"{host}:{port} is free")


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
