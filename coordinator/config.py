"""Configuration: plain values and their validation, no I/O."""

from __future__ import annotations

import math
import os
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from . import cpus
from .errors import ConfigError, InvalidInput
from .inputs import ID_RE, shown
from .redact import redact_url
from .redisurl import REDIS_MODES, SENTINEL_SCHEMES, check_redis_url, seed_urls

ENV_PREFIX = "COORDINATOR_"  # of the environment variables that configure a node
# Bounds of any time (seconds) and any count a node is given: larger ones pass every
# check here and then fail where Redis takes them (milliseconds past 64 bits; counts
# past what its Lua numbers hold exactly), e.g. keys never set to expire.
MAX_SECONDS = 1e9
MAX_COUNT = 2**53
DEFAULT_AGENT = "workers.echo:EchoAgent"
ISOLATIONS = ("process", "none")
CAP_POLICIES = ("evict", "reject")
MIN_AGENT_MEMORY = 128 << 20  # an idle worker maps 40-100 MB of address space
# The user address space of x86-64 Linux: a limit above it bounds nothing (and past 2**63
# the kernel's rlimit cannot even be given it).
MAX_AGENT_MEMORY = 1 << 47
# Past a day a stuck worker is not being noticed at all (the bound also keeps each
# worker's stall-reporter thread within what time.sleep takes).
MAX_AGENT_STALL_TIMEOUT = 86_400.0
# An action's or a start's own bound past a day bounds nothing (0 says so), and a purge
# marks a conversation for a start's bound (in Redis milliseconds, which 1e300 is not).
MAX_AGENT_RUN_TIMEOUT = 86_400.0
MAX_AGENT_WORKERS = 1024  # processes per node, each ~23 MB before any agent

# Bytes a window keeps beyond its largest action: a loop's start note (about 200) and
# the action's own envelope.
NOTE_ROOM = 1024
# The largest event the event store takes (``eventstore/base.py``): far above any event
# the coordinator logs, low enough that a corrupt length field is never believed.
MAX_EVENT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Lifetimes:
    """What one conversation asked for at creation (None: the node's default): how long
    its loop lives on idle without connections (``close_delay``) and how long a loop of
    it may run at most (``max_running_time``), in seconds."""

    close_delay: float | None = None
    max_running_time: float | None = None

    def __post_init__(self) -> None:
        for name in ("close_delay", "max_running_time"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value < math.inf  # nan fails both
            ):
                raise InvalidInput(f"{name} must be None or seconds > 0, got {shown(value)}")

    @classmethod
    def from_body(cls, body: dict[str, Any], config: ManagerConfig) -> Lifetimes:
        """Read and check them from a REST create body, within ``config``'s bounds."""

        def seconds(name: str, bound: float) -> float | None:
            value = body.get(name)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInput(f"{name} must be a number of seconds, got {shown(value)}")
            if not 0 < value <= bound:
                most = "" if bound == float("inf") else f" and at most {bound:g} s"
                raise InvalidInput(f"{name} must be > 0{most}, got {value!r}")
            return float(value)

        running_bound = config.max_running_time or float("inf")
        return cls(
            seconds("close_delay", config.max_close_delay),
            seconds("max_running_time", running_bound),
        )

    def effective(self, config: ManagerConfig) -> tuple[float, float]:
        """(close_delay, max_running_time or 0 for none) as this node applies them:
        the conversation's own, clamped to this node's bounds, else its defaults."""
        close = min(self.close_delay or config.close_delay, config.max_close_delay)
        limit = config.max_running_time
        running = self.max_running_time or limit
        return close, (min(running, limit) if limit else running)


DEFAULT_LIFETIMES = Lifetimes()


def default_node_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "node"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class ManagerConfig:
    """Settings of one coordinator node. Times are in seconds."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    node_id: str = field(default_factory=default_node_id)
    key_prefix: str = "coord"
    agent: str = DEFAULT_AGENT
    max_concurrent_conversations: int = 3
    # Over the user's cap: "evict" the least recently updated loop (the seed) or "reject"
    # the start (CONCURRENCY_LIMIT_REACHED). A token's "org" claim puts its user's loops
    # under the organisation's cap as well (0: none), which always rejects.
    cap_policy: str = "evict"
    max_concurrent_conversations_per_org: int = 0
    close_delay: float = 15.0
    # Bounds of what a conversation may ask for at creation (``Lifetimes``): close_delay
    # up to max_close_delay; a running time up to max_running_time, which is also the
    # default (0: no limit, and none by default).
    max_close_delay: float = 86_400.0
    max_running_time: float = 0.0
    cleanup_interval: float = 15.0
    # How often a node moves to the event store what conversations left without an
    # owner still had in Redis only (``Archiver.sweep``).
    store_sweep_interval: float = 5.0
    # A node that misses heartbeats for node_ttl is dead; its loops stop lease_margin
    # before that by its own monotonic clock.
    node_ttl: float = 6.0
    heartbeat_interval: float = 1.5
    lease_margin: float = 1.5
    # Where the full history lives (``eventstore/factory.py``): file:///PATH or
    # postgresql://...; '' is the machine's default directory (``default_path``).
    event_store: str = ""
    # Redis keeps each conversation's newest events (its hot window), at most this many
    # and about this many bytes, once the store holds them (``archive.py``); actions are
    # refused while the events the store does not hold yet would exceed either bound.
    log_window_events: int = 10_000
    log_window_bytes: int = 16 << 20
    # A stopped conversation's Redis state (record, window, inbox) expires after this
    # many seconds once the store holds it all; it comes back from the store (0: never).
    redis_retention: float = 3600.0
    # Quotas of the event store (0: none): conversations stored per user, and bytes of
    # one conversation's events (an action that would pass it is refused).
    max_conversations_per_user: int = 1000
    max_conversation_bytes: int = 1 << 30
    # The largest event an agent may emit (user actions: max_action_bytes).
    max_agent_event_bytes: int = 1 << 20
    inbox_max: int = 1_000
    max_action_bytes: int = 64 * 1024
    start_timeout: float = 30.0
    redis_timeout: float = 5.0
    connect_timeout: float = 3.0
    redis_max_connections: int = 64
    idle_flush_interval: float = 1.0
    drain_timeout: float = 30.0
    # Backpressure: joins handled at once (more wait up to join_wait, then are refused
    # with NodeBusy) and loop restarts after a node loss run at once, per node.
    max_concurrent_joins: int = 64
    join_wait: float = 10.0
    max_concurrent_restarts: int = 16
    # Let an agent that allows it (``speculative = True``) start on an action sent
    # through its own node before the action's accept has answered (runner.py).
    speculative_dispatch: bool = True
    # Log each change of an agent's state (running, awaiting_user_input, ...) as an
    # ``agent_state_changed`` observation, as OpenHands' agent session does: its web
    # client keeps its input disabled until it has seen one (runner.py).
    agent_state_events: bool = True
    # What the Redis URL points at: auto (ask it), standalone, cluster or sentinel
    # (a redis+sentinel:// URL).
    redis_mode: str = "auto"
    # An action is acknowledged, and an agent event delivered, once this many replicas
    # hold it (WAIT), within ack_timeout seconds (state/writes.py).
    ack_replicas: int = 0
    ack_timeout: float = 1.0
    # Where agent loops run (agentpool.py): "process", in worker processes the node
    # supervises, or "none", in the node's own event loop, where an agent that blocks
    # stalls every conversation of the node and its lease, and one that exits takes the
    # node down. A stall is a worker that has not answered for agent_stall_timeout; an
    # action that stalled or killed its worker max_dispatch_attempts times is answered
    # with an error. Limits per worker (address space, bytes), per dispatch and per start
    # of an agent (seconds); 0 is none. agent_cpus: the CPUs the workers run on, the
    # node's event loop on the others ("auto": all but the first; "": wherever the
    # kernel puts them; cpus.py).
    agent_isolation: str = "process"
    agent_workers: int = field(default_factory=lambda: min(os.cpu_count() or 1, MAX_AGENT_WORKERS))
    agent_cpus: str = ""
    agent_stall_timeout: float = 5.0
    max_dispatch_attempts: int = 2
    agent_memory_limit: int = 0
    agent_dispatch_timeout: float = 0.0
    agent_start_timeout: float = 60.0
    # Connections one user may hold open at once, on all nodes together (0: no limit).
    max_connections_per_user: int = 32

    def _typed(self) -> Iterator[tuple[str, str, Any]]:
        """Each field's name, declared type's name and value."""
        for f in fields(self):
            yield (
                f.name,
                f.type if isinstance(f.type, str) else f.type.__name__,
                getattr(self, f.name),
            )

    def __post_init__(self) -> None:
        for name, expected, value in self._typed():
            if expected == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r}")
            if expected == "str" and not isinstance(value, str):
                raise ConfigError(f"{name} must be a string, got {type(value).__name__}")
            if expected == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if expected == "float" and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)  # nan passes every bound; inf waits for good
            ):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")

        check_redis_url(self.redis_url)  # the scheme, a host, a port, its parameters
        if self.redis_mode not in REDIS_MODES:
            raise ConfigError(
                f"redis_mode must be one of {', '.join(REDIS_MODES)}, got {self.redis_mode!r}"
            )
        sentinel = self.redis_url.startswith(SENTINEL_SCHEMES)
        if sentinel and self.redis_mode not in ("auto", "sentinel"):
            raise ConfigError(
                f"redis_url is a Sentinel URL but redis_mode is {self.redis_mode}: "
                "use redis_mode sentinel (or auto)"
            )
        if self.redis_mode == "sentinel" and not sentinel:
            raise ConfigError(
                "redis_mode sentinel needs a redis_url of the form "
                "redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]"
            )
        if self.redis_mode == "cluster" and self.redis_url.startswith("unix://"):
            raise ConfigError("redis_mode cluster needs a redis:// or rediss:// URL of a node")
        if self.redis_mode == "standalone" and len(seed_urls(self.redis_url)) > 1:
            raise ConfigError(
                "redis_url lists several nodes, the seeds of a Redis Cluster, but redis_mode "
                "is standalone: give one node's URL (for Sentinel: redis+sentinel://)"
            )
        if self.ack_replicas < 0:
            raise ConfigError(f"ack_replicas must be >= 0, got {self.ack_replicas!r}")
        if not isinstance(self.node_id, str) or not ID_RE.fullmatch(self.node_id):
            raise ConfigError(
                f"node_id must be 1-128 characters of [A-Za-z0-9_-], got {shown(self.node_id)}"
            )
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.key_prefix):
            raise ConfigError(f"key_prefix must be 1-64 of [A-Za-z0-9_.-], got {self.key_prefix!r}")
        if ":" not in self.agent:
            raise ConfigError(f"agent must be 'package.module:Class', got {self.agent!r}")
        positive = (
            "max_concurrent_conversations",
            "close_delay",
            "cleanup_interval",
            "store_sweep_interval",
            "node_ttl",
            "heartbeat_interval",
            "log_window_events",
            "log_window_bytes",
            "inbox_max",
            "max_action_bytes",
            "max_agent_event_bytes",
            "start_timeout",
            "redis_timeout",
            "connect_timeout",
            "redis_max_connections",
            "idle_flush_interval",
            "drain_timeout",
            "max_concurrent_joins",
            "join_wait",
            "max_concurrent_restarts",
            "ack_timeout",
            "agent_workers",
            "agent_stall_timeout",
            "max_dispatch_attempts",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.cap_policy not in CAP_POLICIES:
            raise ConfigError(
                f"cap_policy must be one of {', '.join(CAP_POLICIES)}, got {self.cap_policy!r}"
            )
        if self.max_close_delay < self.close_delay:
            raise ConfigError(
                f"max_close_delay ({self.max_close_delay!r}) must be >= close_delay "
                f"({self.close_delay!r})"
            )
        if self.max_running_time < 0:
            raise ConfigError(
                f"max_running_time must be >= 0 (0: no limit), got {self.max_running_time!r}"
            )
        if self.max_concurrent_conversations_per_org < 0:
            raise ConfigError(
                "max_concurrent_conversations_per_org must be >= 0 (0: no limit), got "
                f"{self.max_concurrent_conversations_per_org!r}"
            )
        if self.agent_isolation not in ISOLATIONS:
            raise ConfigError(
                f"agent_isolation must be one of {', '.join(ISOLATIONS)}, "
                f"got {self.agent_isolation!r}"
            )
        cpus.check(self.agent_cpus)
        if self.agent_cpus and self.agent_isolation != "process":
            raise ConfigError(
                "agent_cpus places agent worker processes: it needs agent_isolation process"
            )
        if self.agent_memory_limit and self.agent_memory_limit < MIN_AGENT_MEMORY:
            raise ConfigError(
                "agent_memory_limit must be 0 (no limit) or at least "
                f"{MIN_AGENT_MEMORY >> 20}M (a worker's interpreter needs that much), "
                f"got {self.agent_memory_limit!r}"
            )
        if self.agent_memory_limit > MAX_AGENT_MEMORY:
            raise ConfigError(
                f"agent_memory_limit must be at most {MAX_AGENT_MEMORY >> 40}T (a process's "
                f"whole address space; 0: no limit), got {self.agent_memory_limit!r}"
            )
        if self.agent_stall_timeout > MAX_AGENT_STALL_TIMEOUT:
            raise ConfigError(
                f"agent_stall_timeout must be at most {MAX_AGENT_STALL_TIMEOUT:g} seconds, "
                f"got {self.agent_stall_timeout!r}"
            )
        if self.agent_workers > MAX_AGENT_WORKERS:
            raise ConfigError(
                f"agent_workers must be at most {MAX_AGENT_WORKERS} (processes per node), "
                f"got {self.agent_workers!r}"
            )
        for name in ("agent_dispatch_timeout", "agent_start_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: none), got {getattr(self, name)!r}")
            if getattr(self, name) > MAX_AGENT_RUN_TIMEOUT:
                raise ConfigError(
                    f"{name} must be at most {MAX_AGENT_RUN_TIMEOUT:g} seconds (0: none), "
                    f"got {getattr(self, name)!r}"
                )
        if self.max_connections_per_user < 0:
            raise ConfigError(
                f"max_connections_per_user must be >= 0, got {self.max_connections_per_user!r}"
            )
        for name in ("max_action_bytes", "max_agent_event_bytes"):
            if getattr(self, name) > MAX_EVENT_BYTES:
                raise ConfigError(
                    f"{name} must be at most {MAX_EVENT_BYTES} (the event store's limit), "
                    f"got {getattr(self, name)!r}"
                )
        # A loop's start logs a state note the store gets with its first action: the
        # window holds both, else that action is refused as "behind" for good.
        if self.log_window_events < 2:
            raise ConfigError(
                "log_window_events must be at least 2 (an action and the state note a "
                f"loop's start logs before it), got {self.log_window_events!r}"
            )
        if self.log_window_bytes < self.max_action_bytes + NOTE_ROOM:
            raise ConfigError(
                f"log_window_bytes ({self.log_window_bytes}) must hold at least one action "
                f"and a loop's start note (max_action_bytes {self.max_action_bytes} + "
                f"{NOTE_ROOM})"
            )
        for name in ("max_conversations_per_user", "max_conversation_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: no limit), got {getattr(self, name)!r}")
        if self.redis_retention < 0:
            raise ConfigError(f"redis_retention must be >= 0, got {self.redis_retention!r}")
        if self.lease_margin < 0:
            raise ConfigError(f"lease_margin must be >= 0, got {self.lease_margin!r}")
        if self.heartbeat_interval * 2 > self.node_ttl - self.lease_margin:
            raise ConfigError(
                "heartbeat_interval must leave room for two heartbeats before the loops "
                f"stop: need 2 * {self.heartbeat_interval} <= node_ttl - lease_margin "
                f"({self.node_ttl} - {self.lease_margin})"
            )
        self._within_what_redis_takes()

    def _within_what_redis_takes(self) -> None:
        """Last: a field with a bound of its own says it first."""
        for name, expected, value in self._typed():
            if expected == "int" and abs(value) > MAX_COUNT:
                raise ConfigError(f"{name} must be at most {MAX_COUNT:,}, got {value!r}")
            if expected == "float" and abs(value) > MAX_SECONDS:
                raise ConfigError(
                    f"{name} must be at most {MAX_SECONDS:.0e} seconds (about 31 years), "
                    f"got {value!r}"
                )

    def __repr__(self) -> str:
        # The dataclass's own, with the Redis URL's password left out (configs get logged).
        values = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("redis_url", "event_store"):
                value = redact_url(value)
            values.append(f"{f.name}={value!r}")
        return f"ManagerConfig({', '.join(values)})"

    @property
    def retention_ms(self) -> int:
        """``redis_retention`` as the scripts take it (ms; 0: kept for good)."""
        return int(self.redis_retention * 1000)

    def replace(self, **changes: Any) -> ManagerConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(values)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values.update(changes)
        return ManagerConfig(**values)
