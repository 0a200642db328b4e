"""The ``coordinator`` command line: its parser, flag tables and environment fallbacks.

Every ``serve`` flag falls back to an environment variable ``COORDINATOR_<NAME>``
(``--redis-url`` -> ``COORDINATOR_REDIS_URL``); ``coordinator/cli.py`` runs the commands.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from .auth import ALGORITHMS, DEFAULT_MAX_LIFETIME, DEFAULT_TTL
from .config import DEFAULT_AGENT

ENV_PREFIX = "COORDINATOR_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _switch(value: str) -> bool:
    """on/off (also true/false, yes/no, 1/0) for a flag or its environment variable."""
    word = value.strip().lower()
    if word in ("on", "true", "yes", "1"):
        return True
    if word in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size(value: str) -> int:
    """A byte count such as 512M, 2G or 1048576 (K, M, G are powers of 1024); 0 or off:
    none."""
    word = value.strip().upper().removesuffix("B").removesuffix("I")
    if word in ("0", "OFF", "NONE"):
        return 0
    unit = word[-1:] if word[-1:] in _UNITS else ""
    try:
        number = float(word[: len(word) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 512M, got {value!r}") from None
    return int(number * _UNITS[unit])


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
    "redis_mode": (
        "--redis-mode",
        str.lower,
        "auto|standalone|cluster|sentinel: what --redis-url points at; auto asks the "
        "server (cluster_enabled) and takes a redis+sentinel:// URL as Sentinel "
        "(default: auto)",
    ),
    "ack_replicas": (
        "--ack-replicas",
        int,
        "acknowledge an action, and deliver an agent event, only once this many replicas "
        "hold it (WAIT); 0 trusts the master alone (default: 0)",
    ),
    "ack_timeout": (
        "--ack-timeout",
        float,
        "seconds an acknowledgement waits for --ack-replicas; past it the client gets an "
        "error and may retry with the same client_action_id (default: 1)",
    ),
    "agent_isolation": (
        "--agent-isolation",
        str,
        "process: agent loops run in worker processes, so an agent that blocks, crashes "
        "or leaks hurts only its own conversation; none: in the node's event loop (an "
        "agent that blocks stalls the whole node and its lease) (default: process)",
    ),
    "agent_workers": (
        "--agent-workers",
        int,
        "agent worker processes per node (default: the number of cores)",
    ),
    "agent_stall_timeout": (
        "--agent-stall-timeout",
        float,
        "seconds a worker may leave a heartbeat unanswered before it is killed and its "
        "loops move to the others (default: 5)",
    ),
    "max_dispatch_attempts": (
        "--max-dispatch-attempts",
        int,
        "dispatches of one action that stalled or killed their worker, on any node, "
        "after which it is answered with an error event instead (default: 2)",
    ),
    "agent_memory_limit": (
        "--agent-memory-limit",
        _size,
        "address space per worker process, e.g. 512M; an action that runs out is "
        "answered with an error event (default: no limit)",
    ),
    "agent_dispatch_timeout": (
        "--agent-dispatch-timeout",
        float,
        "seconds one action may take in its agent before it is cancelled and answered "
        "with an error event (default: no limit)",
    ),
}


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
        help=f"HS256 (HMAC) secret {what} (env COORDINATOR_SECRET)",
    )


def _claim_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--token-issuer",
        default=_env("token_issuer"),
        metavar="ISS",
        help=f"{what} 'iss' claim (env COORDINATOR_TOKEN_ISSUER)",
    )
    parser.add_argument(
        "--token-audience",
        default=_env("token_audience"),
        metavar="AUD",
        help=f"{what} 'aud' claim (env COORDINATOR_TOKEN_AUDIENCE)",
    )


def _token_args(serve: argparse.ArgumentParser) -> None:
    """How ``serve`` verifies client tokens (JWTs; see coordinator/auth.py)."""
    serve.add_argument(
        "--token-algorithm",
        default=_env("token_algorithm", "HS256"),
        type=str.upper,
        choices=ALGORITHMS,
        help="JWT algorithm: HS256 with --secret, or RS256/ES256 with "
        "--token-public-key or --token-jwks (env COORDINATOR_TOKEN_ALGORITHM)",
    )
    serve.add_argument(
        "--token-public-key",
        default=_env("token_public_key"),
        metavar="FILE",
        help="PEM public key that verifies RS256/ES256 tokens (env COORDINATOR_TOKEN_PUBLIC_KEY)",
    )
    serve.add_argument(
        "--token-jwks",
        default=_env("token_jwks"),
        metavar="FILE",
        help="local JWKS file (JSON Web Key Set) whose keys verify RS256/ES256 tokens, "
        "chosen by the token's kid; read once at start (env COORDINATOR_TOKEN_JWKS)",
    )
    _claim_args(serve, "refuse tokens without this")
    serve.add_argument(
        "--token-max-lifetime",
        type=float,
        default=_env("token_max_lifetime", DEFAULT_MAX_LIFETIME),
        metavar="SECONDS",
        help="refuse tokens living longer (exp - iat, or exp - now without iat) "
        "(env COORDINATOR_TOKEN_MAX_LIFETIME)",
    )


def _name_environment(parser: argparse.ArgumentParser) -> None:
    """Say in each flag's help which environment variable it falls back to."""
    for action in parser._actions:
        flags = [f for f in action.option_strings if f.startswith("--") and f != "--help"]
        if flags and ENV_PREFIX not in (action.help or ""):
            name = ENV_PREFIX + action.dest.upper()
            action.help = f"{action.help} (env {name})" if action.help else f"env {name}"


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
        "--public-url",
        default=_env("public_url"),
        metavar="URL",
        help="where clients reach this node, advertised in Redis so the browser pages "
        "can move to another node (GET /api/nodes) (default: http://HOST:PORT)",
    )
    serve.add_argument(
        "--redis-url",
        default=_env("redis_url"),
        help="shared Redis, e.g. redis://host:6379/0 (default: start a private embedded one)",
    )
    for dest, (flag, kind, help_text) in CONFIG_FLAGS.items():
        serve.add_argument(flag, dest=dest, type=kind, default=_env(dest), help=help_text)
    serve.add_argument(
        "--agent",
        default=_env("agent", DEFAULT_AGENT),
        help="agent class as package.module:Class, importable by this Python (PYTHONPATH or "
        "an installed package)",
    )
    _secret_arg(serve, "that signs client tokens (required with HS256)")
    _token_args(serve)
    serve.add_argument(
        "--log-level",
        default=_env("log_level", "info"),
        type=str.lower,
        choices=LOG_LEVELS,
        help="log level",
    )
    _name_environment(serve)

    cluster = sub.add_parser(
        "cluster",
        help="run a local demo cluster: a private Redis and N serve processes",
        description=(
            "Start a private embedded Redis and N `coordinator serve` processes on "
            "consecutive ports, wait until each is healthy, then print the URLs, a token for "
            "user 'demo' and how to chat. A node that dies stays down while the others "
            "carry on; type 'restart N' (or send SIGUSR1: every dead node) to start it "
            "again, 'status' to list them. Ctrl-C stops the nodes, then Redis. A secret is "
            "generated unless --secret or COORDINATOR_SECRET is given."
        ),
        formatter_class=_Formatter,
    )
    cluster.add_argument("--nodes", type=int, default=3, help="number of nodes")
    cluster.add_argument("--base-port", type=int, default=8000, help="port of the first node")
    cluster.add_argument("--host", default="127.0.0.1", help="address the nodes listen on")
    cluster.add_argument(
        "--agent",
        default=None,
        help=f"agent class as package.module:Class, importable here (default: {DEFAULT_AGENT})",
    )
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
        description=(
            "Print a JWT for USER (HS256, claims sub, iat, exp), signed with the secret the "
            "nodes use. Nodes refuse tokens living longer than their --token-max-lifetime "
            f"(default {DEFAULT_MAX_LIFETIME:.0f} s, 7 days)."
        ),
        formatter_class=_Formatter,
    )
    token.add_argument("user", metavar="USER", help="user id, e.g. alice or alice@example.com")
    token.add_argument("--ttl", type=float, default=DEFAULT_TTL, help="lifetime in seconds")
    token.add_argument(
        "--admin",
        action="store_true",
        help="add the claim admin=true: GET /api/dashboard then shows the whole cluster",
    )
    _secret_arg(token, "the nodes use (required)")
    _claim_args(token, "the")

    chat = sub.add_parser(
        "chat",
        help="chat in a conversation from the terminal",
        description=(
            "Connect to a node over socket.io, join a conversation (created when new), print "
            "every event as '[id] source: content' and send each line of stdin as a message. "
            "Works with piped input: after end of input it waits for the last answer. When "
            "the node dies or drains, it reconnects to another (--url, or the nodes it "
            "learnt from GET /api/nodes) from the last event it printed. "
            "Connect a second terminal to another node with the same --conversation to see "
            "location transparency."
        ),
        formatter_class=_Formatter,
    )
    chat.add_argument(
        "--url",
        required=True,
        action="append",
        help="node URL, e.g. http://127.0.0.1:8000, or a load balancer's; give --url again "
        "for more nodes to reconnect to (the live nodes' URLs are learnt as well)",
    )
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
    chat.add_argument(
        "--reconnect-for",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="when the node goes away, keep trying the other nodes this long",
    )
    chat.add_argument(
        "--settings",
        metavar="JSON",
        help="agent settings (a JSON object, e.g. '{\"replies\": 2}'), used if this "
        "connection starts the conversation's loop",
    )
    return parser
