"""Pipelined Redis connections with hiredis: the parts the script lanes are built of.

A ``Link`` is one connection: calls write their command at once and get their reply in
order (Redis answers a connection's commands in order), encoded and parsed by hiredis. A
reply not back within its timeout, or a lost connection, fails every call in flight
(their replies can no longer be matched). An ``Endpoint`` says where to connect and how to
introduce the connection (AUTH, SELECT, CLIENT SETNAME, TLS); a ``LinkSlot`` keeps one
link to an endpoint, connecting on first use and again after a failure (asking where the
endpoint is now first, behind Sentinel). A subscriber's link (``subscriptions.py``) is a
``Link`` whose pushed messages go to its owner instead of a call.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
from redis.asyncio.connection import RedisSSLContext, parse_url
from redis.exceptions import (
    AuthenticationError,
    DataError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

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


class Link(asyncio.Protocol):
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
        return self.send_all((command,), timeout)[0]

    def send_all(self, commands: Sequence[bytes], timeout: float) -> list[asyncio.Future[Any]]:
        """Write ``commands`` back to back in one write (one system call, not one each);
        the futures of their replies, in order (``send``'s deadline for each)."""
        transport = self._writable()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        futures: list[asyncio.Future[Any]] = []
        for _ in commands:
            fut: asyncio.Future[Any] = loop.create_future()
            self.waiting.append((fut, deadline))
            futures.append(fut)
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._check)
        # Written at once, not batched per loop iteration: Redis runs an action's accept
        # on the other core while this one dispatches the agent and packs its commit.
        transport.write(commands[0] if len(commands) == 1 else b"".join(commands))
        return futures

    def write(self, commands: Sequence[bytes]) -> None:
        """Write ``commands`` in one write, expecting no reply to match (a subscriber's
        (UN)SUBSCRIBE: Redis answers with a pushed confirmation)."""
        self._writable().write(b"".join(commands))

    def _writable(self) -> asyncio.Transport:
        if self.failure is not None or self.transport is None:
            raise self.failure or RedisConnectionError("the lane is not connected")
        return self.transport

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
        self.parse()

    def parse(self) -> None:
        """Handle the replies read so far, until one says to stop (``received``)."""
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False or self.received(reply):
                return

    def received(self, reply: Any) -> bool:
        """Answer the oldest call with ``reply``; True: stop parsing (the link failed)."""
        if not self.waiting:
            self.fail(RedisConnectionError("a reply nobody asked for"))
            return True
        fut, _ = self.waiting.popleft()
        if fut.done():  # its caller gave up (cancelled); the reply is dropped
            return False
        if isinstance(reply, hiredis.ReplyError):
            fut.set_exception(reply_error(str(reply)))
        else:
            fut.set_result(reply)
        return False

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


# Redis' answers to an AUTH when it has no password (7.x, then before 6.0).
NO_PASSWORD_SET = ("AUTH <password> called without any password", "Client sent AUTH, but no")


def reply_error(message: str) -> RedisError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith(("NOAUTH", "WRONGPASS")):
        return AuthenticationError(message)
    if message.startswith("READONLY"):
        return ReadOnlyError(message)
    return ResponseError(message)


@dataclass(frozen=True)
class Endpoint:
    """Where a link connects (``host``/``port``, or a Unix socket ``path``) and how it
    introduces itself: credentials, database, TLS, and its CLIENT SETNAME."""

    host: str = "localhost"
    port: int = 6379
    path: str = ""
    username: str = ""
    password: str = ""
    db: int = 0
    ssl: ssl.SSLContext | None = field(default=None, compare=False)
    name: str = "coordinator-lane"

    @classmethod
    def from_url(cls, url: str, name: str = "coordinator-lane") -> Endpoint:
        if not lane_supported(url):
            raise ValueError("the script lane supports redis://, rediss:// and unix:// URLs")
        p = parse_url(url)
        return cls(
            host=str(p.get("host", "localhost")),
            port=int(p.get("port", 6379)),
            path=str(p.get("path", "")),
            username=str(p.get("username") or ""),
            password=str(p.get("password") or ""),
            db=int(p.get("db") or 0),
            ssl=ssl_context(p) if url.startswith("rediss://") else None,
            name=name,
        )

    def at(self, host: str, port: int) -> Endpoint:
        """The same introduction, at another address (a shard, a new master)."""
        return Endpoint(host, port, "", self.username, self.password, self.db, self.ssl, self.name)

    def handshake(self) -> list[bytes]:
        commands = []
        if self.password:
            who = [self.username] if self.username else []
            commands.append(pack("AUTH", *who, self.password))
        if self.db:
            commands.append(pack("SELECT", self.db))
        commands.append(pack("CLIENT", "SETNAME", self.name))
        return commands


Locate = Callable[[], Awaitable[tuple[str, int]]]


class LinkSlot:
    """One link, connected on first use and again after it failed. ``locate``
    (Sentinel): where the endpoint is now, asked before each connect; ``factory``: makes
    the connection's protocol (a ``Link``)."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        connect_timeout: float,
        locate: Locate | None = None,
        factory: Callable[[], Link] = Link,
    ) -> None:
        self.endpoint = endpoint
        self._base = endpoint
        self._locate = locate
        self._factory = factory
        self._connect_timeout = connect_timeout
        self._link: Link | None = None
        self._lock: asyncio.Lock | None = None
        self.closed = False

    @property
    def failure(self) -> Exception | None:
        """Why the link failed (None while it is up, or before the first connect)."""
        return self._link.failure if self._link is not None else None

    def current(self) -> Link | None:
        """The link if it is connected and healthy (no await: the hot path)."""
        link = self._link
        return link if link is not None and link.failure is None else None

    async def get(self) -> Link:
        link = self.current()
        return link if link is not None else await self._connect()

    def drop(self, why: Exception) -> None:
        if self._link is not None:
            self._link.fail(why)
            self._link = None

    async def _connect(self) -> Link:
        if self.closed:
            raise RedisConnectionError("the lane is closed")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            link = self.current()
            if link is not None:
                return link  # another caller connected meanwhile
            loop = asyncio.get_running_loop()
            if self._locate is not None:
                host, port = await self._locate()
                if (host, port) != (self.endpoint.host, self.endpoint.port):
                    self.endpoint = self._base.at(host, port)
            e, factory = self.endpoint, self._factory
            try:
                if e.path:
                    connect = loop.create_unix_connection(factory, e.path)
                else:
                    connect = loop.create_connection(
                        factory,
                        e.host,
                        e.port,
                        ssl=e.ssl,
                        server_hostname=e.host if e.ssl else None,
                    )
                async with asyncio.timeout(self._connect_timeout):
                    _, fresh = await connect
            except (OSError, ssl.SSLError) as exc:  # TimeoutError included
                raise RedisConnectionError(f"cannot connect to Redis: {exc!r}") from None
            link = fresh
            command = b""
            try:
                for command in e.handshake():
                    async with asyncio.timeout(self._connect_timeout):
                        try:
                            await link.send(command, self._connect_timeout)
                        except ResponseError as exc:
                            if not str(exc).removeprefix("ERR ").startswith(NO_PASSWORD_SET):
                                raise
                            # As redis-py takes it (the node's other connections do):
                            # a password for a Redis without one is no error.
            except TimeoutError:
                link.fail(RedisConnectionError("the lane's handshake timed out"))
                raise RedisTimeoutError("Redis did not answer the handshake in time") from None
            except ResponseError as exc:
                # AUTH or SELECT refused (a password Redis does not have or does not take,
                # a database it lacks): the URL is wrong, say so as redis-py would.
                link.fail(RedisConnectionError("the lane's handshake failed"))
                name = command.split(b"\r\n")[2].decode("ascii", "replace")  # RESP: *N $L NAME
                kind = AuthenticationError if name == "AUTH" else ResponseError
                raise kind(f"Redis refused the connection's {name}: {exc}") from None
            except BaseException:
                link.fail(RedisConnectionError("the lane's handshake failed"))
                raise
            self._link = link
            return link

    def aclose(self) -> None:
        self.closed = True
        self.drop(RedisConnectionError("the lane is closed"))


def retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # a fire-and-forget reply: read, so nobody warns about it
