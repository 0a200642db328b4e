"""The ``coordinator`` command: serve a node, run a local cluster, issue tokens, chat.

The flags and their ``COORDINATOR_<NAME>`` environment fallbacks are in
``coordinator/cliargs.py``. Exit codes: 0 ok, 1 runtime failure
(Redis unreachable, port in use), 2 usage or configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from . import cpus, logformat, redact
from .auth import (
    ADMIN_ROLE,
    MIN_SECRET_BYTES,
    TokenSettings,
    TokenVerifier,
    issue_token,
    short_secret,
)
from .cliargs import build_parser
from .cliflags import CONFIG_FLAGS, SERVER_FLAGS
from .clisecrets import read_previous_secrets, read_secret_file, visible_secrets
from .config import ManagerConfig
from .errors import (
    REDIS_TROUBLE,
    ConfigError,
    CoordinatorError,
    InvalidInput,
    RedisUnavailable,
    redis_full,
)
from .inputs import check_user_id, parse_settings
from .redact import redact_url
from .serverconfig import ServerConfig
from .tasks import keep_cancelling

PLACEHOLDER_REDIS_URL = "redis://127.0.0.1:6379/0"
# A full collection of the cyclic GC after this many younger ones (CPython's is 10).
FULL_COLLECTION_AFTER = 100


class _Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# A demo cluster runs on one machine: more nodes than this is a mistyped count.
MAX_DEMO_NODES = 32


def _reason(exc: BaseException) -> str:
    """What ``exc`` says; its class when it says nothing (a TimeoutError)."""
    return str(exc) or type(exc).__name__


def _fail(code: int, message: str) -> NoReturn:
    raise _Exit(code, message)


# -- serve -----------------------------------------------------------------------------
def build_config(args: argparse.Namespace, redis_url: str) -> ManagerConfig:
    values: dict[str, Any] = {"redis_url": redis_url, "agent": args.agent}
    for dest in CONFIG_FLAGS:
        value = getattr(args, dest)
        if value is not None:
            values[dest] = value
    return ManagerConfig(**values)


def _require_secret(value: str | None, command: str) -> str:
    if not value:
        _fail(
            2,
            f"{command} needs a secret: pass --secret-file, set COORDINATOR_SECRET "
            "or pass --secret",
        )
    return value


def build_tokens(args: argparse.Namespace) -> TokenVerifier:
    """The verifier of clients' tokens; reads the key file, if any, now."""
    if args.token_algorithm == "HS256":
        _require_secret(args.secret, "serve")
    try:
        return TokenVerifier.from_settings(
            TokenSettings(
                algorithm=args.token_algorithm,
                secret=args.secret if args.token_algorithm == "HS256" else None,
                previous_secrets=read_previous_secrets(args.previous_secret_file),
                public_key_file=args.token_public_key,
                jwks_file=args.token_jwks,
                issuer=args.token_issuer,
                audience=args.token_audience,
                max_lifetime=float(args.token_max_lifetime),
            )
        )
    except (ConfigError, ValueError) as exc:
        _fail(2, _reason(exc))


def build_server_config(args: argparse.Namespace) -> ServerConfig:
    values: dict[str, Any] = {}
    for dest in SERVER_FLAGS:
        value = getattr(args, dest)
        if value is not None:
            values[dest] = value
    try:
        return ServerConfig(**values)
    except ConfigError as exc:
        _fail(2, _reason(exc))


def cmd_serve(args: argparse.Namespace) -> int:
    from .advertise import check_public_url
    from .eventstore.factory import store_from_url

    tokens = build_tokens(args)
    if not 0 <= args.port <= 65535:
        _fail(2, f"--port must be 0-65535, got {args.port}")
    server_config = build_server_config(args)
    try:
        config = build_config(args, args.redis_url or PLACEHOLDER_REDIS_URL)
        cpus.plan(config.agent_cpus)  # this machine's CPUs: refused before anything starts
        store_from_url(config.event_store or None)  # its URL (no I/O)
        if args.public_url:
            check_public_url(args.public_url)
    except ConfigError as exc:
        _fail(2, _reason(exc))
    logformat.configure(args.log_level, args.log_format, config.node_id)
    if short_secret(tokens.settings):
        logging.getLogger(__name__).warning(
            "a token secret is shorter than %d bytes, which HS256 asks for (RFC 7518 3.2)",
            MIN_SECRET_BYTES,
        )
    if args.check:
        from . import preflight

        ports = [("port", args.host, args.port)]
        if server_config.metrics_port is not None:
            ports.append(("metrics port", args.host, server_config.metrics_port))
        found = asyncio.run(preflight.check(config, tokens, ports, bool(args.redis_url)))
        for warning in visible_secrets(args):  # counted with the rest
            found.append(preflight.Finding(preflight.WARN, "command line", warning))
        return preflight.report(found, sys.stdout)
    embedded = None
    if not args.redis_url:
        from .embedded import EmbeddedRedis

        try:
            embedded = EmbeddedRedis().start()
        except CoordinatorError as exc:
            _fail(1, f"no --redis-url given and the embedded Redis did not start: {exc}")
        config = config.replace(redis_url=embedded.url)
        print(f"no --redis-url given: started a private embedded Redis at {embedded.url}")
    try:
        return asyncio.run(
            _serve(
                config, tokens, args.host, args.port, args.log_level, args.public_url, server_config
            )
        )
    finally:
        if embedded is not None:
            embedded.cleanup()


async def _serve(
    config: ManagerConfig,
    tokens: TokenVerifier,
    host: str,
    port: int,
    log_level: str,
    public_url: str | None,
    server_config: ServerConfig,
) -> int:
    from .server import NodeServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and main is not None:
            keep_cancelling(main)  # a second signal: stop waiting for a graceful shutdown
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        node = NodeServer(
            config,
            tokens,
            host=host,
            port=port,
            log_level=log_level,
            public_url=public_url,
            server_config=server_config,
        )
    except ConfigError as exc:
        _fail(2, _reason(exc))
    starting = asyncio.ensure_future(node.start())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a stop signal during start-up: nothing to drain yet
        starting.cancel()
        await asyncio.wait({starting})  # it undoes what it had started
        if not starting.cancelled():
            starting.exception()
        print(f"node {node.node_id} stopped before it finished starting", file=sys.stderr)
        return 0
    try:
        starting.result()
    except ConfigError as exc:
        _fail(2, _reason(exc))
    except RedisUnavailable as exc:
        _fail(1, f"{exc} (check --redis-url / COORDINATOR_REDIS_URL)")
    except (CoordinatorError, RuntimeError) as exc:
        _fail(1, _reason(exc))
    except REDIS_TROUBLE as exc:  # Redis refused the connection's AUTH or SELECT
        where, why = redact_url(config.redis_url), redact.redact(_reason(exc))
        if redis_full(exc):  # the URL is right: Redis takes no write, a registration's neither
            _fail(
                1,
                f"Redis at {where} is full (at its maxmemory): {why.rstrip('.')}; raise maxmemory "
                "or free memory",
            )
        _fail(1, f"Redis at {where}: {why} (check --redis-url / COORDINATOR_REDIS_URL)")
    # What start-up made (modules, classes, the node's parts) lives as long as the
    # process: out of the cyclic GC's sight, a full collection walks only what came
    # later. Under a connection flood, full collections took 50-110 ms before (a client's
    # ack waited that long), 10-30 ms after (docs/failures.md).
    gc.freeze()
    # A full collection walks every live object (about 165 per connection: engine.io's
    # and uvicorn's tasks, coroutines and timers) and frees only reference cycles, which
    # a connection no longer leaves behind (edge.py, sioserver.py). CPython runs one
    # whenever the heap grew by a quarter and 10 younger collections passed: 5 per 1,500
    # joins, 0.2-0.3 s each, a third of a join's CPU. After 100 younger collections
    # (about 700,000 objects allocated and kept) instead: same pause, far more seldom.
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, FULL_COLLECTION_AFTER)
    print(f"node {node.node_id} serving on {node.url} ({node.redis})", flush=True)
    print(f"node {node.node_id} keeps history in the event store {node.event_store}", flush=True)
    if server_config.metrics_port is not None:
        print(f"node {node.node_id} serves /metrics on {node.metrics_url}", flush=True)
    closed = asyncio.ensure_future(node.wait_closed())
    try:
        # Two signals close together may cancel this wait before the first woke it:
        # that second signal means "stop at once" all the same.
        await asyncio.wait({stopped, closed}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        logging.getLogger(__name__).info("node %s stopping", node.node_id)
        await node.aclose()
    except asyncio.CancelledError:
        stopped.cancel()
        print(f"node {node.node_id} stopped before its drain finished", file=sys.stderr)
        return 130
    return 0


# -- other commands --------------------------------------------------------------------
def _dev_tool(name: str) -> None:
    """The developer tools need the ``dev`` extra (aiohttp, python-socketio's client)."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        _fail(
            2,
            f"coordinator {name} needs the developer tools: "
            "pip install 'redis-conversation-coordinator[dev]' (make run installs them)",
        )


def cmd_cluster(args: argparse.Namespace) -> int:
    _dev_tool("cluster")
    from .cluster import run_cluster

    if not 1 <= args.nodes <= MAX_DEMO_NODES:
        _fail(
            2,
            f"--nodes must be 1-{MAX_DEMO_NODES} (each a process with workers), got {args.nodes}",
        )
    if not 1 <= args.base_port <= 65535 - args.nodes + 1:
        _fail(2, f"--base-port must leave room for {args.nodes} ports, got {args.base_port}")
    secret = args.secret or secrets.token_urlsafe(24)
    extra = ["--agent", args.agent] if args.agent else []
    return asyncio.run(
        run_cluster(
            args.nodes,
            args.host,
            args.base_port,
            secret,
            log_level=args.log_level,
            extra_args=extra,
        )
    )


def cmd_token(args: argparse.Namespace) -> int:
    secret = _require_secret(args.secret, "token")
    try:
        print(
            issue_token(
                args.user,
                secret,
                args.ttl,
                issuer=args.token_issuer,
                audience=args.token_audience,
                claims={
                    **({"role": ADMIN_ROLE} if args.admin else {}),
                    **({"org": check_user_id(args.org)} if args.org else {}),
                },
            )
        )
    except (InvalidInput, ConfigError) as exc:
        _fail(2, _reason(exc))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    _dev_tool("chat")
    from .chat import ChatClient, check_node_url

    try:
        urls = [check_node_url(url) for url in args.url]
    except ConfigError as exc:
        _fail(2, f"--url {exc}")
    token = args.token
    if not token:
        if not args.secret:
            _fail(2, "chat needs --token, or --secret to issue one for --user")
        try:
            token = issue_token(args.user, args.secret)
        except (InvalidInput, ConfigError) as exc:
            _fail(2, _reason(exc))

    try:
        settings = parse_settings(args.settings)
    except InvalidInput as exc:
        _fail(2, f"--settings: {exc}")

    async def run() -> int:
        client = ChatClient(
            urls,
            args.conversation,
            token,
            latest_event_id=args.latest_event_id,
            settings=settings or None,
            reconnect_for=args.reconnect_for,
        )
        task = asyncio.ensure_future(client.run(sys.stdin, args.wait))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            return 130

    return asyncio.run(run())


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "cluster": cmd_cluster,
    "token": cmd_token,
    "chat": cmd_chat,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        read_secret_file(args)
        for warning in visible_secrets(args):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        return COMMANDS[args.command](args)
    except _Exit as exc:
        print(f"error: {exc.message}", file=sys.stderr, flush=True)
        return exc.code
    except ConfigError as exc:  # the secret file's (clisecrets.py)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
