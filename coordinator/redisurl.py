"""Redis URLs: the schemes a node accepts, Sentinel URLs parsed, a URL pointed at another
address, and passwords taken out of any text that may quote a URL (logs, errors)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from .errors import ConfigError

_SECRET_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/@\s:]*:)[^@\s]*@", re.I)
_SECRET_IN_QUERY = re.compile(r"(?P<head>[?&]\w*password=)[^&\s]*", re.I)


def redact_url(text: str) -> str:
    """``text`` with the password of any URL in it (``scheme://user:PASSWORD@``, or a
    ``password=`` query parameter) replaced by ``***``: for logs and error messages."""
    text = _SECRET_IN_URL.sub(r"\g<head>***@", text)
    return _SECRET_IN_QUERY.sub(r"\g<head>***", text)


URL_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://")
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
REDIS_MODES = ("auto", "standalone", "cluster", "sentinel")


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
    netloc = f"{auth}@{host}:{port}" if auth else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a Sentinel URL (see ``SentinelURL``); ConfigError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis+sentinel", "rediss+sentinel"):
        raise ConfigError("a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://")
    hosts = parts.netloc.rpartition("@")[2]
    sentinels = []
    for item in filter(None, hosts.split(",")):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"redis_url: sentinel address {item!r} is not HOST:PORT")
        sentinels.append((host.strip("[]"), int(port)))
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
