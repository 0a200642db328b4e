"""Where the master is, as the Sentinels say: the newest configuration, not the first.

redis-py asks the Sentinels one after the other and takes the first answer that looks
sound (the master neither down nor flagged). A Sentinel that has not heard of a
failover (cut off from the others, or restarted with its old file) names the old
master, which after its conversion is a replica, and goes on doing so for the
down-after plus 20 s it takes to flag it down: every connection the node made was to a
replica, and every write refused.

Sentinel's own rule settles which answer is right: a failover's configuration carries
a greater epoch (``config-epoch``) than the one it replaces, and a Sentinel adopts the
greatest it hears of. So every Sentinel is asked, and the sound answer in the greatest
epoch taken; as soon as more than half of the Sentinels named the same master in the
greatest epoch heard so far, without waiting for the others, so that one that hangs
does not hold up every connection for its timeout.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from typing import Any

import redis.sentinel
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.sentinel import MasterNotFoundError

# What a Sentinel that cannot answer raises (redis-py's own list for discovery).
_NO_ANSWER = (RedisConnectionError, ResponseError, RedisTimeoutError, OSError)

Address = tuple[str, int]


def sound(state: Mapping[str, Any]) -> bool:
    """Whether a Sentinel's view of a master may be used: a master, not flagged down."""
    return bool(state["is_master"] and not state["is_sdown"] and not state["is_odown"])


class Tally:
    """The Sentinels' answers for master ``name``, as they come (see the module's
    docstring)."""

    def __init__(self, name: str, sentinels: int) -> None:
        self.name = name
        self.sentinels = sentinels
        self._named: Counter[tuple[int, str, int]] = Counter()  # (epoch, host, port)

    def add(self, masters: object) -> Address | None:
        """Count one Sentinel's ``SENTINEL MASTERS`` (as redis-py parses it); the
        master's address once more than half of the Sentinels named it in the newest
        epoch heard of."""
        state = masters.get(self.name) if isinstance(masters, Mapping) else None
        if state is None or not sound(state):
            return None
        epoch = int(state.get("config-epoch") or 0)
        self._named[(epoch, str(state["ip"]), int(state["port"]))] += 1
        best = self._best()
        if best is not None and self._named[best] * 2 > self.sentinels:
            return best[1], best[2]
        return None

    def best(self) -> Address | None:
        """The master in the newest epoch any Sentinel named (the most named among
        those of that epoch); None if none named one."""
        best = self._best()
        return None if best is None else (best[1], best[2])

    def _best(self) -> tuple[int, str, int] | None:
        if not self._named:
            return None
        return max(self._named, key=lambda k: (k[0], self._named[k]))


def _not_found(name: str, errors: list[str]) -> MasterNotFoundError:
    said = f" : {', '.join(errors)}" if errors else ""
    return MasterNotFoundError(f"No master found for {name!r}{said}")


def _why(sentinel: Any, exc: BaseException) -> str:
    return f"{sentinel} - {exc!r}"


class AskingAll(Sentinel):
    """redis-py's Sentinel (asyncio), every Sentinel asked at once (``Tally``).

    Those not needed for the answer are left to end on their own, within their
    socket timeouts. Callers that ask while a question is out share its answer: after
    a failover every pool connection reconnects at once, and each would ask every
    Sentinel."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._asking: set[asyncio.Future[tuple[Any, Any]]] = set()
        self._discovering: dict[str, asyncio.Future[Address]] = {}

    async def discover_master(self, service_name: str) -> Address:
        shared = self._discovering.get(service_name)
        if shared is None or shared.done():
            shared = asyncio.ensure_future(self._discover(service_name))
            shared.add_done_callback(_retrieved)  # its callers may all be gone
            self._discovering[service_name] = shared
        return await asyncio.shield(shared)

    async def _discover(self, service_name: str) -> Address:
        tally = Tally(service_name, len(self.sentinels))
        errors: list[str] = []
        pending = {asyncio.ensure_future(_ask(s)) for s in self.sentinels}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    sentinel, masters = task.result()
                    if isinstance(masters, BaseException):
                        errors.append(_why(sentinel, masters))
                    elif (found := tally.add(masters)) is not None:
                        return found
        finally:
            for task in pending:
                self._asking.add(task)
                task.add_done_callback(self._asking.discard)
        found = tally.best()
        if found is None:
            raise _not_found(service_name, errors)
        return found


def _retrieved(future: asyncio.Future[Address]) -> None:
    if not future.cancelled():
        future.exception()


async def _ask(sentinel: Any) -> tuple[Any, Any]:
    try:
        return sentinel, await sentinel.sentinel_masters()
    except _NO_ANSWER as exc:
        return sentinel, exc


class KeeperAskingAll(redis.sentinel.Sentinel):
    """redis-py's Sentinel (blocking, for the lease keeper): the Sentinels asked in
    turn (``Tally``), those that did not answer moved last."""

    def discover_master(self, service_name: str) -> Address:
        tally = Tally(service_name, len(self.sentinels))
        errors: list[str] = []
        silent: list[Any] = []
        try:
            for sentinel in self.sentinels:
                try:
                    masters = sentinel.sentinel_masters()
                except _NO_ANSWER as exc:
                    errors.append(_why(sentinel, exc))
                    silent.append(sentinel)
                    continue
                if (found := tally.add(masters)) is not None:
                    return found
        finally:
            self.sentinels = [s for s in self.sentinels if s not in silent] + silent
        found = tally.best()
        if found is None:
            raise _not_found(service_name, errors)
        return found
