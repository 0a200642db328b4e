"""How many connections a node holds open, in all and per client address.

Every TCP connection counts against ``max_connections`` from the moment it is accepted,
whatever it then sends (nothing, half a request, a websocket upgrade). It also counts
against its address's ``max_connections_per_address``, unless it comes from a trusted
proxy: then the address is the client the proxy names in X-Forwarded-For, known only once
a request arrives, and each request or websocket session is counted under it
(``admit_forwarded``). New connections are also limited in rate per address
(``connections_per_address``): each handshake a client makes costs the node more than a
refusal. A connection over a limit is refused at once with a reason. IPv6 clients are
counted per /64, which one machine usually has whole.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from typing import Any

from .ratelimit import TokenBucket, retry_after
from .serverconfig import Network, ServerConfig

# Buckets kept before the refilled ones are dropped (each is a few hundred bytes; an
# attacker with many addresses makes this many at most between prunes).
PRUNE_AT = 10_000


def peer_address(transport: Any) -> str:
    """The IP address of a transport's peer ('' for a Unix socket or unknown)."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple | list) and peer and isinstance(peer[0], str):
        return peer[0]
    return ""


def address_key(address: str) -> str:
    """What a client is counted as: its IPv4 address, or its IPv6 address's /64."""
    if ":" not in address:
        return address
    try:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    except ValueError:
        return address


def trusted(address: str, networks: tuple[Network, ...]) -> bool:
    if not address or not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def forwarded_client(peer: str, forwarded_for: str, networks: tuple[Network, ...]) -> str:
    """The client a chain of trusted proxies names: the rightmost X-Forwarded-For entry
    that is not itself a trusted proxy (the peer, if every entry is)."""
    client = peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        client = hop
        if not trusted(hop, networks):
            break
    return client


class ConnectionGuard:
    """The node's open connections, counted per node and per address (no I/O)."""

    def __init__(self, config: ServerConfig) -> None:
        self.max_total = config.max_connections
        self.max_per_address = config.max_connections_per_address
        self.rate = config.connections_per_address
        self.networks = config.networks
        self._buckets: dict[str, TokenBucket] = {}  # address -> its new-connection bucket
        self._open: dict[int, str] = {}  # id(transport) -> address counted ('' = none)
        self._per_address: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # reason -> count, for /metrics

    def __len__(self) -> int:
        return len(self._open)

    def count(self, address: str) -> int:
        return self._per_address[address_key(address)]

    def is_trusted(self, address: str) -> bool:
        return trusted(address, self.networks)

    def admit(self, transport: Any) -> str | None:
        """Count a new TCP connection; the reason to refuse it, or None."""
        if self.max_total and len(self._open) >= self.max_total:
            self.refused["node"] += 1
            return f"this node holds its maximum of {self.max_total} connections; try another"
        address = peer_address(transport)
        if self.is_trusted(address):
            address = ""  # a proxy: its clients are counted per request
        refusal = self._count(address)
        if refusal is None:
            self._open[id(transport)] = address
        return refusal

    def release(self, transport: Any) -> None:
        """A connection closed (idempotent)."""
        address = self._open.pop(id(transport), None)
        if address:
            self._uncount(address)

    def admit_forwarded(self, address: str) -> str | None:
        """Count a request or websocket session a trusted proxy forwarded for ``address``;
        the reason to refuse it, or None (then ``release_forwarded`` when it ends)."""
        return self._count(address)

    def release_forwarded(self, address: str) -> None:
        self._uncount(address)

    def admit_session(self, address: str) -> str | None:
        """A new engine.io session (a polling handshake) over a connection ``address``
        holds already: counted against the address's rate of new connections, which
        sessions opened over one keep-alive connection escaped (2,460 a second); the
        reason to refuse it, or None."""
        if not address or self.is_trusted(address):
            return None
        return self._too_fast(address, address_key(address))

    def _count(self, address: str) -> str | None:
        if not address:
            return None
        key = address_key(address)
        if self.max_per_address and self._per_address[key] >= self.max_per_address:
            self.refused["address"] += 1
            return (
                f"too many connections from {address} (at most {self.max_per_address} per address)"
            )
        refusal = self._too_fast(address, key)
        if refusal is None:
            self._per_address[key] += 1
        return refusal

    def _too_fast(self, address: str, key: str) -> str | None:
        if self.rate.unlimited:
            return None
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= PRUNE_AT:
                self._prune(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, now)
        wait = bucket.take(now)
        if wait <= 0:
            return None
        self.refused["rate"] += 1
        return (
            f"too many new connections from {address} (limit {self.rate}); "
            f"retry in {retry_after(wait):g}s"
        )

    def _uncount(self, address: str) -> None:
        key = address_key(address)
        left = self._per_address[key] - 1
        if left > 0:
            self._per_address[key] = left
        else:
            del self._per_address[key]

    def _prune(self, now: float) -> None:
        """Forget the buckets that refilled: they hold nothing a new one would not."""
        for key in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[key]
