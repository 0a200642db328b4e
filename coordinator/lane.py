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
behind its accept must travel on the same connection.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Mapping, Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import RedisSSLContext, parse_url
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AuthenticationError,
    DataError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .backoff import Backoff

RETRIES = 2


SCHEMES = ("redis://", "rediss://", "unix://")


def lane_supported(url: str) -> bool:
    return url.startswith(SCHEMES)


def ssl_context(params: Mapping[str, Any]) -> ssl.SSLContext:
    """The SSL context redis-py builds for a ``rediss://`` URL's parameters."""
    names = {
        "ssl_keyfile": "keyfile",
        "ssl_certfile": "certfile",
        "ssl_cert_reqs": "cert_reqs",
        "ssl_ca_certs": "ca_certs",
        "ssl_ca_data": "ca_data",
        "ssl_ca_path": "ca_path",
        "ssl_check_hostname": "check_hostname",
        "ssl_min_version": "min_version",
        "ssl_ciphers": "ciphers",
        "ssl_password": "password",
    }
    options = {names[k]: v for k, v in params.items() if k in names}
    return RedisSSLContext(**options).get()


def pack(*args: Any) -> bytes:
    """One command in RESP, encoded by hiredis (bytes, str, int and float arguments)."""
    try:
        return bytes(hiredis.pack_command(args))
    except TypeError:  # None, bool, containers...
        kinds = (bytes, str, int, float)
        bad = [type(a).__name__ for a in args if isinstance(a, bool) or not isinstance(a, kinds)]
        raise DataError(f"cannot send {', '.join(bad) or 'an argument'} to Redis") from None


class _Link(asyncio.Protocol):
    """One connection: futures of the calls in flight, answered in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # Calls in flight, oldest first, each with the loop time it must be answered by.
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.reader = hiredis.Reader()
        self.failure: Exception | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, command: bytes, timeout: float) -> asyncio.Future[Any]:
        """Write ``command``; its reply must come within ``timeout`` seconds, or every
        call in flight fails (the replies after a missing one cannot be matched)."""
        if self.failure is not None or self.transport is None:
            raise self.failure or RedisConnectionError("the lane is not connected")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        deadline = loop.time() + timeout
        self.waiting.append((fut, deadline))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._check)
        # Written at once, not batched per loop iteration: Redis runs an action's accept
        # on the other core while this one dispatches the agent and packs its commit.
        self.transport.write(command)
        return fut

    def _check(self) -> None:
        """One timer per connection, due at the oldest call's deadline (replies come in
        order): cheaper than a timer per call, and re-armed at most once per reply."""
        self._timer = None
        if self.failure is not None or not self.waiting:
            return
        loop = asyncio.get_running_loop()
        deadline = self.waiting[0][1]
        if deadline <= loop.time():
            self.fail(RedisTimeoutError("Redis did not answer in time"))
        else:
            self._timer = loop.call_at(deadline, self._check)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not self.waiting:
                self.fail(RedisConnectionError("a reply nobody asked for"))
                return
            fut, _ = self.waiting.popleft()
            if fut.done():  # its caller gave up (cancelled); the reply is dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(_reply_error(str(reply)))
            else:
                fut.set_result(reply)

    def fail(self, exc: Exception) -> None:
        """Fail every call in flight and drop the connection."""
        if self.failure is None:
            self.failure = exc
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.waiting:
            fut, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(self.failure)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))


def _reply_error(message: str) -> RedisError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith(("NOAUTH", "WRONGPASS")):
        return AuthenticationError(message)
    return ResponseError(message)


class ScriptLane:
    def __init__(
        self, url: str, *, timeout: float, connect_timeout: float, name: str = "coordinator-lane"
    ) -> None:
        if not lane_supported(url):
            raise ValueError("the script lane supports redis://, rediss:// and unix:// URLs")
        self._params = parse_url(url)
        self._ssl = ssl_context(self._params) if url.startswith("rediss://") else None
        self._name = name  # CLIENT SETNAME: how the connection shows in CLIENT LIST
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._link: _Link | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    async def run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA ``script`` (loading it on NOSCRIPT), retried on a lost connection."""
        command = pack("EVALSHA", script.sha, len(keys), *keys, *args)
        backoff: Backoff | None = None
        for attempt in range(RETRIES + 1):
            try:
                try:
                    return await self._call(command)
                except NoScriptError:  # Redis restarted without its script cache
                    await self._call(pack("SCRIPT", "LOAD", script.script))
                    return await self._call(command)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                if attempt == RETRIES or self._closed:
                    raise
                backoff = backoff or Backoff(base=0.05, cap=1.0)
                await asyncio.sleep(backoff.next())
        raise AssertionError("unreachable")

    def send_now(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]
    ) -> asyncio.Future[Any] | None:
        """EVALSHA ``script`` written at once, not retried; the reply's future is the
        caller's to await (or not). None when the lane is not connected. For a command
        that must reach Redis before what follows on this connection, without the CPU
        of a task (agent dispatch attempts: remoteagent.py)."""
        link = self._link
        if link is None or link.failure is not None or self._closed:
            return None
        return link.send(pack("EVALSHA", script.sha, len(keys), *keys, *args), self._timeout)

    async def _call(self, command: bytes) -> Any:
        link = self._link
        if link is None or link.failure is not None:
            link = await self._connect()
        return await link.send(command, self._timeout)

    async def _connect(self) -> _Link:
        if self._closed:
            raise RedisConnectionError("the lane is closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._link is not None and self._link.failure is None:
                return self._link  # another caller connected meanwhile
            loop = asyncio.get_running_loop()
            p = self._params
            try:
                if "path" in p:
                    connect = loop.create_unix_connection(_Link, str(p["path"]))
                else:
                    host, port = str(p.get("host", "localhost")), int(p.get("port", 6379))
                    connect = loop.create_connection(
                        _Link,
                        host,
                        port,
                        ssl=self._ssl,
                        server_hostname=host if self._ssl is not None else None,
                    )
                async with asyncio.timeout(self._connect_timeout):
                    _, fresh = await connect
            except (OSError, ssl.SSLError) as exc:  # TimeoutError included
                raise RedisConnectionError(f"cannot connect to Redis: {exc!r}") from None
            link: _Link = fresh
            try:
                for command in self._handshake():
                    async with asyncio.timeout(self._connect_timeout):
                        await link.send(command, self._connect_timeout)
            except TimeoutError:
                link.fail(RedisConnectionError("the lane's handshake timed out"))
                raise RedisTimeoutError("Redis did not answer the handshake in time") from None
            except BaseException:
                link.fail(RedisConnectionError("the lane's handshake failed"))
                raise
            self._link = link
            return link

    def _handshake(self) -> list[bytes]:
        p = self._params
        commands = []
        if p.get("password"):
            who = [p["username"]] if p.get("username") else []
            commands.append(pack("AUTH", *who, p["password"]))
        if p.get("db"):
            commands.append(pack("SELECT", int(p["db"])))
        commands.append(pack("CLIENT", "SETNAME", self._name))
        return commands

    async def aclose(self) -> None:
        self._closed = True
        if self._link is not None:
            self._link.fail(RedisConnectionError("the lane is closed"))
            self._link = None
