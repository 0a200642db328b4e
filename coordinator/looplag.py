"""How late a node's event loop runs: ``coordinator_event_loop_lag_seconds``.

Every step of every join and action waits its turn on the one event loop; how late a
timer runs is how long a step waits, and it grows as a node nears the rate it sustains
(the saturation benchmark records it at each step: BENCHMARKS.md, issue #17). A single
long callback (a blocking agent in the node, a full garbage collection) shows as one
late tick, kept for ``KEPT`` ticks (a second when they are on time).
"""

from __future__ import annotations

import asyncio
from collections import deque

EVERY = 0.05  # seconds between ticks
KEPT = 20  # ticks the gauge covers


class LoopLag:
    """``run`` as a task of the node; ``worst()``: the most seconds one of the last
    ``KEPT`` ticks ran late."""

    def __init__(self) -> None:
        self._late: deque[float] = deque(maxlen=KEPT)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + EVERY
            await asyncio.sleep(EVERY)
            self._late.append(max(0.0, loop.time() - due))

    def worst(self) -> float:
        return max(self._late, default=0.0)
