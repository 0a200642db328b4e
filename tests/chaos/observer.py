"""Watching the cluster throughout a scenario.

Every ``NODE_POLL`` seconds the observer asks every node for its own loops
(``GET /api/node``; the handler enforces the node's lease clock before it answers) and
records a round: no conversation may appear on two nodes in one round, and no user may
have more loops than the cap. A paused or dead node does not answer; that is fine.
Every ``OWNER_POLL`` seconds it also reads each conversation's owner incarnation and epoch
from Redis directly, to time when a lost node's conversations are released.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
from redis.exceptions import RedisError

from coordinator.tasks import cancel_and_wait
from tests.chaos.cluster import CAP, ChaosCluster

NODE_POLL = 0.1
OWNER_POLL = 0.05
ASK_TIMEOUT = 0.5


@dataclass(frozen=True)
class Round:
    at: float
    loops: dict[str, list[str]]  # node id -> its loops, for the nodes that answered


@dataclass(frozen=True)
class OwnerSample:
    at: float
    inc: dict[str, str]  # sid -> owner incarnation ('' = not running)
    epoch: dict[str, int]


@dataclass
class Observer:
    cluster: ChaosCluster
    user_of: dict[str, str]
    cap: int = CAP
    rounds: list[Round] = field(default_factory=list)
    owners: list[OwnerSample] = field(default_factory=list)
    double_loops: list[str] = field(default_factory=list)
    over_cap: list[str] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _http: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT))
        self._tasks = [
            asyncio.create_task(self._poll_nodes(), name="observe-nodes"),
            asyncio.create_task(self._poll_owners(), name="observe-owners"),
        ]

    async def aclose(self) -> None:
        # Repeatedly: a cancellation that lands in a redis-py call can be lost (tasks.py).
        stuck = await cancel_and_wait(self._tasks, within=5)
        assert not stuck, f"observer tasks did not stop: {stuck}"
        if self._http is not None:
            await self._http.close()

    # -- loops per node --------------------------------------------------------------
    async def _poll_nodes(self) -> None:
        while True:
            at = time.time()
            answers = await asyncio.gather(
                *(self._ask(i) for i in range(self.cluster.size) if self.cluster.nodes[i].alive)
            )
            self._check(Round(at, {node: loops for node, loops in answers if node}))
            await asyncio.sleep(NODE_POLL)

    async def _ask(self, i: int) -> tuple[str, list[str]]:
        assert self._http is not None
        headers = {"Authorization": f"Bearer {self.cluster.tokens['observer']}"}
        try:
            async with self._http.get(f"{self.cluster.url(i)}/api/node", headers=headers) as resp:
                if resp.status != 200:
                    return "", []
                body = await resp.json()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return "", []  # dead, paused or stopping
        return str(body["node_id"]), [str(sid) for sid in body["loops"]]

    def _check(self, round_: Round) -> None:
        self.rounds.append(round_)
        where: dict[str, str] = {}
        for node, loops in round_.loops.items():
            for sid in loops:
                if sid in where:
                    self.double_loops.append(
                        f"{sid} ran on {where[sid]} and {node} in the round at {round_.at:.3f}"
                    )
                where[sid] = node
        per_user = Counter(self.user_of.get(sid, "?") for sid in where)
        for user, n in per_user.items():
            if n > self.cap:
                loops = sorted(s for s in where if self.user_of.get(s) == user)
                self.over_cap.append(
                    f"{user} had {n} loops (cap {self.cap}) at {round_.at:.3f}: {loops}"
                )

    # -- owners in Redis -------------------------------------------------------------
    async def _poll_owners(self) -> None:
        sids = sorted(self.user_of)
        keys = self.cluster.keys
        while True:
            at = time.time()
            try:
                async with self.cluster.direct.pipeline(transaction=False) as pipe:
                    for sid in sids:
                        pipe.hmget(keys.conv(sid), "inc", "epoch")
                    rows = await pipe.execute()
            except (RedisError, OSError):
                rows = None  # Redis is restarting
            if rows is not None:
                self.owners.append(
                    OwnerSample(
                        at,
                        {sid: (r[0] or b"").decode() for sid, r in zip(sids, rows, strict=True)},
                        {sid: int(r[1] or 0) for sid, r in zip(sids, rows, strict=True)},
                    )
                )
            await asyncio.sleep(OWNER_POLL)

    def owned_by(self, inc: str, before: float) -> list[str]:
        """Conversations whose owner was ``inc`` in the last sample taken before ``before``."""
        samples = [s for s in self.owners if s.at < before]
        if not samples:
            return []
        return sorted(sid for sid, owner in samples[-1].inc.items() if owner == inc)

    def released_at(self, sid: str, inc: str, after: float) -> float | None:
        """When ``sid`` was first seen no longer owned by ``inc`` after ``after``."""
        for sample in self.owners:
            if sample.at > after and sample.inc.get(sid) != inc:
                return sample.at
        return None
