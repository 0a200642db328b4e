"""Redis URLs: the schemes a node accepts, Sentinel URLs parsed, a URL pointed at another
address, and passwords taken out of any text that may quote a URL (logs, errors)."""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import (
    SplitResult,
    parse_qsl,
    quote,
    unquote,
    urlencode,
    urlsplit,
    urlunsplit,
)

from redis.asyncio.connection import RedisSSLContext, parse_url
from redis.exceptions import RedisError

from .errors import ConfigError
from .redact import redact_url

URL_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://")
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
REDIS_MODES = ("auto", "standalone", "cluster", "sentinel")


def check_redis_url(url: str) -> None:
    """Raise ConfigError, naming ``url`` without its password, unless it is a Redis URL
    redis-py reads as meant: a host (a socket path for ``unix://``), a port 0-65535,
    parameters of the right type, nothing of the userinfo taken for the path. redis-py
    itself connects ``redis://`` to localhost:6379 and fails on the others with a
    ValueError quoting a piece of the URL (of the password, when it holds a ``/``)."""
    if url.startswith(SENTINEL_SCHEMES):
        sentinel = parse_sentinel_url(url)
        # Its other parameters are the data nodes', read by redis-py as a redis:// URL's.
        scheme = "rediss" if sentinel.tls else "redis"
        _check_options(url, f"{scheme}://localhost/0?{urlencode(sentinel.query)}")
        return
    seeds = seed_urls(url)
    if len(seeds) > 1:
        for seed in seeds:
            check_redis_url(seed)
        return
    shown = redact_url(url)
    if not url.startswith(URL_SCHEMES):
        raise ConfigError(
            "redis_url must start with redis://, rediss://, unix:// or redis+sentinel://, "
            f"got {shown!r}"
        )
    parts = _split(url)
    try:
        parts.port  # noqa: B018 (raises ValueError unless a number 0-65535)
    except ValueError:
        raise ConfigError(_unusable(url, "the port is not a number 0-65535")) from None
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(_unusable(url, "no socket path: unix:///PATH/TO/redis.sock"))
    else:
        if not parts.hostname:
            raise ConfigError(_unusable(url, "no host: redis://HOST[:PORT][/DB]"))
        # redis-py reads a path that is not a number as no database at all: DB 0.
        if parts.path not in ("", "/") and not _DB_PATH.fullmatch(parts.path):
            raise ConfigError(
                _unusable(url, "after the host comes /DB, a database number (such as /0)")
            )
    _check_options(url, url)


_DB_PATH = re.compile(r"/[0-9]+")
# Timeouts redis-py takes as given: 0 would fail every call at once, a negative one raises
# deep inside asyncio on the first call.
_POSITIVE = ("socket_timeout", "socket_connect_timeout")


def _check_options(url: str, options_url: str) -> None:
    """ConfigError naming ``url`` redacted unless redis-py reads the parameters of
    ``options_url`` (``url`` itself, or a URL holding a Sentinel URL's parameters) as
    values a connection can use."""
    try:
        options: dict[str, Any] = dict(parse_url(options_url))  # redis-py's reading
        if "ssl_cert_reqs" in options:
            RedisSSLContext(cert_reqs=options["ssl_cert_reqs"])
    except (ValueError, RedisError) as exc:  # these name a parameter, not the password
        raise ConfigError(_unusable(url, str(exc).rstrip("."))) from None
    for name, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(_unusable(url, f"{name} must be a finite number"))
        if name in _POSITIVE and value is not None and value <= 0:
            raise ConfigError(_unusable(url, f"{name} must be more than 0 seconds"))


def database_of(url: str) -> int:
    """The database number ``url`` selects (0 when it names none); Redis Cluster has only
    0. Pub/sub ignores it: ``KeySchema.db`` puts it in the channels' names."""
    if url.startswith(SENTINEL_SCHEMES):
        return parse_sentinel_url(url).db
    if url.startswith(URL_SCHEMES):
        with contextlib.suppress(ValueError, RedisError, ConfigError):
            return int(parse_url(seed_urls(url)[0]).get("db") or 0)
    return 0


def seed_urls(url: str) -> list[str]:
    """The URL of each node a ``redis://[AUTH@]HOST:PORT,HOST:PORT...[/DB][?...]`` URL
    lists (``rediss://`` too): a Redis Cluster's seeds, where its slot map is read first,
    in order; ``[url]`` for a URL of one node. ConfigError when an address of several is
    not HOST:PORT."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("redis", "rediss") or not sep:
        return [url]
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    auth, at, hosts = rest[:end].rpartition("@")
    if "," not in hosts:
        return [url]
    return [
        f"{scheme}://{auth}{at}{_bracketed(host)}:{port}{rest[end:]}"
        for host, port in _addresses(hosts, "cluster node")
    ]


def _addresses(hosts: str, what: str, *, blanks: bool = False) -> list[tuple[str, int]]:
    """``HOST:PORT,HOST:PORT...`` as (host, port) pairs (an IPv6 host unbracketed; with
    ``blanks``, empty items skipped); ConfigError naming ``what`` an address is when one
    is not HOST:PORT with a port 1-65535 in ASCII digits."""
    found = []
    items = [part.strip() for part in hosts.split(",")]
    for item in filter(None, items) if blanks else items:
        host, _, port = item.rpartition(":")
        host = host.strip("[]")
        if (
            not host
            or any(c.isspace() for c in host)
            or not _PORT.fullmatch(port)
            or int(port) > 65535
        ):
            raise ConfigError(f"redis_url: {what} address {item!r} is not HOST:PORT")
        found.append((host, int(port)))
    return found


_PORT = re.compile(r"0*[1-9][0-9]{0,4}")


def address_of(url: str) -> tuple[str, int]:
    """The host and port of a node's redis:// or rediss:// URL (6379 when it names none)."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 6379


def shown_address(url: str) -> str:
    """``HOST:PORT`` of a node's URL, an IPv6 host bracketed: for messages."""
    host, port = address_of(url)
    return f"{_bracketed(host)}:{port}"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _split(url: str) -> SplitResult:
    """``url`` split; ConfigError naming it redacted (urllib's message may quote a piece
    of the password) when it cannot be, or when its userinfo runs past the host."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(_unusable(url, "its host cannot be read")) from None
    rest = url.partition("://")[2]
    netloc_end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    if "@" in rest[netloc_end:]:
        raise ConfigError(
            _unusable(
                url,
                "an '@' after the host: a password holding '/', '?', '#' or '@' must be "
                "percent-encoded (%2F, %3F, %23, %40)",
            )
        )
    return parts


def _unusable(url: str, why: str) -> str:
    return f"redis_url {redact_url(url)} is not a usable Redis URL: {why}"


@dataclass(frozen=True)
class SentinelURL:
    """``redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB][?...]``

    The user and password are the data nodes'; ``sentinel_username`` and
    ``sentinel_password`` query parameters are the Sentinels' (when they have their own);
    ``rediss+sentinel://`` speaks TLS to the data nodes, with redis-py's ``ssl_*``
    parameters, as a ``rediss://`` URL does.
    """

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    username: str
    password: str
    sentinel_username: str
    sentinel_password: str
    tls: bool
    query: tuple[tuple[str, str], ...]  # the other parameters (ssl_*), as given

    def options(self) -> dict[str, Any]:
        """The other parameters as redis-py reads them from a node's URL (``socket_timeout``
        a float, ``ssl_*`` as given): for the connections to the data nodes."""
        if not self.query:
            return {}
        read = dict(parse_url(f"redis://localhost/0?{urlencode(self.query)}"))
        for part in ("host", "port", "db", "username", "password"):
            read.pop(part, None)
        return read

    def node_url(self, host: str, port: int) -> str:
        """A redis:// (or rediss://) URL of one data node, with the credentials and db."""
        auth = ""
        if self.password:
            auth = f"{quote(self.username, safe='')}:{quote(self.password, safe='')}@"
        scheme = "rediss" if self.tls else "redis"
        query = f"?{urlencode(self.query)}" if self.query else ""
        return f"{scheme}://{auth}{host}:{port}/{self.db}{query}"


def with_address(url: str, host: str, port: int) -> str:
    """``url`` (redis:// or rediss://) pointing at ``host:port``, its credentials, database
    and parameters kept."""
    parts = urlsplit(url)
    auth, _, _ = parts.netloc.rpartition("@")
    address = f"{_bracketed(host)}:{port}"
    netloc = f"{auth}@{address}" if auth else address
    return urlunsplit(parts._replace(netloc=netloc))


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a Sentinel URL (see ``SentinelURL``); ConfigError naming what is wrong."""
    parts = _split(url)
    if parts.scheme not in ("redis+sentinel", "rediss+sentinel"):
        raise ConfigError("a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://")
    hosts = parts.netloc.rpartition("@")[2]
    sentinels = _addresses(hosts, "sentinel", blanks=True)  # as before: "h:1,h:2,/m"
    if not sentinels:
        raise ConfigError("redis_url: a Sentinel URL needs at least one HOST:PORT")
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ConfigError(
            "redis_url: a Sentinel URL needs the master's name: "
            "redis+sentinel://HOST:PORT/MASTER_NAME[/DB]"
        )
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError("redis_url: after the hosts comes /MASTER_NAME[/DB]")
    query = parse_qsl(parts.query)
    special = {k: v for k, v in query if k in ("sentinel_username", "sentinel_password")}
    return SentinelURL(
        sentinels=tuple(sentinels),
        master=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        sentinel_username=special.get("sentinel_username", ""),
        sentinel_password=special.get("sentinel_password", ""),
        tls=parts.scheme == "rediss+sentinel",
        query=tuple((k, v) for k, v in query if k not in special),
    )
