"""How a node's HTTP and socket.io side treats its clients: sizes, timeouts, connection
caps, rate limits, CORS and the metrics port. Plain values and their validation, no I/O
(``ManagerConfig`` holds what the coordinator itself does).

The defaults are meant to be met by a script flooding a node, never by a person chatting:
docs/failures.md ("Hostile clients") gives each one with what it protects.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .ratelimit import UNLIMITED, Rate

# An engine.io packet carrying an action is its JSON, which may be up to about twice its
# msgpack size (escapes), plus the socket.io framing and the ack id.
FRAMING_BYTES = 16 * 1024
# Largest HTTP request head (request line and headers) h11 buffers: its own default,
# stated because it bounds what a client that never finishes its headers can hold.
MAX_HEAD_BYTES = 16 * 1024


def message_limit(max_action_bytes: int) -> int:
    """The largest websocket message or polling body a node accepts for that action size."""
    return 2 * max_action_bytes + FRAMING_BYTES


# Default rate limits (per second, burst). A person types an action every few seconds,
# opens a conversation now and then and reconnects a few tabs at once after a network
# blip; a script flooding a node sends hundreds a second.
ACTIONS_PER_CONNECTION = Rate(20, 40)
ACTIONS_PER_USER = Rate(50, 100)
# Bytes of actions (packed) per user: a pasted file now and then passes; a stream of big
# actions, which every connection of the conversation receives twice (the action and its
# answer), does not.
ACTION_BYTES_PER_USER = Rate(256 * 1024, 1024 * 1024)
JOINS_PER_USER = Rate(2, 20)
CREATIONS_PER_USER = Rate(0.5, 10)
# Authenticated REST requests per user (a page of events, a list, a close): a dashboard
# polling and a client paging through its history pass; a loop asking as fast as it can
# does not.
REQUESTS_PER_USER = Rate(20, 100)
# New connections one address may open: a reconnect storm of a hundred clients behind one
# NAT passes, a loop opening connections as fast as it can does not.
CONNECTIONS_PER_ADDRESS = Rate(20, 100)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: tuple[str, ...]) -> tuple[Network, ...]:
    """Addresses or CIDR blocks (``10.0.0.0/8``); ConfigError naming a bad one."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"not an IP address or network: {value!r}") from None
    return tuple(out)


def split_list(text: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ``("a", "b", "c")``."""
    return tuple(part for part in re.split(r"[\s,]+", text.strip()) if part)


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one node's edge (times in seconds; a count or rate of 0 is no limit)."""

    # Largest websocket message / polling body before anything else looks at it; None:
    # ``message_limit(max_action_bytes)``.
    max_message_bytes: int | None = None
    # A connection must send a complete request (head and body) within this long of its
    # first byte (or of connecting), and take some of an answer within this long while
    # the answer waits for it; idle keep-alive connections close after the other.
    request_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    # An engine.io session must complete a socket.io CONNECT (join) within this long.
    handshake_timeout: float = 10.0
    max_connections: int = 10_000
    max_connections_per_address: int = 256
    connections_per_address: Rate = CONNECTIONS_PER_ADDRESS
    # Proxies whose X-Forwarded-For names the client (addresses or CIDR blocks).
    trusted_proxies: tuple[str, ...] = ()
    allow_polling: bool = False
    cors_origins: tuple[str, ...] = ()
    metrics_port: int | None = None
    actions_per_connection: Rate = ACTIONS_PER_CONNECTION
    actions_per_user: Rate = ACTIONS_PER_USER
    action_bytes_per_user: Rate = ACTION_BYTES_PER_USER
    joins_per_user: Rate = JOINS_PER_USER
    creations_per_user: Rate = CREATIONS_PER_USER
    requests_per_user: Rate = REQUESTS_PER_USER
    # What may wait for a client that does not read before it is dropped (it reconnects
    # with latest_event_id and misses nothing): events, and their bytes.
    max_queued_events: int = 2_000
    max_queued_bytes: int = 1024 * 1024
    networks: tuple[Network, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "networks":
                continue
            value = getattr(self, f.name)
            if f.type in ("float", "int") and (
                isinstance(value, bool) or not isinstance(value, int | float) or value < 0
            ):
                raise ConfigError(f"{f.name} must be a number >= 0, got {value!r}")
        for name in ("request_timeout", "keep_alive_timeout", "handshake_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_message_bytes is not None and self.max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be 0-65535, got {self.metrics_port}")
        for origin in self.cors_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ConfigError(f"a CORS origin is scheme://host[:port] (or *), got {origin!r}")
        object.__setattr__(self, "networks", parse_networks(self.trusted_proxies))

    def message_bytes(self, max_action_bytes: int) -> int:
        return self.max_message_bytes or message_limit(max_action_bytes)

    @property
    def frames_per_connection(self) -> Rate:
        """Every websocket message a connection sends (pings, garbage, actions): well
        above the action rate, so only a flood that ignores its error acks meets it."""
        a = self.actions_per_connection
        return a if a.unlimited else Rate(2 * a.per_second + 10, 2 * a.burst + 20)

    def replace(self, **changes: Any) -> ServerConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        unknown = set(changes) - set(values)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values.update(changes)
        return ServerConfig(**values)


# What tests and benchmarks that flood a node on purpose use: every limit off.
NO_LIMITS: dict[str, Any] = dict(
    max_connections=0,
    max_connections_per_address=0,
    connections_per_address=UNLIMITED,
    actions_per_connection=UNLIMITED,
    actions_per_user=UNLIMITED,
    action_bytes_per_user=UNLIMITED,
    joins_per_user=UNLIMITED,
    creations_per_user=UNLIMITED,
    requests_per_user=UNLIMITED,
)
