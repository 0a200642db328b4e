"""The exception tree: everything the coordinator raises on purpose derives from
CoordinatorError; what reaching Redis raises (redis-py's errors, the socket's) is
passed on as it is, and ``EXPECTED`` names both kinds (README, "Using it")."""

from __future__ import annotations

from redis.exceptions import (
    AskError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Whatever reaching Redis can raise: redis-py's errors, its cluster client's that are not
# RedisErrors (RedisClusterException, SlotNotCoveredError), and the socket's.
REDIS_TROUBLE: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)
# Of those, the ones worth retrying: the link or the cluster's topology, not the request
# (a command Redis refused would fail the same way again).
REDIS_TRANSIENT: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    RedisClusterException,
    OSError,
)


class CoordinatorError(Exception):
    """Root of every error the coordinator raises on purpose."""


class ConfigError(CoordinatorError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class InvalidInput(CoordinatorError, ValueError):
    """A caller passed a malformed id, action or payload; nothing was changed."""


class RedisUnavailable(CoordinatorError, ConnectionError):
    """Redis could not be reached (at start-up, or for longer than a call may wait)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"Redis at {url} is unreachable: {reason}")
        self.url = url


class RedisRefused(RedisUnavailable):
    """Redis answered, refusing the node: its login (a password missing or wrong) or a
    command its ACL user lacks. No retry mends it; the message says which."""

    def __init__(self, url: str, what: str) -> None:
        CoordinatorError.__init__(self, f"Redis at {url} refused {what}")
        self.url = url


class ConversationClosed(CoordinatorError):
    """The conversation was closed (or its loop evicted) while a connection joined it:
    the connection was told why and is not kept."""

    def __init__(self, sid: str, what: str = "was closed while joining; join again") -> None:
        super().__init__(f"conversation {sid!r} {what}")


class ConversationPurging(ConversationClosed):
    """A purge of the conversation is under way: no node takes it until the purge has
    deleted it everywhere; then the same id may be created again."""

    def __init__(self, sid: str) -> None:
        super().__init__(sid, "is being purged; try again once it is gone")


class ConversationNotFound(CoordinatorError, LookupError):
    """No conversation with that id exists."""

    def __init__(self, sid: str) -> None:
        super().__init__(f"no such conversation: {sid!r}")
        self.sid = sid


class ConnectionNotFound(CoordinatorError, LookupError):
    """The connection id is not joined to any conversation."""

    def __init__(self, connection_id: str) -> None:
        super().__init__(f"connection {connection_id!r} is not joined to a conversation")
        self.connection_id = connection_id


class Forbidden(CoordinatorError, PermissionError):
    """The caller's user does not own the conversation."""

    def __init__(self, sid: str) -> None:
        super().__init__(f"conversation {sid!r} belongs to another user")
        self.sid = sid


class Fenced(CoordinatorError):
    """This node's ownership of a conversation was taken over; its write was rejected."""

    def __init__(self, sid: str, epoch: int, current: int) -> None:
        super().__init__(f"write to {sid!r} with epoch {epoch} rejected (current epoch {current})")
        self.sid = sid
        self.epoch = epoch
        self.current = current


class SpeculationLost(CoordinatorError):
    """An action dispatched before its accept answered was not logged as the next one
    (another node's action came first, or the accept failed): the events answering it
    are discarded, and the loop gets a fresh agent that sees the actions in log order."""

    def __init__(self, sid: str, predicted: int) -> None:
        super().__init__(f"action {predicted} of {sid!r} was not logged as predicted")
        self.sid = sid
        self.predicted = predicted


class NotReplicated(CoordinatorError):
    """A write was made on the Redis master, but fewer replicas than ``--ack-replicas``
    confirmed it within ``--ack-timeout``: a failover now could lose it."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"{reason}; not acknowledged (sending it again with the same client_action_id is safe)"
        )


class UnreplicatedRead(NotReplicated):
    """A read of the log found events fewer replicas than ``--ack-replicas`` hold yet: a
    failover could still undo them, so they are shown to no one until replicas do."""

    def __init__(self, reason: str) -> None:
        CoordinatorError.__init__(self, f"{reason}; shown to no one until they do, try again")


class InboxFull(CoordinatorError):
    """The conversation's action inbox holds too many unprocessed actions."""


class StoreBehind(CoordinatorError):
    """The event store lags: the conversation's events it does not hold yet fill the
    Redis window (``--log-window-events``, ``--log-window-bytes``); nothing was done."""


class CapacityTimeout(CoordinatorError, TimeoutError):
    """A start waited too long for an evicted conversation to release its cap slot."""


class NodeDraining(CoordinatorError):
    """This node is shutting down and takes no new loops or connections."""


class NodeIdInUse(CoordinatorError):
    """Another live process holds this node id's lease (two nodes started with one id)."""


class NodeStopped(NodeDraining):
    """The manager is not running: not started yet, or stopped (``async with``)."""


class NodeBusy(CoordinatorError):
    """This node has ``max_concurrent_joins`` joins in progress and more waited too long."""


class LimitExceeded(CoordinatorError):
    """A client went over one of its limits (a rate or a quota); nothing was done.

    ``limit`` names it (e.g. ``actions per connection``); ``retry_after`` is the number
    of seconds until trying again can succeed (None: not before something is released,
    such as one of the user's connections)."""

    def __init__(self, limit: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after


def too_many_connections(user: str, cap: int) -> LimitExceeded:
    """``max_connections_per_user`` reached: checked as a connection registers, and before
    a start its join asked for (``scripts.ADMIT``)."""
    return LimitExceeded(
        "connections per user",
        f"too many connections: user {user!r} has {cap} open (the limit); "
        "close one to open another",
    )


def beyond_last_event(latest: int, last: int, sid: str) -> InvalidInput:
    """A join's ``latest_event_id`` past the conversation's last event: checked in its
    first read, and before a start it would ask for (``scripts.ACQUIRE``)."""
    return InvalidInput(
        f"latest_event_id {latest} is beyond the last event ({last}) of conversation {sid!r}"
    )


class ConcurrencyLimitReached(LimitExceeded):
    """A start refused by a cap on running loops (``--cap-policy reject``, or an
    organisation's cap): ``limit`` places, ``current`` taken. Clients get ``details``
    (REST 429 body, socket.io connect error data or ack)."""

    CODE = "CONCURRENCY_LIMIT_REACHED"

    def __init__(self, scope: str, who: str, limit: int, current: int) -> None:
        super().__init__(
            f"concurrent conversations per {scope}",
            f"{scope} {who!r} has {current} conversations running, the limit is {limit}; "
            "close one to start another",
        )
        self.cap = limit
        self.current = current

    def details(self) -> dict[str, object]:
        return {
            "error": self.CODE,
            "message": str(self),
            "limit": self.cap,
            "current": self.current,
        }


class AgentFailed(CoordinatorError):
    """An agent running in a worker process failed: it raised (the message names the
    exception), or its worker stalled or died while it worked. ``what``: for its
    clients, what failed (the exception's class when it raised)."""

    def __init__(self, message: str, what: str = "") -> None:
        super().__init__(message)
        self.what = what or "an error"


# What a client is told when Redis is away (a timeout, a lost connection, a failover).
REDIS_AWAY = "the coordinator cannot reach Redis right now; try again"

# What Redis says when it refuses a write at its maxmemory, after its ``OOM`` code.
_FULL = "command not allowed when used memory > 'maxmemory'"


def redis_full(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a write at its ``maxmemory`` (policy
    ``noeviction``): nothing was written.

    It comes in three forms: ``OOM command not allowed ...`` as Redis sent it (the
    lane's replies, a script's error), redis-py's OutOfMemoryError with the ``OOM``
    code taken off, and that error rewritten by a redis-py pipeline as ``Command # 1
    (ZADD ...) of pipeline caused error: command not allowed ...``."""
    if isinstance(exc, OutOfMemoryError):
        return True
    return isinstance(exc, ResponseError) and (str(exc).startswith("OOM") or _FULL in str(exc))


# Redis' refusals that are about the moment, not the command: a failover (READONLY,
# MASTERDOWN, NOREPLICAS), a load or a long script (LOADING, BUSY), the cluster moving
# slots (MOVED, ASK, TRYAGAIN, CLUSTERDOWN), a script cache flushed (NOSCRIPT). redis-py
# raises the codes it knows as their classes, without the code; the lane keeps the text.
_PASSING_CLASSES = (
    ReadOnlyError,
    MasterDownError,
    TryAgainError,
    ClusterDownError,
    MovedError,
    AskError,
    NoScriptError,
)
_PASSING_CODES = tuple(
    f"{code} "
    for code in (
        "READONLY",
        "MASTERDOWN",
        "NOREPLICAS",
        "LOADING",
        "BUSY",
        "MOVED",
        "ASK",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "NOSCRIPT",
    )
)


def redis_refused(exc: BaseException) -> bool:
    """Whether Redis answered ``exc``'s command with an error about the command itself:
    a permission the coordinator's ACL user lacks (NOPERM), a key of another type (another
    application's key under the coordinator's prefix: WRONGTYPE), an unknown command.
    Trying again fails the same way, so it is a server error an operator must see, not
    "cannot reach Redis"; Redis being full (``redis_full``) and the refusals of a failover
    or a resharding, which pass, are not."""
    if not isinstance(exc, ResponseError) or redis_full(exc):
        return False
    if isinstance(exc, _PASSING_CLASSES):
        return False
    # A pipeline's error names its command first: "Command # 1 (...) of pipeline caused
    # error: WRONGTYPE ...".
    reply = str(exc).rpartition("caused error: ")[2]
    return not reply.startswith(_PASSING_CODES)


def redis_glitch(exc: BaseException) -> bool:
    """Whether ``exc`` is an AttributeError or RuntimeError raised inside redis-py: its
    connections raise those when used in the middle of a reconnect (a connection whose
    writer is gone: ``'NoneType' object has no attribute 'writelines'``), which happens
    while a master fails over. They mean what a ConnectionError means."""
    if not isinstance(exc, AttributeError | RuntimeError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return isinstance(module, str) and module.startswith("redis.")


# The errors the coordinator expects while serving: its own and Redis trouble.
EXPECTED: tuple[type[Exception], ...] = (CoordinatorError, *REDIS_TROUBLE)


def unexpected(exc: BaseException) -> bool:
    """Whether a request's error is worth a stack trace in the log: neither one of the
    coordinator's own nor Redis away, or Redis refusing a command (``redis_refused``)."""
    return not isinstance(exc, EXPECTED) or redis_refused(exc)
