"""How late a node's event loop runs: ``coordinator_event_loop_lag_seconds``.

Every step of every join and action waits its turn on the one event loop; how late a
timer runs is how long a step waits, and it grows as a node nears the rate it sustains
(the saturation benchmark records it at each step: BENCHMARKS.md, issue #17). A single
long callback (a blocking agent in the node, a full garbage collection) shows as one
late tick, kept for ``KEPT`` ticks (a second when they are on time). Each tick is also
told to ``observe`` (the histogram ``coordinator_event_loop_delay_seconds``): a scrape
every 15 s sees the gauge's last second only, the histogram every tick.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

EVERY = 0.05  # seconds between ticks
KEPT = 20  # ticks the gauge covers


class LoopLag:
    """``run`` as a task of the node; ``worst()``: the most seconds one of the last
    ``KEPT`` ticks ran late; ``observe``: told how late each tick ran."""

    def __init__(self, observe: Callable[[float], None]) -> None:
        self._late: deque[float] = deque(maxlen=KEPT)
        self._observe = observe

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + EVERY
            await asyncio.sleep(EVERY)
            late = max(0.0, loop.time() - due)
            self._late.append(late)
            self._observe(late)

    def worst(self) -> float:
        return max(self._late, default=0.0)
