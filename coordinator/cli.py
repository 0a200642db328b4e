"""The ``coordinator`` command: serve a node, run a local cluster, issue tokens, chat.

Every ``serve`` flag falls back to an environment variable ``COORDINATOR_<NAME>``
(``--redis-url`` -> ``COORDINATOR_REDIS_URL``). Exit codes: 0 ok, 1 runtime failure
(Redis unreachable, port in use), 2 usage or configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .auth import DEFAULT_TTL, issue_token
from .config import DEFAULT_AGENT, ManagerConfig
from .errors import ConfigError, CoordinatorError, InvalidInput, RedisUnavailable
from .tasks import keep_cancelling

ENV_PREFIX = "COORDINATOR_"
PLACEHOLDER_REDIS_URL = "redis://127.0.0.1:6379/0"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _switch(value: str) -> bool:
    """on/off (also true/false, yes/no, 1/0) for a flag or its environment variable."""
    word = value.strip().lower()
    if word in ("on", "true", "yes", "1"):
        return True
    if word in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


# serve flag -> ManagerConfig field, for the optional settings passed through as given.
CONFIG_FLAGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "node_id": ("--node-id", str, "node id (default: HOST-PID-random)"),
    "key_prefix": ("--key-prefix", str, "prefix of every Redis key (default: coord)"),
    "max_concurrent_conversations": (
        "--max-concurrent-conversations",
        int,
        "running loops allowed per user, cluster-wide (default: 3)",
    ),
    "close_delay": (
        "--close-delay",
        float,
        "seconds an idle loop without connections lives on (default: 15)",
    ),
    "node_ttl": (
        "--node-ttl",
        float,
        "seconds without heartbeat after which a node is dead (default: 6)",
    ),
    "heartbeat_interval": (
        "--heartbeat-interval",
        float,
        "seconds between heartbeats (default: 1.5)",
    ),
    "lease_margin": (
        "--lease-margin",
        float,
        "seconds before node_ttl at which a silent node stops its loops (default: 1.5)",
    ),
    "drain_timeout": (
        "--drain-timeout",
        float,
        "seconds a SIGTERM drain may take before the node exits anyway (default: 30)",
    ),
    "max_concurrent_joins": (
        "--max-concurrent-joins",
        int,
        "joins this node handles at once; more wait (default: 64)",
    ),
    "join_wait": (
        "--join-wait",
        float,
        "seconds a join may wait for a free slot before it is refused as busy (default: 10)",
    ),
    "max_concurrent_restarts": (
        "--max-concurrent-restarts",
        int,
        "loops this node restarts at once after another node is lost (default: 16)",
    ),
    "speculative_dispatch": (
        "--speculative-dispatch",
        _switch,
        "on/off: an agent that allows it starts on an action sent through its own node "
        "before the action is durable, saving a Redis round trip (default: on)",
    ),
}


class _Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _fail(code: int, message: str) -> NoReturn:
    raise _Exit(code, message)


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(ENV_PREFIX + name.upper(), default)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _secret_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--secret",
        default=_env("secret"),
        help=f"HMAC secret {what} (env COORDINATOR_SECRET)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordinator",
        description=(
            "Redis-backed distributed conversation coordinator: run nodes that share one "
            "Redis, so a socket.io client may connect to any node."
        ),
        epilog=(
            "quick start:\n"
            "  coordinator cluster                 # 3 local nodes + a private Redis\n"
            "  coordinator chat --url http://127.0.0.1:8000 --conversation demo1 --secret S"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="run one node (socket.io + REST + /healthz + /metrics)",
        description=(
            "Run one coordinator node. Without --redis-url it starts a private embedded "
            "Redis (fine for trying it out; a cluster needs a shared Redis URL). Every flag "
            "falls back to the environment variable COORDINATOR_<FLAG>, e.g. "
            "COORDINATOR_REDIS_URL. SIGINT/SIGTERM stop it gracefully."
        ),
        formatter_class=_Formatter,
    )
    serve.add_argument("--host", default=_env("host", "127.0.0.1"), help="address to listen on")
    serve.add_argument("--port", type=int, default=_env("port", 8000), help="port to listen on")
    serve.add_argument(
        "--redis-url",
        default=_env("redis_url"),
        help="shared Redis, e.g. redis://host:6379/0 (default: start a private embedded one)",
    )
    for dest, (flag, kind, help_text) in CONFIG_FLAGS.items():
        serve.add_argument(flag, dest=dest, type=kind, default=_env(dest), help=help_text)
    serve.add_argument(
        "--agent", default=_env("agent", DEFAULT_AGENT), help="agent class as package.module:Class"
    )
    _secret_arg(serve, "that signs client tokens (required)")
    serve.add_argument(
        "--log-level",
        default=_env("log_level", "info"),
        type=str.lower,
        choices=LOG_LEVELS,
        help="log level",
    )

    cluster = sub.add_parser(
        "cluster",
        help="run a local demo cluster: a private Redis and N serve processes",
        description=(
            "Start a private embedded Redis and N `coordinator serve` processes on "
            "consecutive ports, wait until each is healthy, then print the URLs, a token for "
            "user 'demo' and how to chat. Ctrl-C stops the nodes, then Redis. A secret is "
            "generated unless --secret or COORDINATOR_SECRET is given."
        ),
        formatter_class=_Formatter,
    )
    cluster.add_argument("--nodes", type=int, default=3, help="number of nodes")
    cluster.add_argument("--base-port", type=int, default=8000, help="port of the first node")
    cluster.add_argument("--host", default="127.0.0.1", help="address the nodes listen on")
    _secret_arg(cluster, "shared by the nodes (default: generated)")
    cluster.add_argument(
        "--log-level",
        default="warning",
        type=str.lower,
        choices=LOG_LEVELS,
        help="nodes' log level",
    )

    token = sub.add_parser(
        "token",
        help="print a signed token for a user",
        description="Print a token for USER, signed with the secret the nodes use.",
        formatter_class=_Formatter,
    )
    token.add_argument("user", metavar="USER", help="user id, e.g. alice or alice@example.com")
    token.add_argument("--ttl", type=float, default=DEFAULT_TTL, help="lifetime in seconds")
    _secret_arg(token, "the nodes use (required)")

    chat = sub.add_parser(
        "chat",
        help="chat in a conversation from the terminal",
        description=(
            "Connect to a node over socket.io, join a conversation (created when new), print "
            "every event as '[id] source: content' and send each line of stdin as a message. "
            "Works with piped input: after end of input it waits for the last answer. "
            "Connect a second terminal to another node with the same --conversation to see "
            "location transparency."
        ),
        formatter_class=_Formatter,
    )
    chat.add_argument("--url", required=True, help="node URL, e.g. http://127.0.0.1:8000")
    chat.add_argument("--conversation", required=True, help="conversation id ([A-Za-z0-9_-])")
    chat.add_argument("--user", default="demo", help="user to issue a token for (with --secret)")
    chat.add_argument("--token", default=_env("token"), help="token (env COORDINATOR_TOKEN)")
    _secret_arg(chat, "to issue a token for --user when no --token is given")
    chat.add_argument(
        "--latest-event-id",
        type=int,
        default=-1,
        help="id of the last event already seen (-1: replay the whole conversation)",
    )
    chat.add_argument(
        "--wait", type=float, default=10.0, help="seconds to wait for the last answer after EOF"
    )
    return parser


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
        _fail(2, f"{command} needs a secret: pass --secret or set COORDINATOR_SECRET")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    secret = _require_secret(args.secret, "serve")
    if not 0 <= args.port <= 65535:
        _fail(2, f"--port must be 0-65535, got {args.port}")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = build_config(args, args.redis_url or PLACEHOLDER_REDIS_URL)
    except ConfigError as exc:
        _fail(2, str(exc))
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
        return asyncio.run(_serve(config, secret, args.host, args.port, args.log_level))
    finally:
        if embedded is not None:
            embedded.cleanup()


async def _serve(config: ManagerConfig, secret: str, host: str, port: int, log_level: str) -> int:
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
    node = NodeServer(config, secret, host=host, port=port, log_level=log_level)
    try:
        await node.start()
    except ConfigError as exc:
        _fail(2, str(exc))
    except RedisUnavailable as exc:
        _fail(1, f"{exc} (check --redis-url / COORDINATOR_REDIS_URL)")
    except (CoordinatorError, RuntimeError) as exc:
        _fail(1, str(exc))
    print(f"node {node.node_id} serving on {node.url}", flush=True)
    stopped = asyncio.ensure_future(stop.wait())
    closed = asyncio.ensure_future(node.wait_closed())
    await asyncio.wait({stopped, closed}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    logging.getLogger(__name__).info("node %s stopping", node.node_id)
    try:
        await node.aclose()
    except asyncio.CancelledError:
        print(f"node {node.node_id} stopped before its drain finished", file=sys.stderr)
        return 130
    return 0


# -- other commands --------------------------------------------------------------------
def cmd_cluster(args: argparse.Namespace) -> int:
    from .cluster import run_cluster

    if args.nodes < 1:
        _fail(2, f"--nodes must be >= 1, got {args.nodes}")
    if not 1 <= args.base_port <= 65535 - args.nodes + 1:
        _fail(2, f"--base-port must leave room for {args.nodes} ports, got {args.base_port}")
    secret = args.secret or secrets.token_urlsafe(24)
    return asyncio.run(
        run_cluster(args.nodes, args.host, args.base_port, secret, log_level=args.log_level)
    )


def cmd_token(args: argparse.Namespace) -> int:
    secret = _require_secret(args.secret, "token")
    try:
        print(issue_token(args.user, secret, args.ttl))
    except (InvalidInput, ConfigError) as exc:
        _fail(2, str(exc))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import ChatClient

    token = args.token
    if not token:
        if not args.secret:
            _fail(2, "chat needs --token, or --secret to issue one for --user")
        try:
            token = issue_token(args.user, args.secret)
        except (InvalidInput, ConfigError) as exc:
            _fail(2, str(exc))

    async def run() -> int:
        client = ChatClient(
            args.url, args.conversation, token, latest_event_id=args.latest_event_id
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
        return COMMANDS[args.command](args)
    except _Exit as exc:
        print(f"error: {exc.message}", file=sys.stderr, flush=True)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
