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
epoch any of them gave is taken; none, if the master of that epoch is down (a master of
an older one has been replaced: the caller asks again). Right after a failover only its
leader may know of it, so an answer is not taken before every Sentinel answered, or
``GRACE`` after more than half of them did (whatever they said: during a failover none
names a sound master; a refusal, or an answer without the master, is no answer), or
``LATE`` after at least half answered or refused, one at least having answered: one
that hangs holds each connection up that long, not for its timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import redis.sentinel
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.sentinel import MasterNotFoundError

log = logging.getLogger(__name__)

# What a Sentinel that cannot answer raises (redis-py's own list for discovery).
_NO_ANSWER = (RedisConnectionError, ResponseError, RedisTimeoutError, OSError)

# Seconds the other Sentinels are waited for once more than half answered (a Sentinel
# answers in well under a millisecond on a LAN); and, LATE, once at least half either
# answered or refused, one at least having answered (with one down, a minority's
# answer is all there is, but the failover's leader may still be on its way).
GRACE = 0.25
LATE = 1.0

Address = tuple[str, int]


def sound(state: Mapping[str, Any]) -> bool:
    """Whether a Sentinel's view of a master may be used: a master, not flagged down."""
    return bool(state["is_master"] and not state["is_sdown"] and not state["is_odown"])


class Tally:
    """The Sentinels' answers for master ``name``, as they come (see the module's
    docstring). ``min_other_sentinels`` and ``force_master_ip`` of redis-py's Sentinel
    are not applied (the backend sets neither)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._named: Counter[tuple[int, str, int]] = Counter()  # sound: (epoch, host, port)
        self._newest = -1  # the greatest epoch any answer gave, sound or not
        self.answered = 0  # Sentinels that said something of the master
        self.ended = 0  # and those that refused, or said nothing of it

    def add(self, masters: object) -> bool:
        """Count one Sentinel's ``SENTINEL MASTERS`` (as redis-py parses it); whether it
        said anything of the master (one that does not watch it says nothing)."""
        self.ended += 1
        state = masters.get(self.name) if isinstance(masters, Mapping) else None
        if state is None:
            return False
        self.answered += 1
        epoch = int(state.get("config-epoch") or 0)
        self._newest = max(self._newest, epoch)
        if sound(state):
            self._named[(epoch, str(state["ip"]), int(state["port"]))] += 1
        return True

    def refused(self) -> None:
        """Count a Sentinel that did not answer."""
        self.ended += 1

    def wait(self, sentinels: int) -> float | None:
        """How much longer the others of ``sentinels`` are worth waiting for, as heard
        so far: ``GRACE`` once more than half answered, ``LATE`` once at least half
        answered or refused (one answering), else all of them (None)."""
        if self.answered * 2 > sentinels:
            return GRACE
        if self.answered and self.ended * 2 >= sentinels:
            return LATE
        return None

    def best(self) -> Address | None:
        """The master of the newest epoch any Sentinel gave (the most named, if they
        differ); None if none named one, or the newest epoch's master is down."""
        best = self._best()
        if best is None or best[0] < self._newest:
            return None
        return best[1], best[2]

    def disagreement(self) -> str:
        """What the Sentinels named, when they named more than one master ('' when
        not): a failover under way, or Sentinels of two groups listed together."""
        if len(self._named) < 2:
            return ""
        return "; ".join(
            f"{n} named {host}:{port} (epoch {epoch})"
            for (epoch, host, port), n in sorted(self._named.items(), reverse=True)
        )

    def not_found(self, errors: list[str]) -> MasterNotFoundError:
        said = list(errors)
        if self._named and self.best() is None:
            said.insert(0, f"the master of the newest configuration (epoch {self._newest}) is down")
        return MasterNotFoundError(
            f"No master found for {self.name!r}" + (f" : {', '.join(said)}" if said else "")
        )

    def _best(self) -> tuple[int, str, int] | None:
        if not self._named:
            return None
        return max(self._named, key=lambda k: (k[0], self._named[k]))


def _why(sentinel: Any, exc: BaseException) -> str:
    return f"{sentinel} - {exc!r}"


class AskingAll(Sentinel):
    """redis-py's Sentinel (asyncio), every Sentinel asked at once (``Tally``).

    Those not needed for the answer are left to end on their own, within their
    socket timeouts (``aclose`` cancels them). Callers that ask while a question is out
    share its answer: after a failover every pool connection reconnects at once, and
    each would ask every Sentinel."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._asking: set[asyncio.Future[tuple[Any, Any]]] = set()
        self._discovering: dict[str, asyncio.Future[Address]] = {}
        self._disagreement = ""  # said once for as long as it lasts

    async def discover_master(self, service_name: str) -> Address:
        shared = self._discovering.get(service_name)
        if shared is None or shared.done():
            shared = asyncio.ensure_future(self._discover(service_name))
            shared.add_done_callback(_retrieved)  # its callers may all be gone
            self._discovering[service_name] = shared
        return await asyncio.shield(shared)

    async def _discover(self, service_name: str) -> Address:
        tally = Tally(service_name)
        errors: list[str] = []
        pending = {asyncio.ensure_future(_ask(s)) for s in self.sentinels}
        loop = asyncio.get_running_loop()
        until: float | None = None  # once enough were heard (``Tally.wait``)
        try:
            while pending:
                wait = None if until is None else max(0.0, until - loop.time())
                done, pending = await asyncio.wait(
                    pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    break
                for task in done:
                    sentinel, masters = task.result()
                    if isinstance(masters, BaseException):
                        errors.append(_why(sentinel, masters))
                        tally.refused()
                    else:
                        tally.add(masters)
                if (more := tally.wait(len(self.sentinels))) is not None:
                    later = loop.time() + more
                    until = later if until is None else min(until, later)
        finally:
            for task in pending:
                self._asking.add(task)
                task.add_done_callback(self._asking.discard)
        if (said := tally.disagreement()) != self._disagreement:
            self._disagreement = said
            if said:
                log.warning(
                    "Sentinels disagree on master %r: %s; the newest epoch's is taken (a "
                    "failover under way? Sentinels of two groups listed in the URL?)",
                    service_name,
                    said,
                )
        found = tally.best()
        if found is None:
            raise tally.not_found(errors)
        return found

    async def aclose(self) -> None:
        """Cancel the questions still out and close the Sentinels' connections."""
        # A discovery cancelled leaves its questions to ``_asking``: those go second.
        for out in (list(self._discovering.values()), self._asking):
            tasks = list(out)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for sentinel in self.sentinels:
            await sentinel.aclose()


def _retrieved(future: asyncio.Future[Address]) -> None:
    if not future.cancelled():
        future.exception()


async def _ask(sentinel: Any) -> tuple[Any, Any]:
    try:
        return sentinel, await sentinel.sentinel_masters()
    except _NO_ANSWER as exc:
        return sentinel, exc


class KeeperAskingAll(redis.sentinel.Sentinel):
    """redis-py's Sentinel (blocking, for the lease keeper, which asks when it
    reconnects): the Sentinels asked in turn (``Tally``), those that did not answer
    last time last, and not at all once more than half of them answered, or at least
    half answered or refused, one answering (each would
    hold the keeper's renewal up for its timeout, after a failover when it matters
    most; the node's master watch asks every Sentinel, and tells the keeper); unless
    those name no master (a failover, which a silent one may know of first), and then
    each at most once in ``REASK`` seconds."""

    REASK = 2.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._silent: dict[Any, float] = {}  # did not answer: when it was last asked

    def discover_master(self, service_name: str) -> Address:
        tally = Tally(service_name)
        errors: list[str] = []
        silent: dict[Any, float] = {}
        skipped: list[Any] = []

        def ask(sentinel: Any) -> None:
            try:
                tally.add(sentinel.sentinel_masters())
            except _NO_ANSWER as exc:
                errors.append(_why(sentinel, exc))
                tally.refused()
                silent[sentinel] = time.monotonic()

        for sentinel in self.sentinels:
            # Enough heard without it (as the async discovery stops waiting).
            if sentinel in self._silent and tally.wait(len(self.sentinels)) is not None:
                skipped.append(sentinel)
            else:
                ask(sentinel)
        for sentinel in skipped:
            last = self._silent[sentinel]
            if tally.best() is None and time.monotonic() - last >= self.REASK:
                ask(sentinel)  # no master from the others: it may know
            else:
                silent[sentinel] = last  # not asked: silent still, for all we know
        self._silent = silent
        self.sentinels = [s for s in self.sentinels if s not in silent] + list(silent)
        found = tally.best()
        if found is None:
            raise tally.not_found(errors)
        return found
