"""Configuration: plain values and their validation, no I/O."""

from __future__ import annotations

import os
import re
import socket
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError, InvalidInput

DEFAULT_AGENT = "workers.echo:EchoAgent"

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Users are often e-mail addresses; braces and whitespace stay out so hash tags hold.
_USER_RE = re.compile(r"[A-Za-z0-9_.@:+=-]{1,128}")


def check_conversation_id(sid: object) -> str:
    """Return ``sid`` if it is a valid conversation id, else raise InvalidInput."""
    if not isinstance(sid, str) or not _ID_RE.fullmatch(sid):
        raise InvalidInput(
            f"invalid conversation id {sid!r}: expected 1-128 characters of [A-Za-z0-9_-]"
        )
    return sid


def check_connection_id(cid: object) -> str:
    if not isinstance(cid, str) or not _ID_RE.fullmatch(cid):
        raise InvalidInput(
            f"invalid connection id {cid!r}: expected 1-128 characters of [A-Za-z0-9_-]"
        )
    return cid


def check_user_id(user: object) -> str:
    if not isinstance(user, str) or not _USER_RE.fullmatch(user):
        raise InvalidInput(
            f"invalid user id {user!r}: expected 1-128 characters of [A-Za-z0-9_.@:+=-]"
        )
    return user


_SECRET_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/@\s:]*:)[^@\s]*@", re.I)
_SECRET_IN_QUERY = re.compile(r"(?P<head>[?&](?:password|ssl_password)=)[^&\s]*", re.I)


def redact_url(text: str) -> str:
    """``text`` with the password of any URL in it (``scheme://user:PASSWORD@``, or a
    ``password=`` query parameter) replaced by ``***``: for logs and error messages."""
    text = _SECRET_IN_URL.sub(r"\g<head>***@", text)
    return _SECRET_IN_QUERY.sub(r"\g<head>***", text)


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
    close_delay: float = 15.0
    cleanup_interval: float = 15.0
    # A node that misses heartbeats for node_ttl is dead; its loops stop lease_margin
    # before that by its own monotonic clock.
    node_ttl: float = 6.0
    heartbeat_interval: float = 1.5
    lease_margin: float = 1.5
    event_log_maxlen: int = 10_000
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
    # Connections one user may hold open at once, on all nodes together (0: no limit).
    max_connections_per_user: int = 32

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            expected = f.type if isinstance(f.type, str) else f.type.__name__
            if expected == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{f.name} must be true or false, got {value!r}")
            if expected == "str" and not isinstance(value, str):
                raise ConfigError(f"{f.name} must be a string, got {type(value).__name__}")
            if expected == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{f.name} must be an integer, got {value!r}")
            if expected == "float" and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise ConfigError(f"{f.name} must be a number, got {value!r}")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                "redis_url must start with redis://, rediss:// or unix://, got "
                f"{redact_url(self.redis_url)!r}"
            )
        try:
            check_connection_id(self.node_id)
        except InvalidInput as exc:
            raise ConfigError(f"node_id: {exc}") from None
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.key_prefix):
            raise ConfigError(f"key_prefix must be 1-64 of [A-Za-z0-9_.-], got {self.key_prefix!r}")
        if ":" not in self.agent:
            raise ConfigError(f"agent must be 'package.module:Class', got {self.agent!r}")
        positive = (
            "max_concurrent_conversations",
            "close_delay",
            "cleanup_interval",
            "node_ttl",
            "heartbeat_interval",
            "event_log_maxlen",
            "inbox_max",
            "max_action_bytes",
            "start_timeout",
            "redis_timeout",
            "connect_timeout",
            "redis_max_connections",
            "idle_flush_interval",
            "drain_timeout",
            "max_concurrent_joins",
            "join_wait",
            "max_concurrent_restarts",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_connections_per_user < 0:
            raise ConfigError(
                f"max_connections_per_user must be >= 0, got {self.max_connections_per_user!r}"
            )
        if self.lease_margin < 0:
            raise ConfigError(f"lease_margin must be >= 0, got {self.lease_margin!r}")
        if self.heartbeat_interval * 2 > self.node_ttl - self.lease_margin:
            raise ConfigError(
                "heartbeat_interval must leave room for two heartbeats before the loops "
                f"stop: need 2 * {self.heartbeat_interval} <= node_ttl - lease_margin "
                f"({self.node_ttl} - {self.lease_margin})"
            )

    def __repr__(self) -> str:
        # The dataclass's own, with the Redis URL's password left out (configs get logged).
        values = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "redis_url":
                value = redact_url(value)
            values.append(f"{f.name}={value!r}")
        return f"ManagerConfig({', '.join(values)})"

    def replace(self, **changes: Any) -> ManagerConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(values)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values.update(changes)
        return ManagerConfig(**values)
