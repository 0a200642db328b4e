"""One node as a running HTTP server: the manager, its ASGI app and uvicorn, in order.

Start-up: start the manager (Redis must answer), bind the sockets (the node's port and,
if asked, a metrics port), build the app, serve. The HTTP protocol is uvicorn's h11 held
to the node's connection limits and request deadline (protocols.py); websocket messages
are bounded by what engine.io accepts (``ServerConfig``).
Shutdown, in named steps: drain the manager (it refuses new loops and connections, hands
off its loops, tells its clients to reconnect and disconnects them), then stop uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from . import redact
from .advertise import UrlAdvertiser, check_public_url
from .app import create_app, new_manager
from .auth import TokenVerifier
from .config import ManagerConfig
from .connlimits import ConnectionGuard
from .errors import CoordinatorError
from .http import Origins, origin_of
from .manager import ConversationManager
from .protocols import GuardedH11Protocol, NodeConfig
from .serverconfig import MAX_HEAD_BYTES, ServerConfig
from .status import Advertisement
from .tasks import TaskSet
from .websocket import CoalescingSansIOProtocol

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_SECONDS = 5
# asyncio accepts up to `backlog` waiting connections in one go, running each one's
# connection_made before anything else: with uvicorn's 2048, a flood of connects (each
# refused at once, 0.1-0.2 ms on a busy 2-core box) held the event loop for up to
# 700 ms, and every client's ack with it; with 256, 50-90 ms. ACCEPT_BATCH bounds that to
# about 10 ms; the kernel's queue of waiting connections keeps LISTEN_BACKLOG (asyncio
# sets both from one number: the socket's is raised again once serving).
ACCEPT_BATCH = 64
LISTEN_BACKLOG = 2048


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling (the caller stops it) and with a ready event."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one. Raises CoordinatorError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise CoordinatorError(f"cannot resolve host {host!r}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    # Keep the protocol: asyncio sets TCP_NODELAY on accepted sockets only when
    # sock.proto is IPPROTO_TCP; with Nagle on, an event written right after an ack
    # waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise CoordinatorError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


class NodeServer:
    """A coordinator node serving HTTP and socket.io. ``await start()``, ``await aclose()``."""

    def __init__(
        self,
        config: ManagerConfig,
        auth: str | TokenVerifier,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        log_level: str = "warning",
        public_url: str | None = None,
        server_config: ServerConfig | None = None,
    ) -> None:
        self.config = config
        self.auth = auth  # a TokenVerifier, or the secret of HS256 tokens
        self.host = host
        self.port = port
        self.log_level = log_level
        self.server_config = server_config or ServerConfig()
        self.manager: ConversationManager = new_manager(config)
        self.guard = ConnectionGuard(self.server_config)
        # Browser origins it serves: its own, --cors-origins, the other nodes' pages.
        self.origins = Origins(self.server_config.cors_origins, self._peer_origins)
        # Background work of the socket.io server (closing sessions that never joined).
        self.tasks = TaskSet(log)
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[Any] | None = None
        self._socks: list[socket.socket] = []
        # Where clients reach this node (advertised to the others' pages); default ``url``.
        self._public_url = check_public_url(public_url) if public_url else None
        self._advertiser: UrlAdvertiser | None = None

    @property
    def node_id(self) -> str:
        return self.manager.node_id

    @property
    def redis(self) -> str:
        """The Redis deployment it uses, e.g. ``cluster Redis at redis://host:7000``."""
        return self.manager.node.backend.describe() if self.manager.started else ""

    @property
    def event_store(self) -> str:
        """The event store it uses, as a URL without its password."""
        return self.manager.node.store_url if self.manager.started else ""

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def public_url(self) -> str:
        return self._public_url or self.url

    @property
    def metrics_url(self) -> str:
        """Where /metrics is served: the metrics port if there is one, else the node's."""
        port = self.server_config.metrics_port
        if port is None:
            return f"{self.url}/metrics"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}/metrics"

    async def _peer_origins(self) -> set[str]:
        return {origin_of(url) for url in await self.manager.directory.advertised_urls()}

    async def start(self) -> None:
        """Start the manager and begin serving; raises RedisUnavailable, CoordinatorError."""
        # The manager first: a bad agent or an unreachable Redis is the error to report.
        await self.manager.start()
        try:
            self._socks = [bind(self.host, self.port)]
            self.port = int(self._socks[0].getsockname()[1])
            settings = self.server_config
            if settings.metrics_port is not None:
                self._socks.append(bind(self.host, settings.metrics_port))
                port = int(self._socks[1].getsockname()[1])
                settings = self.server_config = settings.replace(metrics_port=port)
            app, _ = create_app(
                self.manager,
                self.auth,
                config=settings,
                tasks=self.tasks,
                guard=self.guard,
                origins=self.origins,
            )
        except BaseException:
            self._close_sockets()
            await self.manager.aclose()
            raise
        redact.install()
        access_log = self.log_level == "debug"
        errors = logging.getLogger("uvicorn.error")
        if access_log:
            errors.removeFilter(redact.WEBSOCKET_LINES)
        else:
            errors.addFilter(redact.WEBSOCKET_LINES)
        config = NodeConfig(
            app,
            guard=self.guard,
            request_timeout=settings.request_timeout,
            log_level=self.log_level,
            log_config=None,
            access_log=access_log,
            lifespan="off",
            http=GuardedH11Protocol,
            ws=CoalescingSansIOProtocol,
            # Nothing larger than the largest packet engine.io accepts is buffered.
            ws_max_size=settings.message_bytes(self.config.max_action_bytes),
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            timeout_keep_alive=max(1, round(settings.keep_alive_timeout)),
            # Client addresses from X-Forwarded-For: only from trusted proxies (edge.py).
            proxy_headers=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            backlog=ACCEPT_BATCH,
        )
        self._server = _Uvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=self._socks), name="uvicorn")
        ready = asyncio.create_task(self._server.ready.wait())
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            failure = self._task.exception() if not self._task.cancelled() else None
            await self._stop_manager()
            raise CoordinatorError(f"the HTTP server did not start: {failure!r}")
        for sock in self._socks:
            sock.listen(LISTEN_BACKLOG)  # asyncio set it to ACCEPT_BATCH
        ad = Advertisement(self.node_id, self.public_url, self.config.node_ttl, 0.0)
        self._advertiser = UrlAdvertiser(self.manager.directory, ad, every=self.config.node_ttl)
        await self._advertiser.start()

    async def wait_closed(self) -> None:
        """Wait until the HTTP server stops (after ``stop()`` or on its own)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    def stop(self) -> None:
        """Ask the HTTP server to stop (safe from a signal handler)."""
        if self._server is not None:
            self._server.should_exit = True

    async def aclose(self) -> None:
        """Withdraw the advertisement, drain the manager while sockets are open (clients
        hear why), then stop serving."""
        if self._advertiser is not None:
            await self._advertiser.aclose(within=self.config.redis_timeout)
            self._advertiser = None
        await self._stop_manager()
        if self._task is not None:
            self.stop()
            with contextlib.suppress(Exception):
                await self._task
            self._task = None
        await self.tasks.aclose()
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks = []

    async def _stop_manager(self) -> None:
        try:
            await self.manager.drain()
        except Exception as exc:
            log.warning("drain of node %s failed: %s", self.node_id, exc)
            await self.manager.aclose()
