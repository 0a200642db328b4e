"""The ``coordinator serve`` flags that set a node's configuration, as tables: flag ->
field, converter, help. ``CONFIG_FLAGS`` fill ``ManagerConfig`` (what the coordinator
does), ``SERVER_FLAGS`` fill ``ServerConfig`` (how the node treats its clients); the
parser (cliargs.py) gives each an environment fallback ``COORDINATOR_<NAME>``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from .config import MAX_COUNT, MAX_SECONDS
from .errors import ConfigError
from .ratelimit import Rate
from .serverconfig import split_list


def switch(value: str) -> bool:
    """on/off (also true/false, yes/no, 1/0) for a flag or its environment variable."""
    word = value.strip().lower()
    if word in ("on", "true", "yes", "1"):
        return True
    if word in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


def number(value: str) -> float:
    """A finite number of seconds up to ``MAX_SECONDS``, for a flag or its environment
    variable: ``float`` also takes nan (which turns any bound compared with it off), inf
    and 1e400 (inf: an overflow later, or a wait without end), and 1e300 passes every
    bound but fails where Redis takes it."""
    try:
        result = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(result):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    if abs(result) > MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_SECONDS:.0e} seconds (about 31 years), got {value!r}"
        )
    return result


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(value: str) -> int:
    """A byte count such as 512M, 2G or 1048576 (K, M, G, T are powers of 1024); 0 or off:
    none."""
    word = value.strip().upper().removesuffix("B").removesuffix("I")
    if word in ("0", "OFF", "NONE"):
        return 0
    unit = word[-1:] if word[-1:] in _UNITS else ""
    try:
        size = float(word[: len(word) - len(unit)]) * _UNITS[unit]
    except ValueError:
        size = math.nan
    if not math.isfinite(size) or size > MAX_COUNT:  # nan, inf, 1e400, 1e308G or 1e300
        raise argparse.ArgumentTypeError(f"expected a size such as 512M, got {value!r}")
    return int(size)


# serve flag -> ManagerConfig field, for the optional settings passed through as given.
CONFIG_FLAGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "node_id": ("--node-id", str, "node id (default: HOST-PID-random)"),
    "key_prefix": ("--key-prefix", str, "prefix of every Redis key (default: coord)"),
    "event_store": (
        "--event-store",
        str,
        "where every conversation's full history is kept: file:///ABSOLUTE/PATH (one "
        "machine, or a shared volume) or postgresql://USER@HOST/DB (several machines); "
        "every node of a cluster must use the same one (default: file:// of the "
        "machine's directory, $XDG_DATA_HOME/coordinator/events, "
        "/var/lib/coordinator/events or ~/.local/share/coordinator/events)",
    ),
    "log_window_events": (
        "--log-window-events",
        int,
        "newest events of a conversation Redis keeps once the event store holds them; "
        "actions are refused while more than this many are not yet stored (default: 10000)",
    ),
    "log_window_bytes": (
        "--log-window-bytes",
        _size,
        "bytes of a conversation's newest events Redis keeps, e.g. 16M; actions are "
        "refused while more than this is not yet stored (default: 16M)",
    ),
    "redis_retention": (
        "--redis-retention",
        number,
        "seconds a stopped conversation's Redis state (record, log window, inbox) is kept "
        "once the event store holds it all; it comes back from the store when started "
        "again; 0: kept forever (default: 3600)",
    ),
    "max_conversations_per_user": (
        "--max-conversations-per-user",
        int,
        "conversations one user may have in the event store; creating one more is refused "
        "until one is purged; 0: no limit (default: 1000)",
    ),
    "max_conversation_bytes": (
        "--max-conversation-bytes",
        _size,
        "bytes of one conversation's events, e.g. 1G; an action that would pass it is "
        "refused; 0: no limit (default: 1G)",
    ),
    "max_agent_event_bytes": (
        "--max-agent-event-bytes",
        _size,
        "the largest event an agent may emit, e.g. 1M; a larger one is refused to the "
        "agent and not logged (default: 1M)",
    ),
    "max_concurrent_conversations": (
        "--max-concurrent-conversations",
        int,
        "running loops allowed per user, cluster-wide (default: 3)",
    ),
    "cap_policy": (
        "--cap-policy",
        str,
        "over a user's cap: evict the least recently updated loop, or reject the start "
        "(429 CONCURRENCY_LIMIT_REACHED) (default: evict)",
    ),
    "max_concurrent_conversations_per_org": (
        "--max-concurrent-conversations-per-org",
        int,
        "running loops allowed per organisation (the token's org claim), cluster-wide; "
        "over it a start is rejected (default: 0, no limit)",
    ),
    "close_delay": (
        "--close-delay",
        number,
        "seconds an idle loop without connections lives on (default: 15)",
    ),
    "max_close_delay": (
        "--max-close-delay",
        number,
        "the longest close_delay a conversation may ask for at creation (default: 86400)",
    ),
    "max_running_time": (
        "--max-running-time",
        number,
        "seconds a conversation's loop may run at most, and the longest a conversation "
        "may ask for at creation; then it is closed (default: 0, no limit)",
    ),
    "node_ttl": (
        "--node-ttl",
        number,
        "seconds without heartbeat after which a node is dead (default: 6)",
    ),
    "heartbeat_interval": (
        "--heartbeat-interval",
        number,
        "seconds between heartbeats (default: 1.5)",
    ),
    "lease_margin": (
        "--lease-margin",
        number,
        "seconds before node_ttl at which a silent node stops its loops (default: 1.5)",
    ),
    "drain_timeout": (
        "--drain-timeout",
        number,
        "seconds a SIGTERM drain may take before the node exits anyway (default: 30)",
    ),
    "max_concurrent_joins": (
        "--max-concurrent-joins",
        int,
        "joins this node handles at once; more wait (default: 64)",
    ),
    "join_wait": (
        "--join-wait",
        number,
        "seconds a join may wait for a free slot before it is refused as busy (default: 10)",
    ),
    "max_concurrent_restarts": (
        "--max-concurrent-restarts",
        int,
        "loops this node restarts at once after another node is lost (default: 16)",
    ),
    "speculative_dispatch": (
        "--speculative-dispatch",
        switch,
        "on/off: an agent that allows it starts on an action sent through its own node "
        "before the action is durable, saving a Redis round trip (default: on)",
    ),
    "agent_state_events": (
        "--agent-state-events",
        switch,
        "on/off: log each change of an agent's state (running, awaiting_user_input, ...) "
        "as an agent_state_changed observation, as OpenHands does: its web client keeps "
        "its input disabled until it sees one (default: on)",
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
        number,
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
    "agent_cpus": (
        "--agent-cpus",
        str,
        "CPUs the agent worker processes run on, e.g. 1-3 ('auto': all but the first), the "
        "node's event loop on the others it may use; on a small machine an action then "
        "no longer waits for the node to yield its CPU to the worker (Linux; default: "
        "unset, the kernel places them)",
    ),
    "agent_stall_timeout": (
        "--agent-stall-timeout",
        number,
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
        number,
        "seconds one action may take in its agent before it is cancelled and answered "
        "with an error event (default: no limit)",
    ),
    "agent_start_timeout": (
        "--agent-start-timeout",
        number,
        "seconds an agent's start may take before it is cancelled and the start refused "
        "with an error naming the bound; 0: no limit (default: 60)",
    ),
    "max_connections_per_user": (
        "--max-connections-per-user",
        int,
        "connections one user may hold open on all nodes together; 0: no limit (default: 32)",
    ),
}


def _rate(value: str) -> Rate:
    try:
        return Rate.parse(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _origins(value: str) -> tuple[str, ...]:
    return split_list(value)


# serve flag -> ServerConfig field: how the node treats its clients (serverconfig.py).
SERVER_FLAGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "max_message_bytes": (
        "--max-message-bytes",
        int,
        "largest websocket message or polling body accepted, before anything reads it "
        "(default: 2 x the largest action + 16 KiB = 144 KiB)",
    ),
    "request_timeout": (
        "--request-timeout",
        number,
        "seconds a connection has to send a complete request (head and body) from "
        "connecting or from its next request's first byte; else it is closed, with a 408 "
        "when no request head came; an answer the client takes nothing of for this long "
        "is cut off (default: 10)",
    ),
    "keep_alive_timeout": (
        "--keep-alive-timeout",
        number,
        "seconds an idle HTTP keep-alive connection stays open (default: 5)",
    ),
    "handshake_timeout": (
        "--handshake-timeout",
        number,
        "seconds an engine.io session has to complete its socket.io CONNECT (default: 10)",
    ),
    "max_connections": (
        "--max-connections",
        int,
        "connections this node holds open at once, of any kind; 0: no limit (default: 10000)",
    ),
    "max_connections_per_address": (
        "--max-connections-per-address",
        int,
        "connections one client address may hold open on this node; 0: no limit (default: 256)",
    ),
    "connections_per_address": (
        "--limit-connections-per-address",
        _rate,
        "new connections one client address may open, RATE[:BURST] per second (IPv6: per "
        "/64) (default: 20:100)",
    ),
    "trusted_proxies": (
        "--trusted-proxies",
        split_list,
        "addresses or CIDR blocks of proxies whose X-Forwarded-For names the client, "
        "comma-separated (default: none; X-Forwarded-For is ignored)",
    ),
    "allow_polling": (
        "--allow-polling",
        switch,
        "on/off: accept socket.io's HTTP long-polling transport; behind a load balancer it "
        "needs sticky sessions (deploy/nginx.conf) (default: off, websocket only)",
    ),
    "cors_origins": (
        "--cors-origins",
        _origins,
        "browser origins (scheme://host[:port]) allowed to call the node, comma-separated, "
        "or * for any (default: none: same origin only)",
    ),
    "metrics_port": (
        "--metrics-port",
        int,
        "serve /metrics on this port only (on --host), not on the node's port "
        "(default: on the node's port)",
    ),
    "actions_per_connection": (
        "--limit-actions-per-connection",
        _rate,
        "actions (any event) one connection may send: RATE[:BURST] per second, or off "
        "(default: 20:40)",
    ),
    "actions_per_user": (
        "--limit-actions-per-user",
        _rate,
        "actions one user may send on all nodes together, RATE[:BURST] (default: 50:100)",
    ),
    "action_bytes_per_user": (
        "--limit-action-bytes-per-user",
        _rate,
        "bytes of actions one user may send on all nodes together, RATE[:BURST] "
        "(default: 262144:1048576, 256 KiB/s with 1 MiB saved up)",
    ),
    "joins_per_user": (
        "--limit-joins-per-user",
        _rate,
        "socket.io connects (joins) per user, on all nodes together (default: 2:20)",
    ),
    "creations_per_user": (
        "--limit-creations-per-user",
        _rate,
        "conversations one user may create through REST, on all nodes (default: 0.5:10)",
    ),
    "requests_per_user": (
        "--limit-requests-per-user",
        _rate,
        "authenticated REST requests per user (any /api/ call), on all nodes (default: 20:100)",
    ),
    "max_queued_events": (
        "--max-queued-events",
        int,
        "events waiting for a client that does not read before it is dropped; it "
        "reconnects with latest_event_id and misses nothing (default: 2000)",
    ),
    "max_queued_bytes": (
        "--max-queued-bytes",
        int,
        "bytes of events waiting for a client that does not read before it is "
        "dropped (default: 1 MiB)",
    ),
}


# `serve` flags that turn every client limit off: for the tests and benchmarks that flood
# a node on purpose (a deployment keeps the defaults).
NO_LIMIT_FLAGS = (
    "--max-connections", "0",
    "--max-connections-per-address", "0",
    "--limit-connections-per-address", "off",
    "--limit-actions-per-connection", "off",
    "--limit-actions-per-user", "off",
    "--limit-action-bytes-per-user", "off",
    "--limit-joins-per-user", "off",
    "--limit-creations-per-user", "off",
    "--limit-requests-per-user", "off",
    "--max-connections-per-user", "0",
)  # fmt: skip
